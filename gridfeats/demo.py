"""``gridfeats demo``: the main job end to end on data it makes itself (what ``make demo`` runs).

1. render a few synthetic images (``gridfeats make-synthetic``);
2. extract grid features and region features (bottom-up-attention selection: 10 to 100 boxes per
   image, the features VQA and captioning heads read) into two HDF5 feature stores, at the
   config's real input size (600/1000 for the shipped configs), with ``gridfeats extract``'s code;
3. print both summaries and draw the most confident regions, with class and top attribute, on
   the first image (``detections.png``).

Weights: ``--weights`` when given; otherwise the seeded random initialisation, said plainly in the
output (boxes and labels are then arbitrary, but every step of the pipeline runs for real).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

DEFAULT_IMAGES = 4
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
        "--config", default="R-50-grid", help="detector config (path or shipped name)"
    )
    parser.add_argument(
        "--weights", help="checkpoint; without it the detector uses a seeded random initialisation"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the synthetic data and of the random init"
    )
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "opts", nargs=argparse.REMAINDER, metavar="KEY VALUE", help="config overrides"
    )


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


def region_labels(item, class_names: Sequence[str], attribute_names: Sequence[str]) -> List[str]:
    labels = []
    for k in range(len(item["boxes"])):
        cls = class_names[int(item["classes"][k])]
        attr = (
            f"{attribute_names[int(item['attr_ids'][k, 0])]} " if item["attr_ids"].shape[1] else ""
        )
        labels.append(f"{attr}{cls} {float(item['scores'][k]):.3g}")
    return labels


def run_demo(
    out_dir: str,
    num_images: int = DEFAULT_IMAGES,
    config: str = "R-50-grid",
    weights: Optional[str] = None,
    seed: int = 0,
    workers: int = 1,
    opts: Sequence[str] = (),
    log=None,
) -> dict:
    """Run the demo; returns the paths it wrote (``data``, ``grid``, ``region``, ``png``)."""
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
    say(f"1/3 rendered {num_images} synthetic images into {data['images']}")
    if weights is None:
        say(
            f"    weights: none given -> seeded random initialisation (seed {seed}); the pipeline "
            "runs for real, but boxes, labels and features are arbitrary. Pass --weights CKPT for "
            "meaningful ones."
        )
    else:
        say(f"    weights: {weights}")

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
        f"longest at most {cfg.INPUT.MAX_SIZE_TEST} (as the released features were made)"
    )
    grid_path = os.path.join(out_dir, "grid.h5")
    region_path = os.path.join(out_dir, "region.h5")
    grid = run_extraction(ExtractOptions(output=grid_path, mode="grid", **common))
    say("2/3 grid features (grid-feats-vqa C5 maps):")
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

    store = FeatureStore(region_path)
    image_id = store.ids[0]
    item = store[image_id]
    order = np.argsort(-item["scores"], kind="stable")[:BOXES_DRAWN]
    picked = {name: item[name][order] for name in ("boxes", "scores", "classes", "attr_ids")}
    class_names = _names(str(data["objects_vocab"]), cfg.MODEL.ROI_HEADS.NUM_CLASSES, "class")
    attribute_names = _names(
        str(data["attributes_vocab"]), cfg.MODEL.ROI_ATTRIBUTE_HEAD.NUM_CLASSES, "attr"
    )
    image_file = os.path.join(str(data["images"]), image_file_name(int(image_id)))
    png_path = os.path.join(out_dir, "detections.png")
    draw_regions(
        read_image(image_file), picked["boxes"], region_labels(picked, class_names, attribute_names)
    ).save(png_path)
    say(f"3/3 drew the {len(order)} most confident regions of image {image_id} on {png_path}")
    return {
        "data": str(data["images"]),
        "grid": grid_path,
        "region": region_path,
        "png": png_path,
        "image_file": image_file,
    }


def run(args: argparse.Namespace) -> int:
    from gridfeats.data.synthetic import SyntheticDataError
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
            args.out, args.num_images, args.config, args.weights, args.seed, args.workers, args.opts
        )
    except (ExtractError, StoreError, PrecisionError, SyntheticDataError) as exc:
        print(f"gridfeats demo: error: {exc}", file=sys.stderr)
        return 2
    return 0
