"""Fast-mode quality: the agreement metrics themselves, and the fast modes measured with them
against exact fp32 on a Detectron2 parity photo with the parity weights (at a reduced input size,
so that the test stays a few seconds)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from gridfeats.data.image_io import read_image
from gridfeats.features.agreement import match_regions, region_agreement
from gridfeats.layers import conv as conv_module
from gridfeats.layers import winograd
from gridfeats.structures import Instances
from tests.parity import d2parity


def _regions(boxes, classes, features, attr=None):
    fields = dict(
        pred_boxes=torch.tensor(boxes, dtype=torch.float32),
        pred_classes=torch.tensor(classes),
        box_features=torch.tensor(features, dtype=torch.float32),
    )
    if attr is not None:
        fields["attr_probs"] = torch.tensor(attr, dtype=torch.float32)
    return Instances((100, 100), **fields)


def test_identical_regions_agree_fully():
    a = _regions([[0, 0, 10, 10], [20, 20, 50, 40]], [3, 5], [[1, 2], [3, 4]], [[0.9, 0.1]] * 2)
    agreement = region_agreement([a], [a])
    assert agreement.matched_share == 1.0 and agreement.reference == 2
    assert agreement.cosine_min == pytest.approx(1.0) and agreement.attr_top1 == 1.0


def test_a_region_needs_the_same_class_and_iou_090_and_is_matched_once():
    ref = _regions([[0, 0, 10, 10], [20, 20, 50, 40]], [3, 5], [[1, 0], [0, 1]], [[0.9, 0.1]] * 2)
    # The first moved by 1 px in x (IoU 9/11 < 0.9), the second kept but with a flipped attribute
    # and a rotated feature; a duplicate of the second cannot be matched twice.
    other = _regions(
        [[1, 0, 11, 10], [20, 20, 50, 40], [20, 20, 50, 40]],
        [3, 5, 5],
        [[1, 0], [1, 1], [0, 1]],
        [[0.9, 0.1], [0.2, 0.8], [0.9, 0.1]],
    )
    assert match_regions(ref, other) == [(1, 1)]
    agreement = region_agreement([ref], [other])
    assert agreement.matched_share == 0.5
    assert agreement.cosine_min == pytest.approx(2**-0.5)
    assert agreement.attr_top1 == 0.0
    relabelled = _regions([[20, 20, 50, 40]], [4], [[0, 1]])
    assert region_agreement([ref], [relabelled]).matched == 0


@pytest.fixture(scope="module")
def parity_photo_detections(tmp_path_factory):
    if not d2parity.available():
        pytest.skip(f"parity fixtures not found at {d2parity.FIXTURES}")
    from gridfeats.api import Detector
    from gridfeats.config import get_cfg
    from gridfeats.precision import cpu_has_native_bf16

    weights = d2parity.weights_path("R-50-grid", tmp_path_factory.getbasetemp())
    cfg = get_cfg("R-50-grid", opts=["INPUT.MIN_SIZE_TEST", 256, "INPUT.MAX_SIZE_TEST", 400])
    modes = {"exact": dict(), "fast": dict(fast=True)}
    if cpu_has_native_bf16():
        modes["bf16"] = dict(precision="bf16")
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    winograd_calls = []
    try:
        out = {}
        for name, kwargs in modes.items():
            with pytest.MonkeyPatch.context() as patch:
                # At this reduced size the RPN map has fewer tiles than Winograd needs to pay
                # off; lower the bar so that the fast fp32 mode runs it on the real weights.
                policy = dataclasses.replace(winograd.cpu_policy(), min_tiles=1)
                patch.setattr(winograd, "cpu_policy", lambda policy=policy: policy)
                patch.setattr(conv_module, "winograd_conv3x3", _counting(winograd_calls))
                detector = Detector(cfg, weights=weights, **kwargs)
                prepared = detector.prepare(d2parity.FIXTURES / "images" / "motorcycle.jpg")
                (out[name],) = detector.detect_batch([prepared])
            out[f"{name}_winograd_calls"] = len(winograd_calls)
            winograd_calls.clear()
        # Exact fp32 again, on the photo with every pixel value moved by one grey level.
        pixels = read_image(d2parity.FIXTURES / "images" / "motorcycle.jpg")
        rng = np.random.default_rng(0)
        moved = np.clip(pixels.astype(np.int16) + rng.choice([-1, 1], pixels.shape), 0, 255)
        exact = Detector(cfg, weights=weights)
        (out["exact_one_grey_level"],) = exact.detect_batch([exact.prepare(moved.astype(np.uint8))])
    finally:
        torch.set_num_threads(saved)
    assert len(out["exact"]) >= 20  # enough detections for shares to mean something
    return out


def _counting(calls):
    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return winograd.winograd_conv3x3(*args, **kwargs)

    return counted


def test_fast_fp32_regions_match_exact(parity_photo_detections):
    """fast fp32 folds the norms and runs the wide 3x3 convolutions (here the RPN head's, 2048
    channels) by Winograd F(4x4, 3x3); the exact mode never does."""
    assert parity_photo_detections["fast_winograd_calls"] >= 1
    assert parity_photo_detections["exact_winograd_calls"] == 0
    agreement = region_agreement(
        [parity_photo_detections["exact"]], [parity_photo_detections["fast"]]
    )
    assert agreement.matched_share >= 0.99
    assert agreement.cosine_min >= 0.9999
    assert agreement.attr_top1 >= 0.99


def test_bf16_regions_stay_close_to_exact(parity_photo_detections):
    """bf16 moves the backbone features by ~1e-2 relative, enough to reorder near-tied proposals
    and scores of these random weights: measured 85-97% of detections matched (the issue's target
    is 95%), while matched features stay at cosine >= 0.999. Attribute top-1 of the matched ones
    (400 near-tied attributes of random weights) depends on the CPU's bf16 kernels: >= 0.9 on an
    Intel AMX machine, 0.899 (80 of 89) on an AMD EPYC with AVX512-BF16 and no AMX."""
    if "bf16" not in parity_photo_detections:
        pytest.skip("this CPU has no native bf16")
    agreement = region_agreement(
        [parity_photo_detections["exact"]], [parity_photo_detections["bf16"]]
    )
    assert agreement.matched_share >= 0.8
    assert agreement.cosine_min >= 0.999
    assert agreement.attr_top1 >= 0.85


def test_the_random_parity_model_moves_its_detections_under_a_one_grey_level_change(
    parity_photo_detections,
):
    """Why the bf16 bar of 95% matched is read on a trained detector, not on these random weights:
    exact fp32 itself, given the photo with each pixel value moved by one grey level (features
    still at cosine >= 0.9999), keeps only 93-94% of its detections (AVX2, this size; 90% over
    the three parity photos at full size). The seeded model's scores are near-ties, so the share
    measures how chaotic the model is, not how close a mode's numbers are; the trained demo
    detector keeps 97.7% under bf16 (docs/extract.md)."""
    agreement = region_agreement(
        [parity_photo_detections["exact"]], [parity_photo_detections["exact_one_grey_level"]]
    )
    assert agreement.matched_share < 0.97
    assert agreement.cosine_min >= 0.9999
