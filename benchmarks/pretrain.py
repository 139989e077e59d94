"""Speed and memory of one pretraining step per method and backbone, against a plain reference.

For each (method, backbone) it times ``m.train_step(views)`` of ``gridfeats.pretrain`` on fixed
random views at a fixed batch, and in the same process the same step written the obvious way from
the paper's pseudocode (``tests/pretrain/paper_reference.py``: torchvision / a plain ViT, no
schedules, no bookkeeping), interleaved in rounds so a noisy shared machine moves both together;
it prints images/s of both, their ratio, and the peak RSS of a fresh process running only that
configuration (each configuration runs in its own child process). ``--knn-epochs N`` also runs
``gridfeats pretrain simsiam`` for N epochs on the synthetic classification split and prints its
kNN top-1 curve against the random-init value (epoch 0).

    python benchmarks/pretrain.py                        # CPU, small sizes (64 px, batch 32)
    python benchmarks/pretrain.py --size 224 --batch 64 --device cuda
    python benchmarks/pretrain.py --knn-epochs 30
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import nn  # noqa: E402

CONFIGS = [
    ("simsiam", "resnet18"),
    ("mocov2", "resnet18"),
    ("mocov3", "resnet18"),
    ("mocov3", "vit_tiny"),
    ("mae", "vit_tiny"),
    ("dino", "vit_tiny"),
]


def _views(method: str, batch: int, size: int, device: str):
    g = torch.Generator().manual_seed(0)
    n = 1 if method == "mae" else 2
    views = [torch.randn(batch, 3, size, size, generator=g) for _ in range(n)]
    if method == "dino":
        views += [torch.randn(batch, 3, size // 2, size // 2, generator=g) for _ in range(2)]
    return [v.to(device) for v in views]


def _ours(method: str, arch: str, size: int, batch: int, device: str):
    from gridfeats.pretrain import build_method

    kw = dict(arch=arch, device=device)
    if arch.startswith("vit"):
        kw.update(img_size=size, patch_size=8 if size <= 64 else 16)
    if method == "mocov2":
        kw["queue_size"] = batch * 64
    if method == "mae":
        kw.update(decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4)
    if method == "dino":
        kw["out_dim"] = 4096
    m = build_method(method, **kw)
    return lambda views: m.train_step(views)


def _plain(method: str, arch: str, size: int, batch: int, device: str):
    """The paper's pseudocode on the same-size networks (tests/pretrain/paper_reference.py)."""
    from gridfeats.pretrain.vit import VIT_SIZES
    from tests.pretrain import paper_reference as ref

    def vit(learned=False):
        d, depth, heads = VIT_SIZES[arch]
        p = 8 if size <= 64 else 16
        return ref.TinyViT(img=size, patch=p, d=d, depth=depth, heads=heads, learned_pos=learned)

    if method == "simsiam":
        net = nn.Module()
        net.encoder = ref.resnet18_with(ref.bn_mlp([512, 512, 512, 2048], last_bias=True))
        net.predictor = ref.bn_mlp([2048, 512, 2048], last_bn=False, last_bias=True)
        net.to(device)
        opt = torch.optim.SGD(net.parameters(), 0.05, momentum=0.9, weight_decay=1e-4)
        return lambda v: ref.simsiam_step(net, opt, *v)
    if method == "mocov2":
        net = nn.Module()
        net.register_buffer("queue", nn.functional.normalize(torch.randn(128, batch * 64), dim=0))
        net.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        net.encoder_q = ref.resnet18_with(
            nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 128))
        )
        net.encoder_k = copy.deepcopy(net.encoder_q).requires_grad_(False)
        net.to(device)
        opt = torch.optim.SGD(net.encoder_q.parameters(), 0.03, momentum=0.9, weight_decay=1e-4)
        return lambda v: ref.moco_step(net, opt, *v, m=0.999, t=0.2)
    if method == "mocov3":
        net = nn.Module()
        if arch.startswith("vit"):
            net.base_encoder = vit()
            net.base_encoder.head = ref.bn_mlp([VIT_SIZES[arch][0], 4096, 4096, 256])
            net.predictor = ref.bn_mlp([256, 4096, 256])
        else:
            net.base_encoder = ref.resnet18_with(ref.bn_mlp([512, 4096, 256]))
            net.predictor = ref.bn_mlp([256, 4096, 256], last_bn=False)
        net.momentum_encoder = copy.deepcopy(net.base_encoder).requires_grad_(False)
        net.to(device)
        opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], 1e-4)
        return lambda v: ref.mocov3_step(net, opt, *v, m=0.99, t=0.2)
    if method == "mae":
        net = nn.Module()
        enc = vit()
        net.patch_embed, net.cls_token, net.pos_embed = (
            enc.patch_embed,
            enc.cls_token,
            enc.pos_embed,
        )
        net.blocks, net.norm = enc.blocks, enc.norm
        d = VIT_SIZES[arch][0]
        n = enc.pos_embed.shape[1]
        net.decoder_embed = nn.Linear(d, 128)
        net.mask_token = nn.Parameter(torch.zeros(1, 1, 128))
        net.decoder_pos_embed = nn.Parameter(torch.zeros(1, n, 128), requires_grad=False)
        net.decoder_blocks = nn.ModuleList([ref.TinyBlock(128, 4) for _ in range(2)])
        net.decoder_norm = nn.LayerNorm(128, eps=1e-6)
        p = enc.patch_embed.proj.kernel_size[0]
        net.decoder_pred = nn.Linear(128, p * p * 3)
        net.to(device)
        opt = torch.optim.AdamW([q for q in net.parameters() if q.requires_grad], 1e-4)
        gen = torch.Generator().manual_seed(0)
        return lambda v: ref.mae_step(
            net, opt, v[0], torch.rand(len(v[0]), n - 1, generator=gen).to(device), 0.75, p
        )
    if method == "dino":

        def make():
            net = nn.Module()
            net.backbone = vit(learned=True)
            net.head = ref.DinoHeadRef(VIT_SIZES[arch][0], 4096, hidden=2048, bottleneck=256)
            return net.to(device)

        student, teacher = make(), make()
        teacher.load_state_dict(student.state_dict())
        teacher.requires_grad_(False)
        opt = torch.optim.AdamW([q for q in student.parameters() if q.requires_grad], 1e-4)
        state = {"center": torch.zeros(1, 4096, device=device)}

        def step(v):
            # the plain ViT has a fixed-size table: the reference runs every crop at global size
            crops = v[:2] + [nn.functional.interpolate(c, size=v[0].shape[-1]) for c in v[2:]]
            loss, state["center"] = ref.dino_step(
                student, teacher, state["center"], opt, crops, 0.1, 0.04, 0.996, 0.9, 3.0, False
            )
            return loss

        return step
    raise ValueError(method)


def run_one(method: str, arch: str, size: int, batch: int, rounds: int, device: str) -> dict:
    torch.manual_seed(0)
    views = _views(method, batch, size, device)
    ours, plain = (
        _ours(method, arch, size, batch, device),
        _plain(method, arch, size, batch, device),
    )
    ours(views), plain(views)  # warm-up
    best = {"ours": float("inf"), "plain": float("inf")}
    for _ in range(rounds):
        for name, fn in (("ours", ours), ("plain", plain)):
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn(views)
            if device == "cuda":
                torch.cuda.synchronize()
            best[name] = min(best[name], time.perf_counter() - t)
    return {
        "method": method,
        "arch": arch,
        "ours_img_s": batch / best["ours"],
        "plain_img_s": batch / best["plain"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def knn_curve(epochs: int, threads: int) -> None:
    from gridfeats.data.synthetic_classes import make_classification

    with tempfile.TemporaryDirectory() as tmp:
        paths = make_classification(tmp, per_class=40, size=64)
        out = Path(tmp) / "run"
        cmd = [
            sys.executable,
            "-m",
            "gridfeats",
            "pretrain",
            "simsiam",
            "--data",
            paths["train"],
            "--out",
            out,
            "--arch",
            "resnet18",
            "--epochs",
            epochs,
            "--batch-size",
            64,
            "--crop-size",
            64,
            "--knn-train",
            paths["train"],
            "--knn-val",
            paths["val"],
        ]
        env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(threads))
        subprocess.run([str(c) for c in cmd], env=env, check=True, stderr=subprocess.DEVNULL)
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        print("\nSimSiam R-18, 270 train / 90 val synthetic shape images (9 classes), kNN k=20:")
        for r in rows:
            if "knn_top1" in r:
                print(
                    f"  epoch {r['epoch']:3d}  knn_top1 {r['knn_top1']:.3f}  "
                    f"output_std*sqrt(d) {r['collapse_score']:.3f}"
                    + ("  (random init)" if r["epoch"] == 0 else "")
                )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--device", default="cpu")
    p.add_argument("--only", nargs=2, metavar=("METHOD", "ARCH"), help=argparse.SUPPRESS)
    p.add_argument("--knn-epochs", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.only:
        print(json.dumps(run_one(*a.only, a.size, a.batch, a.rounds, a.device)))
        return
    print(
        f"one training step, batch {a.batch}, {a.size}px, {a.device}, {a.threads} threads "
        f"(best of {a.rounds}); plain = the paper's pseudocode on the same networks"
    )
    print(
        f"{'method':8s} {'backbone':9s} {'ours img/s':>10s} {'plain img/s':>11s} "
        f"{'ratio':>6s} {'peak RSS MB':>11s}"
    )
    for method, arch in CONFIGS:
        cmd = [
            sys.executable,
            __file__,
            "--only",
            method,
            arch,
            "--size",
            str(a.size),
            "--batch",
            str(a.batch),
            "--rounds",
            str(a.rounds),
            "--threads",
            str(a.threads),
            "--device",
            a.device,
        ]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            print(f"{method:8s} {arch:9s} failed: {res.stderr.strip().splitlines()[-1]}")
            continue
        r = json.loads(res.stdout.strip().splitlines()[-1])
        print(
            f"{method:8s} {arch:9s} {r['ours_img_s']:10.1f} {r['plain_img_s']:11.1f} "
            f"{r['ours_img_s'] / r['plain_img_s']:6.2f} {r['peak_rss_mb']:11.0f}"
        )
    if a.knn_epochs:
        knn_curve(a.knn_epochs, a.threads)


if __name__ == "__main__":
    main()
