"""``gridfeats demo``: the main job end to end on data it makes itself (what ``make demo`` runs).

1. render a few synthetic images (``gridfeats make-synthetic``);
2. get a detector that really detects: without ``--weights``, the shipped demo detector
   (``configs/demo-synthetic.yaml``, a narrow R-50-grid) is trained with ``gridfeats
   train-detector``'s code on a larger synthetic set, evaluated on that set's held-out val split
   (COCO box AP, attribute top-1 on ground-truth boxes), and cached (see :func:`demo_detector`),
   so only the first run pays for the training;
3. extract grid features and region features (bottom-up-attention selection: 10 to 100 boxes per
   image, the features VQA and captioning heads read) into two HDF5 feature stores, at the
   config's input size, with ``gridfeats extract``'s code;
4. print both summaries, and draw the detector's detections (Detectron2's selection, score at
   least ``DRAW_MIN_SCORE``) with class and attribute names on the first image
   (``detections.png``).

``--weights CKPT`` skips step 2 and uses the checkpoint; ``--no-train`` keeps the seeded random
initialisation (boxes and labels are then arbitrary, and the demo says so).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from gridfeats.errors import GridfeatsError

DEFAULT_IMAGES = 4
DEMO_CONFIG = "demo-synthetic"
#: The demo detector's training set: ``make-synthetic --num DEMO_TRAIN_IMAGES --seed
#: DEMO_DATA_SEED`` (80 % train, 20 % val). Its seed differs from the demo's default ``--seed 0``,
#: so the images the demo draws on are not training images.
DEMO_TRAIN_IMAGES = 1600
DEMO_DATA_SEED = 1
DEMO_VAL_FRACTION = 0.2
#: Bumped when the training recipe outside the config changes, so old cache entries are not reused.
RECIPE_VERSION = 1
DRAW_MIN_SCORE = 0.5
BOXES_DRAWN = 10
_COLOURS = [
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
]


class DemoError(GridfeatsError, ValueError):
    """A demo request that cannot run; ``reason`` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", required=True, help="folder for the synthetic data, the feature stores and the PNG"
    )
    parser.add_argument(
        "--num-images",
        type=int,
        default=DEFAULT_IMAGES,
        help="synthetic images to make and extract",
    )
    parser.add_argument(
        "--config", default=DEMO_CONFIG, help="detector config (path or shipped name)"
    )
    parser.add_argument(
        "--weights", help="checkpoint; without it the demo detector is trained (or read from cache)"
    )
    parser.add_argument(
        "--no-train",
        action="store_true",
        help="without --weights, keep the seeded random initialisation instead of training",
    )
    parser.add_argument(
        "--train-images",
        type=int,
        default=DEMO_TRAIN_IMAGES,
        help="synthetic images the demo detector trains on (20%% held out for its evaluation)",
    )
    parser.add_argument(
        "--cache-dir",
        help="where trained demo detectors are kept (default $GRIDFEATS_CACHE, else "
        "$XDG_CACHE_HOME/gridfeats, else ~/.cache/gridfeats)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the synthetic data and of the random init"
    )
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "opts", nargs=argparse.REMAINDER, metavar="KEY VALUE", help="config overrides"
    )


# --------------------------------------------------------------------------------- demo detector
def default_cache_dir() -> Path:
    """``$GRIDFEATS_CACHE``, else ``$XDG_CACHE_HOME/gridfeats``, else ``~/.cache/gridfeats``."""
    if os.environ.get("GRIDFEATS_CACHE"):
        return Path(os.environ["GRIDFEATS_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gridfeats"


def _sha256(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


def hash_folder(root: Path) -> str:
    """SHA-256 over every file under ``root`` (relative path and bytes, in sorted order): the data
    hash of a cache entry, so a run is only reused for byte-identical training data."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode("utf-8") + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class DemoDetector:
    """A trained demo detector: its weights, its val-split metrics and how it was obtained."""

    weights: Path
    run_dir: Path
    metrics: Dict[str, float]  # train_detector's names: bbox/AP, bbox/AP50, attr/top1, ...
    cached: bool  # read from the cache rather than trained by this call
    train_seconds: float  # wall time of the training (and final evaluation) when it ran
    train_images: int
    val_images: int

    def summary(self) -> str:
        m = self.metrics

        def fmt(key: str) -> str:
            value = m.get(key)
            return "n/a" if value is None else f"{value:.3f}"

        return (
            f"val split ({self.val_images} held-out images): box AP50 {fmt('bbox/AP50')}, "
            f"AP {fmt('bbox/AP')}, attribute top-1 on ground-truth boxes {fmt('attr/top1')}"
        )


DEMO_RECORD = "demo_detector.json"


def _training_data(cache: Path, num_images: int, seed: int) -> Dict[str, Path]:
    """The synthetic training set in the cache, rendered once (into a temporary folder that is
    renamed when complete, so an interrupted render is never mistaken for a finished one)."""
    from gridfeats.data.synthetic import make_synthetic, output_paths

    spec = {"images": num_images, "seed": seed, "val_fraction": DEMO_VAL_FRACTION}
    folder = cache / f"data-{_sha256(spec)[:16]}"
    if not folder.is_dir():
        partial = cache / f".{folder.name}.partial-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        make_synthetic(partial, num_images, seed=seed, val_fraction=DEMO_VAL_FRACTION)
        try:
            partial.rename(folder)
        except OSError:  # another process finished the same folder first
            shutil.rmtree(partial, ignore_errors=True)
    return output_paths(folder)


def demo_detector(
    config: str = DEMO_CONFIG,
    opts: Sequence[str] = (),
    cache_dir: Optional[os.PathLike] = None,
    train_images: int = DEMO_TRAIN_IMAGES,
    data_seed: int = DEMO_DATA_SEED,
    progress: bool = False,
    log=None,
) -> DemoDetector:
    """Train the demo detector on synthetic shapes, or reuse the cached run of the same config and
    data.

    The cache entry is ``CACHE/demo-detector/run-<key>`` where ``key`` hashes the effective config
    (``opts`` applied), the data hash (:func:`hash_folder` of the rendered training set) and
    :data:`RECIPE_VERSION`; it is ``gridfeats train-detector``'s run folder (``model_final.pth``,
    ``metrics.jsonl``, ``loss_curve.png``, ``eval/``) plus :data:`DEMO_RECORD`. A killed training
    resumes from its last checkpoint on the next call.
    """
    from gridfeats.config import get_cfg
    from gridfeats.engine.detection import train_detector

    def say(text: str) -> None:
        if log is not False:
            print(text, file=log if log is not None else sys.stdout, flush=True)

    if train_images < 2:
        raise DemoError("the demo detector needs at least 2 training images (train and val)")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache = cache / "demo-detector"
    cache.mkdir(parents=True, exist_ok=True)
    data = _training_data(cache, train_images, data_seed)
    base_cfg = get_cfg(config, list(opts))
    key = _sha256(
        {
            "config": base_cfg.dump(),
            "data": hash_folder(data["root"]),
            "recipe": RECIPE_VERSION,
        }
    )
    run_dir = cache / f"run-{key[:16]}"
    record_path = run_dir / DEMO_RECORD
    counts = {
        split: len(json.loads(data[f"{split}_instances"].read_text(encoding="utf-8"))["images"])
        for split in ("train", "val")
    }
    if record_path.is_file() and (run_dir / "model_final.pth").is_file():
        record = json.loads(record_path.read_text(encoding="utf-8"))
        return DemoDetector(
            run_dir / "model_final.pth",
            run_dir,
            record["metrics"],
            True,
            float(record["train_seconds"]),
            counts["train"],
            counts["val"],
        )

    cfg = base_cfg.clone()
    cfg.defrost()
    cfg.DATASETS.TRAIN = (str(data["train_instances"]),)
    cfg.DATASETS.TEST = (str(data["val_instances"]),)
    cfg.freeze()
    say(
        f"    training the demo detector ({config}, {cfg.SOLVER.MAX_ITER} iterations of "
        f"{cfg.SOLVER.IMS_PER_BATCH} images) on {counts['train']} synthetic images; "
        f"run folder {run_dir}"
    )
    start = time.perf_counter()
    metrics = train_detector(
        cfg, run_dir, resume=True, precision="fp32", device="cpu", progress=progress
    )
    seconds = time.perf_counter() - start
    record = {"metrics": metrics, "train_seconds": seconds, "config": config, "key": key}
    tmp = record_path.with_name(f".{DEMO_RECORD}.tmp")
    tmp.write_text(json.dumps(record, indent=1), encoding="utf-8")
    tmp.replace(record_path)
    return DemoDetector(
        run_dir / "model_final.pth",
        run_dir,
        metrics,
        False,
        seconds,
        counts["train"],
        counts["val"],
    )


# --------------------------------------------------------------------------------- drawing
def draw_regions(image: np.ndarray, boxes: np.ndarray, labels: Sequence[str]) -> Image.Image:
    """``image`` (HxWx3 uint8 RGB) with each box outlined in its colour and its label above it."""
    canvas = Image.fromarray(image).convert("RGB")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    width = max(1, round(max(canvas.size) / 300))
    for k, (box, label) in enumerate(zip(boxes, labels)):
        colour = _COLOURS[k % len(_COLOURS)]
        x1, y1, x2, y2 = (float(v) for v in box)
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=width)
        left, top, right, bottom = draw.textbbox((x1, y1), label, font=font)
        ty = y1 - (bottom - top) - 2 if y1 - (bottom - top) - 2 >= 0 else y1 + width
        draw.rectangle([x1, ty, x1 + (right - left) + 4, ty + (bottom - top) + 2], fill=colour)
        draw.text((x1 + 2, ty), label, fill=(0, 0, 0), font=font)
    return canvas


def _names(path: str, count: int, kind: str) -> List[str]:
    """Vocabulary names when the file matches the model's size (a detector trained on the synthetic
    set), else ``kind`` + index (e.g. the 1600 VG classes, whose names are not shipped)."""
    from gridfeats.data.vocab import read_vocab_names

    try:
        names = read_vocab_names(path)
    except (OSError, ValueError):
        names = []
    return names if len(names) == count else [f"{kind} {i}" for i in range(count)]


ATTRIBUTES_SHOWN = 2  # the synthetic objects have two attributes each: a colour and a size


def detection_labels(
    detections: Dict[str, Any], class_names: Sequence[str], attribute_names: Sequence[str]
) -> List[str]:
    """``"large red circle 0.98"``: the most probable attributes (those above 0.1, at most
    :data:`ATTRIBUTES_SHOWN`), the class and the score of each detection."""
    labels = []
    attr_scores = detections.get("attr_scores")
    for k in range(len(detections["boxes"])):
        words = []
        if attr_scores is not None and attr_scores.shape[1]:
            probs = attr_scores[k]
            order = np.argsort(-np.asarray(probs), kind="stable")[:ATTRIBUTES_SHOWN]
            words = [attribute_names[int(a)] for a in order if float(probs[a]) > 0.1][::-1]
        cls = class_names[int(detections["classes"][k])]
        labels.append(" ".join([*words, cls, f"{float(detections['scores'][k]):.2f}"]))
    return labels


def pick_drawn(scores: np.ndarray) -> np.ndarray:
    """Indices of the detections to draw: score >= :data:`DRAW_MIN_SCORE`, best first, at most
    :data:`BOXES_DRAWN`; when none passes (an untrained model), the :data:`BOXES_DRAWN` best."""
    order = np.argsort(-scores, kind="stable")
    confident = order[scores[order] >= DRAW_MIN_SCORE]
    return (confident if len(confident) else order)[:BOXES_DRAWN]


# --------------------------------------------------------------------------------- the demo
def run_demo(
    out_dir: str,
    num_images: int = DEFAULT_IMAGES,
    config: str = DEMO_CONFIG,
    weights: Optional[str] = None,
    seed: int = 0,
    workers: int = 1,
    opts: Sequence[str] = (),
    log=None,
    train: bool = True,
    train_images: int = DEMO_TRAIN_IMAGES,
    cache_dir: Optional[os.PathLike] = None,
) -> dict:
    """Run the demo; returns the paths it wrote (``data``, ``grid``, ``region``, ``png``,
    ``image_file``), ``weights`` and, when it trained or reused the demo detector, ``detector``
    (a :class:`DemoDetector`)."""
    from gridfeats.api import Detector
    from gridfeats.config import get_cfg
    from gridfeats.data.image_io import read_image
    from gridfeats.data.synthetic import image_file_name, make_synthetic
    from gridfeats.extract.job import ExtractOptions, run_extraction
    from gridfeats.features import BottomUpSettings
    from gridfeats.store import FeatureStore

    def say(text: str) -> None:
        print(text, file=log if log is not None else sys.stdout, flush=True)

    os.makedirs(out_dir, exist_ok=True)
    data = make_synthetic(os.path.join(out_dir, "data"), num_images, seed=seed, overwrite=True)
    say(f"1/4 rendered {num_images} synthetic images into {data['images']}")
    trained: Optional[DemoDetector] = None
    if weights is not None:
        say(f"2/4 weights: {weights}")
    elif train:
        trained = demo_detector(
            config, opts, cache_dir, train_images, progress=log is None, log=log
        )
        weights = str(trained.weights)
        how = (
            f"reused from the cache (trained in {trained.train_seconds:.0f} s)"
            if trained.cached
            else f"trained in {trained.train_seconds:.0f} s"
        )
        say(f"2/4 demo detector {how} on {trained.train_images} synthetic images: {weights}")
        say(f"    {trained.summary()}")
    else:
        say(
            f"2/4 weights: none (--no-train) -> seeded random initialisation (seed {seed}); the "
            "pipeline runs for real, but boxes, labels and features are arbitrary."
        )

    common = dict(
        input=str(data["instances"]),
        image_root=str(data["images"]),
        config=config,
        opts=list(opts),
        weights=weights,
        seed=seed,
        workers=workers,
        overwrite=True,
    )
    cfg = get_cfg(config, list(opts))
    say(
        f"    extracting at the config's input size: shortest edge {cfg.INPUT.MIN_SIZE_TEST}, "
        f"longest at most {cfg.INPUT.MAX_SIZE_TEST}"
    )
    grid_path = os.path.join(out_dir, "grid.h5")
    region_path = os.path.join(out_dir, "region.h5")
    grid = run_extraction(ExtractOptions(output=grid_path, mode="grid", **common))
    say("3/4 grid features (grid-feats-vqa C5 maps):")
    say("    " + grid.format().replace("\n", "\n    "))
    region = run_extraction(
        ExtractOptions(
            output=region_path,
            mode="region",
            regions="bottom-up",
            bottom_up=BottomUpSettings(),
            **common,
        )
    )
    say("    region features (bottom-up-attention selection, 10-100 boxes):")
    say("    " + region.format().replace("\n", "\n    "))

    image_id = FeatureStore(region_path).ids[0]
    image_file = os.path.join(str(data["images"]), image_file_name(int(image_id)))
    detector = Detector(cfg, weights=weights, seed=seed)
    found = {k: v.numpy() for k, v in detector.detect(image_file).items()}
    picked = pick_drawn(found["scores"])
    drawn = {k: v[picked] for k, v in found.items()}
    class_names = _names(str(data["objects_vocab"]), cfg.MODEL.ROI_HEADS.NUM_CLASSES, "class")
    attribute_names = _names(
        str(data["attributes_vocab"]), cfg.MODEL.ROI_ATTRIBUTE_HEAD.NUM_CLASSES, "attr"
    )
    labels = detection_labels(drawn, class_names, attribute_names)
    png_path = os.path.join(out_dir, "detections.png")
    draw_regions(read_image(image_file), drawn["boxes"], labels).save(png_path)
    confident = bool(len(picked)) and float(drawn["scores"].min()) >= DRAW_MIN_SCORE
    which = (
        f"detections with score >= {DRAW_MIN_SCORE}"
        if confident
        else f"most confident detections (none scores {DRAW_MIN_SCORE})"
    )
    say(f"4/4 drew the {len(picked)} {which} of image {image_id} on {png_path}:")
    for label in labels:
        say(f"    {label}")
    return {
        "data": str(data["images"]),
        "grid": grid_path,
        "region": region_path,
        "png": png_path,
        "image_file": image_file,
        "weights": weights,
        "detector": trained,
        "labels": labels,
    }


def run(args: argparse.Namespace) -> int:
    from gridfeats.checkpoint import CheckpointError
    from gridfeats.data.synthetic import SyntheticDataError
    from gridfeats.engine.detection import DetectionTrainingError
    from gridfeats.extract.job import ExtractError
    from gridfeats.precision import PrecisionError
    from gridfeats.store.errors import StoreError

    if args.num_images < 1:
        print("gridfeats demo: error: --num-images must be at least 1", file=sys.stderr)
        return 2
    if len(args.opts) % 2:
        print("gridfeats demo: error: config overrides come in KEY VALUE pairs", file=sys.stderr)
        return 2
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        run_demo(
            args.out,
            args.num_images,
            args.config,
            args.weights,
            args.seed,
            args.workers,
            args.opts,
            train=not args.no_train,
            train_images=args.train_images,
            cache_dir=args.cache_dir,
        )
    except (
        DemoError,
        DetectionTrainingError,
        CheckpointError,
        ExtractError,
        StoreError,
        PrecisionError,
        SyntheticDataError,
    ) as exc:
        print(f"gridfeats demo: error: {exc}", file=sys.stderr)
        return 2
    return 0
