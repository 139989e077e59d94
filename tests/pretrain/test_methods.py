"""Two ``train_step``s of each method equal two steps of the papers' pseudocode.

Each test seeds a tiny network written independently in paper_reference.py, saves it in the
reference repo's own checkpoint layout, loads that into ``build_method(..., checkpoint=...)``, runs
two steps of both on the same fixed views and compares the two losses and every updated tensor
(online and momentum / teacher weights, BN statistics, queue, center).

Everything runs in float64: in float32 the two implementations' different but equivalent
summation orders (batched crops, fused losses) leave rounding noise that BatchNorm and two SGD
steps amplify differently per CPU's kernels (3.8e-5 on DINO's conv1 on an AVX2 EPYC, within
2e-6 on AVX-512), while in float64 the comparison measures the algorithm alone (to 1e-7; the
float32 sin-cos position tables of the ViTs are the one float32 part left).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gridfeats.pretrain import build_method
from tests.pretrain import paper_reference as ref

B = 8


@pytest.fixture(autouse=True)
def _float64():
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(saved)


def views(seed, n=2, size=32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, 3, size, size, generator=g) for _ in range(n)]


def module(sd):
    return {"module." + k: v.clone() for k, v in sd.items()}


def assert_same(ours: dict, theirs: dict, atol=1e-7, adam_lr=None):
    """Every tensor equal to float32 rounding. With Adam, a gradient that is zero up to rounding
    (e.g. the key bias of attention, which softmax ignores) becomes an update of about +-lr whose
    sign is the rounding noise's, so there each entry may differ by up to 2 lr per step, and the
    bulk (99.5 % of all entries) must still agree to ``atol``."""
    assert set(ours) == set(theirs), set(ours) ^ set(theirs)
    close = total = 0
    for k, v in theirs.items():
        d = (ours[k].double() - v.double()).abs()
        if adam_lr is None:
            assert torch.allclose(ours[k].double(), v.double(), atol=atol, rtol=1e-7), (k, d.max())
        elif d.numel():
            assert d.max() <= 4 * adam_lr + atol, (k, d.max().item())
            close += int((d <= atol + 1e-5 * v.double().abs()).sum())
            total += d.numel()
    if adam_lr is not None:
        assert close >= 0.995 * total, (close, total)


def changed(before: dict, after: dict) -> int:
    return sum(not torch.equal(before[k], after[k]) for k in before)


@pytest.fixture(autouse=True)
def _seed(one_thread):
    torch.manual_seed(0)


def test_simsiam_two_steps_match_the_paper_pseudocode():
    net = nn.Module()
    net.encoder = ref.resnet18_with(ref.bn_mlp([512, 512, 512, 16], last_bias=True))
    net.predictor = ref.bn_mlp([16, 8, 16], last_bn=False, last_bias=True)
    ckpt = {"epoch": 0, "arch": "resnet18", "state_dict": module(net.state_dict())}
    start = copy.deepcopy(net.state_dict())
    lr = 0.05
    opt = torch.optim.SGD(net.parameters(), lr, momentum=0.9, weight_decay=1e-4)
    net.encoder.fc[6].bias.requires_grad = False
    m = build_method("simsiam", checkpoint=ckpt, lr=lr, weight_decay=1e-4, momentum=0.9)
    for seed in (1, 2):
        theirs = ref.simsiam_step(net, opt, *views(seed))
        assert m.train_step(views(seed)) == pytest.approx(theirs, rel=1e-7, abs=1e-9)
    ours = m.upstream_state_dict()["state_dict"]
    assert_same(ours, module(net.state_dict()))
    assert changed(module(start), ours) > 50


def test_mocov2_two_steps_match_including_queue_and_key_encoder():
    net = nn.Module()
    net.register_buffer("queue", nn.functional.normalize(torch.randn(16, 32), dim=0))
    net.register_buffer("queue_ptr", torch.tensor([8]))
    net.encoder_q = ref.resnet18_with(
        nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 16))
    )
    net.encoder_k = copy.deepcopy(net.encoder_q)
    ckpt = {"state_dict": module(net.state_dict())}
    opt = torch.optim.SGD(net.encoder_q.parameters(), 0.03, momentum=0.9, weight_decay=1e-4)
    m = build_method("mocov2", checkpoint=ckpt, lr=0.03, ema=0.9, temperature=0.2)
    assert m.model.queue.shape == (16, 32)
    for seed in (1, 2):
        torch.manual_seed(10 + seed)
        theirs = ref.moco_step(net, opt, *views(seed), m=0.9, t=0.2)
        torch.manual_seed(10 + seed)
        assert m.train_step(views(seed)) == pytest.approx(theirs, rel=1e-7)
    ours = m.upstream_state_dict()["state_dict"]
    assert int(ours["module.queue_ptr"]) == 24
    assert_same(ours, module(net.state_dict()))


@pytest.mark.parametrize("arch", ["resnet18", "vit"])
def test_mocov3_two_steps_match(arch):
    net = nn.Module()
    if arch == "vit":
        net.base_encoder = ref.TinyViT(d=32, heads=4)
        net.base_encoder.patch_embed.proj.requires_grad_(False)  # random patch projection
        net.base_encoder.head = ref.bn_mlp([32, 32, 32, 16])
        net.predictor = ref.bn_mlp([16, 32, 16])
    else:
        net.base_encoder = ref.resnet18_with(ref.bn_mlp([512, 32, 16]))
        net.predictor = ref.bn_mlp([16, 32, 16], last_bn=False)
    net.momentum_encoder = copy.deepcopy(net.base_encoder)
    net.momentum_encoder.requires_grad_(False)
    net = _reorder(net)
    ckpt = {"state_dict": module(net.state_dict())}
    kw = dict(ema=0.9, num_heads=4) if arch == "vit" else dict(ema=0.9)
    if arch == "vit":
        opt = torch.optim.AdamW(
            [p for p in net.parameters() if p.requires_grad], 1e-3, weight_decay=0.1
        )
        m = build_method(
            "mocov3", checkpoint=ckpt, lr=1e-3, weight_decay=0.1, temperature=0.2, **kw
        )
        t = 0.2
    else:
        state = {}
        m = build_method(
            "mocov3", checkpoint=ckpt, lr=0.3, weight_decay=1e-6, temperature=1.0, **kw
        )
        t = 0.2 * 5
    for seed in (1, 2):
        if arch == "vit":
            theirs = ref.mocov3_step(net, opt, *views(seed), m=0.9, t=t)
        else:
            lars = _LarsShim(net, 0.3, 1e-6, 0.9, state)
            theirs = ref.mocov3_step(net, lars, *views(seed), m=0.9, t=t)
        assert m.train_step(views(seed)) == pytest.approx(theirs, rel=1e-7)
    assert_same(m.upstream_state_dict()["state_dict"], module(net.state_dict()), atol=1e-7)


class _LarsShim:
    def __init__(self, net, lr, wd, momentum, state):
        self.net, self.args, self.state = net, (lr, wd, momentum), state

    def zero_grad(self):
        self.net.zero_grad(set_to_none=True)

    def step(self):
        ref.lars_step_(self.net.parameters(), *self.args, self.state)


def _reorder(net):
    """Register in the repos' order: base_encoder, momentum_encoder, predictor."""
    out = nn.Module()
    out.base_encoder, out.momentum_encoder, out.predictor = (
        net.base_encoder,
        net.momentum_encoder,
        net.predictor,
    )
    return out


def test_mae_two_steps_match_with_given_noise():
    net = nn.Module()
    vit = ref.TinyViT(d=32, heads=4)
    net.patch_embed, net.cls_token, net.pos_embed = vit.patch_embed, vit.cls_token, vit.pos_embed
    net.blocks, net.norm = vit.blocks, vit.norm
    net.decoder_embed = nn.Linear(32, 16)
    net.mask_token = nn.Parameter(torch.randn(1, 1, 16) * 0.02)
    net.decoder_pos_embed = nn.Parameter(torch.randn(1, 17, 16), requires_grad=False)
    net.decoder_blocks = nn.ModuleList([ref.TinyBlock(16, 4)])
    net.decoder_norm = nn.LayerNorm(16, eps=1e-6)
    net.decoder_pred = nn.Linear(16, 8 * 8 * 3)
    ckpt = {"model": copy.deepcopy(net.state_dict())}
    named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        [
            {
                "params": [p for n, p in named if p.ndim == 1 or n.endswith(".bias")],
                "weight_decay": 0.0,
            },
            {
                "params": [p for n, p in named if not (p.ndim == 1 or n.endswith(".bias"))],
                "weight_decay": 0.05,
            },
        ],
        lr=1e-3,
        betas=(0.9, 0.95),
    )
    m = build_method(
        "mae",
        checkpoint=ckpt,
        lr=1e-3,
        weight_decay=0.05,
        mask_ratio=0.75,
        norm_pix_loss=True,
        num_heads=4,
        decoder_num_heads=4,
    )
    for seed in (1, 2):
        noise = torch.rand(B, 16, generator=torch.Generator().manual_seed(seed))
        (img,) = views(seed, 1)
        theirs = ref.mae_step(net, opt, img, noise, 0.75, 8)
        assert m.train_step([img], noise=noise) == pytest.approx(theirs, rel=1e-7)
    # The fixed sin-cos position table is float32 in gridfeats (as MAE's checkpoints store it)
    # and float64 in the reference here; two AdamW steps carry that 1e-8 to ~1e-6.
    assert_same(m.upstream_state_dict()["model"], net.state_dict(), atol=5e-6)


@pytest.mark.parametrize("arch", ["resnet18", "vit"])
def test_dino_two_steps_match_teacher_and_center(arch):
    def make():
        net = nn.Module()
        if arch == "vit":
            net.backbone = ref.TinyViT(d=32, heads=4, learned_pos=True)
        else:
            net.backbone = ref.resnet18_with(nn.Identity())
        net.head = ref.DinoHeadRef(32 if arch == "vit" else 512, 64)
        return net

    if arch == "vit":
        crops = lambda s: views(s, 4)  # noqa: E731
    else:
        crops = lambda s: views(s, 2) + views(s + 100, 2, 16)  # noqa: E731
    student, teacher = make(), make()
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    center = torch.randn(1, 64) * 0.1
    t_sd = (
        module(teacher.state_dict()) if arch == "resnet18" else copy.deepcopy(teacher.state_dict())
    )
    ckpt = {
        "student": module(student.state_dict()),
        "teacher": t_sd,
        "dino_loss": {"center": center.clone()},
    }
    params = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in params if not (n.endswith(".bias") or p.ndim == 1)]},
        {
            "params": [p for n, p in params if n.endswith(".bias") or p.ndim == 1],
            "weight_decay": 0.0,
        },
    ]
    if arch == "vit":
        opt, adam_lr = torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.04), 1e-3
    else:  # the README's ResNet recipe: SGD
        opt, adam_lr = torch.optim.SGD(groups, lr=0.03, momentum=0.9, weight_decay=0.04), None
    m = build_method(
        "dino",
        checkpoint=ckpt,
        lr=opt.defaults["lr"],
        weight_decay=0.04,
        ema=0.9,
        teacher_temp=0.04,
        student_temp=0.1,
        center_momentum=0.9,
        optimizer="adamw" if adam_lr else "sgd",
        num_heads=4,
        drop_path_rate=0.0,
    )
    for epoch, seed in ((0, 1), (1, 2)):
        theirs, center = ref.dino_step(
            student,
            teacher,
            center,
            opt,
            crops(seed),
            0.1,
            0.04,
            0.9,
            0.9,
            3.0,
            freeze_last=epoch == 0,
        )
        m.epoch = epoch
        assert m.train_step(crops(seed)) == pytest.approx(theirs, rel=1e-7)
    state = m.upstream_state_dict()
    assert_same(state["student"], module(student.state_dict()), atol=1e-7, adam_lr=adam_lr)
    t_now = teacher.state_dict()
    t_ref = module(t_now) if arch == "resnet18" else t_now
    assert_same(state["teacher"], t_ref, atol=1e-7, adam_lr=adam_lr and adam_lr * 0.1)
    assert torch.allclose(state["dino_loss"]["center"], center, atol=1e-7)


def test_checkpoint_round_trip_and_clear_errors(tmp_path):
    m = build_method("simsiam", arch="resnet18", dim=32, pred_dim=8)
    path = tmp_path / "checkpoint_0000.pth.tar"
    torch.save(m.upstream_state_dict(), path)
    again = build_method("simsiam", checkpoint=str(path))
    assert all(
        torch.equal(a, b) for a, b in zip(m.state_dict().values(), again.state_dict().values())
    )
    bad = m.upstream_state_dict()
    bad["state_dict"].pop("module.predictor.0.weight")
    with pytest.raises(Exception, match="predictor.0.weight"):
        build_method("simsiam", checkpoint=bad)
    with pytest.raises(ValueError, match="unknown pretraining method"):
        build_method("byol")
