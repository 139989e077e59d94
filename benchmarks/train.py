"""Seconds per training iteration of R-50-grid at the standard input size, split into its parts.

One iteration = the train mapper on ``--batch`` synthetic images (read, ResizeShortestEdge to
600 / max 1000, flip; the ``data`` part), the training forward (the five losses), the backward of
their sum and the SGD step of :func:`gridfeats.build_optimizer` (Detectron2's R-50-grid solver:
FREEZE_AT 2, FrozenBN, 1600 classes, 400 attributes). Reported per part as the median over
``--iters`` measured iterations after ``--warmup``, with the peak resident memory of the process.

The achieved speed: the forward's FLOPs are counted by fvcore on the same batch (fvcore counts
one per multiply-add; reported here as 2 FLOPs per multiply-add), the backward taken as twice the
forward, and ``3 x forward FLOPs / (forward + backward seconds)`` compared with a square matmul of
the same dtype timed in the same process just before each measured iteration (so a noisy shared
machine slows both alike; the ratio is the median over iterations). Random (seeded) weights: the
speed does not depend on their values except through how many proposals survive NMS. Usage::

    python benchmarks/train.py                       # CPU, fp32, torch's default thread count
    python benchmarks/train.py --precision bf16      # autocast bf16 (CPUs with AMX/AVX512-BF16)
    python benchmarks/train.py --device cuda --precision bf16
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from gridfeats.config import get_cfg  # noqa: E402
from gridfeats.data.detection_dataset import load_coco_with_attributes_json  # noqa: E402
from gridfeats.data.detection_mapper import DetectionTrainMapper  # noqa: E402
from gridfeats.data.synthetic import make_synthetic  # noqa: E402
from gridfeats.modeling.build import build_model  # noqa: E402
from gridfeats.precision import autocast, check_precision  # noqa: E402
from gridfeats.solver import build_optimizer  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(dtype: torch.dtype, device: torch.device, n: int = 2048, reps: int = 5) -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def forward_flops(model, batch, precision: str, device: torch.device) -> float:
    """fvcore's count of the training forward (multiply-adds) x 2."""
    from fvcore.nn import FlopCountAnalysis

    class Wrapped(torch.nn.Module):  # fvcore traces a module over tensors / dicts of tensors
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, images, boxes, classes, attributes):
            items = [
                {"image": im, "instances": {"gt_boxes": b, "gt_classes": c, "gt_attributes": a}}
                for im, b, c, a in zip(images, boxes, classes, attributes)
            ]
            return tuple(self.inner(items).values())

    inputs = (
        [x["image"] for x in batch],
        [x["instances"].gt_boxes for x in batch],
        [x["instances"].gt_classes for x in batch],
        [x["instances"].gt_attributes for x in batch],
    )
    with autocast(precision, device):
        analysis = FlopCountAnalysis(Wrapped(model), inputs)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        return 2.0 * analysis.total()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="R-50-grid")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=tuple(DTYPES), default="fp32")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    check_precision(args.precision, device)

    cfg = get_cfg(args.config, ["MODEL.WEIGHTS", "", "MODEL.DEVICE", str(device)])
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_synthetic(Path(tmp) / "syn", args.batch * (args.warmup + args.iters), seed=0)
        records, _ = load_coco_with_attributes_json(paths["instances"], paths["images"])
        mapper = DetectionTrainMapper.from_config(cfg)
        torch.manual_seed(0)
        model = build_model(cfg).to(device)
        optimizer = build_optimizer(cfg, model)
        times: Dict[str, List[float]] = {"data": [], "forward": [], "backward": [], "step": []}
        sizes, matmuls = [], []
        for it in range(args.warmup + args.iters):
            if it >= args.warmup:
                matmuls.append(matmul_gflops(DTYPES[args.precision], device))
            t0 = time.perf_counter()
            batch = [
                mapper(records[it * args.batch + j], np.random.default_rng([0, it, j]))
                for j in range(args.batch)
            ]
            t1 = time.perf_counter()
            with autocast(args.precision, device):
                losses = model(batch)
            total = sum(losses.values())
            sync(device)
            t2 = time.perf_counter()
            total.backward()
            sync(device)
            t3 = time.perf_counter()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync(device)
            t4 = time.perf_counter()
            if it >= args.warmup:
                for key, value in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                    times[key].append(value)
                sizes += [tuple(x["image"].shape[1:]) for x in batch]
        flops = forward_flops(model, batch, args.precision, device)

    median = {k: statistics.median(v) for k, v in times.items()}
    fwd_bwd = median["forward"] + median["backward"]
    achieved = 3 * flops / fwd_bwd / 1e9
    fractions = [
        3 * flops / (f + b) / 1e9 / m
        for f, b, m in zip(times["forward"], times["backward"], matmuls)
    ]
    result = {
        "config": args.config,
        "device": str(device),
        "precision": args.precision,
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "input_sizes": sizes,
        "seconds_per_iteration": sum(median.values()),
        "seconds": median,
        "forward_backward_seconds": fwd_bwd,
        "forward_gflop": flops / 1e9,
        "achieved_gflops": achieved,
        "matmul_gflops": statistics.median(matmuls),
        "fraction_of_matmul": statistics.median(fractions),
        "peak_rss_mib": peak_rss_mib(),
    }
    if device.type == "cuda":
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
