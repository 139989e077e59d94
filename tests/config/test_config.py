"""Tests of gridfeats.config: Detectron2@ffff8ac defaults, shipped YAMLs, _BASE_, overrides.

Expected values come from docs/detectron2-facts.md 1.4 and Appendix A; the reference's dump of
R-50-grid (Appendix A) is stored in tests/assets/config.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict

import pytest
import yaml

from gridfeats.config import (
    NEWER_DETECTRON2_KEYS,
    SHIPPED_CONFIG_DIR,
    CfgNode,
    ConfigError,
    cfg_source_name,
    cfg_source_path,
    detectron2_defaults,
    get_cfg,
    shipped_config_names,
)
from gridfeats.config.defaults import is_gridfeats_key
from gridfeats.config.yaml_loader import merge_raw_dicts

REFERENCE_DUMP = (
    Path(__file__).resolve().parents[1] / "assets" / "config" / "R-50-grid.ffff8ac-dump.yaml"
)
MODEL_CONFIGS = ["R-50-grid", "X-101-grid", "X-152-grid", "X-152-challenge", "R-50-updn"]

# Keys whose Detectron2@ffff8ac default is a tuple (yacs keeps the default's type on merge).
TUPLE_KEYS = {
    "INPUT.MIN_SIZE_TRAIN",
    "DATASETS.TRAIN",
    "DATASETS.TEST",
    "DATASETS.PROPOSAL_FILES_TRAIN",
    "DATASETS.PROPOSAL_FILES_TEST",
    "MODEL.RPN.BBOX_REG_WEIGHTS",
    "MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS",
    "MODEL.ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS",
    "MODEL.ROI_BOX_CASCADE_HEAD.IOUS",
    "MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS",
    "MODEL.RETINANET.BBOX_REG_WEIGHTS",
    "SOLVER.STEPS",
    "TEST.AUG.MIN_SIZES",
}

# Pure Detectron2@ffff8ac (+ attribute) defaults of the keys that the grid YAMLs change.
PURE_DEFAULTS_OF_GRID_KEYS = {
    "MODEL.WEIGHTS": "",
    "MODEL.ATTRIBUTE_ON": False,
    "MODEL.RESNETS.OUT_FEATURES": ["res4"],
    "MODEL.RESNETS.RES5_DILATION": 1,
    "MODEL.RPN.IN_FEATURES": ["res4"],
    "MODEL.RPN.SMOOTH_L1_BETA": 0.0,
    "MODEL.RPN.BOUNDARY_THRESH": -1,
    "MODEL.ROI_HEADS.NAME": "Res5ROIHeads",
    "MODEL.ROI_HEADS.IN_FEATURES": ["res4"],
    "MODEL.ROI_HEADS.NUM_CLASSES": 80,
    "MODEL.ROI_BOX_HEAD.NAME": "",
    "MODEL.ROI_BOX_HEAD.NUM_FC": 0,
    "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION": 14,
    "MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO": 0,
    "MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA": 0.0,
    "DATASETS.TRAIN": (),
    "DATASETS.TEST": (),
    "SOLVER.BASE_LR": 0.001,
    "SOLVER.STEPS": (30000,),
    "SOLVER.MAX_ITER": 40000,
    "INPUT.MIN_SIZE_TRAIN": (800,),
    "INPUT.MAX_SIZE_TRAIN": 1333,
    "INPUT.MIN_SIZE_TEST": 800,
    "INPUT.MAX_SIZE_TEST": 1333,
}


class PerConfig(tuple):
    """One expected value per config, in MODEL_CONFIGS order (a table row with 5 columns)."""

    def __new__(cls, *values: Any) -> "PerConfig":
        assert len(values) == len(MODEL_CONFIGS)
        return super().__new__(cls, values)


_F4, _DCN = [False] * 4, [False, False, True, True]
_R50_W = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
_X101_W = "detectron2://ImageNetPretrained/FAIR/X-101-32x8d.pkl"
_X152_W = "catalog://ImageNetPretrained/FAIR/X-152-32x8d-IN5k"
_IMAGENET_STD = [57.375, 57.120, 58.395]
_ONES = [1.0, 1.0, 1.0]

# Spec table 1.4: a PerConfig row differs per config; any other value is the same in all five.
EFFECTIVE_TABLE: Dict[str, Any] = {
    "MODEL.META_ARCHITECTURE": "GeneralizedRCNN",
    "MODEL.DEVICE": "cuda",
    "MODEL.MASK_ON": False,
    "MODEL.KEYPOINT_ON": False,
    "MODEL.LOAD_PROPOSALS": False,
    "MODEL.ATTRIBUTE_ON": True,
    "MODEL.PIXEL_MEAN": [103.530, 116.280, 123.675],
    "MODEL.PIXEL_STD": PerConfig(_ONES, _IMAGENET_STD, _ONES, _ONES, _ONES),
    "MODEL.WEIGHTS": PerConfig(_R50_W, _X101_W, _X152_W, _X152_W, _R50_W),
    "MODEL.BACKBONE.NAME": "build_resnet_backbone",
    "MODEL.BACKBONE.FREEZE_AT": 2,
    "MODEL.RESNETS.DEPTH": PerConfig(50, 101, 152, 152, 50),
    "MODEL.RESNETS.NUM_GROUPS": PerConfig(1, 32, 32, 32, 1),
    "MODEL.RESNETS.WIDTH_PER_GROUP": PerConfig(64, 8, 8, 8, 64),
    "MODEL.RESNETS.STRIDE_IN_1X1": PerConfig(True, False, False, False, True),
    "MODEL.RESNETS.OUT_FEATURES": PerConfig(*[["res5"]] * 4, ["res4"]),
    "MODEL.RESNETS.RES5_DILATION": PerConfig(2, 2, 2, 2, 1),
    "MODEL.RESNETS.NORM": "FrozenBN",
    "MODEL.RESNETS.STEM_OUT_CHANNELS": 64,
    "MODEL.RESNETS.RES2_OUT_CHANNELS": 256,
    "MODEL.RESNETS.DEFORM_ON_PER_STAGE": PerConfig(_F4, _F4, _F4, _DCN, _F4),
    "MODEL.RESNETS.DEFORM_MODULATED": False,
    "MODEL.RESNETS.DEFORM_NUM_GROUPS": 1,
    "MODEL.PROPOSAL_GENERATOR.NAME": "RPN",
    "MODEL.PROPOSAL_GENERATOR.MIN_SIZE": 0,
    "MODEL.ANCHOR_GENERATOR.NAME": "DefaultAnchorGenerator",
    "MODEL.ANCHOR_GENERATOR.SIZES": [[32, 64, 128, 256, 512]],
    "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS": [[0.5, 1.0, 2.0]],
    "MODEL.ANCHOR_GENERATOR.OFFSET": 0.0,
    "MODEL.RPN.HEAD_NAME": "StandardRPNHead",
    "MODEL.RPN.IN_FEATURES": PerConfig(*[["res5"]] * 4, ["res4"]),
    "MODEL.RPN.BOUNDARY_THRESH": 0,
    "MODEL.RPN.IOU_THRESHOLDS": [0.3, 0.7],
    "MODEL.RPN.IOU_LABELS": [0, -1, 1],
    "MODEL.RPN.BATCH_SIZE_PER_IMAGE": 256,
    "MODEL.RPN.POSITIVE_FRACTION": 0.5,
    "MODEL.RPN.BBOX_REG_WEIGHTS": (1.0, 1.0, 1.0, 1.0),
    "MODEL.RPN.SMOOTH_L1_BETA": 0.1111,
    "MODEL.RPN.LOSS_WEIGHT": 1.0,
    "MODEL.RPN.BBOX_LOSS_WEIGHT": PerConfig(1.0, 1.0, 1.0, 0.5, 1.0),
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN": 12000,
    "MODEL.RPN.PRE_NMS_TOPK_TEST": 6000,
    "MODEL.RPN.POST_NMS_TOPK_TRAIN": 2000,
    "MODEL.RPN.POST_NMS_TOPK_TEST": 1000,
    "MODEL.RPN.NMS_THRESH": 0.7,
    "MODEL.ROI_HEADS.NAME": PerConfig(*["AttributeStandardROIHeads"] * 4, "AttributeRes5ROIHeads"),
    "MODEL.ROI_HEADS.IN_FEATURES": PerConfig(*[["res5"]] * 4, ["res4"]),
    "MODEL.ROI_HEADS.NUM_CLASSES": 1600,
    "MODEL.ROI_HEADS.IOU_THRESHOLDS": [0.5],
    "MODEL.ROI_HEADS.IOU_LABELS": [0, 1],
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": 512,
    "MODEL.ROI_HEADS.POSITIVE_FRACTION": 0.25,
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST": 0.05,
    "MODEL.ROI_HEADS.NMS_THRESH_TEST": 0.5,
    "MODEL.ROI_HEADS.PROPOSAL_APPEND_GT": True,
    "MODEL.ROI_BOX_HEAD.NAME": PerConfig(*["FastRCNNConvFCHead"] * 4, ""),
    "MODEL.ROI_BOX_HEAD.NUM_FC": PerConfig(2, 2, 2, 2, 0),
    "MODEL.ROI_BOX_HEAD.FC_DIM": 1024,
    "MODEL.ROI_BOX_HEAD.NUM_CONV": 0,
    "MODEL.ROI_BOX_HEAD.CONV_DIM": 256,
    "MODEL.ROI_BOX_HEAD.NORM": "",
    "MODEL.ROI_BOX_HEAD.POOLER_TYPE": "ROIAlignV2",
    "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION": PerConfig(1, 1, 1, 1, 14),
    "MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO": PerConfig(2, 2, 2, 0, 2),
    "MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS": (10.0, 10.0, 5.0, 5.0),
    "MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA": 1.0,
    "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG": False,
    "MODEL.ROI_BOX_HEAD.TRAIN_ON_PRED_BOXES": False,
    "MODEL.ROI_BOX_HEAD.BBOX_LOSS_WEIGHT": PerConfig(1.0, 1.0, 1.0, 0.0, 1.0),
    "MODEL.ROI_ATTRIBUTE_HEAD.OBJ_EMBED_DIM": 256,
    "MODEL.ROI_ATTRIBUTE_HEAD.FC_DIM": 512,
    "MODEL.ROI_ATTRIBUTE_HEAD.LOSS_WEIGHT": 0.2,
    "MODEL.ROI_ATTRIBUTE_HEAD.NUM_CLASSES": 400,
    "INPUT.FORMAT": "BGR",
    "INPUT.MASK_FORMAT": "polygon",
    "INPUT.MIN_SIZE_TRAIN": PerConfig((600,), (600,), (600,), (360, 600), (600,)),
    "INPUT.MIN_SIZE_TRAIN_SAMPLING": PerConfig("choice", "choice", "choice", "range", "choice"),
    "INPUT.MAX_SIZE_TRAIN": 1000,
    "INPUT.MIN_SIZE_TEST": 600,
    "INPUT.MAX_SIZE_TEST": 1000,
    "INPUT.CROP.ENABLED": False,
    "INPUT.MAX_ATTR_PER_INS": 16,
    "TEST.DETECTIONS_PER_IMAGE": 100,
    "TEST.AUG.ENABLED": False,
    "TEST.PRECISE_BN.ENABLED": False,
    "TEST.EVAL_PERIOD": 0,
    "DATASETS.TRAIN": ("visual_genome_train", "visual_genome_val"),
    "DATASETS.TEST": ("visual_genome_test",),
    "DATALOADER.NUM_WORKERS": 4,
    "DATALOADER.ASPECT_RATIO_GROUPING": True,
    "DATALOADER.SAMPLER_TRAIN": "TrainingSampler",
    "DATALOADER.FILTER_EMPTY_ANNOTATIONS": True,
    "SOLVER.IMS_PER_BATCH": 16,
    "SOLVER.BASE_LR": 0.02,
    "SOLVER.LR_SCHEDULER_NAME": PerConfig(
        *["WarmupMultiStepLR"] * 3, "WarmupCosineLR", "WarmupMultiStepLR"
    ),
    "SOLVER.MAX_ITER": PerConfig(90000, 90000, 90000, 60000, 90000),
    "SOLVER.STEPS": (60000, 80000),
    "SOLVER.GAMMA": 0.1,
    "SOLVER.MOMENTUM": 0.9,
    "SOLVER.WEIGHT_DECAY": 1e-4,
    "SOLVER.WEIGHT_DECAY_NORM": 0.0,
    "SOLVER.WEIGHT_DECAY_BIAS": 1e-4,
    "SOLVER.BIAS_LR_FACTOR": 1.0,
    "SOLVER.WARMUP_FACTOR": 0.001,
    "SOLVER.WARMUP_ITERS": 1000,
    "SOLVER.WARMUP_METHOD": "linear",
    "SOLVER.CHECKPOINT_PERIOD": 5000,
    "SOLVER.CLIP_GRADIENTS.ENABLED": False,
    "OUTPUT_DIR": "./output",
    "SEED": -1,
    "CUDNN_BENCHMARK": False,
    "VIS_PERIOD": 0,
    "VERSION": 2,
}


def flatten(node: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """Nested config/dict -> {"A.B.C": leaf}."""
    flat: Dict[str, Any] = {}
    for key, value in node.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def detectron2_keys(flat: Dict[str, Any]) -> Dict[str, Any]:
    """A flattened config without gridfeats' own keys (``GRIDFEATS_NODES``)."""
    return {k: v for k, v in flat.items() if not is_gridfeats_key(k)}


def as_lists(value: Any) -> Any:
    """Tuples -> lists, recursively: how a YAML dump represents a value."""
    if isinstance(value, (list, tuple)):
        return [as_lists(v) for v in value]
    return value


def same_value_and_type(got: Any, expected: Any) -> bool:
    """Equal, with bool/int/float and tuple/list distinguished (1 == 1.0 == True in Python)."""
    if type(got) is not type(expected):
        return False
    if isinstance(got, (list, tuple)):
        return len(got) == len(expected) and all(map(same_value_and_type, got, expected))
    return got == expected


# yacs coerces only the outer container to the default's type, so a tuple of tuples read back from
# a dump becomes a tuple of lists (Detectron2 behaves the same). The only such key is unused here.
NESTED_TUPLE_KEYS = {"MODEL.ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS"}


def assert_same_config(got: CfgNode, expected: CfgNode) -> None:
    """Same keys, and same values and types (inner containers of NESTED_TUPLE_KEYS aside)."""
    got_flat, expected_flat = flatten(got), flatten(expected)
    assert sorted(got_flat) == sorted(expected_flat)
    wrong = {}
    for key, want in expected_flat.items():
        have = got_flat[key]
        if key in NESTED_TUPLE_KEYS:
            ok = type(have) is type(want) and as_lists(have) == as_lists(want)
        else:
            ok = same_value_and_type(have, want)
        if not ok:
            wrong[key] = (have, want)
    assert wrong == {}


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def reference() -> Dict[str, Any]:
    return flatten(yaml.safe_load(REFERENCE_DUMP.read_text(encoding="utf-8")))


@pytest.fixture(scope="module")
def shipped() -> Dict[str, CfgNode]:
    names = MODEL_CONFIGS + ["Base-RCNN-grid", "Base-RCNN-updn"]
    return {name: get_cfg(name) for name in names}


# --------------------------------------------------------------------------------------------
# Defaults and the reference dump
# --------------------------------------------------------------------------------------------


def test_r50_grid_effective_config_equals_reference_dump_key_by_key(shipped, reference):
    got = detectron2_keys(flatten(shipped["R-50-grid"]))
    assert sorted(got) == sorted(reference)
    wrong = {
        key: (got[key], reference[key])
        for key in reference
        if not same_value_and_type(as_lists(got[key]), reference[key])
    }
    assert wrong == {}


def test_dump_text_parses_back_to_the_reference(shipped, reference):
    assert detectron2_keys(flatten(yaml.safe_load(shipped["R-50-grid"].dump()))) == reference


def test_keys_beyond_the_reference_are_only_gridfeats_nodes(shipped, reference):
    extra = sorted(set(flatten(shipped["R-50-grid"])) - set(reference))
    assert extra and all(is_gridfeats_key(k) for k in extra)
    own = {"MODEL.GRID.RES5_DILATION", "DATASETS.IMAGE_ROOT", "SOLVER.RANK_INVARIANT"}
    assert own <= set(extra)


def test_pure_defaults_are_reference_with_grid_yaml_settings_undone(reference):
    expected = dict(reference)
    expected.update({k: as_lists(v) for k, v in PURE_DEFAULTS_OF_GRID_KEYS.items()})
    got = detectron2_keys(flatten(get_cfg()))
    assert sorted(got) == sorted(expected)
    wrong = {
        key: (got[key], expected[key])
        for key in got
        if not same_value_and_type(as_lists(got[key]), expected[key])
    }
    assert wrong == {}


def test_pure_detectron2_defaults_have_no_attribute_keys():
    cfg = detectron2_defaults()
    assert "ATTRIBUTE_ON" not in cfg.MODEL
    assert "ROI_ATTRIBUTE_HEAD" not in cfg.MODEL
    assert "MAX_ATTR_PER_INS" not in cfg.INPUT
    assert "BBOX_LOSS_WEIGHT" not in cfg.MODEL.RPN


@pytest.mark.parametrize("name", MODEL_CONFIGS + [None])
def test_tuple_defaults_stay_tuples_and_others_stay_lists(name, shipped):
    cfg = shipped[name] if name else get_cfg()
    for key, value in flatten(cfg).items():
        if key in TUPLE_KEYS:
            assert isinstance(value, tuple), key
        elif isinstance(value, (list, tuple)):
            assert isinstance(value, list), key


def test_get_cfg_returns_fresh_independent_copies():
    first = get_cfg(freeze=False)
    first.SOLVER.BASE_LR = 1.0
    first.MODEL.PIXEL_STD[0] = 5.0
    second = get_cfg()
    assert second.SOLVER.BASE_LR == 0.001
    assert second.MODEL.PIXEL_STD == [1.0, 1.0, 1.0]


# --------------------------------------------------------------------------------------------
# The shipped configs (spec table 1.4)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("index,name", list(enumerate(MODEL_CONFIGS)))
def test_shipped_config_matches_spec_table(index, name, shipped):
    flat = flatten(shipped[name])
    wrong = {}
    for key, spec in EFFECTIVE_TABLE.items():
        expected = spec[index] if isinstance(spec, PerConfig) else spec
        if not same_value_and_type(flat[key], expected):
            wrong[key] = (flat[key], expected)
    assert wrong == {}


@pytest.mark.parametrize(
    "base,model", [("Base-RCNN-grid", "R-50-grid"), ("Base-RCNN-updn", "R-50-updn")]
)
def test_base_files_equal_their_r50_config_except_weights(base, model, shipped):
    base_flat, model_flat = flatten(shipped[base]), flatten(shipped[model])
    assert base_flat["MODEL.WEIGHTS"] == ""
    differing = {k for k in model_flat if model_flat[k] != base_flat[k]}
    assert differing == {"MODEL.WEIGHTS"}


def test_every_shipped_yaml_is_listed_and_loads():
    demo = {"demo-synthetic"}  # the small detector `gridfeats demo` trains (configs/ comment block)
    bases = {"Base-RCNN-grid", "Base-RCNN-updn"}
    assert set(shipped_config_names()) == set(MODEL_CONFIGS) | bases | demo
    for name in shipped_config_names():
        assert get_cfg(SHIPPED_CONFIG_DIR / f"{name}.yaml").VERSION == 2


# --------------------------------------------------------------------------------------------
# Config file resolution and source name
# --------------------------------------------------------------------------------------------


def test_bare_name_with_or_without_suffix_and_path_give_the_same_config(shipped):
    by_path = get_cfg(SHIPPED_CONFIG_DIR / "X-152-challenge.yaml")
    assert by_path == shipped["X-152-challenge"] == get_cfg("X-152-challenge.yaml")


def test_unknown_bare_name_lists_shipped_configs():
    with pytest.raises(FileNotFoundError, match=r"'R-51-grid'.*shipped configs: .*R-50-grid"):
        get_cfg("R-51-grid")


def test_missing_path_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        get_cfg(tmp_path / "nope.yaml")


def test_source_name_is_the_config_stem_and_survives_clone(shipped, tmp_path):
    cfg = shipped["X-101-grid"]
    assert cfg_source_name(cfg) == "X-101-grid"
    assert cfg_source_path(cfg) == SHIPPED_CONFIG_DIR / "X-101-grid.yaml"
    assert cfg_source_name(cfg.clone()) == "X-101-grid"
    assert cfg_source_name(get_cfg()) == "defaults"
    custom = write(tmp_path / "my-run.yaml", f"_BASE_: {SHIPPED_CONFIG_DIR / 'R-50-grid.yaml'}")
    assert cfg_source_name(get_cfg(custom)) == "my-run"
    assert "_gridfeats_source_file" not in cfg.dump()


# --------------------------------------------------------------------------------------------
# _BASE_ resolution
# --------------------------------------------------------------------------------------------


def test_base_resolves_relative_to_including_file_not_cwd(tmp_path, monkeypatch):
    write(
        tmp_path / "bases" / "root.yaml",
        "MODEL:\n  RPN:\n    NMS_THRESH: 0.6\n    IN_FEATURES: [res3, res4]\nVERSION: 2\n",
    )
    write(
        tmp_path / "bases" / "mid.yaml",
        "_BASE_: root.yaml\nMODEL:\n  RPN:\n    IN_FEATURES: [res5]\n  RESNETS:\n    DEPTH: 101\n",
    )
    child = write(
        tmp_path / "runs" / "child.yaml",
        "_BASE_: ../bases/mid.yaml\nMODEL:\n  RESNETS:\n    DEPTH: 152\n",
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = get_cfg(child)
    assert cfg.MODEL.RPN.NMS_THRESH == 0.6  # inherited through two levels
    assert cfg.MODEL.RPN.IN_FEATURES == ["res5"]  # a list replaces the base list wholesale
    assert cfg.MODEL.RESNETS.DEPTH == 152  # the child wins
    assert cfg.MODEL.RESNETS.NUM_GROUPS == 1  # untouched keys keep the defaults


def test_base_list_form_merges_bases_in_order_then_the_child(tmp_path):
    write(tmp_path / "a.yaml", "SOLVER:\n  BASE_LR: 0.1\n  MAX_ITER: 10\nSEED: 1\n")
    write(tmp_path / "b.yaml", "SOLVER:\n  BASE_LR: 0.2\nSEED: 2\n")
    child = write(tmp_path / "c.yaml", "_BASE_: [a.yaml, b.yaml]\nSEED: 3\n")
    cfg = get_cfg(child)
    assert (cfg.SOLVER.BASE_LR, cfg.SOLVER.MAX_ITER, cfg.SEED) == (0.2, 10, 3)


def test_base_absolute_path_and_tuple_strings(tmp_path):
    base = write(tmp_path / "deep" / "base.yaml", "SOLVER:\n  STEPS: (5, 7)\n")
    child = write(tmp_path / "child.yaml", f"_BASE_: {base}\nINPUT:\n  MIN_SIZE_TRAIN: (360,600)\n")
    cfg = get_cfg(child)
    assert cfg.SOLVER.STEPS == (5, 7)
    assert cfg.INPUT.MIN_SIZE_TRAIN == (360, 600)


def test_missing_base_names_both_files(tmp_path):
    child = write(tmp_path / "child.yaml", "_BASE_: gone.yaml\n")
    with pytest.raises(FileNotFoundError, match=r"gone\.yaml.*child\.yaml"):
        get_cfg(child)


def test_base_cycle_is_reported(tmp_path):
    write(tmp_path / "a.yaml", "_BASE_: b.yaml\n")
    b = write(tmp_path / "b.yaml", "_BASE_: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        get_cfg(b)


def test_child_mapping_over_base_scalar_is_an_error(tmp_path):
    write(tmp_path / "a.yaml", "SEED: 1\n")
    child = write(tmp_path / "c.yaml", "_BASE_: a.yaml\nSEED:\n  X: 1\n")
    with pytest.raises(ConfigError, match="SEED"):
        get_cfg(child)


def test_base_must_be_a_name_or_list_of_names(tmp_path):
    child = write(tmp_path / "c.yaml", "_BASE_: 5\n")
    with pytest.raises(ConfigError, match="_BASE_"):
        get_cfg(child)


# --------------------------------------------------------------------------------------------
# Overrides
# --------------------------------------------------------------------------------------------


def test_overrides_are_literal_evaluated_and_coerced_to_default_types():
    cfg = get_cfg(
        "R-50-grid",
        opts=[
            "INPUT.MIN_SIZE_TRAIN",
            "(360, 600)",
            "SOLVER.STEPS",
            "[1000, 2000]",
            "MODEL.DEVICE",
            "cpu",
            "MODEL.ROI_HEADS.SCORE_THRESH_TEST",
            "0.2",
            "TEST.DETECTIONS_PER_IMAGE",
            "36",
            "MODEL.RESNETS.DEFORM_ON_PER_STAGE",
            "[False, False, True, True]",
            "MODEL.WEIGHTS",
            "/models/R-50.pth",
        ],
    )
    assert cfg.INPUT.MIN_SIZE_TRAIN == (360, 600)
    assert cfg.SOLVER.STEPS == (1000, 2000) and isinstance(cfg.SOLVER.STEPS, tuple)
    assert cfg.MODEL.DEVICE == "cpu"
    assert cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST == 0.2
    assert cfg.TEST.DETECTIONS_PER_IMAGE == 36
    assert cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE == [False, False, True, True]
    assert cfg.MODEL.WEIGHTS == "/models/R-50.pth"
    assert cfg.MODEL.RESNETS.RES5_DILATION == 2  # the YAML still applied


def test_overrides_win_over_the_yaml():
    cfg = get_cfg("X-152-challenge", opts=["SOLVER.MAX_ITER", "10"])
    assert cfg.SOLVER.MAX_ITER == 10


@pytest.mark.parametrize(
    "key,value",
    [
        ("MODEL.ROI_HEADS.NUM_CLASSES", "0.5"),  # float for an int
        ("SOLVER.BASE_LR", "1"),  # int for a float: yacs refuses too
        ("INPUT.MIN_SIZE_TRAIN", "600"),  # int for a tuple
        ("MODEL.DEVICE", "[1]"),  # list for a str
        ("MODEL.RPN", "5"),  # scalar for a whole node
    ],
)
def test_override_of_wrong_type_names_the_key(key, value):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        get_cfg(opts=[key, value])


def test_unknown_override_key_is_a_keyerror_naming_it():
    with pytest.raises(KeyError, match="Non-existent config key: MODEL.RESNETS.DEPTHS"):
        get_cfg(opts=["MODEL.RESNETS.DEPTHS", "50"])
    with pytest.raises(KeyError, match="Non-existent config key: NOPE.X"):
        get_cfg(opts=["NOPE.X", "1"])


def test_odd_override_list_is_refused():
    with pytest.raises(ValueError, match="KEY VALUE pairs"):
        get_cfg(opts=["MODEL.DEVICE"])


def test_base_key_in_overrides_is_refused():
    with pytest.raises(ValueError, match="_BASE_"):
        get_cfg(opts=["_BASE_", "R-50-grid.yaml"])


def test_frozen_by_default_and_mutable_on_request():
    cfg = get_cfg("R-50-grid")
    with pytest.raises(AttributeError, match="immutable"):
        cfg.MODEL.DEVICE = "cpu"
    cfg = get_cfg("R-50-grid", freeze=False)
    cfg.MODEL.DEVICE = "cpu"
    assert cfg.MODEL.DEVICE == "cpu"


# --------------------------------------------------------------------------------------------
# Unknown keys, bad files, newer Detectron2 keys
# --------------------------------------------------------------------------------------------


def test_unknown_yaml_key_is_a_keyerror_naming_key_and_file(tmp_path):
    path = write(tmp_path / "typo.yaml", "MODEL:\n  RESNETS:\n    DEPHT: 101\n")
    expected = r"Non-existent config key: MODEL\.RESNETS\.DEPHT.*typo\.yaml"
    with pytest.raises(KeyError, match=expected):
        get_cfg(path)


def test_attribute_keys_need_no_setup_call(tmp_path):
    text = "MODEL:\n  ATTRIBUTE_ON: True\n  ROI_ATTRIBUTE_HEAD:\n    LOSS_WEIGHT: 0.5\n"
    path = write(tmp_path / "attr.yaml", text)
    cfg = get_cfg(path)
    assert cfg.MODEL.ATTRIBUTE_ON is True and cfg.MODEL.ROI_ATTRIBUTE_HEAD.LOSS_WEIGHT == 0.5


@pytest.mark.parametrize(
    "text,match",
    [
        ("MODEL: [unclosed\n", "cannot parse"),
        ("- a\n- b\n", "mapping"),
        ("MODEL:\n  RESNETS:\n    DEPTH: fifty\n", r"MODEL\.RESNETS\.DEPTH"),
        ("SEED: 2020-01-01\n", "SEED"),
        ("VERSION: 1\n", "VERSION 1 is not supported"),
        ("SEED: !!python/object:os.system {}\n", "cannot parse"),
    ],
)
def test_bad_config_files_get_specific_errors(tmp_path, text, match):
    path = write(tmp_path / "bad.yaml", text)
    with pytest.raises(ValueError, match=match):
        get_cfg(path)


def test_empty_file_changes_nothing(tmp_path):
    path = write(tmp_path / "empty.yaml", "# nothing here\n")
    assert get_cfg(path) == get_cfg()


# A few keys (with the newest Detectron2's default values) of a dump made by a newer version.
NEWER_DUMP_EXTRAS = """
FLOAT32_PRECISION: ''
DATALOADER: {REPEAT_SQRT: true}
INPUT: {RANDOM_FLIP: horizontal}
MODEL:
  RPN: {BBOX_REG_LOSS_TYPE: smooth_l1, BBOX_REG_LOSS_WEIGHT: 1.0, CONV_DIMS: [-1]}
  ROI_BOX_HEAD: {BBOX_REG_LOSS_TYPE: smooth_l1, BBOX_REG_LOSS_WEIGHT: 1.0, USE_FED_LOSS: false,
    USE_SIGMOID_CE: false, FED_LOSS_FREQ_WEIGHT_POWER: 0.5, FED_LOSS_NUM_CLASSES: 50}
  RETINANET: {BBOX_REG_LOSS_TYPE: smooth_l1, NORM: ''}
SOLVER: {AMP: {ENABLED: false}, BASE_LR_END: 0.0, NESTEROV: false, NUM_DECAYS: 3,
  RESCALE_INTERVAL: false, REFERENCE_WORLD_SIZE: 0, WEIGHT_DECAY_BIAS: null}
"""


def test_newer_detectron2_dump_loads_to_the_reference_dump(tmp_path, shipped, caplog):
    raw = yaml.safe_load(shipped["R-50-grid"].dump())
    merge_raw_dicts(yaml.safe_load(NEWER_DUMP_EXTRAS), raw)
    path = write(tmp_path / "newer.yaml", yaml.safe_dump(raw))
    with caplog.at_level(logging.WARNING, logger="gridfeats.config"):
        cfg = get_cfg(path)
    assert yaml.safe_load(cfg.dump()) == yaml.safe_load(shipped["R-50-grid"].dump())
    assert_same_config(cfg, shipped["R-50-grid"])
    warned = " ".join(r.getMessage() for r in caplog.records)
    for key in [
        "SOLVER.AMP",
        "MODEL.RPN.BBOX_REG_LOSS_TYPE",
        "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE",
        "FLOAT32_PRECISION",
        "SOLVER.REFERENCE_WORLD_SIZE",
        "INPUT.RANDOM_FLIP",
    ]:
        assert key in warned
    assert "WEIGHT_DECAY_BIAS" in warned


def test_null_bias_decay_follows_the_effective_weight_decay(tmp_path):
    text = "SOLVER:\n  WEIGHT_DECAY: 0.0005\n  WEIGHT_DECAY_BIAS: null\n"
    path = write(tmp_path / "wd.yaml", text)
    assert get_cfg(path).SOLVER.WEIGHT_DECAY_BIAS == 0.0005


def test_newer_keys_in_overrides_are_dropped_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="gridfeats.config"):
        cfg = get_cfg("R-50-grid", opts=["SOLVER.AMP.ENABLED", "True", "MODEL.DEVICE", "cpu"])
    assert "AMP" not in cfg.SOLVER and cfg.MODEL.DEVICE == "cpu"
    assert "SOLVER.AMP.ENABLED" in caplog.text


def test_newer_key_list_never_shadows_a_reference_key():
    flat = flatten(get_cfg())
    clashes = {
        key
        for key in NEWER_DETECTRON2_KEYS
        if any(f == key or f.startswith(f"{key}.") for f in flat)
    }
    assert clashes == set()


# --------------------------------------------------------------------------------------------
# Round trip
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_dump_then_load_gives_an_equal_config(name, shipped, tmp_path):
    path = write(tmp_path / f"{name}.dump.yaml", shipped[name].dump())
    loaded = get_cfg(path)
    assert_same_config(loaded, shipped[name])
    assert yaml.safe_load(loaded.dump()) == yaml.safe_load(shipped[name].dump())
