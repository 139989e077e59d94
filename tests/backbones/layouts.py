"""Seeded checkpoints in the SSL repos' real on-disk layouts (docs/backbones.md, "Containers").

Each writer takes the backbone the test compares against and wraps it exactly as the repo's
trainer saves it: container keys and their order, DDP's ``module.``, branch prefixes, the other
encoder, projector / predictor / decoder / DINO head tensors, the queue, optimizer and scaler
state and the ``argparse.Namespace`` of MAE and DINO. The other encoders hold different values
(flipped tensors), so a converter that takes the wrong branch gives different features. Head
widths are reduced (the converter drops these tensors by name, whatever their size) so that the
files stay small; the backbones themselves have their real shapes.
"""

from __future__ import annotations

import argparse
from collections import OrderedDict
from pathlib import Path
from typing import Dict, Mapping

import torch

Tensors = "OrderedDict[str, torch.Tensor]"


def _prefixed(prefix: str, state: Mapping[str, torch.Tensor]) -> Tensors:
    return OrderedDict((prefix + k, v) for k, v in state.items())


def _other_encoder(state: Mapping[str, torch.Tensor]) -> Tensors:
    """Same keys and shapes, different values (the key / momentum encoder)."""
    return OrderedDict((k, v.flip(0).clone() if v.dim() else v.clone()) for k, v in state.items())


def _linear(name: str, fan_in: int, fan_out: int, bias: bool = True) -> Tensors:
    out = OrderedDict([(f"{name}.weight", torch.randn(fan_out, fan_in) * 0.01)])
    if bias:
        out[f"{name}.bias"] = torch.zeros(fan_out)
    return out


def _bn1d(name: str, n: int, affine: bool = True) -> Tensors:
    out: Tensors = OrderedDict()
    if affine:
        out[f"{name}.weight"], out[f"{name}.bias"] = torch.ones(n), torch.zeros(n)
    out[f"{name}.running_mean"], out[f"{name}.running_var"] = torch.zeros(n), torch.ones(n)
    out[f"{name}.num_batches_tracked"] = torch.tensor(7)
    return out


def _backbone(state: Mapping[str, torch.Tensor], drop: str = "fc.") -> Tensors:
    return OrderedDict((k, v) for k, v in state.items() if not k.startswith(drop))


def _sgd(n: int = 2) -> Dict:
    return {"state": {}, "param_groups": [{"lr": 0.03, "momentum": 0.9, "params": list(range(n))}]}


# -------------------------------------------------------------------------------------------------
# ResNet recipes (torchvision resnet50 state dicts)
# -------------------------------------------------------------------------------------------------
def write_torchvision(resnet_state: Mapping[str, torch.Tensor], path: Path) -> Path:
    torch.save(OrderedDict(resnet_state), path)
    return path


def write_moco_v2(resnet_state: Mapping[str, torch.Tensor], path: Path, hidden: int = 64) -> Path:
    """moco main_moco.py: queue first, then encoder_q (fc = 2-layer MLP), then encoder_k."""
    q = _backbone(resnet_state)
    q.update(_linear("fc.0", 2048, hidden))
    q.update(_linear("fc.2", hidden, 128))
    queue = torch.nn.functional.normalize(torch.randn(128, 256), dim=0)
    state = OrderedDict(
        [("module.queue", queue), ("module.queue_ptr", torch.zeros(1, dtype=torch.long))]
    )
    state.update(_prefixed("module.encoder_q.", q))
    state.update(_prefixed("module.encoder_k.", _other_encoder(q)))
    torch.save({"epoch": 200, "arch": "resnet50", "state_dict": state, "optimizer": _sgd()}, path)
    return path


def write_simsiam(
    resnet_state: Mapping[str, torch.Tensor], path: Path, ddp: bool = True, hidden: int = 64
) -> Path:
    """simsiam main_simsiam.py: encoder (fc = 3-layer projector), predictor; ``module.`` if DDP."""
    enc = _backbone(resnet_state)
    enc.update(_linear("fc.0", 2048, hidden, bias=False))
    enc.update(_bn1d("fc.1", hidden))
    enc.update(_linear("fc.3", hidden, hidden, bias=False))
    enc.update(_bn1d("fc.4", hidden))
    enc.update(_linear("fc.6", hidden, hidden))
    enc.update(_bn1d("fc.7", hidden, affine=False))
    pred = _linear("0", hidden, 16, bias=False)
    pred.update(_bn1d("1", 16))
    pred.update(_linear("3", 16, hidden))
    state = _prefixed("encoder.", enc)
    state.update(_prefixed("predictor.", pred))
    if ddp:
        state = _prefixed("module.", state)
    torch.save({"epoch": 100, "arch": "resnet50", "state_dict": state, "optimizer": _sgd()}, path)
    return path


def _mocov3_mlp(name: str, dims, last_bn: bool) -> Tensors:
    out: Tensors = OrderedDict()
    for i in range(len(dims) - 1):
        out.update(_linear(f"{name}.{3 * i}", dims[i], dims[i + 1], bias=False))
        if i < len(dims) - 2:
            out.update(_bn1d(f"{name}.{3 * i + 1}", dims[i + 1]))
        elif last_bn:
            out.update(_bn1d(f"{name}.{3 * i + 1}", dims[i + 1], affine=False))
    return out


def write_mocov3_resnet(resnet_state: Mapping[str, torch.Tensor], path: Path) -> Path:
    """moco-v3 main_moco.py, R-50: base_encoder (fc = projector), momentum_encoder, predictor."""
    base = _backbone(resnet_state)
    base.update(_mocov3_mlp("fc", (2048, 64, 32), last_bn=True))
    state = _prefixed("module.base_encoder.", base)
    state.update(_prefixed("module.momentum_encoder.", _other_encoder(base)))
    state.update(_prefixed("module.predictor.", _mocov3_mlp("", (32, 64, 32), last_bn=False)))
    scaler = {
        "scale": 65536.0,
        "growth_factor": 2.0,
        "backoff_factor": 0.5,
        "growth_interval": 2000,
        "_growth_tracker": 0,
    }
    torch.save(
        {
            "epoch": 100,
            "arch": "resnet50",
            "state_dict": state,
            "optimizer": _sgd(),
            "scaler": scaler,
        },
        path,
    )
    return path


def write_dino_resnet(resnet_state: Mapping[str, torch.Tensor], path: Path) -> Path:
    """dino main_dino.py, R-50: SyncBN + DDP on both nets: ``module.backbone.`` / ``module.head.``
    (MultiCropWrapper set fc to Identity, so there is no fc)."""
    backbone = _backbone(resnet_state)
    return _write_dino(
        backbone,
        _other_encoder(backbone),
        2048,
        path,
        ddp_teacher=True,
        args=argparse.Namespace(arch="resnet50", patch_size=16, out_dim=32),
    )


def write_dino_resnet_release(resnet_state: Mapping[str, torch.Tensor], path: Path) -> Path:
    """``dino_resnet50_pretrain.pth``: the teacher backbone, plain, no fc."""
    torch.save(_backbone(resnet_state), path)
    return path


# -------------------------------------------------------------------------------------------------
# ViT recipes (timm-style names)
# -------------------------------------------------------------------------------------------------
def _dino_head(dim: int, hidden: int = 32, bottleneck: int = 16, out: int = 32) -> Tensors:
    head = _linear("mlp.0", dim, hidden)
    head.update(_linear("mlp.2", hidden, hidden))
    head.update(_linear("mlp.4", hidden, bottleneck))
    head["last_layer.weight_g"] = torch.ones(out, 1)
    head["last_layer.weight_v"] = torch.randn(out, bottleneck)
    return head


def _write_dino(teacher, student, dim, path, ddp_teacher: bool, args) -> Path:
    t = _prefixed("backbone.", teacher)
    t.update(_prefixed("head.", _dino_head(dim)))
    s = _prefixed("module.backbone.", student)
    s.update(_prefixed("module.head.", _dino_head(dim)))
    if ddp_teacher:
        t = _prefixed("module.", t)
    torch.save(
        {
            "student": s,
            "teacher": t,
            "optimizer": _sgd(),
            "epoch": 100,
            "args": args,
            "dino_loss": {"center": torch.zeros(1, 32)},
            "fp16_scaler": {"scale": 1024.0},
        },
        path,
    )
    return path


def write_dino_vit(
    vit_state: Mapping[str, torch.Tensor], path: Path, arch: str = "vit_small"
) -> Path:
    """dino main_dino.py, ViT: the teacher is not DDP-wrapped (no BN): ``backbone.``, ``head.``."""
    dim = vit_state["cls_token"].shape[-1]
    return _write_dino(
        OrderedDict(vit_state),
        _other_encoder(vit_state),
        dim,
        path,
        ddp_teacher=False,
        args=argparse.Namespace(arch=arch, patch_size=16, out_dim=32),
    )


def write_dino_vit_release(vit_state: Mapping[str, torch.Tensor], path: Path) -> Path:
    """``dino_deitsmall16_pretrain.pth``: the teacher backbone as a plain state dict."""
    torch.save(OrderedDict(vit_state), path)
    return path


def write_mocov3_vit(
    vit_state: Mapping[str, torch.Tensor], path: Path, arch: str = "vit_small"
) -> Path:
    """moco-v3 main_moco.py, ViT: base_encoder (head = 3-layer projector), momentum, predictor."""
    dim = vit_state["cls_token"].shape[-1]
    base = OrderedDict(vit_state)
    base.update(_mocov3_mlp("head", (dim, 64, 64, 32), last_bn=True))
    state = _prefixed("module.base_encoder.", base)
    state.update(_prefixed("module.momentum_encoder.", _other_encoder(base)))
    state.update(_prefixed("module.predictor.", _mocov3_mlp("", (32, 64, 32), last_bn=True)))
    torch.save(
        {
            "epoch": 300,
            "arch": arch,
            "state_dict": state,
            "optimizer": _sgd(),
            "scaler": {"scale": 65536.0},
        },
        path,
    )
    return path


def write_mae_pretrain(
    vit_state: Mapping[str, torch.Tensor], path: Path, model: str = "mae_vit_base_patch16"
) -> Path:
    """mae util/misc.py save_model: ``model`` (no prefix) with mask token and decoder, ``args``."""
    dim = vit_state["cls_token"].shape[-1]
    n = vit_state["pos_embed"].shape[1]
    state = OrderedDict(vit_state)
    state["mask_token"] = torch.zeros(1, 1, 32)
    state.update(_linear("decoder_embed", dim, 32))
    state["decoder_pos_embed"] = torch.zeros(1, n, 32)
    for key in ("norm1.weight", "norm1.bias", "attn.qkv.weight", "mlp.fc1.weight"):
        state[f"decoder_blocks.0.{key}"] = torch.zeros(8)
    state.update(_linear("decoder_norm", 32, 32))
    state.update(_linear("decoder_pred", 32, 16 * 16 * 3))
    args = argparse.Namespace(model=model, mask_ratio=0.75, norm_pix_loss=True, output_dir="./out")
    torch.save(
        {"model": state, "optimizer": _sgd(), "epoch": 799, "scaler": {"scale": 1.0}, "args": args},
        path,
    )
    return path


def write_mae_release(vit_state: Mapping[str, torch.Tensor], path: Path) -> Path:
    """``mae_pretrain_vit_base.pth``: ``{'model': encoder only}``."""
    torch.save({"model": OrderedDict(vit_state)}, path)
    return path
