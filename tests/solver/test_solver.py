"""build_optimizer / build_lr_scheduler: Detectron2@ffff8ac's parameter groups and LR schedules."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gridfeats.config import get_cfg
from gridfeats.layers import FrozenBatchNorm2d
from gridfeats.solver import build_lr_scheduler, build_optimizer


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.frozen = FrozenBatchNorm2d(4)
        self.embed = nn.Embedding(5, 2)
        self.fc = nn.Linear(4, 2)
        self.tied = self.fc  # the same tensors twice: one group each, not two
        self.frozen_fc = nn.Linear(2, 2)
        self.frozen_fc.requires_grad_(False)


def _cfg(*opts):
    return get_cfg("R-50-grid", opts=list(opts))


def test_one_group_per_trainable_tensor_with_norm_and_bias_rules():
    cfg = _cfg(
        "SOLVER.BASE_LR", "0.1", "SOLVER.WEIGHT_DECAY", "0.01", "SOLVER.WEIGHT_DECAY_NORM",
        "0.002", "SOLVER.WEIGHT_DECAY_BIAS", "0.003", "SOLVER.BIAS_LR_FACTOR", "2.0",
    )  # fmt: skip
    net = _Net()
    opt = build_optimizer(cfg, net)
    assert isinstance(opt, torch.optim.SGD)
    names = {id(p): n for n, p in net.named_parameters()}
    groups = [(names[id(g["params"][0])], g["lr"], g["weight_decay"]) for g in opt.param_groups]
    assert all(len(g["params"]) == 1 for g in opt.param_groups)
    assert groups == [
        ("conv.weight", 0.1, 0.01),
        ("conv.bias", 0.1 * 2.0, 0.003),
        ("bn.weight", 0.1, 0.002),  # norm layers: WEIGHT_DECAY_NORM, base LR, bias included
        ("bn.bias", 0.1, 0.002),
        ("embed.weight", 0.1, 0.01),  # the attribute embedding is decayed like any weight
        ("fc.weight", 0.1, 0.01),
        ("fc.bias", 0.2, 0.003),
    ]
    for g in opt.param_groups:
        assert g["momentum"] == 0.9 and g["nesterov"] is False and g["dampening"] == 0


def test_detectron2_defaults_decay_biases_too():
    cfg = _cfg()
    assert cfg.SOLVER.WEIGHT_DECAY_BIAS == cfg.SOLVER.WEIGHT_DECAY == 1e-4
    assert cfg.SOLVER.WEIGHT_DECAY_NORM == 0.0 and cfg.SOLVER.BIAS_LR_FACTOR == 1.0
    opt = build_optimizer(cfg, nn.Linear(3, 2))
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [(0.02, 1e-4)] * 2


def test_sgd_step_is_torch_sgd_with_weight_decay():
    cfg = _cfg("SOLVER.BASE_LR", "0.5", "SOLVER.WEIGHT_DECAY", "0.1")
    fc = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        fc.weight.copy_(torch.tensor([[1.0, -2.0]]))
    fc.weight.grad = torch.tensor([[0.0, 1.0]])
    opt = build_optimizer(cfg, fc)
    opt.step()
    # first step, no momentum buffer yet: w - lr * (g + wd * w)
    expected = [1.0 - 0.5 * 0.1, -2.0 - 0.5 * (1.0 - 0.2)]
    assert fc.weight.detach()[0].tolist() == pytest.approx(expected, rel=1e-7)


def test_gradient_clipping_by_value_when_enabled():
    cfg = _cfg(
        "SOLVER.CLIP_GRADIENTS.ENABLED", "True", "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", "0.25",
        "SOLVER.WEIGHT_DECAY", "0.0", "SOLVER.BASE_LR", "1.0",
    )  # fmt: skip
    fc = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        fc.weight.zero_()
    fc.weight.grad = torch.tensor([[3.0, -0.1]])
    opt = build_optimizer(cfg, fc)
    assert isinstance(opt, torch.optim.SGD)
    opt.step()
    assert torch.allclose(fc.weight.detach(), torch.tensor([[-0.25, 0.1]]))


def test_no_trainable_parameters_is_a_clear_error():
    fc = nn.Linear(2, 2)
    fc.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        build_optimizer(_cfg(), fc)


def _lrs(cfg, iters):
    opt = build_optimizer(cfg, nn.Linear(1, 1))
    sched = build_lr_scheduler(cfg, opt)
    out, it = [], 0
    for target in iters:
        while it < target:
            opt.step()
            sched.step()
            it += 1
        out.append([g["lr"] for g in opt.param_groups])
    return out


def test_multistep_warmup_and_milestones():
    cfg = _cfg("SOLVER.STEPS", "(60, 80)", "SOLVER.WARMUP_ITERS", "10", "SOLVER.MAX_ITER", "90")
    iters = [0, 1, 5, 9, 10, 59, 60, 61, 79, 80, 89]
    lrs = [g[0] for g in _lrs(cfg, iters)]
    warm = [0.02 * (0.001 * (1 - t / 10) + t / 10) for t in (0, 1, 5, 9)]
    # the LR drops *at* the milestone iteration (bisect_right), exactly as 0.02 * 0.1 ** k
    assert lrs == warm + [
        0.02,
        0.02,
        0.02 * 0.1,
        0.02 * 0.1,
        0.02 * 0.1,
        0.02 * 0.1**2,
        0.02 * 0.1**2,
    ]


def test_constant_warmup():
    cfg = _cfg(
        "SOLVER.WARMUP_METHOD", "constant", "SOLVER.WARMUP_ITERS", "3", "SOLVER.STEPS", "(5,)"
    )
    assert [g[0] for g in _lrs(cfg, [0, 2, 3, 5])] == [0.02 * 0.001] * 2 + [0.02, 0.02 * 0.1]


def test_cosine_schedule():
    cfg = _cfg(
        "SOLVER.LR_SCHEDULER_NAME", "WarmupCosineLR", "SOLVER.MAX_ITER", "100",
        "SOLVER.WARMUP_ITERS", "10",
    )  # fmt: skip
    lrs = [g[0] for g in _lrs(cfg, [0, 10, 50, 100])]
    assert lrs[0] == pytest.approx(0.02 * 0.001 * 0.5 * (1 + math.cos(0.0)), rel=1e-15)
    assert lrs[1] == pytest.approx(0.02 * 0.5 * (1 + math.cos(math.pi * 0.1)), rel=1e-15)
    assert lrs[2] == pytest.approx(0.01, rel=1e-12) and lrs[3] == pytest.approx(0.0, abs=1e-18)


def test_bias_lr_factor_scales_the_schedule_per_group():
    cfg = _cfg("SOLVER.BIAS_LR_FACTOR", "2.0", "SOLVER.WARMUP_ITERS", "0", "SOLVER.STEPS", "(2,)")
    assert _lrs(cfg, [0, 2]) == [[0.02, 0.04], [0.02 * 0.1, 0.04 * 0.1]]


@pytest.mark.parametrize(
    "opts, match",
    [
        (("SOLVER.LR_SCHEDULER_NAME", "Poly"), "LR_SCHEDULER_NAME"),
        (("SOLVER.WARMUP_METHOD", "exp"), "WARMUP_METHOD"),
        (("SOLVER.STEPS", "(80, 60)"), "increasing"),
    ],
)
def test_bad_schedule_config_is_a_clear_error(opts, match):
    with pytest.raises(ValueError, match=match):
        build_lr_scheduler(_cfg(*opts), build_optimizer(_cfg(), nn.Linear(1, 1)))
