"""torchvision ResNet / ResNeXt state dicts -> the project's ResNet names and config.

The rename is the one moco-det's ``convert-pretrain-to-detectron2.py`` applies (``conv1`` ->
``stem.conv1``, ``bn1`` -> ``stem.conv1.norm``, ``layerN`` -> ``res{N+1}``, ``bnK`` ->
``convK.norm``, ``downsample.0/1`` -> ``shortcut`` / ``shortcut.norm``), minus its junk: the
classifier or projector ``fc`` is dropped by name instead of becoming ``stem.fc``, and BN's
``num_batches_tracked`` (FrozenBN has none) is dropped. The architecture (depth, groups, widths)
is read from the tensors' shapes, never assumed.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Dict, List, Mapping, Tuple

import torch

from gridfeats.checkpoint.convert.errors import ConversionError

#: Blocks per stage -> depth, for torchvision's Bottleneck ResNets.
DEPTH_OF_BLOCKS = {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152}

#: torchvision's preprocessing in Detectron2's 0..255 units (ToTensor, then ImageNet Normalize).
IMAGENET_PIXEL_MEAN = [123.675, 116.28, 103.53]
IMAGENET_PIXEL_STD = [58.395, 57.12, 57.375]

_BLOCK_KEY = re.compile(r"^layer([1-4])\.(\d+)\.(.+)$")


def is_torchvision_resnet(state: Mapping[str, torch.Tensor]) -> bool:
    return "conv1.weight" in state and any(k.startswith("layer1.") for k in state)


def is_project_resnet(state: Mapping[str, torch.Tensor]) -> bool:
    return "stem.conv1.weight" in state and any(k.startswith("res2.") for k in state)


def _rename(key: str) -> str:
    if key.startswith("conv1."):
        return "stem." + key
    if key.startswith("bn1."):
        return "stem.conv1.norm." + key[len("bn1.") :]
    m = _BLOCK_KEY.match(key)
    if not m:
        raise ConversionError(f"unrecognised ResNet tensor {key!r}")
    stage, block, rest = int(m.group(1)) + 1, m.group(2), m.group(3)
    rest = re.sub(r"^bn([1-3])\.", r"conv\1.norm.", rest)
    rest = re.sub(r"^downsample\.0\.", "shortcut.", rest)
    rest = re.sub(r"^downsample\.1\.", "shortcut.norm.", rest)
    if not re.match(r"^(conv[1-3]|shortcut)\.", rest):
        raise ConversionError(f"unrecognised ResNet tensor {key!r}")
    return f"res{stage}.{block}.{rest}"


def torchvision_to_project(
    state: Mapping[str, torch.Tensor],
) -> Tuple["OrderedDict[str, torch.Tensor]", List[str]]:
    """Rename a torchvision ResNet state dict; returns ``(renamed, dropped_keys)``.

    ``fc.*`` (ImageNet classifier, MoCo/SimSiam projector) and ``num_batches_tracked`` are dropped;
    any other key that is not part of a torchvision ResNet is an error.
    """
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    dropped: List[str] = []
    for key, value in state.items():
        if key.startswith("fc.") or key.endswith("num_batches_tracked"):
            dropped.append(key)
            continue
        out[_rename(key)] = value
    return out, dropped


def project_resnet_drop(
    state: Mapping[str, torch.Tensor],
) -> Tuple["OrderedDict[str, torch.Tensor]", List[str]]:
    """Keep the project-named ResNet tensors, dropping ``num_batches_tracked`` and classifiers."""
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    dropped: List[str] = []
    for key, value in state.items():
        if key.endswith("num_batches_tracked") or not re.match(r"^(stem|res[2-5])\.", key):
            dropped.append(key)
            continue
        out[key] = value
    for key in [k for k in out if k.endswith(".norm.weight")]:
        # Caffe2 (MSRA) norms are affine only: identity statistics, as Detectron2 fills them.
        stem = key[: -len("weight")]
        if stem + "running_mean" not in out:
            out[stem + "running_mean"] = torch.zeros_like(out[key])
            out[stem + "running_var"] = torch.ones_like(out[key])
    return out, dropped


def resnet_config(state: Mapping[str, torch.Tensor]) -> Dict[str, object]:
    """``MODEL.RESNETS.*`` values read from project-named ResNet tensors (depth, groups, widths)."""
    blocks = []
    for stage in range(2, 6):
        ids = {int(k.split(".")[1]) for k in state if k.startswith(f"res{stage}.")}
        if not ids:
            break
        blocks.append(max(ids) + 1)
    if "res2.0.conv3.weight" not in state:
        raise ConversionError(
            "basic-block ResNets (ResNet-18/34, no conv3) are not supported: the project's ResNet "
            "is the bottleneck design"
        )
    if len(blocks) != 4:
        raise ConversionError(f"expected ResNet stages res2..res5, found {len(blocks)} stages")
    depth = DEPTH_OF_BLOCKS.get(tuple(blocks))
    if depth is None:
        raise ConversionError(
            f"blocks per stage {tuple(blocks)} match no supported depth "
            f"({', '.join(f'{v}: {k}' for k, v in DEPTH_OF_BLOCKS.items())})"
        )
    conv2 = state["res2.0.conv2.weight"]
    bottleneck = int(conv2.shape[0])
    groups = bottleneck // int(conv2.shape[1])
    return {
        "MODEL.RESNETS.DEPTH": depth,
        "MODEL.RESNETS.NUM_GROUPS": groups,
        "MODEL.RESNETS.WIDTH_PER_GROUP": bottleneck // groups,
        "MODEL.RESNETS.STEM_OUT_CHANNELS": int(state["stem.conv1.weight"].shape[0]),
        "MODEL.RESNETS.RES2_OUT_CHANNELS": int(state["res2.0.conv3.weight"].shape[0]),
    }


def describe_resnet(config: Mapping[str, object]) -> str:
    groups, width = config["MODEL.RESNETS.NUM_GROUPS"], config["MODEL.RESNETS.WIDTH_PER_GROUP"]
    name = "ResNeXt" if groups > 1 else "ResNet"
    return f"{name}-{config['MODEL.RESNETS.DEPTH']} ({groups} group(s) x {width} channels)"


#: Config for torchvision-trained ResNets (every SSL repo here): moco-det's ``*_moco.yaml`` deltas
#: that concern the weights (RGB, ImageNet mean/std, stride in the 3x3), with FrozenBN.
TORCHVISION_INPUT_CONFIG: Dict[str, object] = {
    "INPUT.FORMAT": "RGB",
    "MODEL.PIXEL_MEAN": IMAGENET_PIXEL_MEAN,
    "MODEL.PIXEL_STD": IMAGENET_PIXEL_STD,
    "MODEL.RESNETS.STRIDE_IN_1X1": False,
    "MODEL.RESNETS.NORM": "FrozenBN",
}
