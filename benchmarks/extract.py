"""Throughput of ``gridfeats extract``'s model path, and how close the grid forward gets to the
machine's matmul speed.

Prints, for every precision the device runs natively (fp32; bf16 on CPUs with AVX512-BF16/AMX and
on GPUs; fp16 on GPUs):

* images/s of grid and region (bottom-up selection) features at batch 1 and batch N on a fixed
  set of synthetic images, through the job's own feature makers (decoding excluded: it runs in
  DataLoader workers, overlapped with the model);
* the achieved GFLOP/s of the grid forward at 600x1000 (FLOPs counted by fvcore, 2 per
  multiply-add) against a plain square matmul of the same dtype timed in the same process, as a
  ratio, with and without the job's fast kernels (folded norms, channels-last);
* grid-vs-region time, and for fast precisions the speed-up over fp32 and the cosine similarity
  of their grid features to fp32's.

Timings are the best of ``--repeats`` runs, measured in rounds that alternate the model and the
matmul, so a noisy shared machine moves both together. Random weights are used (speed does not
depend on the values, except region selection through how many boxes pass; bottom-up keeps
10-100 either way). Usage::

    python benchmarks/extract.py                    # CPU, torch's default thread count
    python benchmarks/extract.py --threads 1 --images 4 --batch 4
    python benchmarks/extract.py --device cuda
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from gridfeats.api import GRID_RES5_DILATION, Detector  # noqa: E402
from gridfeats.config import get_cfg  # noqa: E402
from gridfeats.data.preprocess import prepare_rgb  # noqa: E402
from gridfeats.extract.features import GridFeatureMaker, RegionFeatureMaker  # noqa: E402
from gridfeats.extract.regions import BottomUpSettings  # noqa: E402
from gridfeats.extract.speed import apply_fast_inference  # noqa: E402
from gridfeats.precision import PrecisionError, check_precision, cpu_flags  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_description() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = sorted(
        f for f in cpu_flags() if f.startswith(("avx512_bf16", "amx", "avx512f", "avx2"))
    )
    return (
        f"{model} ({platform.machine()}), {os.cpu_count()} logical CPUs, torch capability "
        f"{torch.backends.cpu.get_cpu_capability()}, flags: {' '.join(flags) or 'n/a'}"
    )


def best_time(fn: Callable[[], object], repeats: int, sync: Callable[[], None]) -> float:
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


def synthetic_images(count: int) -> List[np.ndarray]:
    """The fixed benchmark set: the first ``count`` synthetic images (seed 0), decoded once."""
    from gridfeats.data.image_io import read_image
    from gridfeats.data.synthetic import make_synthetic

    with tempfile.TemporaryDirectory() as tmp:
        paths = make_synthetic(tmp, count, seed=0)
        return [read_image(p) for p in sorted(Path(paths["images"]).iterdir())]


def grid_forward_flops(detector: Detector, tensor: torch.Tensor) -> float:
    """FLOPs (2 per multiply-add, counted by fvcore) of one grid forward (backbone + C5)."""
    from fvcore.nn import FlopCountAnalysis

    class GridForward(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, images):
            features = self.model.backbone(images, res5_dilation=GRID_RES5_DILATION)
            return self.model.roi_heads.conv5_features(features)

    counter = FlopCountAnalysis(GridForward(detector.model).eval(), (tensor,))
    counter.unsupported_ops_warnings(False)
    counter.uncalled_modules_warnings(False)
    with torch.inference_mode():
        return 2.0 * counter.total()


def roofline(
    detector: Detector,
    precision: str,
    size: Sequence[int],
    matmul_n: int,
    repeats: int,
    sync,
    flops: float = 0.0,
) -> Dict:
    """GFLOP/s of the grid forward at ``size`` vs a same-dtype matmul, alternating the two.

    ``flops``: the forward's FLOPs when already counted (folded norms hide the norm's own FLOPs
    from the counter; the work per image is the same, so both variants use the unfolded count).
    """
    device = detector.device
    h, w = size
    image = (np.random.default_rng(0).random((h, w, 3)) * 255).astype(np.uint8)
    prepared = [
        prepare_rgb(image, detector.cfg.INPUT.MIN_SIZE_TEST, detector.cfg.INPUT.MAX_SIZE_TEST)
    ]
    if not flops:
        with torch.inference_mode():
            tensor = detector.model.preprocess([prepared[0].image]).tensor
        flops = grid_forward_flops(detector, tensor)
    dtype = DTYPES[precision]
    a = torch.randn(matmul_n, matmul_n, device=device).to(dtype)
    b = torch.randn(matmul_n, matmul_n, device=device).to(dtype)
    model_t, matmul_t = [], []
    detector.grid_batch(prepared)  # warm-up
    a @ b
    for _ in range(repeats):
        model_t.append(best_time(lambda: detector.grid_batch(prepared), 1, sync))
        matmul_t.append(best_time(lambda: a @ b, 3, sync))
    model_gflops = flops / min(model_t) / 1e9
    matmul_gflops = 2.0 * matmul_n**3 / min(matmul_t) / 1e9
    return {
        "input": prepared[0].input_hw,
        "gflop": flops / 1e9,
        "seconds": min(model_t),
        "model_gflops": model_gflops,
        "matmul_gflops": matmul_gflops,
        "ratio": model_gflops / matmul_gflops,
    }


def one_pass(maker, prepared, batch: int) -> None:
    for i in range(0, len(prepared), batch):
        maker.records(prepared[i : i + batch])


def interleaved_throughput(
    variants: Dict[tuple, tuple], prepared, repeats: int, sync
) -> Dict[tuple, float]:
    """images/s of every ``(maker, batch)`` variant, timed in rounds that visit all variants, so a
    burst of load from other processes hits every variant instead of one precision."""
    for maker, batch in variants.values():
        one_pass(maker, prepared[:1], batch)  # warm-up
    times: Dict[tuple, List[float]] = {key: [] for key in variants}
    for _ in range(repeats):
        for key, (maker, batch) in variants.items():
            times[key].append(
                best_time(functools.partial(one_pass, maker, prepared, batch), 1, sync)
            )
    return {key: len(prepared) / min(values) for key, values in times.items()}


def cosine_to(reference: List[torch.Tensor], other: List[torch.Tensor]) -> float:
    sims = [
        torch.nn.functional.cosine_similarity(
            r.flatten().double(), o.flatten().double(), dim=0
        ).item()
        for r, o in zip(reference, other)
    ]
    return min(sims)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="R-50-grid")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads", type=int, help="torch intra-op threads (default: torch's choice)"
    )
    parser.add_argument("--images", type=int, default=4, help="synthetic images in the fixed set")
    parser.add_argument(
        "--batch", type=int, default=4, help="the batch size N compared with batch 1"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--matmul-n", type=int, default=2048)
    parser.add_argument(
        "--size",
        type=int,
        nargs=2,
        default=(600, 1000),
        metavar=("H", "W"),
        help="image size of the GFLOP/s measurement",
    )
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "fp16"])
    parser.add_argument("--skip-region", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    print(
        f"device      {args.device}: "
        f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else cpu_description()}"
    )
    print(
        f"torch       {torch.__version__}, {torch.get_num_threads()} threads, load average "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )
    images = synthetic_images(args.images)
    cfg = get_cfg(args.config)
    prepared = [prepare_rgb(im, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST) for im in images]
    sizes = sorted({p.input_hw for p in prepared})
    print(f"images      {len(prepared)} synthetic images, network inputs {sizes}")

    detectors: Dict[str, Detector] = {}
    for precision in args.precisions:
        try:
            check_precision(precision, device)
        except PrecisionError as exc:
            print(f"\n[{precision}] skipped: {exc}")
            continue
        print(
            f"\n[{precision}] grid forward at {args.size[0]}x{args.size[1]} vs a {args.matmul_n}^2 "
            f"{precision} matmul"
        )
        flops = 0.0
        for fast in (False, True):
            detector = Detector(cfg, device=device, precision=precision)
            if fast:
                apply_fast_inference(detector)
            r = roofline(detector, precision, args.size, args.matmul_n, args.repeats, sync, flops)
            flops = r["gflop"] * 1e9
            label = "fast kernels" if fast else "plain       "
            print(
                f"  {label} {r['gflop']:.1f} GFLOP in {r['seconds']:.3f} s = "
                f"{r['model_gflops']:.1f} GFLOP/s; matmul {r['matmul_gflops']:.1f} GFLOP/s; ratio "
                f"{r['ratio']:.2f}"
            )
        detectors[precision] = detector  # the fast one: what the job runs

    variants = {}
    for precision, detector in detectors.items():
        variants[(precision, "grid b1")] = (GridFeatureMaker(detector), 1)
        variants[(precision, f"grid b{args.batch}")] = (
            GridFeatureMaker(detector, batched_forward=True),
            args.batch,
        )
        if not args.skip_region:
            variants[(precision, "region b1")] = (
                RegionFeatureMaker(detector, BottomUpSettings()),
                1,
            )
            variants[(precision, f"region b{args.batch}")] = (
                RegionFeatureMaker(detector, BottomUpSettings(), batched_forward=True),
                args.batch,
            )
    speeds = interleaved_throughput(variants, prepared, args.repeats, sync)
    fp32_grids = None
    for precision, detector in detectors.items():
        mine = {name: v for (p, name), v in speeds.items() if p == precision}
        print(
            f"\n[{precision}] images/s (fast kernels): "
            + ", ".join(f"{k}: {v:.2f}" for k, v in mine.items())
        )
        if not args.skip_region:
            print(
                "  region/grid time per image (batch 1): "
                f"{mine['grid b1'] / mine['region b1']:.2f}x"
            )
        grids = [g.float().cpu() for g in detector.grid_batch(prepared)]
        if precision == "fp32":
            fp32_grids = grids
        elif fp32_grids is not None:
            print(
                "  vs fp32: grid b1 speed-up "
                f"{mine['grid b1'] / speeds[('fp32', 'grid b1')]:.2f}x, "
                f"min cosine similarity of grid features {cosine_to(fp32_grids, grids):.5f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
