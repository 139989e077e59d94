"""The service on the real detector (R-50-grid, random init, small inputs) over real HTTP.

The reference is ``gridfeats extract`` itself: the same images are extracted into feature stores
with the same config and options, and every answer must hold exactly the stored numbers, for
single requests, for 64 concurrent clients whose images were batched together, and for the
pooled-grid, Detectron2-region and bottom-up-region variants.
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from gridfeats.data.synthetic import make_synthetic
from gridfeats.data.vocab import write_vocab
from gridfeats.extract.job import ExtractOptions, run_extraction
from gridfeats.features import BottomUpSettings
from gridfeats.store import FeatureStore
from service.backend import DetectorBackend
from service.settings import ServiceSettings
from tests.service.helpers import ServerThread, metric_value

CONFIG = "R-50-grid"
# Small inputs keep a CPU forward at tens of milliseconds; a zero score threshold makes the random
# model return boxes, and few proposals keep its per-class NMS cheap.
OPTS = (
    "INPUT.MIN_SIZE_TEST",
    "96",
    "INPUT.MAX_SIZE_TEST",
    "160",
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST",
    "0.0",
    "TEST.DETECTIONS_PER_IMAGE",
    "12",
    "MODEL.RPN.POST_NMS_TOPK_TEST",
    "20",
)
NUM_IMAGES = 8
REGION_IMAGES = 2  # region extraction is the slow part: a few images show the parity


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
def extracted(synthetic, tmp_path_factory):
    """Feature stores written by the extraction job on the same images, config and options."""
    images, _ = synthetic
    out = tmp_path_factory.mktemp("stores")
    region_list = out / "region_images.txt"
    region_list.write_text("".join(f"{p}\n" for p in images[2 : 2 + REGION_IMAGES]))
    runs = {
        "grid": dict(input=str(images[0].parent), mode="grid"),
        "grid_2x2": dict(input=str(images[0].parent), mode="grid", grid_pool=(2, 2)),
        "detectron2": dict(input=str(region_list), mode="region", attr_topk=3),
        "bottom_up": dict(
            input=str(region_list),
            mode="region",
            regions="bottom-up",
            attr_topk=2,
            bottom_up=BottomUpSettings(score_thresh=0.2, min_boxes=4, max_boxes=6),
        ),
    }
    stores = {}
    for name, options in runs.items():
        path = out / f"{name}.h5"
        run_extraction(
            ExtractOptions(
                output=str(path),
                config=CONFIG,
                opts=list(OPTS),
                dtype="float32",
                workers=0,
                progress=False,
                **options,
            ),
            log=io.StringIO(),
        )
        stores[name] = FeatureStore(str(path))
    return stores


@pytest.fixture(scope="module")
def server(synthetic):
    _, vocab_dir = synthetic
    settings = ServiceSettings(
        config=CONFIG,
        opts=OPTS,
        max_batch=8,
        max_wait_ms=10,
        max_queue=128,
        objects_vocab=str(vocab_dir / "objects_vocab.txt"),
        attributes_vocab=str(vocab_dir / "attributes_vocab.txt"),
    )
    with ServerThread(settings, lambda: DetectorBackend.from_settings(settings)) as srv:
        yield srv


def _content_type(path: Path) -> str:
    return "image/png" if path.suffix == ".png" else "image/jpeg"


def _post(
    srv: ServerThread, path: Path, query: str = "", accept: str = "application/x-npy"
) -> httpx.Response:
    return httpx.post(
        f"{srv.url}/v1/features{query}",
        content=path.read_bytes(),
        timeout=120,
        headers={"content-type": _content_type(path), "accept": accept},
    )


def _npz(response: httpx.Response):
    assert response.status_code == 200, response.text
    return np.load(io.BytesIO(response.content))


def test_model_info_describes_the_detector(server):
    info = httpx.get(server.url + "/v1/model").json()
    assert info["config"] == CONFIG and info["random_init"] is True and info["weights_sha256"] == ""
    assert info["feature_dims"] == {"grid": 2048, "region": 1024}
    assert (info["num_classes"], info["num_attributes"]) == (1600, 400)
    assert (info["input_min_size"], info["input_max_size"]) == (96, 160)
    assert info["vocabulary"] is True


def test_grid_answers_equal_the_extracted_store(server, extracted, synthetic):
    images, _ = synthetic
    store = extracted["grid"]
    for path in images[:4]:
        served = _npz(_post(server, path, accept="application/x-npz"))
        stored = store[path.name]
        np.testing.assert_array_equal(served["0/features"], stored["features"])
        for field in ("grid_hw", "image_hw", "input_hw"):
            assert served[f"0/{field}"].tolist() == stored[field].tolist()


def test_pooled_grid_answers_equal_extract_grid_pool(server, extracted, synthetic):
    images, _ = synthetic
    for path in images[4:6]:
        served = _npz(_post(server, path, "?grid_pool=2x2", accept="application/x-npz"))
        np.testing.assert_array_equal(
            served["0/features"], extracted["grid_2x2"][path.name]["features"]
        )


@pytest.mark.parametrize(
    "store_name,query",
    [
        ("detectron2", "?mode=region&attr_topk=3"),
        (
            "bottom_up",
            "?mode=region&regions=bottom-up&bottom_up_thresh=0.2&min_boxes=4&max_boxes=6&attr_topk=2",
        ),
    ],
)
def test_region_answers_equal_the_extracted_store(server, extracted, synthetic, store_name, query):
    images, _ = synthetic
    for path in images[2 : 2 + REGION_IMAGES]:
        served = _npz(_post(server, path, query, accept="application/x-npz"))
        stored = extracted[store_name][str(path)]
        assert len(stored["scores"]) > 0
        for field in ("features", "boxes", "scores", "classes", "attr_ids", "attr_scores"):
            np.testing.assert_array_equal(served[f"0/{field}"], stored[field], err_msg=field)


def test_region_json_has_vocabulary_names(server, synthetic):
    images, _ = synthetic
    image = _post(server, images[3], "?mode=region&attr_topk=2", accept="application/json").json()[
        "images"
    ][0]
    assert image["shape"][1] == 1024 and len(image["boxes"]) == image["shape"][0] > 0
    assert image["class_names"] == [f"object{c}" for c in image["classes"]]
    assert image["attr_names"] == [[f"attribute{a}" for a in row] for row in image["attr_ids"]]


def test_64_concurrent_clients_get_the_extracted_numbers_from_shared_batches(
    server, extracted, synthetic
):
    images, _ = synthetic
    store = extracted["grid"]
    before = httpx.get(server.url + "/metrics").text
    batches_before = metric_value(before, "gridfeats_batch_size_count")
    images_before = metric_value(before, "gridfeats_batch_size_sum")
    jobs = [images[i % len(images)] for i in range(64)]
    with ThreadPoolExecutor(64) as pool:
        responses = list(pool.map(lambda p: _post(server, p), jobs))
    for path, response in zip(jobs, responses):
        assert response.status_code == 200, response.text
        # Batched with others, yet bit-identical to the one-by-one extraction.
        np.testing.assert_array_equal(
            np.load(io.BytesIO(response.content)), store[path.name]["features"]
        )
    after = httpx.get(server.url + "/metrics").text
    batches = metric_value(after, "gridfeats_batch_size_count") - batches_before
    assert metric_value(after, "gridfeats_batch_size_sum") - images_before == 64
    assert batches < 64 / 2, f"{batches} batches for 64 concurrent images: batching did not happen"


def test_one_multipart_request_with_several_images(server, extracted, synthetic):
    images, _ = synthetic
    chosen = images[5:8]
    files = [("images", (p.name, p.read_bytes(), _content_type(p))) for p in chosen]
    served = _npz(
        httpx.post(
            server.url + "/v1/features",
            files=files,
            timeout=120,
            headers={"accept": "application/x-npz"},
        )
    )
    for index, path in enumerate(chosen):
        np.testing.assert_array_equal(
            served[f"{index}/features"], extracted["grid"][path.name]["features"]
        )
