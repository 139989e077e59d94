"""Training from backbones converted by ``gridfeats convert-backbone``: a torchvision ResNet-50
and an MAE ViT (an SSL initialisation takes the same path)."""

from __future__ import annotations

import pytest
import torch

from gridfeats.cli import main as gridfeats_main
from tests.training.helpers import final_weights, train_args

pytest.importorskip("gridfeats.checkpoint.convert")

SMALL_HEADS = [
    "MODEL.ROI_HEADS.NUM_CLASSES", "6",
    "MODEL.ROI_ATTRIBUTE_HEAD.NUM_CLASSES", "8",
    "MODEL.ROI_BOX_HEAD.FC_DIM", "32",
    "MODEL.ROI_ATTRIBUTE_HEAD.OBJ_EMBED_DIM", "8",
    "MODEL.ROI_ATTRIBUTE_HEAD.FC_DIM", "16",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
    "INPUT.MIN_SIZE_TRAIN", "(64,)",
    "INPUT.MAX_SIZE_TRAIN", "96",
    "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.MAX_ITER", "2",
    "SOLVER.WARMUP_ITERS", "1",
    "SOLVER.BASE_LR", "0.001",
    "SEED", "3",
    "DATASETS.TEST", "()",
    "DATALOADER.NUM_WORKERS", "0",
]  # fmt: skip


def test_a_converted_torchvision_resnet50_initialises_training(data, tmp_path):
    import torchvision

    torch.manual_seed(0)
    source = torchvision.models.resnet50(weights=None).eval()
    torch.save(source.state_dict(), tmp_path / "resnet50.pth")
    converted = tmp_path / "tv-r50.pth"
    assert (
        gridfeats_main(
            ["convert-backbone", str(tmp_path / "resnet50.pth"), "--out", str(converted)]
        )
        == 0
    )

    run = tmp_path / "run"
    args = train_args(data, run, "--weights", str(converted), opts=SMALL_HEADS)
    args[args.index("--config") + 1] = str(converted.with_suffix(".yaml"))
    assert gridfeats_main(args) == 0
    final = final_weights(run)
    # FREEZE_AT 2: the stem and res2 keep the torchvision weights exactly; res3+ trained from them
    assert torch.equal(final["backbone.stem.conv1.weight"], source.conv1.weight)
    assert torch.equal(final["backbone.res2.0.conv1.weight"], source.layer1[0].conv1.weight)
    moved = final["backbone.res4.0.conv1.weight"] - source.layer3[0].conv1.weight
    assert 0 < moved.abs().max() < 0.05


def test_a_converted_mae_vit_initialises_training(data, tmp_path):
    """A ViT (MAE's released encoder layout, converted) as the detector backbone: training runs
    on the stride-16 map and moves the converted weights."""
    from tests.backbones import layouts
    from tests.backbones.reference import RefViT

    source = RefViT(seed=5, dim=48, depth=2, heads=12, table="mae")
    src = layouts.write_mae_release(source.state_dict(), tmp_path / "mae_pretrain_vit.pth")
    converted = tmp_path / "mae.pth"
    cli = ["convert-backbone", str(src), "--out", str(converted), "--num-heads", "12"]
    assert gridfeats_main(cli) == 0
    run = tmp_path / "run"
    args = train_args(data, run, "--weights", str(converted), opts=SMALL_HEADS)
    args[args.index("--config") + 1] = str(converted.with_suffix(".yaml"))
    assert gridfeats_main(args) == 0
    final = final_weights(run)
    start = torch.load(converted, weights_only=True)["model"]
    vit_keys = [k for k in start if k.startswith("backbone.") and k.endswith("qkv.weight")]
    assert vit_keys, sorted(start)[:5]
    moved = max((final[k] - start[k]).abs().max().item() for k in vit_keys)
    assert 0 < moved < 0.05
