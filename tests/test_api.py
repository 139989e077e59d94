"""The public ``Detector`` API on R-50-grid with small test sizes (random weights).

``INPUT.MIN_SIZE_TEST 64 / MAX_SIZE_TEST 96`` keeps forwards cheap; ``SCORE_THRESH_TEST 0.0`` makes
random weights produce detections (their softmax scores are ~1/1601, below the default 0.05).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import gridfeats.precision as precision
from gridfeats.api import Detector
from gridfeats.checkpoint import CheckpointError
from gridfeats.config import get_cfg
from gridfeats.data.image_io import ImageReadError
from gridfeats.precision import PrecisionError

SMALL = [
    "INPUT.MIN_SIZE_TEST",
    "64",
    "INPUT.MAX_SIZE_TEST",
    "96",
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST",
    "0.0",
]


@pytest.fixture(autouse=True)
def _one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def cfg():
    return get_cfg("R-50-grid", opts=SMALL)


@pytest.fixture(scope="module")
def detector(cfg):
    return Detector(cfg, seed=0)


def _image(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth image with some structure (random noise gives degenerate, all-alike detections)."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:h, 0:w]
    img = np.stack(
        [(ys * 255 // max(h - 1, 1)), (xs * 255 // max(w - 1, 1)), np.full((h, w), 128)], axis=2
    )
    img[h // 4 : h // 2, w // 3 : 2 * w // 3] = rng.integers(0, 256, 3)
    return img.astype(np.uint8)


def _assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_random_init_is_deterministic_per_seed_and_leaves_global_rng_alone(cfg, detector):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    again = Detector(cfg, seed=0)
    assert torch.equal(torch.rand(3), expected_next)
    other = Detector(cfg, seed=1)
    assert detector.random_init and detector.load_report is None
    same = detector.model.state_dict()
    for key, value in again.model.state_dict().items():
        assert torch.equal(value, same[key]), key
    key = "roi_heads.box_predictor.cls_score.weight"
    assert not torch.equal(other.model.state_dict()[key], same[key])
    img = _image(60, 90, 0)
    _assert_same(again.detect(img), detector.detect(img))


def test_grid_output_shape_and_dtype(detector):
    grid = detector.extract_grid(_image(60, 90, 1))  # resized to 64 x 96: stride 32 -> 2 x 3
    assert isinstance(grid, torch.Tensor)
    assert grid.dtype == torch.float32 and grid.device.type == "cpu"
    assert grid.shape == (2048, 2, 3)
    assert detector.grid_dim == 2048 and detector.region_dim == 1024
    assert torch.isfinite(grid).all() and (grid >= 0).all()  # post-ReLU C5 map


def test_detect_output_shapes_dtypes_and_order(detector):
    out = detector.detect(_image(60, 90, 2))
    assert set(out) == {"boxes", "scores", "classes", "features", "attr_scores"}
    k = len(out["scores"])
    assert 0 < k <= 100  # TEST.DETECTIONS_PER_IMAGE
    assert out["boxes"].shape == (k, 4) and out["boxes"].dtype == torch.float32
    assert out["scores"].dtype == torch.float32
    assert out["classes"].shape == (k,) and out["classes"].dtype == torch.int64
    assert out["features"].shape == (k, 1024) and out["features"].dtype == torch.float32
    assert out["attr_scores"].shape == (k, 400) and out["attr_scores"].dtype == torch.float32
    assert torch.all(out["scores"][:-1] >= out["scores"][1:])
    assert out["classes"].min() >= 0 and out["classes"].max() < 1600
    torch.testing.assert_close(out["attr_scores"].sum(dim=1), torch.ones(k))
    boxes = out["boxes"]  # original pixels: clipped to the 90 x 60 input, non-empty
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 90).all()
    assert (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= 60).all()
    assert ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).all()


def test_path_pil_and_array_inputs_agree(detector, tmp_path):
    img = _image(70, 50, 3)
    path = tmp_path / "x.png"
    Image.fromarray(img).save(path)
    grids = [detector.extract_grid(src) for src in (str(path), path, Image.open(path), img)]
    for g in grids[1:]:
        assert torch.equal(g, grids[0])
    dets = [detector.detect(src) for src in (str(path), Image.open(path), img)]
    for d in dets[1:]:
        _assert_same(d, dets[0])


def _assert_close(a: dict, b: dict):
    """Equal up to float noise: same detections (classes, count, order), boxes within 1e-3 px (the
    parity fixtures allow 1e-2), other values within 1e-5."""
    assert a.keys() == b.keys()
    assert torch.equal(a["classes"], b["classes"])
    for k in a:
        atol = 1e-3 if k == "boxes" else 1e-5
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=atol, msg=k)


def test_list_input_equals_one_by_one(detector, tmp_path):
    """A list runs one forward per image: exactly the single-call results, whatever the sizes."""
    a, b, c = (
        _image(60, 90, 4),
        _image(90, 60, 5),
        _image(61, 92, 6),
    )  # a and c share the input size
    Image.fromarray(b).save(tmp_path / "b.png")
    batch = [a, str(tmp_path / "b.png"), Image.fromarray(c)]
    grids = detector.extract_grid(batch)
    assert isinstance(grids, list) and len(grids) == 3
    assert [tuple(g.shape) for g in grids] == [(2048, 2, 3), (2048, 3, 2), (2048, 2, 3)]
    for image, grid in zip((a, b, c), grids):
        assert torch.equal(grid, detector.extract_grid(image))
    dets = detector.detect(batch)
    assert isinstance(dets, list) and len(dets) == 3
    for image, det in zip((a, b, c), dets):
        _assert_same(det, detector.detect(image))


def test_batch_forward_groups_same_size_images(cfg, detector):
    """``batch_forward=True`` shares one forward between same-size images (never padding): a batch
    of 2 changes the convolutions' float rounding (about 2e-6 here, the size of a thread-count
    change)."""
    batched = Detector(cfg, seed=0, batch_forward=True)
    a, b, c = _image(60, 90, 4), _image(90, 60, 5), _image(61, 92, 6)
    grids = batched.extract_grid([a, b, c])
    assert torch.equal(grids[1], detector.extract_grid(b))  # alone in its size group
    for i, image in ((0, a), (2, c)):
        torch.testing.assert_close(grids[i], detector.extract_grid(image), rtol=1e-5, atol=1e-5)
    dets = batched.detect([a, b, c])
    _assert_same(dets[1], detector.detect(b))
    _assert_close(dets[0], detector.detect(a))
    _assert_close(dets[2], detector.detect(c))


def test_bad_image_is_an_image_read_error(detector):
    with pytest.raises(ImageReadError) as err:
        detector.detect(b"definitely not an image")
    assert err.value.reason.startswith("not an image")


def test_partial_checkpoint_is_refused_unless_allowed(cfg, tmp_path):
    path = tmp_path / "partial.pth"
    torch.save({"model": {"backbone.stem.conv1.weight": torch.zeros(64, 3, 7, 7)}}, path)
    with pytest.raises(CheckpointError, match="incomplete checkpoint"):
        Detector(cfg, weights=path)
    det = Detector(cfg, weights=path, allow_partial=True)
    assert not det.random_init and det.load_report.loaded == ["backbone.stem.conv1.weight"]
    assert "roi_heads.box_predictor.cls_score.weight" in det.load_report.missing
    assert torch.count_nonzero(det.model.backbone.stem.conv1.weight) == 0
    assert len(det.weights_sha256) == 64


def test_precision_errors(cfg, monkeypatch):
    with pytest.raises(PrecisionError, match="fp16"):
        Detector(cfg, precision="fp16")
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    with pytest.raises(PrecisionError, match="bf16"):
        Detector(cfg, precision="bf16")


def test_region_features_are_pooled_at_each_detection_s_own_input_box(cfg):
    """On a resized image, a detection's feature is the box head at its network-input box, and
    its attribute probabilities are read from that feature with its predicted class."""
    detector = Detector(get_cfg("R-50-grid", opts=SMALL), seed=0)
    image = _image(30, 45, 3)  # resized 30x45 -> 64x96: boxes differ by a factor 2.13 per axis
    (det,) = detector.detect_batch([detector.prepare(image)])
    assert len(det) > 0
    p = detector.prepare(image)
    heads = detector.model.roi_heads
    with torch.inference_mode():
        features = detector.model.backbone(detector.model.normalize([p.image]).tensor)
        expected = heads.box_features(features, [det.pred_boxes_input])
        attrs = heads.attribute_probs(expected, det.pred_classes)
    torch.testing.assert_close(det.box_features, expected, rtol=0, atol=0)
    torch.testing.assert_close(det.attr_probs, attrs, rtol=0, atol=0)
    scale = torch.tensor([45 / 96, 30 / 64, 45 / 96, 30 / 64])
    torch.testing.assert_close(det.pred_boxes, det.pred_boxes_input * scale, rtol=1e-6, atol=1e-4)
    with torch.inference_mode():  # the original-pixel boxes would give other features
        misplaced = heads.box_features(features, [det.pred_boxes])
    assert not torch.allclose(misplaced, expected)


def test_a_detection_left_empty_by_the_rescale_leaves_no_row(monkeypatch):
    """Detectron2 drops boxes that are empty after rescaling and clipping; their features go too."""
    detector = Detector(get_cfg("R-50-grid", opts=SMALL), seed=0)
    heads = detector.model.roi_heads
    select = heads.select

    def select_with_a_degenerate_box(predictions):
        results = select(predictions)
        out = []
        for det in results:
            h, w = det.image_size
            extra = det[:1]  # a copy of the first detection squeezed onto the right border
            extra.pred_boxes = torch.tensor([[w, 0.0, w, h / 2]], dtype=det.pred_boxes.dtype)
            out.append(type(det).cat([det[:2], extra, det[2:]]))
        return out

    monkeypatch.setattr(heads, "select", select_with_a_degenerate_box)
    (det,) = detector.detect_batch([detector.prepare(_image(12, 18, 4))])  # upscaled 5.3x
    monkeypatch.setattr(heads, "select", select)
    (plain,) = detector.detect_batch([detector.prepare(_image(12, 18, 4))])
    assert len(det) == len(plain) and len(det.box_features) == len(det)
    torch.testing.assert_close(det.box_features, plain.box_features, rtol=0, atol=0)
    torch.testing.assert_close(det.pred_boxes, plain.pred_boxes, rtol=0, atol=0)


def test_fast_mode_turns_on_its_shortcuts_and_the_exact_mode_keeps_detectron2s(cfg, detector):
    fast = Detector(cfg, seed=0, fast=True)
    assert (
        fast.model.roi_heads.sparse_box_deltas and not fast.model.proposal_generator.exact_tie_order
    )
    exact = detector.model
    assert not exact.roi_heads.sparse_box_deltas and exact.proposal_generator.exact_tie_order
