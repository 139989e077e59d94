"""Caffe2 / Detectron1 blob names -> Detectron2 module names (``res2_0_branch2a_w`` ->
``res2.0.conv1.weight``)."""

from __future__ import annotations

import re
from typing import Dict, Iterable

import torch

_NORM_RULES = [
    (".bn.s", ".norm.weight"),
    (".bn.bias", ".norm.bias"),
    (".bn.rm", ".norm.running_mean"),
    (".bn.running.mean", ".norm.running_mean"),
    (".bn.riv", ".norm.running_var"),
    (".bn.running.var", ".norm.running_var"),
    (".bn.gamma", ".norm.weight"),
    (".bn.beta", ".norm.bias"),
    (".gn.s", ".norm.weight"),
    (".gn.bias", ".norm.bias"),
]

_DETECTION_RULES = [
    (r"^conv\.rpn(\.fpn2)?\.", "proposal_generator.rpn_head.conv."),
    (r"^rpn\.bbox\.pred(\.fpn2)?\.", "proposal_generator.rpn_head.anchor_deltas."),
    (r"^rpn\.cls\.logits(\.fpn2)?\.", "proposal_generator.rpn_head.objectness_logits."),
    (r"^bbox\.pred\.", "bbox_pred."),
    (r"^cls\.score\.", "cls_score."),
    (r"^fc6\.", "box_head.fc1."),
    (r"^fc7\.", "box_head.fc2."),
]


def convert_caffe2_name(name: str) -> str:
    """Rename one blob, applying the rules in Detectron2's order."""
    name = {"pred_b": "linear_b", "pred_w": "linear_w"}.get(
        name, name
    )  # whole names only: bbox_pred_w stays
    name = name.replace("_", ".")
    name = re.sub(r"\.b$", ".bias", name)
    name = re.sub(r"\.w$", ".weight", name)
    for old, new in _NORM_RULES:
        if name.endswith(old):
            name = name[: -len(old)] + new
            break
    if name.startswith("res.conv1.norm."):
        name = "conv1.norm." + name[len("res.conv1.norm.") :]
    if name.startswith("conv1."):
        name = "stem." + name
    for old, new in (
        (".branch1.", ".shortcut."),
        (".branch2a.", ".conv1."),
        (".branch2b.", ".conv2."),
        (".branch2c.", ".conv3."),
    ):
        name = name.replace(old, new)
    for pattern, new in _DETECTION_RULES:
        name = re.sub(pattern, new, name)
    return name


def convert_caffe2_state_dict(blobs: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename every blob; detection heads also move Caffe2's background class (row 0) to the end."""
    out: Dict[str, torch.Tensor] = {}
    for old, value in blobs.items():
        new = convert_caffe2_name(old)
        if new in out:
            raise ValueError(f"two Caffe2 blobs map to {new!r} (second: {old!r})")
        if new.startswith("bbox_pred.") and value.shape[0] % 4 == 0 and value.shape[0] > 4:
            value = value[4:]  # drop the background class' regression rows
        elif new.startswith("cls_score.") and value.shape[0] > 1:
            value = torch.cat([value[1:], value[:1]])  # background first -> background last
        out[new] = value
    return out


def caffe2_names(names: Iterable[str]) -> Dict[str, str]:
    return {n: convert_caffe2_name(n) for n in names}
