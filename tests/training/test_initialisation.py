"""``--weights``: a Caffe2 ImageNet ``.pkl`` initialises the backbone (FREEZE_AT keeps the stem
and res2 exactly as loaded), and without weights the run starts from the seeded initialisation."""

from __future__ import annotations

import pickle

import numpy as np
import torch

from gridfeats.cli import main as gridfeats_main
from gridfeats.config import get_cfg
from gridfeats.engine import seed_all_rngs
from gridfeats.modeling.build import build_model
from tests.training.helpers import TINY_CONFIG, final_weights, train_args

SHORT = ["SOLVER.MAX_ITER", "2", "DATASETS.TEST", "()"]


def _caffe2_pkl(path, state):
    rng = np.random.default_rng(3)

    def like(key):
        return rng.standard_normal(tuple(state[key].shape)).astype(np.float32)

    blobs = {
        "conv1_w": like("backbone.stem.conv1.weight"),
        "res_conv1_bn_s": np.abs(like("backbone.stem.conv1.norm.weight")),
        "res_conv1_bn_b": like("backbone.stem.conv1.norm.bias"),
        "res2_0_branch2a_w": like("backbone.res2.0.conv1.weight"),
        "res3_0_branch2a_w": like("backbone.res3.0.conv1.weight"),
        "fc1000_w": np.zeros((10, 4), np.float32),
    }
    with open(path, "wb") as f:
        pickle.dump({"blobs": blobs}, f)
    return blobs


def test_caffe2_pkl_initialises_the_backbone_and_frozen_stages_keep_it(data, tmp_path):
    state = build_model(get_cfg(TINY_CONFIG)).state_dict()
    blobs = _caffe2_pkl(tmp_path / "R-tiny.pkl", state)
    run = tmp_path / "pkl"
    assert (
        gridfeats_main(train_args(data, run, "--weights", str(tmp_path / "R-tiny.pkl"), opts=SHORT))
        == 0
    )
    final = final_weights(run)
    for key, blob in (
        ("backbone.stem.conv1.weight", "conv1_w"),  # frozen (FREEZE_AT 2): exactly as loaded
        ("backbone.stem.conv1.norm.weight", "res_conv1_bn_s"),
        ("backbone.res2.0.conv1.weight", "res2_0_branch2a_w"),
    ):
        np.testing.assert_array_equal(final[key].numpy(), blobs[blob], err_msg=key)
    trained = final["backbone.res3.0.conv1.weight"].numpy()
    assert not np.array_equal(trained, blobs["res3_0_branch2a_w"])  # res3 trains
    assert np.abs(trained - blobs["res3_0_branch2a_w"]).max() < 0.1  # ... starting from the pkl


def test_scratch_starts_from_the_seeded_initialisation(data, tmp_path):
    run = tmp_path / "scratch"
    assert gridfeats_main(train_args(data, run, opts=SHORT)) == 0
    seed_all_rngs(7)  # the tiny config's SEED
    init = build_model(get_cfg(TINY_CONFIG)).state_dict()
    final = final_weights(run)
    assert torch.equal(final["backbone.stem.conv1.weight"], init["backbone.stem.conv1.weight"])
    assert not torch.equal(
        final["roi_heads.box_predictor.cls_score.weight"],
        init["roi_heads.box_predictor.cls_score.weight"],
    )
