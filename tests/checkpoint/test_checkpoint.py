"""Checkpoint reading and loading (docs/detectron2-facts.md 4.5): containers, prefixes, reports,
Caffe2 renaming with suffix matching, FrozenBN metadata, and refusal of pickles that would run
code."""

from __future__ import annotations

import os
import pickle
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from gridfeats.checkpoint import (
    CheckpointError,
    convert_caffe2_name,
    convert_caffe2_state_dict,
    load_checkpoint,
    match_by_suffix,
    read_checkpoint,
)
from gridfeats.config import get_cfg
from gridfeats.layers import Conv2d, FrozenBatchNorm2d
from gridfeats.modeling import GeneralizedRCNN, build_model
from gridfeats.modeling.anchors import DefaultAnchorGenerator

ANCHOR_KEY = "proposal_generator.anchor_generator.cell_anchors.0"
CONV_KEY = "backbone.res5.0.conv1.weight"
VAR_KEY = "backbone.res5.0.conv1.norm.running_var"
CLS_KEY = "roi_heads.box_predictor.cls_score.weight"


# --------------------------------------------------------------------------------------------------
# Caffe2 names
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "caffe2,detectron2",
    [
        ("conv1_w", "stem.conv1.weight"),
        ("conv1_b", "stem.conv1.bias"),
        ("res_conv1_bn_gamma", "stem.conv1.norm.weight"),
        ("res_conv1_bn_s", "stem.conv1.norm.weight"),
        ("res2_0_branch1_w", "res2.0.shortcut.weight"),
        ("res2_0_branch2a_w", "res2.0.conv1.weight"),
        ("res2_0_branch2b_bn_running_var", "res2.0.conv2.norm.running_var"),
        ("res3_1_branch2c_bn_b", "res3.1.conv3.norm.bias"),
        ("res4_5_branch2a_bn_beta", "res4.5.conv1.norm.bias"),
        ("res5_2_branch2c_bn_riv", "res5.2.conv3.norm.running_var"),
        ("res5_2_branch2c_bn_rm", "res5.2.conv3.norm.running_mean"),
        ("fc1000_w", "fc1000.weight"),
        ("pred_w", "linear.weight"),
        ("conv_rpn_w", "proposal_generator.rpn_head.conv.weight"),
        ("rpn_bbox_pred_w", "proposal_generator.rpn_head.anchor_deltas.weight"),
        ("rpn_cls_logits_b", "proposal_generator.rpn_head.objectness_logits.bias"),
        ("bbox_pred_w", "bbox_pred.weight"),
        ("bbox_pred_b", "bbox_pred.bias"),
        ("cls_score_w", "cls_score.weight"),
        ("fc6_w", "box_head.fc1.weight"),
        ("fc7_b", "box_head.fc2.bias"),
    ],
)
def test_caffe2_name_conversion(caffe2, detectron2):
    assert convert_caffe2_name(caffe2) == detectron2


def test_caffe2_detection_heads_move_background():
    cls_w = torch.arange(4 * 2, dtype=torch.float32).view(4, 2)  # row 0 = Caffe2 background
    cls_b = torch.tensor([10.0, 11.0, 12.0, 13.0])
    box_w = torch.arange(16 * 2, dtype=torch.float32).view(16, 2)  # 4 classes x 4 incl. background
    box_b = torch.arange(16, dtype=torch.float32)
    out = convert_caffe2_state_dict(
        {"cls_score_w": cls_w, "cls_score_b": cls_b, "bbox_pred_w": box_w, "bbox_pred_b": box_b}
    )
    assert torch.equal(out["cls_score.weight"], torch.cat([cls_w[1:], cls_w[:1]]))
    assert out["cls_score.bias"].tolist() == [11.0, 12.0, 13.0, 10.0]
    assert torch.equal(out["bbox_pred.weight"], box_w[4:])
    assert out["bbox_pred.bias"].tolist() == list(range(4, 16))


def test_match_by_suffix_longest_wins_and_ambiguity_is_an_error():
    model = ["roi_heads.res5.0.conv1.weight", "backbone.stem.conv1.weight"]
    mapping = match_by_suffix(model, ["conv1.weight", "res5.0.conv1.weight", "stem.conv1.weight"])
    assert mapping == {
        "roi_heads.res5.0.conv1.weight": "res5.0.conv1.weight",
        "backbone.stem.conv1.weight": "stem.conv1.weight",
    }
    # A suffix must start at a dot: "1.weight" does not fill "...conv1.weight".
    assert match_by_suffix(["a.conv1.weight"], ["1.weight"]) == {}
    with pytest.raises(CheckpointError, match="ambiguous"):
        match_by_suffix(["a.x.weight", "b.x.weight"], ["x.weight"])


# --------------------------------------------------------------------------------------------------
# .pth loading on a tiny model with Detectron2's key layout
# --------------------------------------------------------------------------------------------------
class _Tiny(nn.Module):
    """``backbone.res5.0.conv1`` (+ FrozenBN), the anchor buffer and a ``cls_score`` linear."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.res5 = nn.ModuleList([nn.Module()])
        self.backbone.res5[0].conv1 = Conv2d(4, 2, 1, bias=False, norm=FrozenBatchNorm2d(2))
        self.proposal_generator = nn.Module()
        self.proposal_generator.anchor_generator = DefaultAnchorGenerator([32], [1.0], stride=16)
        self.roi_heads = nn.Module()
        self.roi_heads.box_predictor = nn.Module()
        self.roi_heads.box_predictor.cls_score = nn.Linear(2, 3)


def _source_state(seed: int = 0) -> "OrderedDict[str, torch.Tensor]":
    torch.manual_seed(seed)
    src = _Tiny()
    with torch.no_grad():
        for t in src.state_dict().values():
            t.copy_(torch.rand_like(t) + 0.5)
    return src.state_dict()


def _assert_loaded(model: nn.Module, state, keys=None):
    target = model.state_dict()
    for key in keys or [k for k in state if k != ANCHOR_KEY]:
        assert torch.equal(target[key], state[key]), key


def test_pth_with_model_key_and_extras(tmp_path):
    state = _source_state()
    path = tmp_path / "ckpt.pth"
    torch.save({"model": state, "iteration": 7, "scheduler": {"last_epoch": 7}}, path)
    model = _Tiny()
    report, extra = load_checkpoint(model, path)
    _assert_loaded(model, state)
    assert report.complete and not report.missing and not report.unexpected
    assert set(report.loaded) == set(state)
    assert extra == {"iteration": 7, "scheduler": {"last_epoch": 7}}


def test_bare_state_dict_and_module_prefix(tmp_path):
    state = _source_state(1)
    torch.save(state, tmp_path / "bare.pth")
    prefixed = OrderedDict((f"module.{k}", v) for k, v in state.items())
    torch.save({"model": prefixed}, tmp_path / "ddp.pth")
    for name in ("bare.pth", "ddp.pth"):
        model = _Tiny()
        report, _ = load_checkpoint(model, tmp_path / name)
        _assert_loaded(model, state)
        assert report.complete and not report.unexpected, name


def test_shape_mismatch_is_reported_and_skipped(tmp_path):
    state = _source_state(2)
    state[CLS_KEY] = torch.ones(5, 2)
    torch.save({"model": state}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="shape mismatch .*cls_score.weight"):
        load_checkpoint(_Tiny(), tmp_path / "bad.pth")
    model = _Tiny()
    init = model.state_dict()[CLS_KEY].clone()
    report, _ = load_checkpoint(model, tmp_path / "bad.pth", allow_partial=True)
    assert report.shape_mismatch == [(CLS_KEY, (5, 2), (3, 2))]
    assert torch.equal(model.state_dict()[CLS_KEY], init)  # kept at its init value
    _assert_loaded(model, state, [CONV_KEY, VAR_KEY])


def test_missing_keys_refused_unless_allow_partial_and_unexpected_reported(tmp_path):
    state = _source_state(3)
    del state[CONV_KEY]
    state["roi_heads.extra.weight"] = torch.zeros(1)
    torch.save({"model": state}, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(_Tiny(), tmp_path / "partial.pth")
    assert CONV_KEY in str(err.value) and "allow_partial" in str(err.value)
    model = _Tiny()
    report, _ = load_checkpoint(model, tmp_path / "partial.pth", allow_partial=True)
    assert report.missing == [CONV_KEY]
    assert report.unexpected == ["roi_heads.extra.weight"]
    assert not report.complete
    _assert_loaded(model, state, [VAR_KEY, CLS_KEY])


def test_unexpected_keys_alone_and_absent_anchor_buffer_are_fine(tmp_path):
    state = _source_state(4)
    del state[ANCHOR_KEY]
    state["backbone.res5.0.conv1.norm.num_batches_tracked"] = torch.tensor(3)
    torch.save({"model": state}, tmp_path / "ok.pth")
    model = _Tiny()
    report, _ = load_checkpoint(model, tmp_path / "ok.pth")
    assert report.complete
    assert report.derived == [ANCHOR_KEY]
    assert report.unexpected == ["backbone.res5.0.conv1.norm.num_batches_tracked"]
    # The derived buffer keeps the values computed from the config.
    assert model.state_dict()[ANCHOR_KEY].tolist() == [[-16.0, -16.0, 16.0, 16.0]]


def test_numpy_values_in_a_pth(tmp_path):
    state = _source_state(5)
    as_numpy = {k: v.numpy() for k, v in state.items()}
    torch.save({"model": as_numpy}, tmp_path / "np.pth")
    model = _Tiny()
    report, _ = load_checkpoint(model, tmp_path / "np.pth")
    assert report.complete
    _assert_loaded(model, state)


def test_unreadable_inputs_give_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint(tmp_path / "nope.pth")
    torch.save({"model": {"a": "text"}}, tmp_path / "str.pth")
    with pytest.raises(CheckpointError, match="not a tensor"):
        read_checkpoint(tmp_path / "str.pth")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="expected a state dict"):
        read_checkpoint(tmp_path / "list.pth")


def test_frozen_bn_metadata_survives_reading_and_prefix_stripping(tmp_path):
    """Checkpoint metadata FrozenBN version 2 gets eps subtracted, version 3 does not."""
    state = _source_state(6)
    for version, expected_shift in ((2, 1e-5), (3, 0.0)):
        meta = OrderedDict({"module.backbone.res5.0.conv1.norm": {"version": version}})
        prefixed = OrderedDict((f"module.{k}", v) for k, v in state.items())
        prefixed._metadata = meta
        path = tmp_path / f"v{version}.pth"
        torch.save({"model": prefixed}, path)
        model = _Tiny()
        load_checkpoint(model, path)
        torch.testing.assert_close(
            model.state_dict()[VAR_KEY], state[VAR_KEY] - expected_shift, rtol=0, atol=0
        )


# --------------------------------------------------------------------------------------------------
# Caffe2-style .pkl into real (narrow) models
# --------------------------------------------------------------------------------------------------
NARROW = [
    "MODEL.RESNETS.STEM_OUT_CHANNELS",
    "8",
    "MODEL.RESNETS.RES2_OUT_CHANNELS",
    "16",
    "MODEL.RESNETS.WIDTH_PER_GROUP",
    "4",
    "MODEL.ROI_HEADS.NUM_CLASSES",
    "5",
    "MODEL.ROI_BOX_HEAD.FC_DIM",
    "8",
    "MODEL.ROI_ATTRIBUTE_HEAD.NUM_CLASSES",
    "6",
    "MODEL.ROI_ATTRIBUTE_HEAD.FC_DIM",
    "8",
    "MODEL.ROI_ATTRIBUTE_HEAD.OBJ_EMBED_DIM",
    "4",
]


def _narrow_model(config: str) -> GeneralizedRCNN:
    torch.manual_seed(0)
    return build_model(get_cfg(config, opts=NARROW))


def _write_caffe2_pkl(path, model_state, res5_prefix: str):
    rng = np.random.default_rng(0)

    def like(key):
        return rng.standard_normal(tuple(model_state[key].shape)).astype(np.float32)

    blobs = {
        "conv1_w": like("backbone.stem.conv1.weight"),
        "conv1_b": np.zeros(8, np.float32),  # the stem conv has no bias: unused
        "res_conv1_bn_s": like("backbone.stem.conv1.norm.weight"),
        "res_conv1_bn_b": like("backbone.stem.conv1.norm.bias"),
        "res2_0_branch2b_bn_running_var": np.abs(like("backbone.res2.0.conv2.norm.running_var")),
        "res5_0_branch2a_w": like(f"{res5_prefix}.res5.0.conv1.weight"),
        "res5_0_branch2a_bn_s": like(f"{res5_prefix}.res5.0.conv1.norm.weight"),
        "res5_2_branch2c_w": like(f"{res5_prefix}.res5.2.conv3.weight"),
        "fc1000_w": np.zeros((10, 4), np.float32),
    }
    momenta = {
        k + "_momentum": np.full((1, 1), 7.0, np.float32) for k in ("conv1_w", "res5_0_branch2a_w")
    }
    with open(path, "wb") as f:
        pickle.dump({"blobs": {**blobs, **momenta}, "epoch": 0}, f)
    return blobs


@pytest.mark.parametrize(
    "config,res5_prefix", [("R-50-grid", "backbone"), ("R-50-updn", "roi_heads")]
)
def test_caffe2_pkl_fills_tensors_by_suffix(tmp_path, config, res5_prefix):
    model = _narrow_model(config)
    path = tmp_path / "imagenet.pkl"
    blobs = _write_caffe2_pkl(path, model.state_dict(), res5_prefix)
    with pytest.raises(CheckpointError, match="incomplete"):
        load_checkpoint(model, path)
    report, extra = load_checkpoint(model, path, allow_partial=True)
    state = model.state_dict()
    expected = {
        "backbone.stem.conv1.weight": "conv1_w",
        "backbone.stem.conv1.norm.weight": "res_conv1_bn_s",
        "backbone.stem.conv1.norm.bias": "res_conv1_bn_b",
        "backbone.res2.0.conv2.norm.running_var": "res2_0_branch2b_bn_running_var",
        f"{res5_prefix}.res5.0.conv1.weight": "res5_0_branch2a_w",
        f"{res5_prefix}.res5.0.conv1.norm.weight": "res5_0_branch2a_bn_s",
        f"{res5_prefix}.res5.2.conv3.weight": "res5_2_branch2c_w",
    }
    for key, blob in expected.items():
        np.testing.assert_array_equal(state[key].numpy(), blobs[blob], err_msg=key)
    assert sorted(report.loaded) == sorted(expected)
    assert report.unexpected == [
        "fc1000.weight",
        "stem.conv1.bias",
    ]  # momenta were dropped, not reported
    assert extra.get("__author__") == "Caffe2"


def test_zoo_format_pkl_is_loaded_like_a_state_dict(tmp_path):
    state = _source_state(7)
    with open(tmp_path / "zoo.pkl", "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in state.items()}, "__author__": "someone"}, f)
    model = _Tiny()
    report, extra = load_checkpoint(model, tmp_path / "zoo.pkl")
    assert report.complete and extra["__author__"] == "someone"
    _assert_loaded(model, state)


# --------------------------------------------------------------------------------------------------
# Pickles that would run code
# --------------------------------------------------------------------------------------------------
class _Malicious:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pkl_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "executed"
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"blobs": {"conv1_w": _Malicious(marker)}}, f)
    with pytest.raises(
        CheckpointError, match="refusing to load posix.system|refusing to load os.system"
    ):
        load_checkpoint(_Tiny(), tmp_path / "evil.pkl", allow_partial=True)
    assert not marker.exists()


def test_malicious_pth_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "executed"
    torch.save({"model": {CONV_KEY: _Malicious(marker)}}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        load_checkpoint(_Tiny(), tmp_path / "evil.pth", allow_partial=True)
    assert not marker.exists()
