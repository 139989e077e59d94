"""The engine's step: accumulation, clipping, precision refusal, the metrics log, param groups."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gridfeats import precision
from gridfeats.engine import (
    GradClip,
    RankInfo,
    Trainer,
    build_param_groups,
    distributed,
    hooks,
    read_metrics,
)


def _data(n: int = 16):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 5, generator=generator)
    y = x @ torch.randn(5, 2, generator=generator) + 0.1 * torch.randn(n, 2, generator=generator)
    return x, y


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2))


def _mse(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def _train(batch_size: int, accumulation: int, steps: int, **kwargs) -> nn.Module:
    x, y = _data()
    model = _model()
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)
    trainer = Trainer(
        model,
        loader,
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        max_iter=steps,
        loss_fn=_mse,
        grad_accumulation=accumulation,
        **kwargs,
    )
    trainer.train()
    return model


def test_gradient_accumulation_equals_one_big_batch():
    big = _train(batch_size=8, accumulation=1, steps=4)  # two epochs of two steps
    accumulated = _train(batch_size=2, accumulation=4, steps=4)
    one_small = _train(batch_size=2, accumulation=1, steps=4)
    for a, b, c in zip(big.parameters(), accumulated.parameters(), one_small.parameters()):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)
        assert not torch.allclose(a, c, atol=1e-3)  # the comparison can tell batches apart


def test_an_epoch_that_does_not_divide_into_steps_is_refused_or_warned():
    x, y = _data(6)
    model = _model()
    loader = DataLoader(TensorDataset(x, y), batch_size=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match="1 of the 3 batches of every epoch are left out"):
        trainer = Trainer(model, loader, optimizer, max_epochs=2, grad_accumulation=2)
    assert trainer.iters_per_epoch == 1 and trainer.max_iter == 2
    with pytest.raises(ValueError, match="fewer than grad_accumulation=4"):
        Trainer(model, loader, optimizer, max_iter=1, grad_accumulation=4)
    with pytest.raises(ValueError, match="give max_iter or max_epochs"):
        Trainer(model, loader, optimizer)


def _grads():
    a = nn.Parameter(torch.zeros(3))
    b = nn.Parameter(torch.zeros(2))
    a.grad = torch.tensor([3.0, -4.0, 0.0])  # norm 5
    b.grad = torch.tensor([0.3, -0.4])  # norm 0.5
    return a, b


def test_clip_by_value_clamps_every_entry():
    a, b = _grads()
    GradClip("value", 1.0)([a, b])
    assert a.grad.tolist() == [1.0, -1.0, 0.0]
    assert b.grad.tolist() == pytest.approx([0.3, -0.4])


def test_clip_by_norm_is_per_parameter_as_in_detectron2():
    a, b = _grads()
    GradClip("norm", 1.0)([a, b])
    assert a.grad.norm().item() == pytest.approx(1.0, rel=1e-5)
    assert a.grad.tolist() == pytest.approx([0.6, -0.8, 0.0], rel=1e-5)  # direction kept
    assert b.grad.tolist() == pytest.approx([0.3, -0.4])  # already under the threshold


def test_clip_full_model_rescales_the_global_norm():
    a, b = _grads()
    GradClip("full_model", 1.0)([a, b])
    total = math.sqrt(a.grad.norm() ** 2 + b.grad.norm() ** 2)
    assert total == pytest.approx(1.0, rel=1e-5)
    assert b.grad.tolist() == pytest.approx([0.3 / 25.25**0.5, -0.4 / 25.25**0.5], rel=1e-5)


def test_clip_config_reads_detectron2s_solver_node():
    from gridfeats.config import get_cfg

    cfg = get_cfg(
        None,
        [
            "SOLVER.CLIP_GRADIENTS.ENABLED",
            "True",
            "SOLVER.CLIP_GRADIENTS.CLIP_TYPE",
            "norm",
            "SOLVER.CLIP_GRADIENTS.CLIP_VALUE",
            "0.5",
        ],
    )
    assert GradClip.from_config(cfg.SOLVER.CLIP_GRADIENTS) == GradClip("norm", 0.5, 2.0)
    assert GradClip.from_config(get_cfg().SOLVER.CLIP_GRADIENTS) is None
    with pytest.raises(ValueError, match="clip type"):
        GradClip("global", 1.0)


def test_the_trainer_clips_before_the_optimizer_step():
    """One SGD step (lr 1, no momentum) from a clipped gradient moves each weight by at most
    the clip value."""
    x, y = _data()
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    loader = DataLoader(TensorDataset(x, 100 * y), batch_size=16)
    Trainer(
        model,
        loader,
        torch.optim.SGD(model.parameters(), lr=1.0),
        max_iter=1,
        loss_fn=_mse,
        clip_gradients=GradClip("value", 0.01),
    ).train()
    moves = [(p.detach() - b).abs().max().item() for p, b in zip(model.parameters(), before)]
    assert max(moves) == pytest.approx(0.01, rel=1e-4)


def test_bf16_on_a_cpu_without_native_bf16_is_refused(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    x, y = _data()
    model = _model()
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(precision.PrecisionError, match="no native bf16"):
        Trainer(model, loader, optimizer, max_iter=1, loss_fn=_mse, precision="bf16")
    with pytest.raises(precision.PrecisionError, match="fp16 is a GPU mode"):
        Trainer(model, loader, optimizer, max_iter=1, loss_fn=_mse, precision="fp16")


def test_bf16_on_a_cpu_with_native_bf16_runs_the_forward_in_bf16(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    x, y = _data()
    model = _model()
    seen = []

    def loss_fn(model, batch):
        out = model(batch[0])
        seen.append(out.dtype)
        return nn.functional.mse_loss(out.float(), batch[1])

    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    Trainer(model, loader, optimizer, max_iter=2, loss_fn=loss_fn, precision="bf16").train()
    assert seen == [torch.bfloat16, torch.bfloat16]
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights


def test_a_non_finite_loss_stops_training_with_the_step_and_the_terms():
    x, y = _data()
    model = _model()
    loader = DataLoader(TensorDataset(x, y), batch_size=8)

    def loss_fn(model, batch):
        return {"loss_ok": _mse(model, batch), "loss_bad": torch.tensor(float("nan"))}

    trainer = Trainer(
        model, loader, torch.optim.SGD(model.parameters(), lr=0.1), max_iter=1, loss_fn=loss_fn
    )
    with pytest.raises(FloatingPointError, match="iteration 1.*loss_bad"):
        trainer.train()


def test_metrics_jsonl_holds_losses_lr_and_evaluations(tmp_path):
    x, y = _data()
    model = _model()
    loader = DataLoader(TensorDataset(x, y), batch_size=4)  # 4 steps per epoch
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)

    def loss_fn(model, batch):
        return {"loss_a": _mse(model, batch), "loss_b": 0.5 * _mse(model, batch)}

    trainer = Trainer(model, loader, optimizer, scheduler, max_epochs=2, loss_fn=loss_fn)
    calls = []

    def evaluate():
        calls.append(trainer.iter)
        return {"score": float(trainer.iter)}

    trainer.register_hooks(
        [
            hooks.MetricsWriter(tmp_path / "metrics.jsonl", period=2, progress=False),
            hooks.EvalHook(evaluate, epoch_period=1),
        ]
    )
    trainer.train()
    records = read_metrics(tmp_path / "metrics.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    assert [(r["step"], r["epoch"]) for r in train] == [(2, 0), (4, 0), (6, 1), (8, 1)]
    assert [r["lr"] for r in train] == [0.1, 0.05, 0.05, 0.025]  # the LR each step used
    for r in train:
        assert set(r) == {"kind", "step", "epoch", "time", "loss_a", "loss_b", "total_loss", "lr"}
        assert r["loss_b"] == pytest.approx(0.5 * r["loss_a"])
        assert r["total_loss"] == pytest.approx(r["loss_a"] + r["loss_b"])
    evals = [r for r in records if r["kind"] == "eval"]
    assert [(r["step"], r["epoch"], r["score"]) for r in evals] == [(4, 1, 4.0), (8, 2, 8.0)]
    assert calls == [4, 8]  # not repeated at the end: the last step was evaluated


def test_param_groups_split_norm_and_bias_decay_and_multiply_lrs():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    model[2].weight.requires_grad_(False)
    single = build_param_groups(model, weight_decay=1e-4)
    assert len(single) == 1 and single[0]["weight_decay"] == 1e-4
    assert single[0]["params"] == [p for p in model.parameters() if p.requires_grad]

    groups = build_param_groups(
        model,
        lr=0.1,
        weight_decay=1e-4,
        weight_decay_norm=0.0,
        weight_decay_bias=1e-5,
        bias_lr_factor=2.0,
        lr_multipliers={"1.": 0.5},
    )
    by_param = {id(p): g for g in groups for p in g["params"]}
    assert by_param[id(model[0].weight)] == {**by_param[id(model[0].weight)], "lr": 0.1}
    assert by_param[id(model[0].weight)]["weight_decay"] == 1e-4
    assert by_param[id(model[0].bias)]["lr"] == pytest.approx(0.2)
    assert by_param[id(model[0].bias)]["weight_decay"] == 1e-5
    assert by_param[id(model[1].weight)]["lr"] == pytest.approx(0.05)
    assert by_param[id(model[1].weight)]["weight_decay"] == 0.0
    assert id(model[2].weight) not in by_param  # frozen
    assert sum(len(g["params"]) for g in groups) == 5
    assert len(groups) == 4  # linear weights; biases; norm weight; norm bias (lr x0.5 x2)
    with pytest.raises(ValueError, match="need a base lr"):
        build_param_groups(model, lr_multipliers={"0.": 0.1})


def test_rank_info_reads_torchrun_variables_and_single_process_collectives_are_identities():
    info = RankInfo.from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert info == RankInfo(1, 2, 1) and info.distributed and not info.is_main
    assert RankInfo.from_env({}) == RankInfo()
    with pytest.raises(ValueError, match="inconsistent torchrun environment"):
        RankInfo.from_env({"RANK": "2", "WORLD_SIZE": "2"})
    assert distributed.all_reduce_scalars({"b": 2, "a": 1.5}) == {"b": 2.0, "a": 1.5}
    assert distributed.sum_over_ranks([1, 2]) == [1, 2]
    assert distributed.all_gather_objects(["x"]) == ["x"]
    with pytest.raises(ValueError, match="auto, cpu or cuda"):
        distributed.resolve_device("tpu")


def test_ema_hook_averages_the_weights_after_each_step_and_swaps_them_in():
    x, y = _data()
    model = _model()
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    trainer = Trainer(
        model, loader, torch.optim.SGD(model.parameters(), lr=0.1), max_iter=3, loss_fn=_mse
    )

    class Record(hooks.HookBase):
        def __init__(self):
            self.weights = []

        def before_train(self):
            self.weights.append({k: v.clone() for k, v in model.state_dict().items()})

        def after_step(self):
            self.weights.append({k: v.clone() for k, v in model.state_dict().items()})

    record, ema = Record(), hooks.EMA(decay=0.5)
    trainer.register_hooks([record, ema])
    trainer.train()
    expected = dict(record.weights[0])
    for weights in record.weights[1:]:
        expected = {k: 0.5 * expected[k] + 0.5 * weights[k] for k in weights}
    for name, value in expected.items():
        assert torch.allclose(ema.shadow[name], value, atol=1e-7), name
    live = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.applied():
        assert torch.equal(model.state_dict()["0.weight"], ema.shadow["0.weight"])
    assert all(torch.equal(v, live[k]) for k, v in model.state_dict().items())


def test_a_torchrun_world_without_a_process_group_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    x, y = _data()
    model = _model()
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    with pytest.raises(RuntimeError, match="call gridfeats.engine.distributed.init_process_group"):
        Trainer(model, loader, torch.optim.SGD(model.parameters(), lr=0.1), max_iter=1)


def test_a_method_that_owns_its_update_overrides_run_step(tmp_path):
    """The pretraining pattern: ``train_step`` does its own backward and optimizer step; the
    engine keeps the data position, hooks and checkpoints."""
    x, y = _data()
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def train_step(batch) -> float:
        optimizer.zero_grad()
        loss = _mse(model, batch)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    class MethodTrainer(Trainer):
        def run_step(self):
            self.last_lr = optimizer.param_groups[0]["lr"]
            self.last_losses = {"loss": train_step(self.next_batch())}

    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    trainer = MethodTrainer(model, loader, optimizer, max_epochs=2)
    trainer.register_hooks(
        [
            hooks.MetricsWriter(tmp_path / "metrics.jsonl", period=1, progress=False),
            hooks.PeriodicCheckpointer(tmp_path, final_name=None),
        ]
    )
    trainer.train()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 9))
    assert records[-1]["loss"] < records[0]["loss"]
    from gridfeats.engine import load_training_state

    saved = load_training_state(tmp_path / "last.pt")
    assert saved["position"] == {"iteration": 8, "epoch": 2, "batch": 0}
    assert not (tmp_path / "final.pt").exists()
