"""A synthetic Visual-Genome-style data set of coloured shapes: ``gridfeats make-synthetic``.

Tests, the demo and the VQA/captioning heads need images with known objects, attributes,
questions and captions, and nothing may be downloaded; this module renders them. Everything is
a pure function of ``seed``: the same call writes byte-identical files. Image ``i`` depends only
on ``(seed, i)``, so a larger ``num_images`` keeps the smaller set's images as a prefix (only the
train/val split is redrawn).

Layout written under ``DIR`` (other parts of the project rely on these exact names)::

    DIR/images/000001.jpg ...           # image i is f"{i:06d}" + ".jpg", or ".png" when i % 6 == 3;
                                        # sides 160..640 px, landscape, portrait or square; RGB
    DIR/annotations/instances.json      # VG-style COCO json (grid-feats-vqa's visual_genome_*.json)
    DIR/annotations/instances_train.json  # the same, restricted to the train / val split's images
    DIR/annotations/instances_val.json    # (detector training and its held-out evaluation)
    DIR/annotations/objects_vocab.txt   # bottom-up-attention vocab format: one entry per line,
    DIR/annotations/attributes_vocab.txt  # synonyms comma-separated, no final newline
    DIR/vqa/train_questions.json        # VQA v2 questions  (images of the train split)
    DIR/vqa/train_annotations.json      # VQA v2 annotations (10 answers per question)
    DIR/vqa/val_questions.json, DIR/vqa/val_annotations.json
    DIR/captions/train_captions.json    # COCO caption format, 5 captions per image
    DIR/captions/val_captions.json
    DIR/image_list.txt                  # "images/000001.jpg" per line, relative to DIR

``instances.json`` holds every image (the detector trains on all of them) and has the keys
``images[{id, file_name, height, width}]`` (``file_name`` relative to ``DIR/images``, ids 1..N),
``annotations[{id, image_id, category_id, bbox, area, iscrowd: 0, attribute_ids}]``,
``categories[{id, name, supercategory: "shape"}]`` and, at top level, ``attributes[{id, name}]``
(there is no separate attributes file). Conventions:

* ``bbox`` is ``[x, y, w, h]`` in pixels around the object's *visible* pixels (x + w is one past
  the last column); ``area`` is the visible pixel count (objects may be partly covered).
* category ids are 1-based in vocab order: id k is ``objects_vocab.txt`` line k (1-based), i.e.
  model class k - 1, as Detectron2's "rank of the id" mapping gives without a warning.
* ``attribute_ids`` are 0-based indices into ``attributes_vocab.txt`` (colour, then size), as
  grid-feats-vqa's 400-way attribute loss uses them.

The VQA, caption and ``instances_{train,val}.json`` files split the images into train and val
(about ``val_fraction`` of them in val; an image is in exactly one split, the same one in every
file; annotation ids are those of ``instances.json``). ``question_id`` is
``image_id * 1000 + k`` as in VQA v2; caption ids are ``image_id * 10 + k``. See
:mod:`gridfeats.data.synthetic_questions` and :mod:`gridfeats.data.synthetic_captions` for what
is asked and said, and
:mod:`gridfeats.data.synthetic_scene` for what is drawn.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from gridfeats.data.synthetic_captions import CAPTIONS_PER_IMAGE, make_captions
from gridfeats.data.synthetic_questions import QuestionAnswer, make_questions
from gridfeats.data.synthetic_scene import COLORS, SHAPES, SIZES, SceneObject, render_scene
from gridfeats.data.vocab import write_vocab
from gridfeats.errors import GridfeatsError

PathLike = Union[str, os.PathLike]

MAX_IMAGES = 999_999  # six-digit file names
MAX_QUESTIONS_PER_IMAGE = 10
PNG_PERIOD, PNG_PHASE = 6, 3  # image i is a PNG when i % 6 == 3 (so any set of 3+ images has one)
JPEG_QUALITY = 92
QUESTION_ID_STRIDE = 1000
CAPTION_ID_STRIDE = 10
PARALLEL_FROM = 200  # images; below this, starting worker processes costs more than it saves
_IMAGE_NAME = re.compile(r"^\d{6}\.(jpg|png)$")

# Independent random streams, so that e.g. changing the questions never changes the pixels.
_STREAM_SPLIT, _STREAM_SCENE, _STREAM_QUESTIONS, _STREAM_CAPTIONS = range(4)

#: Object categories (1-based ids) and attributes (0-based ids), from the scene tables.
CATEGORY_NAMES: Tuple[str, ...] = tuple(word.name for word in SHAPES)
ATTRIBUTE_NAMES: Tuple[str, ...] = tuple(word.name for word in (*COLORS, *SIZES))


class SyntheticDataError(GridfeatsError, ValueError):
    """A request that cannot be carried out (bad argument or an output folder in the way)."""


def output_paths(out_dir: PathLike) -> Dict[str, Path]:
    """The paths :func:`make_synthetic` writes under ``out_dir``, by name."""
    root = Path(out_dir)
    return {
        "root": root,
        "images": root / "images",
        "instances": root / "annotations" / "instances.json",
        "train_instances": root / "annotations" / "instances_train.json",
        "val_instances": root / "annotations" / "instances_val.json",
        "objects_vocab": root / "annotations" / "objects_vocab.txt",
        "attributes_vocab": root / "annotations" / "attributes_vocab.txt",
        "train_questions": root / "vqa" / "train_questions.json",
        "train_annotations": root / "vqa" / "train_annotations.json",
        "val_questions": root / "vqa" / "val_questions.json",
        "val_annotations": root / "vqa" / "val_annotations.json",
        "train_captions": root / "captions" / "train_captions.json",
        "val_captions": root / "captions" / "val_captions.json",
        "image_list": root / "image_list.txt",
    }


def image_file_name(image_id: int) -> str:
    """File name (relative to ``DIR/images``) of image ``image_id``."""
    extension = "png" if image_id % PNG_PERIOD == PNG_PHASE else "jpg"
    return f"{image_id:06d}.{extension}"


def split_image_ids(
    num_images: int, val_fraction: float, rng: np.random.Generator
) -> Tuple[List[int], List[int]]:
    """Sorted ``(train_ids, val_ids)``; both non-empty when 2+ images and 0 < val_fraction."""
    num_val = int(round(num_images * val_fraction))
    if val_fraction > 0 and num_images >= 2:
        num_val = min(max(num_val, 1), num_images - 1)
    elif num_images < 2:
        num_val = 0
    shuffled = [int(i) + 1 for i in rng.permutation(num_images)]
    return sorted(shuffled[num_val:]), sorted(shuffled[:num_val])


def _rng(seed: int, stream: int, index: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, stream, index])


def _check_arguments(
    num_images: Any, seed: Any, val_fraction: Any, questions_per_image: Any
) -> None:
    def is_int(value: Any) -> bool:
        return isinstance(value, (int, np.integer)) and not isinstance(value, bool)

    if not is_int(num_images) or not 1 <= num_images <= MAX_IMAGES:
        raise SyntheticDataError(
            f"the number of images must be an integer in 1..{MAX_IMAGES}, got {num_images!r}"
        )
    if not is_int(seed) or seed < 0:
        raise SyntheticDataError(f"the seed must be a non-negative integer, got {seed!r}")
    if (
        isinstance(val_fraction, bool)
        or not isinstance(val_fraction, (int, float))
        or not 0.0 <= val_fraction < 1.0
    ):
        raise SyntheticDataError(f"the validation fraction must be in [0, 1), got {val_fraction!r}")
    if not is_int(questions_per_image) or not 1 <= questions_per_image <= MAX_QUESTIONS_PER_IMAGE:
        raise SyntheticDataError(
            f"questions per image must be an integer in 1..{MAX_QUESTIONS_PER_IMAGE}, got "
            f"{questions_per_image!r}"
        )


def _existing_outputs(paths: Dict[str, Path]) -> List[Path]:
    found = [path for key, path in paths.items() if key not in ("root", "images") and path.exists()]
    if paths["images"].is_dir():
        found += sorted(p for p in paths["images"].iterdir() if _IMAGE_NAME.match(p.name))
    return found


def _prepare_output(paths: Dict[str, Path], overwrite: bool) -> None:
    """Create the folders; refuse to mix with an earlier data set unless told to replace it."""
    root = paths["root"]
    if root.exists() and not root.is_dir():
        raise SyntheticDataError(f"{root} exists and is not a directory")
    existing = _existing_outputs(paths)
    if existing and not overwrite:
        raise SyntheticDataError(
            f"{root} already holds synthetic data ({existing[0]} exists); "
            "pass --overwrite (overwrite=True) to replace it"
        )
    for path in existing:  # only files with our names: other content of the folder is left alone
        path.unlink()
    for folder in (
        paths["images"],
        paths["instances"].parent,
        paths["train_questions"].parent,
        paths["train_captions"].parent,
    ):
        folder.mkdir(parents=True, exist_ok=True)


def _save_image(pixels: np.ndarray, path: Path) -> None:
    image = Image.fromarray(pixels)
    if path.suffix == ".png":
        image.save(path, format="PNG", compress_level=6)
    else:  # 4:4:4 keeps the colour edges where the boxes say they are
        image.save(path, format="JPEG", quality=JPEG_QUALITY, subsampling=0)


def _write_json(path: Path, payload: Any) -> None:
    path.write_text(json.dumps(payload, separators=(",", ":")), encoding="utf-8")


def _instance(obj: SceneObject, image_id: int, annotation_id: int) -> Dict[str, Any]:
    x0, y0, x1, y1 = obj.box
    return {
        "id": annotation_id,
        "image_id": image_id,
        "category_id": CATEGORY_NAMES.index(obj.shape) + 1,
        "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
        "area": float(obj.area),
        "iscrowd": 0,
        "attribute_ids": [ATTRIBUTE_NAMES.index(obj.color), ATTRIBUTE_NAMES.index(obj.size)],
    }


def _info(seed: int, split: str = "all") -> Dict[str, Any]:
    return {
        "description": "gridfeats synthetic shapes",
        "version": "1.0",
        "seed": seed,
        "split": split,
    }


def _vqa_files(
    image_ids: Sequence[int], questions: Dict[int, List[QuestionAnswer]], split: str, seed: int
) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """The VQA v2 questions and annotations documents of one split."""
    question_rows, annotation_rows = [], []
    for image_id in image_ids:
        for k, qa in enumerate(questions[image_id]):
            question_id = image_id * QUESTION_ID_STRIDE + k
            question_rows.append(
                {"image_id": image_id, "question": qa.question, "question_id": question_id}
            )
            annotation_rows.append(
                {
                    "question_id": question_id,
                    "image_id": image_id,
                    "question_type": qa.question_type,
                    "answer_type": qa.answer_type,
                    "multiple_choice_answer": qa.answer,
                    "answers": [
                        {"answer": answer, "answer_confidence": confidence, "answer_id": number}
                        for number, (answer, confidence) in enumerate(qa.answers, start=1)
                    ],
                }
            )
    common = {
        "info": _info(seed, split),
        "license": {"name": "synthetic, no restrictions"},
        "data_type": "synthetic",
        "data_subtype": split,
    }
    return (
        {**common, "task_type": "Open-Ended", "questions": question_rows},
        {**common, "annotations": annotation_rows},
    )


def _caption_file(
    image_ids: Sequence[int],
    images: Dict[int, Dict[str, Any]],
    captions: Dict[int, List[str]],
    split: str,
    seed: int,
) -> Dict[str, Any]:
    """The COCO captions document of one split."""
    rows = [
        {"image_id": image_id, "id": image_id * CAPTION_ID_STRIDE + k, "caption": caption}
        for image_id in image_ids
        for k, caption in enumerate(captions[image_id])
    ]
    return {
        "info": _info(seed, split),
        "images": [images[i] for i in image_ids],
        "annotations": rows,
    }


def _render_one(
    seed: int, image_id: int, images_dir: Path, questions_per_image: int
) -> Tuple[int, Dict[str, Any], List[SceneObject], List[QuestionAnswer], List[str]]:
    """Image ``image_id`` written to ``images_dir``, with what the json files say about it."""
    scene, pixels = render_scene(_rng(seed, _STREAM_SCENE, image_id))
    file_name = image_file_name(image_id)
    _save_image(pixels, images_dir / file_name)
    image = {"id": image_id, "file_name": file_name, "height": scene.height, "width": scene.width}
    image_questions = make_questions(
        scene, _rng(seed, _STREAM_QUESTIONS, image_id), questions_per_image
    )
    image_captions = make_captions(
        scene, _rng(seed, _STREAM_CAPTIONS, image_id), CAPTIONS_PER_IMAGE
    )
    return image_id, image, list(scene.objects), image_questions, image_captions


def _render_all(
    seed: int, num_images: int, images_dir: Path, questions_per_image: int, workers: Optional[int]
) -> Iterator[Tuple[int, Dict[str, Any], List[SceneObject], List[QuestionAnswer], List[str]]]:
    """:func:`_render_one` for images 1..N in order, in ``workers`` processes when asked."""
    if workers is None:
        workers = (os.cpu_count() or 1) if num_images >= PARALLEL_FROM else 0
    ids = range(1, num_images + 1)
    # fork: the workers only run numpy and PIL; "spawn" would re-import the caller's __main__,
    # which breaks scripts without a main guard. Where fork is missing, render in this process.
    if workers <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        for image_id in ids:
            yield _render_one(seed, image_id, images_dir, questions_per_image)
        return
    render = functools.partial(
        _render_one, seed, images_dir=images_dir, questions_per_image=questions_per_image
    )
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        yield from pool.map(render, ids, chunksize=max(1, min(64, num_images // (4 * workers))))


def make_synthetic(
    out_dir: PathLike,
    num_images: int,
    seed: int = 0,
    val_fraction: float = 0.2,
    questions_per_image: int = 5,
    overwrite: bool = False,
    workers: Optional[int] = None,
) -> Dict[str, Path]:
    """Render ``num_images`` images and write the layout of the module docstring under ``out_dir``.

    ``workers`` processes render and encode the images (default: one per CPU for sets of
    :data:`PARALLEL_FROM` images or more, else none); the files are the same for any count.

    Returns :func:`output_paths` of ``out_dir``. Raises :class:`SyntheticDataError` for a bad
    argument, or when ``out_dir`` already holds such a data set and ``overwrite`` is false (with
    ``overwrite`` only files with this layout's names are removed first).
    """
    _check_arguments(num_images, seed, val_fraction, questions_per_image)
    paths = output_paths(out_dir)
    _prepare_output(paths, overwrite)

    images: Dict[int, Dict[str, Any]] = {}
    instances: List[Dict[str, Any]] = []
    questions: Dict[int, List[QuestionAnswer]] = {}
    captions: Dict[int, List[str]] = {}
    for image_id, image, objects, image_questions, image_captions in _render_all(
        seed, num_images, paths["images"], questions_per_image, workers
    ):
        images[image_id] = image
        for obj in objects:
            instances.append(_instance(obj, image_id, len(instances) + 1))
        questions[image_id] = image_questions
        captions[image_id] = image_captions

    categories = [
        {"id": k + 1, "name": name, "supercategory": "shape"}
        for k, name in enumerate(CATEGORY_NAMES)
    ]
    attributes = [{"id": k, "name": name} for k, name in enumerate(ATTRIBUTE_NAMES)]
    _write_json(
        paths["instances"],
        {
            "info": _info(seed),
            "images": list(images.values()),
            "annotations": instances,
            "categories": categories,
            "attributes": attributes,
        },
    )
    write_vocab(paths["objects_vocab"], [(w.name, *w.synonyms) for w in SHAPES])
    write_vocab(paths["attributes_vocab"], [(w.name, *w.synonyms) for w in (*COLORS, *SIZES)])

    splits = dict(
        zip(("train", "val"), split_image_ids(num_images, val_fraction, _rng(seed, _STREAM_SPLIT)))
    )
    for split, image_ids in splits.items():
        members = set(image_ids)
        _write_json(
            paths[f"{split}_instances"],
            {
                "info": _info(seed, split),
                "images": [images[i] for i in image_ids],
                "annotations": [a for a in instances if a["image_id"] in members],
                "categories": categories,
                "attributes": attributes,
            },
        )
        question_doc, annotation_doc = _vqa_files(image_ids, questions, split, seed)
        _write_json(paths[f"{split}_questions"], question_doc)
        _write_json(paths[f"{split}_annotations"], annotation_doc)
        _write_json(
            paths[f"{split}_captions"], _caption_file(image_ids, images, captions, split, seed)
        )

    lines = [f"images/{image['file_name']}\n" for image in images.values()]
    paths["image_list"].write_text("".join(lines), encoding="utf-8")
    return paths


# ----------------------------------------------------------------------------- command line


def _count_argument(low: int, high: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in {low}..{high}, got {value}")
        return value

    return parse


def _fraction_argument(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``gridfeats make-synthetic``."""
    parser.add_argument(
        "--out", required=True, type=Path, help="output folder (created if missing)"
    )
    parser.add_argument(
        "--num", required=True, type=_count_argument(1, MAX_IMAGES), help="number of images"
    )
    parser.add_argument(
        "--seed",
        type=_count_argument(0, 2**63 - 1),
        default=0,
        help="random seed; the same seed writes identical files (default 0)",
    )
    parser.add_argument(
        "--val-fraction",
        type=_fraction_argument,
        default=0.2,
        help="share of images in the VQA/caption val split (default 0.2)",
    )
    parser.add_argument(
        "--questions-per-image",
        type=_count_argument(1, MAX_QUESTIONS_PER_IMAGE),
        default=5,
        help="VQA questions per image (default 5)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a data set already in --out (only files of this layout are removed)",
    )
    parser.add_argument(
        "--classify",
        type=_count_argument(0, MAX_IMAGES),
        default=0,
        metavar="PER_CLASS",
        help="also write a labelled classification split, PER_CLASS images of each of 9 "
        "shape/colour classes, under OUT/classify/{train,val}/<class>/ (for the kNN monitor)",
    )


def run(args: argparse.Namespace) -> int:
    """Write the data set and print where its files are; user errors become one-line messages."""
    try:
        paths = make_synthetic(
            args.out,
            args.num,
            seed=args.seed,
            val_fraction=args.val_fraction,
            questions_per_image=args.questions_per_image,
            overwrite=args.overwrite,
        )
        if getattr(args, "classify", 0):
            from gridfeats.data.synthetic_classes import make_classification

            paths.update(
                {
                    f"classify_{k}": v
                    for k, v in make_classification(args.out, args.classify, seed=args.seed).items()
                }
            )
    except SyntheticDataError as exc:
        print(f"gridfeats make-synthetic: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        print(
            f"gridfeats make-synthetic: error: cannot write the data set{where}: "
            f"{exc.strerror or exc}",
            file=sys.stderr,
        )
        return 1
    print(f"wrote {args.num} synthetic images (seed {args.seed}) to {paths['root']}")
    for key, path in paths.items():
        if key != "root":
            print(f"  {key:18s} {path}")
    return 0
