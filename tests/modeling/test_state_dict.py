"""State-dict keys and shapes of every shipped detector config (docs/detectron2-facts.md 4.1-4.4).

R-50-grid, R-50-updn and X-101-grid are compared with the key manifests Detectron2 itself dumped
(``keys_<config>.json`` in the parity fixtures); X-152-grid and X-152-challenge with the spec's
counts. Models are built on the ``meta`` device: shapes without allocating 170M parameters.

Parameter counts: the spec's numbers are ``sum(p.numel() for p in model.parameters())`` — FrozenBN
statistics and the anchor buffer are buffers, so they are not counted (the state-dict total is
larger).
"""

from __future__ import annotations

import json

import pytest
import torch

from gridfeats.config import get_cfg
from gridfeats.modeling import GeneralizedRCNN, build_model
from tests.parity import d2parity

# config -> (keys, parameters, trainable parameters) from the spec (4.2-4.4).
SPEC_COUNTS = {
    "R-50-grid": (285, 73_979_100, 73_756_700),
    "R-50-updn": (281, 51_159_260, None),
    "X-101-grid": (540, 137_063_644, None),
    "X-152-grid": (795, 170_552_540, None),
    "X-152-challenge": (873, 177_520_538, None),
}
# The Base files are R-50-grid / R-50-updn without MODEL.WEIGHTS.
SPEC_COUNTS["Base-RCNN-grid"] = SPEC_COUNTS["R-50-grid"]
SPEC_COUNTS["Base-RCNN-updn"] = SPEC_COUNTS["R-50-updn"]
DETECTOR_CONFIGS = sorted(SPEC_COUNTS)
MANIFESTS = [(c, c) for c in d2parity.CONFIGS] + [
    ("Base-RCNN-grid", "R-50-grid"),
    ("Base-RCNN-updn", "R-50-updn"),
]


def _meta_model(config: str) -> GeneralizedRCNN:
    with torch.device("meta"):
        return build_model(get_cfg(config))


def _shapes(model) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_every_shipped_detector_config_is_covered():
    from gridfeats.config import shipped_config_names

    # demo-synthetic is the project's own small demo detector, not a grid-feats-vqa model.
    assert set(shipped_config_names()) - {"demo-synthetic"} == set(DETECTOR_CONFIGS)


@pytest.mark.parametrize("config", DETECTOR_CONFIGS)
def test_key_count_and_parameter_count_match_spec(config):
    model = _meta_model(config)
    keys, params, trainable = SPEC_COUNTS[config]
    assert len(model.state_dict()) == keys
    assert sum(p.numel() for p in model.parameters()) == params
    if trainable is not None:  # FREEZE_AT 2: stem and res2 are not trained
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trainable


@pytest.mark.parametrize("config,manifest_name", MANIFESTS)
def test_keys_and_shapes_equal_detectron2_manifest(config, manifest_name):
    manifest_path = d2parity.FIXTURES / f"keys_{manifest_name}.json"
    if not manifest_path.is_file():
        pytest.skip(f"parity fixtures not found at {d2parity.FIXTURES}")
    manifest = {key: tuple(shape) for key, shape, _dtype in json.loads(manifest_path.read_text())}
    dtypes = {dtype for _key, _shape, dtype in json.loads(manifest_path.read_text())}
    ours = _shapes(_meta_model(config))
    assert set(ours) - set(manifest) == set(), "keys Detectron2 does not have"
    assert set(manifest) - set(ours) == set(), "Detectron2 keys we lack"
    mismatched = {k: (ours[k], manifest[k]) for k in manifest if ours[k] != manifest[k]}
    assert mismatched == {}
    assert dtypes == {"float32"}


def test_r50_grid_spot_shapes_from_the_spec_table():
    shapes = _shapes(_meta_model("R-50-grid"))
    assert shapes["backbone.stem.conv1.weight"] == (64, 3, 7, 7)
    assert shapes["backbone.res2.0.conv1.weight"] == (64, 64, 1, 1)
    assert shapes["backbone.res2.1.conv1.weight"] == (64, 256, 1, 1)
    assert shapes["backbone.res5.0.shortcut.weight"] == (2048, 1024, 1, 1)
    assert shapes["backbone.res5.2.conv2.norm.running_var"] == (512,)
    assert shapes["proposal_generator.anchor_generator.cell_anchors.0"] == (15, 4)
    assert shapes["proposal_generator.rpn_head.anchor_deltas.weight"] == (60, 2048, 1, 1)
    assert shapes["roi_heads.box_predictor.cls_score.weight"] == (1601, 1024)
    assert shapes["roi_heads.box_predictor.bbox_pred.weight"] == (6400, 1024)
    assert shapes["roi_heads.attribute_predictor.fc.0.weight"] == (512, 1280)
    assert not any(k.endswith("num_batches_tracked") for k in shapes)
    # Within a block: shortcut, conv1, conv2, conv3 (registration order is the checkpoint order).
    block = [
        k
        for k in shapes
        if k.startswith("backbone.res3.0.") and k.endswith(".weight") and ".norm." not in k
    ]
    assert block == [
        "backbone.res3.0.shortcut.weight",
        "backbone.res3.0.conv1.weight",
        "backbone.res3.0.conv2.weight",
        "backbone.res3.0.conv3.weight",
    ]


def test_r50_updn_head_res5_and_widths():
    shapes = _shapes(_meta_model("R-50-updn"))
    assert not any(k.startswith("backbone.res5") for k in shapes)
    assert sum(k.startswith("backbone.") for k in shapes) == 215
    assert sum(k.startswith("roi_heads.res5.") for k in shapes) == 50
    assert shapes["roi_heads.res5.0.conv1.weight"] == (512, 1024, 1, 1)
    assert shapes["proposal_generator.rpn_head.conv.weight"] == (1024, 1024, 3, 3)
    assert shapes["roi_heads.box_predictor.cls_score.weight"] == (1601, 2048)
    assert shapes["roi_heads.attribute_predictor.fc.0.weight"] == (512, 2304)
    assert not any(k.startswith("roi_heads.box_head") for k in shapes)


@pytest.mark.parametrize("config", ["X-152-grid", "X-152-challenge"])
def test_x152_resnext_shapes(config):
    shapes = _shapes(_meta_model(config))
    for stage, n_blocks, conv2, conv3 in (
        ("res2", 3, (256, 8, 3, 3), (256, 256, 1, 1)),
        ("res3", 8, (512, 16, 3, 3), (512, 512, 1, 1)),
        ("res4", 36, (1024, 32, 3, 3), (1024, 1024, 1, 1)),
        ("res5", 3, (2048, 64, 3, 3), (2048, 2048, 1, 1)),
    ):
        assert f"backbone.{stage}.{n_blocks - 1}.conv1.weight" in shapes
        assert f"backbone.{stage}.{n_blocks}.conv1.weight" not in shapes
        assert shapes[f"backbone.{stage}.0.conv2.weight"] == conv2
        assert shapes[f"backbone.{stage}.0.conv3.weight"] == conv3


def test_x152_challenge_has_39_offset_convs():
    grid = _shapes(_meta_model("X-152-grid"))
    challenge = _shapes(_meta_model("X-152-challenge"))
    extra = sorted(set(challenge) - set(grid))
    assert set(grid) <= set(challenge)
    assert len(extra) == 2 * 39
    for i in range(36):
        assert challenge[f"backbone.res4.{i}.conv2_offset.weight"] == (18, 1024, 3, 3)
        assert challenge[f"backbone.res4.{i}.conv2_offset.bias"] == (18,)
    for i in range(3):
        assert challenge[f"backbone.res5.{i}.conv2_offset.weight"] == (18, 2048, 3, 3)
        assert challenge[f"backbone.res5.{i}.conv2_offset.bias"] == (18,)
    assert not any(
        "conv2_offset" in k for k in extra if k.startswith(("backbone.res2", "backbone.res3"))
    )
    # Registration order inside a deformable block: conv1, conv2_offset, conv2, conv3.
    block = [k for k in challenge if k.startswith("backbone.res4.1.") and ".norm." not in k]
    assert block == [
        "backbone.res4.1.conv1.weight",
        "backbone.res4.1.conv2_offset.weight",
        "backbone.res4.1.conv2_offset.bias",
        "backbone.res4.1.conv2.weight",
        "backbone.res4.1.conv3.weight",
    ]
