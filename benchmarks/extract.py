"""Where extraction time goes, and how fast every mode is next to the exact one, in one run.

Prints, on the device given (CPU by default):

1. **matmul**: GFLOP/s of a square matmul per dtype, the machine's ceiling in this process.
2. **layout**: representative convolutions of the models (RPN 3x3 on 2048 channels, dilated and
   plain res5 3x3, res4 3x3, per-region res5 3x3/1x1) NCHW vs channels-last, per dtype: the
   measurement behind ``gridfeats.precision.FAST_MEMORY_FORMAT``.
3. **stages**, per config and mode: the time of every stage of grid extraction and of region
   extraction (Detectron2's rule and bottom-up-attention's), its FLOPs (fvcore, 2 per
   multiply-add) and its GFLOP/s as a share of the same-dtype matmul, so that compute-bound stages
   and overhead are told apart. Stages are timed inside the real calls (``Detector.detect_batch``,
   the feature makers) by hooks, exclusive of the stages they contain.
4. **throughput**: images/s of grid, region (detectron2) and region (bottom-up) features per mode
   (``exact`` fp32, ``fast`` fp32, ``bf16`` where the CPU has it natively, ``fp16`` on GPUs) and
   **today**, the exact mode of the seam commit ``ea5a3e1`` (``--baseline``) run in a worker
   subprocess from ``git archive`` of that commit. Rounds visit every variant on the same image in
   turn, so load from other processes hits all of them; images/s is the median over rounds and
   every ratio the median of per-round ratios. Decoding is excluded there (it runs in DataLoader
   workers, overlapped with the model); it is in the stage table.
5. **quality** of each fast mode against exact fp32 on the same images: share of detections
   matched (same class, IoU >= 0.9), region-feature cosine, attribute top-1 agreement
   (:mod:`gridfeats.features.agreement`), and the grid features' cosine.

Weights: the Detectron2 parity fixtures' seeded generator (``--fixtures``, default
``../shared/fixtures/d2parity``) with its calibration, so ~20-100 detections per image survive
the configs' own ``SCORE_THRESH_TEST`` 0.05 (no threshold change needed); images: the fixtures'
photos (network inputs of about 600x900 / 600x600 / 1000x600). Without the fixtures, seeded random
weights with ``SCORE_THRESH_TEST`` lowered to 0.0005 so that about 100 detections come out.

Usage::

    python benchmarks/extract.py                      # R-50-grid + R-50-updn, 1 thread, 3 rounds
    python benchmarks/extract.py --configs R-50-grid --rounds 5 --threads 2
    python benchmarks/extract.py --quick --no-baseline  # tiny smoke run (the test suite's)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]


def _code_root(argv: Sequence[str]) -> Path:
    """``--code DIR`` (the worker's source tree) goes on sys.path before gridfeats is imported."""
    if "--code" in argv:
        return Path(argv[list(argv).index("--code") + 1])
    return REPO


sys.path.insert(0, str(_code_root(sys.argv)))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from gridfeats.api import Detector  # noqa: E402
from gridfeats.config import get_cfg  # noqa: E402
from gridfeats.features import BottomUpSettings, FeatureSpec, make_feature_maker  # noqa: E402

BASELINE = "ea5a3e1"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
KINDS = {
    "grid": FeatureSpec("grid"),
    "region-d2": FeatureSpec("region", regions="detectron2", attr_topk=10),
    "region-bu": FeatureSpec("region", regions=BottomUpSettings(), attr_topk=10),
}
#: The stage table's rows, in pipeline order (a row absent from a kind shows "-").
STAGES = (
    "decode+resize",
    "normalise+pad",
    "backbone stem..res4",
    "res5 (dilated)",
    "res5 (undilated, grid)",
    "RPN head",
    "proposal selection/NMS",
    "ROI pooling + box head",
    "box predictor (cls + bbox FC)",
    "class-specific box decoding",
    "score filter + per-class NMS",
    "bottom-up selection",
    "re-pool at returned boxes",
    "attribute head",
    "records (to CPU, top-k attributes)",
    "store write",
    "other",
)
#: Smoke-test model: R-50 with 1/8 of the channels, tiny inputs, few proposals.
QUICK_OPTS = [
    "MODEL.RESNETS.WIDTH_PER_GROUP", 8, "MODEL.RESNETS.RES2_OUT_CHANNELS", 32,
    "MODEL.RESNETS.STEM_OUT_CHANNELS", 16, "MODEL.ROI_BOX_HEAD.FC_DIM", 64,
    "MODEL.ROI_ATTRIBUTE_HEAD.FC_DIM", 32, "MODEL.ROI_ATTRIBUTE_HEAD.OBJ_EMBED_DIM", 16,
    "INPUT.MIN_SIZE_TEST", 64, "INPUT.MAX_SIZE_TEST", 96,
    "MODEL.RPN.PRE_NMS_TOPK_TEST", 100, "MODEL.RPN.POST_NMS_TOPK_TEST", 8,
]  # fmt: skip


# --- machine ----------------------------------------------------------------------------------
def describe_machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from gridfeats.precision import cpu_flags

    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown CPU",
    )
    flags = sorted(f for f in cpu_flags() if f.startswith(("avx512_bf16", "amx_bf16", "avx2")))
    return (
        f"{model} ({platform.machine()}), {os.cpu_count()} logical CPUs, torch capability "
        f"{torch.backends.cpu.get_cpu_capability()}, {' '.join(flags)}"
    )


def available_modes(device: torch.device) -> List[Tuple[str, bool, str]]:
    """``(name, fast, precision)`` of every mode this device runs natively; refusals printed."""
    from gridfeats.precision import PrecisionError, check_precision

    modes = [("exact", False, "fp32"), ("fast", True, "fp32")]
    for precision in ("bf16", "fp16"):
        try:
            check_precision(precision, device)
        except PrecisionError as exc:
            print(f"  {precision}: refused ({exc})")
            continue
        modes.append((precision, True, precision))
    return modes


def make_sync(device: torch.device) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def matmul_gflops(dtype: torch.dtype, device: torch.device, n: int, sync, repeats=3) -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    best = math.inf
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best / 1e9


# --- layout table -----------------------------------------------------------------------------
def layout_table(device, dtypes: Sequence[str], sync, quick: bool) -> None:
    scale = 8 if quick else 1
    #: name: (input NCHW, weight OIHW, padding, dilation)
    cases = {
        "RPN 3x3, 2048 ch, 38x56": ((1, 2048, 38, 56), (2048, 2048, 3, 3), 1, 1),
        "RPN 3x3 (updn), 1024 ch, 38x56": ((1, 1024, 38, 56), (1024, 1024, 3, 3), 1, 1),
        "res5 3x3 dilated 2, 512 ch, 38x56": ((1, 512, 38, 56), (512, 512, 3, 3), 2, 2),
        "res5 3x3, 512 ch, 19x28": ((1, 512, 19, 28), (512, 512, 3, 3), 1, 1),
        "res4 3x3, 256 ch, 38x56": ((1, 256, 38, 56), (256, 256, 3, 3), 1, 1),
        "res3 3x3, 128 ch, 76x128": ((1, 128, 76, 128), (128, 128, 3, 3), 1, 1),
        "res2 1x1 64->256, 152x256": ((1, 64, 152, 256), (256, 64, 1, 1), 0, 1),
        "res2 1x1 256->64, 152x256": ((1, 256, 152, 256), (64, 256, 1, 1), 0, 1),
        "res3 1x1 128->512, 76x128": ((1, 128, 76, 128), (512, 128, 1, 1), 0, 1),
        "ROI res5 3x3, 512 ch, 100x7x7": ((100, 512, 7, 7), (512, 512, 3, 3), 1, 1),
        "ROI res5 3x3, 512 ch, 300x7x7": ((300, 512, 7, 7), (512, 512, 3, 3), 1, 1),
        "ROI res5 1x1 2048->512, 100x7x7": ((100, 2048, 7, 7), (512, 2048, 1, 1), 0, 1),
    }
    print(
        "\n== layout: conv GFLOP/s, NCHW vs channels-last (best of 3); fp32 Winograd F(4x4, 3x3) "
        "in direct-equivalent GFLOP/s, '*' where this CPU's fast mode takes it =="
    )
    winograd_column = "fp32" in dtypes
    print(
        f"  {'layer':36s}"
        + "".join(f"{d + ' nchw':>11s}{d + ' cl':>9s}" for d in dtypes)
        + (f"{'winograd':>10s}" if winograd_column else "")
    )
    for name, (xs, ws, pad, dil) in cases.items():
        xs = (xs[0], max(1, xs[1] // scale), xs[2], xs[3])
        ws = (max(1, ws[0] // scale), max(1, ws[1] // scale), ws[2], ws[3])
        flops = 2.0 * xs[0] * xs[2] * xs[3] * ws[0] * ws[1] * ws[2] * ws[3]
        row = f"  {name:36s}"
        for d in dtypes:
            x = torch.randn(xs, device=device).to(DTYPES[d])
            w = (torch.randn(ws, device=device) * 0.01).to(DTYPES[d])
            for fmt in (torch.contiguous_format, torch.channels_last):
                xf, wf = x.contiguous(memory_format=fmt), w.contiguous(memory_format=fmt)
                t = _best(_conv_call(xf, wf, pad, dil), sync)
                row += f"{flops / t / 1e9:{11 if fmt == torch.contiguous_format else 9}.1f}"
        if winograd_column:
            row += _winograd_cell(xs, ws, pad, dil, flops, device, sync)
        print(row)


def _winograd_cell(xs, ws, pad: int, dil: int, flops: float, device, sync) -> str:
    """The fp32 Winograd path on this layer, timed wherever it can run (3x3, padding equal to the
    dilation or undilated), with ``*`` where this CPU's fast mode takes it
    (``winograd.cpu_policy()``): the figures that set the policy."""
    from gridfeats.layers.winograd import prepare_winograd, winograd_conv3x3, winograd_pays_off

    if device.type != "cpu" or ws[2:] != (3, 3) or (dil != 1 and pad != dil):
        return f"{'-':>10s}"
    x = torch.randn(xs)
    prepared = prepare_winograd(torch.randn(ws) * 0.01, None)
    t = _best(lambda: winograd_conv3x3(x, prepared, pad, dil), sync)
    taken = "*" if winograd_pays_off(x, ws[0], pad, dil) else " "
    return f"{flops / t / 1e9:9.1f}{taken}"


def _conv_call(x, w, padding: int, dilation: int) -> Callable[[], torch.Tensor]:
    return lambda: torch.nn.functional.conv2d(x, w, None, 1, padding, dilation)


def _best(fn, sync, repeats=3) -> float:
    with torch.inference_mode():
        fn()
        best = math.inf
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            best = min(best, time.perf_counter() - start)
    return best


# --- stage clock ------------------------------------------------------------------------------
class StageClock:
    """Exclusive wall time per stage label, from hooks and wrappers around the real calls.

    Nested timed calls are subtracted from their parent, so the labels add up to the total.
    ``context`` tells hooks shared between kinds which label to use (e.g. res5 dilated or not).
    """

    def __init__(self, sync):
        self.sync = sync
        self.totals: Dict[str, float] = defaultdict(float)
        self.stack: List[list] = []
        self.context = ""
        self.enabled = False
        self._undo: List[Callable[[], None]] = []

    def enter(self, label: str) -> None:
        if self.enabled:
            self.sync()
            self.stack.append([label, time.perf_counter(), 0.0])

    def exit(self) -> None:
        if self.enabled and self.stack:
            self.sync()
            label, start, children = self.stack.pop()
            elapsed = time.perf_counter() - start
            self.totals[label] += elapsed - children
            if self.stack:
                self.stack[-1][2] += elapsed

    def parent(self) -> str:
        return self.stack[-1][0] if self.stack else ""

    def hook_module(self, module: torch.nn.Module, label: Callable[[], str]) -> None:
        pre = module.register_forward_pre_hook(lambda m, a: self.enter(label()))
        post = module.register_forward_hook(lambda m, a, o: self.exit())
        self._undo += [pre.remove, post.remove]

    def wrap(self, owner, name: str, label: Callable[[], str]) -> None:
        original = getattr(owner, name)
        clock = self

        def timed(*args, **kwargs):
            clock.enter(label())
            try:
                return original(*args, **kwargs)
            finally:
                clock.exit()

        setattr(owner, name, timed)
        self._undo.append(lambda: setattr(owner, name, original))

    def remove(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo = []


def instrument(detector: Detector, clock: StageClock) -> None:
    """Hook every stage of ``detector``'s grid and region paths (see :data:`STAGES`)."""
    import gridfeats.api as api_module
    import gridfeats.features.makers as makers_module
    import gridfeats.features.selection as selection_module
    import gridfeats.modeling.roi_heads.roi_heads as heads_module

    model = detector.model
    backbone = model.backbone
    for name in ["stem"] + [s for s in backbone.stage_names if s != "res5"]:
        stage = getattr(backbone, name)
        for block in [stage] if name == "stem" else list(stage):
            clock.hook_module(block, lambda: "backbone stem..res4")
    if "res5" in backbone.stage_names:
        for block in backbone.res5:
            clock.hook_module(
                block,
                lambda: "res5 (undilated, grid)" if clock.context == "grid" else "res5 (dilated)",
            )
    rpn = model.proposal_generator
    clock.hook_module(rpn.rpn_head, lambda: "RPN head")
    clock.hook_module(rpn, lambda: "proposal selection/NMS")
    heads = model.roi_heads
    clock.wrap(heads, "conv5_features", lambda: "res5 (undilated, grid)")
    clock.wrap(
        heads,
        "box_features",
        lambda: (
            "ROI pooling + box head"
            if clock.parent() == "box predictor (cls + bbox FC)"
            else "re-pool at returned boxes"
        ),
    )
    clock.wrap(heads, "predict", lambda: "box predictor (cls + bbox FC)")
    # The fast modes' sparse path (ROIHeads.detect_sparse): the same stages, other calls.
    clock.wrap(heads, "detect_sparse", lambda: "box predictor (cls + bbox FC)")
    clock.wrap(
        heads.box2box_transform,
        "apply_deltas",
        lambda: (
            "class-specific box decoding"
            if clock.parent() == "box predictor (cls + bbox FC)"
            else clock.parent()
        ),
    )
    clock.wrap(heads_module, "select_candidates", lambda: "score filter + per-class NMS")
    clock.wrap(heads_module, "predict_boxes_and_probs", lambda: "class-specific box decoding")
    clock.wrap(
        heads_module, "fast_rcnn_inference_single_image", lambda: "score filter + per-class NMS"
    )
    clock.wrap(selection_module, "select_bottom_up", lambda: "bottom-up selection")
    clock.wrap(heads, "attribute_probs", lambda: "attribute head")
    clock.wrap(model, "normalize", lambda: "normalise+pad")
    clock.wrap(api_module, "detector_postprocess", lambda: "records (to CPU, top-k attributes)")
    for cls in (makers_module.GridFeatureMaker, makers_module.RegionFeatureMaker):
        clock.wrap(cls, "records", lambda: "records (to CPU, top-k attributes)")


def stage_flops(detector: Detector, prepared, kind: str, rois: Dict[str, int]) -> Dict[str, float]:
    """FLOPs (2 per multiply-add, fvcore) per stage label for one image of ``kind``.

    Counted per module with fvcore on one traced run of the same calls; the per-ROI heads are
    split between the proposals and the re-pooled detections by their counts (``rois``).
    """
    from fvcore.nn import FlopCountAnalysis

    model = detector.model
    heads = model.roi_heads

    class Run(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, tensor):
            from gridfeats.structures import ImageList

            images = ImageList(tensor, [prepared.input_hw])
            if kind == "grid":
                return model.grid_features(images)
            features = model.backbone(images.tensor)
            proposals, _ = model.proposal_generator(images, features)
            predictions = heads.predict(features, proposals, class_boxes=kind != "region-bu")
            if kind == "region-bu":
                feats = predictions[0].box_features[:1]
                classes = torch.zeros(1, dtype=torch.int64)
                out = [feats]
            else:
                det = heads.select(predictions)[0]
                feats = heads.box_features(features, [det.pred_boxes])
                classes = det.pred_classes
                out = [feats]
            if heads.attribute_on:
                out.append(heads.attribute_probs(feats, classes))
            return tuple(out)

    with torch.inference_mode():
        tensor = model.normalize([prepared.image]).tensor
        counter = FlopCountAnalysis(Run().eval(), (tensor,))
        counter.unsupported_ops_warnings(False)
        counter.uncalled_modules_warnings(False)
        counter.tracer_warnings("none")
        by_module = counter.by_module()

    def flops(name: str) -> float:
        return 2.0 * by_module.get(name, 0)

    out: Dict[str, float] = defaultdict(float)
    res4_and_below = ["model.backbone.stem"] + [
        f"model.backbone.{s}" for s in model.backbone.stage_names if s != "res5"
    ]
    out["backbone stem..res4"] = sum(flops(n) for n in res4_and_below)
    res5_label = "res5 (undilated, grid)" if kind == "grid" else "res5 (dilated)"
    out[res5_label] += flops("model.backbone.res5")
    if kind == "grid":
        if hasattr(heads, "res5"):
            out["res5 (undilated, grid)"] += flops("model.roi_heads.res5")
        return dict(out)
    out["RPN head"] = flops("model.proposal_generator.rpn_head")
    per_roi = flops("model.roi_heads.res5") + flops("model.roi_heads.box_head")
    proposals, repooled = rois.get("proposals", 0), rois.get("repooled", 0)
    if kind == "region-bu":
        repooled = 0
        per_roi -= per_roi / (proposals + 1)  # the traced run's one extra row
    share = proposals / max(1, proposals + repooled)
    out["ROI pooling + box head"] = per_roi * share
    out["re-pool at returned boxes"] = per_roi * (1 - share)
    out["box predictor (cls + bbox FC)"] = flops("model.roi_heads.box_predictor")
    out["attribute head"] = flops("model.roi_heads.attribute_predictor")
    return dict(out)


def store_write(records, mode: str, feature_dim: int, attr_topk: int, directory: str) -> None:
    from gridfeats.store.layout import StoreMetadata
    from gridfeats.store.writer import FeatureWriter

    meta = StoreMetadata(mode=mode, feature_dim=feature_dim, attr_topk=attr_topk)
    path = os.path.join(directory, f"{mode}-{time.perf_counter_ns()}.h5")
    with FeatureWriter(path, meta, compression="none", overwrite=True) as writer:
        for i, record in enumerate(records):
            writer.add(f"image{i}", record)
        writer.commit()


def stage_table(
    detector: Detector,
    paths: Sequence[str],
    kinds: Sequence[str],
    matmul: float,
    sync,
    rounds: int,
    flop_cache: Dict[str, Dict[str, float]],
    exact: Detector,
) -> Dict[str, Dict[str, float]]:
    """Median per-stage seconds of each kind over ``rounds`` passes of the first image, and print
    them with FLOPs (counted once on the ``exact`` detector: every mode does the same work) and
    GFLOP/s against ``matmul``."""
    clock = StageClock(sync)
    instrument(detector, clock)
    tables: Dict[str, Dict[str, float]] = {}
    flop_tables: Dict[str, Dict[str, float]] = {}
    try:
        for kind in kinds:
            maker = make_feature_maker(detector, KINDS[kind])
            runs: List[Dict[str, float]] = []
            rois: Dict[str, int] = {}
            for r in range(rounds + 1):  # the first is warm-up
                clock.totals.clear()
                clock.context = "grid" if kind == "grid" else "region"
                clock.enabled = True
                with tempfile.TemporaryDirectory() as tmp:
                    sync()
                    start = time.perf_counter()
                    clock.enter("decode+resize")
                    prepared = detector.prepare(paths[0])
                    clock.exit()
                    records = maker.records([prepared])
                    clock.enter("store write")
                    store_write(records, maker.mode, maker.feature_dim, maker.attr_topk, tmp)
                    clock.exit()
                    sync()
                    total = time.perf_counter() - start
                clock.enabled = False
                times = dict(clock.totals)
                times["other"] = max(0.0, total - sum(times.values()))
                times["total"] = total
                if r:
                    runs.append(times)
                if kind != "grid":
                    rois = {
                        "proposals": _count_proposals(detector, prepared),
                        "repooled": len(records[0]["boxes"]) if kind == "region-d2" else 0,
                    }
            labels = set().union(*runs)
            tables[kind] = {k: statistics.median(r.get(k, 0.0) for r in runs) for k in labels}
            if kind not in flop_cache:
                flop_cache[kind] = stage_flops(exact, prepared, kind, rois)
            flop_tables[kind] = flop_cache[kind]
    finally:
        clock.remove()
    _print_stage_table(tables, flop_tables, matmul)
    return tables


def _count_proposals(detector: Detector, prepared) -> int:
    with torch.inference_mode(), detector._context():
        images = detector._batch([prepared], [0])
        features = detector.model.backbone(images.tensor)
        proposals, _ = detector.model.proposal_generator(images, features)
    return len(proposals[0])


def _print_stage_table(tables, flop_tables, matmul: float) -> None:
    kinds = list(tables)
    head = "".join(f"{k:>30s}" for k in kinds)
    print(f"  {'stage':36s}{head}")
    print(f"  {'':36s}" + "".join(f"{'ms   GFLOP  GF/s  %mm':>30s}" for _ in kinds))
    for stage in STAGES + ("total",):
        row = f"  {stage:36s}"
        for kind in kinds:
            t = tables[kind].get(stage)
            if t is None:
                row += f"{'-':>30s}"
                continue
            flops = flop_tables[kind].get(stage, 0.0) if stage != "total" else 0.0
            if stage == "total":
                flops = sum(flop_tables[kind].values())
            if flops > 0 and t > 0:
                gfs = flops / t / 1e9
                row += f"{t * 1e3:11.1f}{flops / 1e9:8.1f}{gfs:6.1f}{100 * gfs / matmul:5.0f}"
            else:
                row += f"{t * 1e3:11.1f}{'':19s}"
        print(row)


# --- throughput -------------------------------------------------------------------------------
class BaselineWorker:
    """The exact mode of another commit, in a subprocess driven one image at a time."""

    def __init__(self, commit: str, args, weights: Dict[str, Optional[str]], tmp: str):
        tree = Path(tmp) / f"gridfeats-{commit}"
        tree.mkdir()
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", commit], check=True, capture_output=True
        ).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(tree, filter="data")
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--code", str(tree)]
        command += ["--threads", str(torch.get_num_threads()), "--device", args.device]
        command += ["--quick"] if args.quick else []
        command += ["--no-warm-up"] if args.no_warm_up else []
        env = dict(os.environ, PYTHONPATH=str(tree))
        self.proc = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        self.weights = weights

    def seconds(self, config: str, kind: str, path: str) -> float:
        request = {"config": config, "kind": kind, "path": path, "weights": self.weights[config]}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the baseline worker exited")
        return float(json.loads(line)["seconds"])

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def worker_main(args) -> int:
    """``--worker``: answer ``{"config", "kind", "path", "weights"}`` lines with the seconds that
    the exact mode of the code on sys.path takes on that (already decoded) image."""
    detectors: Dict[str, Detector] = {}
    makers = {}
    for line in sys.stdin:
        request = json.loads(line)
        config, kind = request["config"], request["kind"]
        if config not in detectors:
            cfg = _cfg(config, args.quick, request["weights"] is None)
            detectors[config] = Detector(cfg, weights=request["weights"])
        key = (config, kind)
        if key not in makers:
            makers[key] = make_feature_maker(detectors[config], KINDS[kind])
        prepared = detectors[config].prepare(request["path"])
        if not args.no_warm_up and key not in getattr(worker_main, "warm", set()):
            makers[key].records([prepared])
            worker_main.warm = getattr(worker_main, "warm", set()) | {key}
        start = time.perf_counter()
        makers[key].records([prepared])
        print(json.dumps({"seconds": time.perf_counter() - start}), flush=True)
    return 0


def throughput(
    detectors: Dict[Tuple[str, str], Detector],
    configs: Sequence[str],
    modes: Sequence[str],
    kinds: Sequence[str],
    paths: Sequence[str],
    rounds: int,
    sync,
    baseline: Optional[BaselineWorker],
    warm_up: Sequence[str] = (),
):
    """Per (config, kind, mode): per-round seconds on the round's image, and the records of each
    image (for the quality section). Every round visits all variants on one image in turn."""
    seconds: Dict[Tuple[str, str, str], List[float]] = defaultdict(list)
    records: Dict[Tuple[str, str, str], Dict[int, list]] = defaultdict(dict)
    makers = {}
    for config in configs:
        for mode in modes:
            for kind in kinds:
                maker = make_feature_maker(detectors[(config, mode)], KINDS[kind])
                makers[(config, kind, mode)] = maker
                if mode in warm_up:  # (not the modes the stage tables already ran)
                    maker.records([detectors[(config, mode)].prepare(paths[0])])
    for r in range(rounds):
        index = r % len(paths)
        for config in configs:
            prepared = detectors[(config, "exact")].prepare(paths[index])
            for kind in kinds:
                if baseline is not None:
                    seconds[(config, kind, "today")].append(
                        baseline.seconds(config, kind, paths[index])
                    )
                for mode in modes:
                    maker = makers[(config, kind, mode)]
                    sync()
                    start = time.perf_counter()
                    out = maker.records([prepared])
                    sync()
                    seconds[(config, kind, mode)].append(time.perf_counter() - start)
                    records[(config, kind, mode)].setdefault(index, out[0])
    return seconds, records


def print_throughput(seconds, configs, modes, kinds, has_baseline: bool) -> Dict:
    columns = (["today"] if has_baseline else []) + list(modes)
    references = ["exact"] + (["today"] if has_baseline else [])
    pairs = [(c, ref) for ref in references for c in columns if c != ref]
    print(
        f"  {'config':11s}{'features':11s}"
        + "".join(f"{c + ' img/s':>12s}" for c in columns)
        + "".join(f"{c + '/' + ref:>13s}" for c, ref in pairs)
    )
    ratios = {}
    for config in configs:
        for kind in kinds:
            row = f"  {config:11s}{kind:11s}"
            for c in columns:
                row += f"{1.0 / statistics.median(seconds[(config, kind, c)]):12.3f}"
            for c, ref in pairs:
                per_round = [
                    a / b for a, b in zip(seconds[(config, kind, ref)], seconds[(config, kind, c)])
                ]
                ratios[(config, kind, c, ref)] = statistics.median(per_round)
                row += f"{ratios[(config, kind, c, ref)]:13.2f}"
            print(row)
    return ratios


# --- quality ----------------------------------------------------------------------------------
def record_instances(record) -> "object":
    from gridfeats.structures import Instances

    fields = {
        "pred_boxes": torch.as_tensor(record["boxes"]).float(),
        "pred_classes": torch.as_tensor(record["classes"]).long(),
        "box_features": torch.as_tensor(record["features"]).float(),
    }
    if record["attr_ids"].shape[1]:
        fields["attr_top1"] = torch.as_tensor(record["attr_ids"][:, 0]).long()
    return Instances(tuple(int(v) for v in record["image_hw"]), **fields)


def print_quality(records, configs, modes, kinds) -> Dict:
    from gridfeats.features.agreement import region_agreement

    results = {}
    for config in configs:
        for mode in modes:
            if mode == "exact":
                continue
            for kind in kinds:
                ref = records[(config, kind, "exact")]
                oth = records[(config, kind, mode)]
                images = sorted(set(ref) & set(oth))
                if kind == "grid":
                    cos = min(
                        float(
                            torch.nn.functional.cosine_similarity(
                                torch.as_tensor(ref[i]["features"]).double().flatten(),
                                torch.as_tensor(oth[i]["features"]).double().flatten(),
                                dim=0,
                            )
                        )
                        for i in images
                    )
                    results[(config, kind, mode)] = cos
                    print(f"  {config:11s}{mode:6s}{kind:11s} grid cosine min {cos:.6f}")
                    continue
                agreement = region_agreement(
                    [record_instances(ref[i]) for i in images],
                    [record_instances(oth[i]) for i in images],
                )
                results[(config, kind, mode)] = agreement
                print(f"  {config:11s}{mode:6s}{kind:11s} {agreement.describe()}")
    return results


# --- setup ------------------------------------------------------------------------------------
def _cfg(config: str, quick: bool, seeded_init: bool = False):
    """The config as benchmarked: ``--quick``'s tiny variant; with seeded-init weights (no
    fixtures) a score threshold low enough that about 100 detections come out."""
    opts = list(QUICK_OPTS) if quick else []
    if seeded_init:
        opts += ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0005]
    return get_cfg(config, opts=opts or None)


def fixture_paths(fixtures: Path, quick: bool, tmp: str) -> List[str]:
    if quick or not (fixtures / "images").is_dir():
        from PIL import Image

        rng = np.random.default_rng(0)
        paths = []
        for i, (h, w) in enumerate(((48, 72), (80, 60))):
            path = os.path.join(tmp, f"image{i}.jpg")
            Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(path)
            paths.append(path)
        return paths
    return sorted(str(p) for p in (fixtures / "images").iterdir())


def fixture_weights(config: str, fixtures: Path, quick: bool, tmp: str) -> Optional[str]:
    """The parity generator's checkpoint for ``config`` (None: seeded init, see module doc)."""
    if quick or not (fixtures / f"keys_{config}.json").is_file():
        return None
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_weights", fixtures / "make_weights.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    manifest = json.loads((fixtures / f"keys_{config}.json").read_text())
    state = gen.make_state_dict(manifest, config, dict(np.load(fixtures / "calib.npz")))
    path = os.path.join(tmp, f"{config}.pth")
    torch.save({"model": state}, path)
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["R-50-grid", "R-50-updn"])
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved throughput rounds")
    parser.add_argument("--stage-rounds", type=int, default=1, help="timed passes per stage table")
    parser.add_argument("--matmul-n", type=int, default=2048)
    parser.add_argument("--fixtures", default=str(REPO.parent / "shared" / "fixtures" / "d2parity"))
    parser.add_argument("--baseline", default=BASELINE, help="commit whose exact mode is 'today'")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--skip-stages", action="store_true")
    parser.add_argument(
        "--no-warm-up", action="store_true", help="no untimed first pass per throughput variant"
    )
    parser.add_argument("--stage-modes", nargs="+", help="modes with a stage table (default all)")
    parser.add_argument("--quick", action="store_true", help="tiny model and images (smoke test)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--code", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        return worker_main(args)
    if args.quick:
        args.matmul_n = min(args.matmul_n, 256)
    device = torch.device(args.device)
    sync = make_sync(device)
    fixtures = Path(os.environ.get("GRIDFEATS_D2PARITY", args.fixtures))
    print(f"device      {args.device}: {describe_machine(device)}")
    print(
        f"torch       {torch.__version__}, {torch.get_num_threads()} threads, load average "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} at start"
    )
    print("modes")
    modes = available_modes(device)
    names = [m[0] for m in modes]
    dtypes = sorted({p for _, _, p in modes}, key=list(DTYPES).index)

    with tempfile.TemporaryDirectory() as tmp:
        paths = fixture_paths(fixtures, args.quick, tmp)
        weights = {c: fixture_weights(c, fixtures, args.quick, tmp) for c in args.configs}
        print(
            "weights     "
            + (
                "parity fixtures' seeded generator (configs' own SCORE_THRESH_TEST)"
                if all(weights.values())
                else "seeded init, ROI_HEADS.SCORE_THRESH_TEST 0.0005 (about 100 detections)"
            )
        )
        print(f"images      {', '.join(Path(p).name for p in paths)}")
        detectors: Dict[Tuple[str, str], Detector] = {}
        for config in args.configs:
            cfg = _cfg(config, args.quick, weights[config] is None)
            for name, fast, precision in modes:
                detectors[(config, name)] = Detector(
                    cfg, weights=weights[config], device=device, fast=fast, precision=precision
                )

        baseline = None  # started first: a worker that cannot start shows at once
        if not args.no_baseline:
            try:
                baseline = BaselineWorker(args.baseline, args, weights, tmp)
                baseline.seconds(args.configs[0], args.kinds[0], paths[0])
            except (subprocess.CalledProcessError, OSError, RuntimeError) as exc:
                print(f"\nbaseline {args.baseline} unavailable ({exc}); 'today' column omitted")
                baseline = None

        print("\n== matmul GFLOP/s (best of 3, this process) ==")
        matmul = {d: matmul_gflops(DTYPES[d], device, args.matmul_n, sync) for d in dtypes}
        print("  " + ", ".join(f"{d} {v:.1f}" for d, v in matmul.items()))
        layout_table(device, dtypes, sync, args.quick)

        if not args.skip_stages:
            for config in args.configs:
                flop_cache: Dict[str, Dict[str, float]] = {}
                for name, _, precision in modes:
                    if args.stage_modes and name not in args.stage_modes:
                        continue
                    print(
                        f"\n== stages: {config}, {name} ({precision}), image "
                        f"{Path(paths[0]).name}; %mm = share of the {precision} matmul =="
                    )
                    stage_table(
                        detectors[(config, name)],
                        paths,
                        args.kinds,
                        matmul[precision],
                        sync,
                        args.stage_rounds,
                        flop_cache,
                        detectors[(config, "exact")],
                    )

        try:
            seconds, records = throughput(
                detectors,
                args.configs,
                names,
                args.kinds,
                paths,
                args.rounds,
                sync,
                baseline,
                warm_up=[
                    n
                    for n in names
                    if not args.no_warm_up
                    and (args.skip_stages or (args.stage_modes and n not in args.stage_modes))
                ],
            )
        finally:
            if baseline is not None:
                baseline.close()
        print(
            f"\n== throughput: images/s (median of {args.rounds} interleaved rounds, decode "
            f"excluded) and ratios (median of per-round ratios); today = exact mode of "
            f"{args.baseline if baseline else '-'} =="
        )
        print_throughput(seconds, args.configs, names, args.kinds, baseline is not None)
        spread = {
            key: (max(v) - min(v)) / statistics.median(v) for key, v in seconds.items() if len(v)
        }
        print(
            "  noise: load average now "
            + " ".join(f"{x:.1f}" for x in os.getloadavg())
            + f"; largest per-variant spread over rounds (max-min)/median "
            f"{max(spread.values()):.0%} (different images per round add to it)"
        )
        print("\n== quality vs exact fp32 (same images) ==")
        print_quality(records, args.configs, names, args.kinds)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
