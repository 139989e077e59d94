"""The service on the real detector (R-50-grid, random init, small inputs) over real HTTP.

The reference is the offline path: ``Detector.extract_grid`` / ``Detector.detect`` on the image
*files* (what ``gridfeats extract`` calls), so these tests show that bytes sent to the service give
the extraction's numbers, alone and when 64 concurrent clients are batched together.
"""
from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from gridfeats.api import Detector
from gridfeats.config import get_cfg
from gridfeats.data.synthetic import make_synthetic
from gridfeats.data.vocab import write_vocab
from gridfeats.store.records import grid_map_to_rows
from service.backend import DetectorBackend
from service.results import top_attributes
from service.settings import ServiceSettings
from tests.test_service_support import ServerThread, metric_value

CONFIG = "R-50-grid"
# Small inputs keep a CPU forward at tens of milliseconds; a zero score threshold makes the random
# model return boxes so that region answers have content.
OPTS = ("INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "160",
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "TEST.DETECTIONS_PER_IMAGE", "12",
        "MODEL.RPN.POST_NMS_TOPK_TEST", "20")
NUM_IMAGES = 8
# Batched forwards may sum in another order than single ones (BLAS blocking): allow float noise.
BATCH_RTOL, BATCH_ATOL = 1e-4, 1e-4


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic(root, NUM_IMAGES, seed=3)
    images = sorted((root / "images").iterdir())
    assert {p.suffix for p in images} == {".jpg", ".png"}
    vocab_dir = tmp_path_factory.mktemp("vocab")
    write_vocab(vocab_dir / "objects_vocab.txt", [[f"object{i}"] for i in range(1600)])
    write_vocab(vocab_dir / "attributes_vocab.txt", [[f"attribute{i}"] for i in range(400)])
    return images, vocab_dir


@pytest.fixture(scope="module")
def reference():
    """The offline detector: same config, same seeded initialisation as the server's."""
    return Detector(get_cfg(CONFIG, list(OPTS)))


@pytest.fixture(scope="module")
def server(synthetic):
    _, vocab_dir = synthetic
    settings = ServiceSettings(config=CONFIG, opts=OPTS, max_batch=8, max_wait_ms=10, max_queue=128,
                               objects_vocab=str(vocab_dir / "objects_vocab.txt"),
                               attributes_vocab=str(vocab_dir / "attributes_vocab.txt"))
    with ServerThread(settings, lambda: DetectorBackend.from_settings(settings)) as srv:
        yield srv


def _content_type(path: Path) -> str:
    return "image/png" if path.suffix == ".png" else "image/jpeg"


def _post(srv: ServerThread, path: Path, query: str = "", accept: str = "application/x-npy") -> httpx.Response:
    return httpx.post(f"{srv.url}/v1/features{query}", content=path.read_bytes(), timeout=120,
                      headers={"content-type": _content_type(path), "accept": accept})


def test_model_info_describes_the_detector(server):
    info = httpx.get(server.url + "/v1/model").json()
    assert info["config"] == CONFIG and info["random_init"] is True and info["weights_sha256"] == ""
    assert info["feature_dims"] == {"grid": 2048, "region": 1024}
    assert (info["num_classes"], info["num_attributes"]) == (1600, 400)
    assert (info["input_min_size"], info["input_max_size"]) == (96, 160)
    assert info["vocabulary"] is True


def test_grid_features_equal_offline_extraction(server, reference, synthetic):
    images, _ = synthetic
    for path in images[:4]:
        response = _post(server, path)
        assert response.status_code == 200, response.text
        served = np.load(io.BytesIO(response.content))
        expected = grid_map_to_rows(reference.extract_grid(str(path)))
        np.testing.assert_array_equal(served, expected)


def test_region_answer_equals_offline_detection(server, reference, synthetic):
    images, _ = synthetic
    path = images[3]  # a PNG in the synthetic layout
    response = _post(server, path, "?mode=region&attr_topk=3", accept="application/x-npz")
    assert response.status_code == 200, response.text
    served = np.load(io.BytesIO(response.content))
    expected = reference.detect(str(path))
    assert len(expected["scores"]) > 0
    for field in ("boxes", "scores", "features"):
        np.testing.assert_array_equal(served[f"0/{field}"], expected[field].numpy())
    np.testing.assert_array_equal(served["0/classes"], expected["classes"].numpy())
    ids, probs = top_attributes(expected["attr_scores"].numpy(), 3, len(expected["scores"]))
    np.testing.assert_array_equal(served["0/attr_ids"], ids)
    np.testing.assert_array_equal(served["0/attr_scores"], probs)

    as_json = _post(server, path, "?mode=region&attr_topk=2&max_regions=4", accept="application/json").json()
    image = as_json["images"][0]
    assert image["shape"] == [4, 1024]
    assert image["class_names"] == [f"object{c}" for c in image["classes"]]
    assert image["attr_names"] == [[f"attribute{a}" for a in row] for row in image["attr_ids"]]
    assert image["image_hw"] == list(served["0/image_hw"])


def test_64_concurrent_clients_get_correct_features_from_shared_batches(server, reference, synthetic):
    images, _ = synthetic
    expected = {path: grid_map_to_rows(reference.extract_grid(str(path))) for path in images}
    before = httpx.get(server.url + "/metrics").text
    batches_before = metric_value(before, "gridfeats_batch_size_count")
    images_before = metric_value(before, "gridfeats_batch_size_sum")
    jobs = [images[i % len(images)] for i in range(64)]
    with ThreadPoolExecutor(64) as pool:
        responses = list(pool.map(lambda p: _post(server, p), jobs))
    for path, response in zip(jobs, responses):
        assert response.status_code == 200, response.text
        np.testing.assert_allclose(np.load(io.BytesIO(response.content)), expected[path],
                                   rtol=BATCH_RTOL, atol=BATCH_ATOL)
    after = httpx.get(server.url + "/metrics").text
    batches = metric_value(after, "gridfeats_batch_size_count") - batches_before
    assert metric_value(after, "gridfeats_batch_size_sum") - images_before == 64
    assert batches < 64 / 2, f"{batches} forwards for 64 concurrent images: batching did not happen"


def test_one_multipart_request_with_several_images(server, reference, synthetic):
    images, _ = synthetic
    chosen = images[4:7]
    files = [("images", (p.name, p.read_bytes(), _content_type(p))) for p in chosen]
    response = httpx.post(server.url + "/v1/features?pool=avg&pool_size=2", files=files, timeout=120,
                          headers={"accept": "application/x-npz"})
    assert response.status_code == 200, response.text
    served = np.load(io.BytesIO(response.content))
    for index, path in enumerate(chosen):
        fmap = reference.extract_grid(str(path)).numpy()
        h, w = fmap.shape[1:]
        assert served[f"{index}/grid_hw"].tolist() == [min(2, h), min(2, w)]
        assert served[f"{index}/features"].shape == (min(2, h) * min(2, w), 2048)
