"""Peak resident memory of grid extraction and detection (target: under 4 GiB on a CPU worker).

Why a separate process per measurement: peak RSS (``ru_maxrss``) only ever grows, so measuring
``extract_grid`` and ``detect`` in one process would report the larger of the two for both. Each
mode therefore runs in a fresh child (``--child MODE``) and the parent prints one line per mode.

Usage::

    python benchmarks/memory.py                      # R-50-grid, 600x1000 image, 2 threads
    python benchmarks/memory.py --score-thresh 0.0   # worst case: every proposal's every class

Random weights are used unless ``--weights`` is given: memory does not depend on the values, except
through how many detection candidates pass the score threshold (hence ``--score-thresh``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
MODES = ("grid", "detect")
TARGET_GIB = 4.0


def _peak_rss_gib() -> float:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024**2)


def _current_rss_gib() -> float:
    with open("/proc/self/statm") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / (1024**3)


def _test_image(h: int, w: int):
    """A deterministic, structured RGB image (gradients and blocks), no file needed."""
    import numpy as np

    ys, xs = np.mgrid[0:h, 0:w]
    img = np.stack([ys * 255 // max(h - 1, 1), xs * 255 // max(w - 1, 1), (ys + xs) % 256], axis=2)
    img[h // 4 : h // 2, w // 4 : w // 2] = (200, 30, 60)
    return img.astype(np.uint8)


def measure(
    mode: str,
    config: str,
    size: List[int],
    threads: int,
    weights: Optional[str],
    score_thresh: Optional[float],
) -> Dict[str, float]:
    """Run one mode in this process and return its memory figures (GiB) and timing (s)."""
    import torch

    from gridfeats.api import Detector
    from gridfeats.config import get_cfg

    torch.set_num_threads(threads)
    image = _test_image(*size)
    opts = ["INPUT.MIN_SIZE_TEST", str(min(size)), "INPUT.MAX_SIZE_TEST", str(max(size))]
    if score_thresh is not None:
        opts += ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", str(score_thresh)]
    baseline = _peak_rss_gib()
    detector = Detector(get_cfg(config, opts=opts), weights=weights)
    after_build = _current_rss_gib()
    start = time.perf_counter()
    if mode == "grid":
        out = detector.extract_grid(image)
        detail = {"grid_shape": list(out.shape)}
    else:
        out = detector.detect(image)
        detail = {"detections": int(len(out["scores"]))}
    seconds = time.perf_counter() - start
    return {
        "mode": mode,
        "baseline_gib": baseline,
        "model_gib": after_build,
        "peak_gib": _peak_rss_gib(),
        "seconds": seconds,
        **detail,
    }


def _run_child(mode: str, args: argparse.Namespace) -> Dict[str, float]:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        mode,
        "--config",
        args.config,
        "--size",
        *map(str, args.size),
        "--threads",
        str(args.threads),
    ]
    if args.weights:
        cmd += ["--weights", args.weights]
    if args.score_thresh is not None:
        cmd += ["--score-thresh", str(args.score_thresh)]
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="R-50-grid", help="shipped config name or YAML path")
    parser.add_argument(
        "--size",
        nargs=2,
        type=int,
        default=[600, 1000],
        metavar=("H", "W"),
        help="test image size; the test resize is set so it is the network input size",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--weights", default=None, help="checkpoint (default: seeded random init)")
    parser.add_argument(
        "--score-thresh", type=float, default=None, help="override ROI_HEADS.SCORE_THRESH_TEST"
    )
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        print(
            json.dumps(
                measure(
                    args.child,
                    args.config,
                    args.size,
                    args.threads,
                    args.weights,
                    args.score_thresh,
                )
            )
        )
        return 0

    thresh = "config default" if args.score_thresh is None else args.score_thresh
    print(
        f"{args.config}, {args.size[0]}x{args.size[1]} image, {args.threads} threads, score "
        f"threshold {thresh}"
    )
    worst = 0.0
    for mode in args.modes:
        r = _run_child(mode, args)
        worst = max(worst, r["peak_gib"])
        extra = ", ".join(f"{k} {v}" for k, v in r.items() if k in ("grid_shape", "detections"))
        print(
            f"  {mode:6s}: peak RSS {r['peak_gib']:.2f} GiB (model loaded {r['model_gib']:.2f} "
            f"GiB, interpreter {r['baseline_gib']:.2f} GiB), {r['seconds']:.1f} s, {extra}"
        )
    verdict = "within" if worst < TARGET_GIB else "OVER"
    print(f"peak {worst:.2f} GiB: {verdict} the {TARGET_GIB:.0f} GiB target")
    return 0 if worst < TARGET_GIB else 1


if __name__ == "__main__":
    sys.exit(main())
