"""The synthetic data set generator: layout, formats, determinism, pixels, questions, CLI."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from gridfeats.cli import main as cli_main
from gridfeats.data.image_io import read_image
from gridfeats.data.synthetic import SyntheticDataError, make_synthetic, output_paths
from gridfeats.data.synthetic_scene import (
    COLOR_RGB,
    COLORS,
    MIN_SIDE_PX,
    SHAPES,
    SIZE_RANGE,
    render_scene,
)
from gridfeats.data.vocab import VocabError, parse_vocab, read_vocab, read_vocab_names, write_vocab

REPO = Path(__file__).resolve().parents[2]
NUM_IMAGES = 40
SEED = 7
COLOR_TOLERANCE = (
    50.0  # RGB distance to a nominal colour that still counts as that colour after JPEG
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Dict[str, Path]:
    return make_synthetic(tmp_path_factory.mktemp("synthetic") / "data", NUM_IMAGES, seed=SEED)


def load(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def all_files(root: Path) -> Dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def objects_by_image(instances: dict) -> Dict[int, List[dict]]:
    """Per image, each object as {shape, color, size, bbox} with names resolved through the json."""
    categories = {c["id"]: c["name"] for c in instances["categories"]}
    attributes = {a["id"]: a["name"] for a in instances["attributes"]}
    colors = {w.name for w in COLORS}
    result: Dict[int, List[dict]] = {image["id"]: [] for image in instances["images"]}
    for ann in instances["annotations"]:
        names = [attributes[i] for i in ann["attribute_ids"]]
        result[ann["image_id"]].append(
            {
                "shape": categories[ann["category_id"]],
                "color": next(n for n in names if n in colors),
                "size": next(n for n in names if n in ("small", "large")),
                "bbox": ann["bbox"],
            }
        )
    return result


# ----------------------------------------------------------------------------- determinism


def test_same_seed_writes_identical_bytes_and_other_seeds_differ(tmp_path):
    first = make_synthetic(tmp_path / "a", 7, seed=11)["root"]
    second = make_synthetic(tmp_path / "b", 7, seed=11)["root"]
    other = make_synthetic(tmp_path / "c", 7, seed=12)["root"]
    assert all_files(first) == all_files(second)
    assert len(all_files(first)) == 7 + 12
    assert (
        all_files(first)["annotations/instances.json"]
        != all_files(other)["annotations/instances.json"]
    )


def test_rendering_in_worker_processes_writes_the_same_files(tmp_path):
    serial = make_synthetic(tmp_path / "serial", 9, seed=3, workers=0)["root"]
    parallel = make_synthetic(tmp_path / "parallel", 9, seed=3, workers=2)["root"]
    assert all_files(serial) == all_files(parallel)


def test_image_i_depends_only_on_seed_and_i(tmp_path):
    small = make_synthetic(tmp_path / "small", 3, seed=5)["images"]
    large = make_synthetic(tmp_path / "large", 6, seed=5)["images"]
    for name in ("000001.jpg", "000002.jpg", "000003.png"):
        assert (small / name).read_bytes() == (large / name).read_bytes()


# ----------------------------------------------------------------------------- layout and formats


def test_layout_matches_the_documented_names(dataset):
    for key, path in dataset.items():
        assert path.exists(), key
    assert dataset == output_paths(dataset["root"])
    listed = dataset["image_list"].read_text(encoding="utf-8").splitlines()
    on_disk = sorted("images/" + p.name for p in dataset["images"].iterdir())
    assert listed == on_disk and len(listed) == NUM_IMAGES
    assert {Path(p).suffix for p in listed} == {".jpg", ".png"}
    assert sum(p.endswith(".jpg") for p in listed) > sum(p.endswith(".png") for p in listed)


def test_images_have_varied_sizes_matching_the_json(dataset):
    instances = load(dataset["instances"])
    shapes = set()
    for image in instances["images"]:
        path = dataset["images"] / image["file_name"]
        with Image.open(path) as img:
            assert img.format == {"jpg": "JPEG", "png": "PNG"}[image["file_name"][-3:]]
            assert img.mode == "RGB"
            assert img.size == (image["width"], image["height"])
        assert 160 <= image["height"] <= 640 and 160 <= image["width"] <= 640
        shapes.add(
            "landscape"
            if image["width"] > image["height"]
            else "portrait"
            if image["width"] < image["height"]
            else "square"
        )
        assert isinstance(image["id"], int)
    assert {"landscape", "portrait"} <= shapes
    assert len({(i["height"], i["width"]) for i in instances["images"]}) > NUM_IMAGES // 2


def test_instances_json_is_valid_vg_coco(dataset):
    coco = COCO(str(dataset["instances"]))
    instances = load(dataset["instances"])
    object_names = read_vocab_names(dataset["objects_vocab"])
    attribute_names = read_vocab_names(dataset["attributes_vocab"])

    # categories: 1-based ids in vocab order; attributes: 0-based ids in vocab order
    assert [c["id"] for c in instances["categories"]] == list(range(1, len(object_names) + 1))
    assert [c["name"] for c in instances["categories"]] == object_names == [w.name for w in SHAPES]
    assert [(a["id"], a["name"]) for a in instances["attributes"]] == list(
        enumerate(attribute_names)
    )

    images = {i["id"]: i for i in instances["images"]}
    assert sorted(images) == list(range(1, NUM_IMAGES + 1))
    annotation_ids = [a["id"] for a in instances["annotations"]]
    assert len(set(annotation_ids)) == len(annotation_ids)
    for ann in instances["annotations"]:
        image = images[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        assert w > 0 and h > 0 and x >= 0 and y >= 0
        assert x + w <= image["width"] and y + h <= image["height"]
        assert 0 < ann["area"] <= w * h
        assert ann["iscrowd"] == 0
        assert ann["category_id"] in coco.cats
        ids = ann["attribute_ids"]
        assert 1 <= len(ids) <= 16 and all(
            isinstance(i, int) and 0 <= i < len(attribute_names) for i in ids
        )
    per_image = Counter(a["image_id"] for a in instances["annotations"])
    assert all(1 <= per_image[i] <= 6 for i in images)
    assert max(per_image.values()) >= 4  # several objects in some images
    assert len(coco.getImgIds()) == NUM_IMAGES


def test_vocab_files_use_the_bottom_up_attention_format(dataset):
    text = dataset["objects_vocab"].read_text(encoding="utf-8")
    assert not text.endswith("\n")
    assert "cross,plus" in text.split("\n")
    assert read_vocab(dataset["attributes_vocab"])[4] == ["purple", "violet"]


def test_small_objects_are_smaller_than_large_ones(dataset):
    instances = load(dataset["instances"])
    short = {i["id"]: min(i["height"], i["width"]) for i in instances["images"]}
    relative = {"small": [], "large": []}
    for image_id, objects in objects_by_image(instances).items():
        for obj in objects:
            relative[obj["size"]].append(max(obj["bbox"][2:]) / short[image_id])
    small_cap = max(SIZE_RANGE["small"][1], MIN_SIDE_PX / 160) + 0.01
    assert max(relative["small"]) <= small_cap  # a box never outgrows the drawn shape
    assert np.median(relative["large"]) > SIZE_RANGE["small"][1] + 0.05


# ----------------------------------------------------------------------------- pixels


def color_masks(pixels: np.ndarray) -> Dict[str, np.ndarray]:
    """Per colour name, the pixels whose nearest nominal object colour it is (within tolerance)."""
    names = [w.name for w in COLORS]
    refs = np.array([COLOR_RGB[n] for n in names], dtype=np.float32)
    dist = np.linalg.norm(pixels[:, :, None, :].astype(np.float32) - refs[None, None], axis=-1)
    nearest, close = dist.argmin(axis=-1), dist.min(axis=-1) < COLOR_TOLERANCE
    return {name: close & (nearest == k) for k, name in enumerate(names)}


def erode(mask: np.ndarray) -> np.ndarray:
    """3x3 erosion: drops one-pixel JPEG fringes where two colours meet."""
    padded = np.pad(mask, 1)
    out = np.ones_like(mask)
    for dy in range(3):
        for dx in range(3):
            out &= padded[dy : dy + mask.shape[0], dx : dx + mask.shape[1]]
    return out


def test_objects_are_drawn_where_the_boxes_say(dataset):
    instances = load(dataset["instances"])
    files = {i["id"]: i["file_name"] for i in instances["images"]}
    for image_id, objects in objects_by_image(instances).items():
        pixels = read_image(dataset["images"] / files[image_id])
        masks = color_masks(pixels)
        inside_some_box = {name: np.zeros(pixels.shape[:2], bool) for name in masks}
        for obj in objects:
            x, y, w, h = (int(v) for v in obj["bbox"])
            mine = masks[obj["color"]][y : y + h, x : x + w]
            inside_some_box[obj["color"]][y : y + h, x : x + w] = True
            assert mine.mean() > 0.15, (image_id, obj)  # the object fills a good part of its box
            # the box is tight: each of its sides touches the object
            for strip in (mine[:2], mine[-2:], mine[:, :2], mine[:, -2:]):
                assert strip.any(), (image_id, obj)
        for name, mask in masks.items():  # and no object colour appears outside its boxes
            stray = erode(mask) & ~inside_some_box[name]
            assert not stray.any(), (image_id, name, np.argwhere(stray)[:3])


def test_rendered_scene_boxes_and_areas_are_exact():
    for index in range(20):
        scene, pixels = render_scene(np.random.default_rng([3, index]))
        assert pixels.shape == (scene.height, scene.width, 3) and pixels.dtype == np.uint8
        assert 1 <= len(scene.objects) <= 6
        for obj in scene.objects:
            mask = np.all(pixels == np.array(obj.rgb, np.uint8), axis=-1)
            ys, xs = np.nonzero(mask)
            assert mask.sum() == obj.area
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == obj.box


# ----------------------------------------------------------------------------- VQA


def vqa_pairs(dataset, split):
    questions = load(dataset[f"{split}_questions"])
    annotations = load(dataset[f"{split}_annotations"])
    by_id = {a["question_id"]: a for a in annotations["annotations"]}
    return questions, annotations, [(q, by_id[q["question_id"]]) for q in questions["questions"]]


def test_vqa_files_are_consistent_and_split_by_image(dataset):
    instances = load(dataset["instances"])
    split_images = {}
    for split in ("train", "val"):
        questions, annotations, pairs = vqa_pairs(dataset, split)
        assert questions["task_type"] == "Open-Ended" and questions["data_subtype"] == split
        assert len(annotations["annotations"]) == len(questions["questions"]) == len(pairs)
        ids = [q["question_id"] for q in questions["questions"]]
        assert len(set(ids)) == len(ids) and all(isinstance(i, int) for i in ids)
        per_image = Counter(q["image_id"] for q in questions["questions"])
        assert set(per_image.values()) == {5}
        for question, ann in pairs:
            assert ann["image_id"] == question["image_id"]
            assert [a["answer_id"] for a in ann["answers"]] == list(range(1, 11))
            assert {a["answer_confidence"] for a in ann["answers"]} <= {"yes", "maybe", "no"}
            votes = Counter(a["answer"] for a in ann["answers"])
            assert votes.most_common(1)[0] == (ann["multiple_choice_answer"], max(votes.values()))
            assert votes[ann["multiple_choice_answer"]] >= 6
            expected_type = (
                "yes/no"
                if ann["multiple_choice_answer"] in ("yes", "no")
                else "number"
                if ann["multiple_choice_answer"].isdigit()
                else "other"
            )
            assert ann["answer_type"] == expected_type
            assert question["question"].startswith(ann["question_type"])
        split_images[split] = set(per_image)
    assert not split_images["train"] & split_images["val"]
    assert split_images["train"] | split_images["val"] == {i["id"] for i in instances["images"]}
    assert len(split_images["val"]) == round(0.2 * NUM_IMAGES)


def oracle(question: str, objects: List[dict]) -> str:
    """Answer a generated question from the instances json alone (what the image shows)."""

    def only(items):
        assert len(items) == 1, (question, items)
        return items[0]

    plural = {w.plural_name: w.name for w in SHAPES}
    colors = [w.name for w in COLORS]
    if m := re.fullmatch(r"what color is the (?:(small|large) )?(\w+)\?", question):
        return only([o for o in objects if o["shape"] == m[2] and m[1] in (None, o["size"])])[
            "color"
        ]
    if m := re.fullmatch(r"what shape is the (?:(small|large) )?(\w+) object\?", question):
        return only([o for o in objects if o["color"] == m[2] and m[1] in (None, o["size"])])[
            "shape"
        ]
    if m := re.fullmatch(r"is the (\w+) (\w+) (?:small or large|large or small)\?", question):
        return only([o for o in objects if (o["color"], o["shape"]) == (m[1], m[2])])["size"]
    if m := re.fullmatch(r"how many (\w+) shapes are there\?", question):
        return str(sum(o["color"] == m[1] for o in objects))
    if re.fullmatch(
        r"how many (shapes|objects) are (there|in the picture|in the image)\?", question
    ):
        return str(len(objects))
    if m := re.fullmatch(r"how many (\w+) are there\?", question):
        return str(sum(o["shape"] == plural[m[1]] for o in objects))
    if m := re.fullmatch(r"is there an? (\w+) (\w+)\?", question):
        return "yes" if any((o["color"], o["shape"]) == (m[1], m[2]) for o in objects) else "no"
    if m := re.fullmatch(r"is the (\w+) (\w+)\?", question):
        assert m[2] in colors
        return "yes" if only([o for o in objects if o["shape"] == m[1]])["color"] == m[2] else "no"
    if m := re.fullmatch(r"are there any (\w+) shapes\?", question):
        return "yes" if any(o["color"] == m[1] for o in objects) else "no"
    if m := re.fullmatch(r"are there any (\w+)\?", question):
        return "yes" if any(o["shape"] == plural[m[1]] for o in objects) else "no"
    raise AssertionError(f"unexpected question form: {question!r}")


def test_questions_are_answerable_from_the_annotations(dataset):
    objects = objects_by_image(load(dataset["instances"]))
    checked = 0
    for split in ("train", "val"):
        for question, ann in vqa_pairs(dataset, split)[2]:
            assert (
                oracle(question["question"], objects[question["image_id"]])
                == ann["multiple_choice_answer"]
            )
            checked += 1
    assert checked == 5 * NUM_IMAGES


def test_questions_are_varied_balanced_and_sometimes_disputed(dataset):
    anns = [ann for split in ("train", "val") for _, ann in vqa_pairs(dataset, split)[2]]
    types = Counter(a["question_type"] for a in anns)
    assert {"what color is the", "how many", "is there a", "is the", "are there", "what"} <= set(
        types
    )
    assert set(a["answer_type"] for a in anns) == {"yes/no", "number", "other"}
    yes_no = [a["multiple_choice_answer"] for a in anns if a["answer_type"] == "yes/no"]
    assert 0.35 <= yes_no.count("yes") / len(yes_no) <= 0.65
    numbers = {a["multiple_choice_answer"] for a in anns if a["answer_type"] == "number"}
    assert "0" in numbers and len(numbers) >= 4
    disputed = [a for a in anns if len({x["answer"] for x in a["answers"]}) > 1]
    assert 0.15 * len(anns) <= len(disputed) <= 0.7 * len(anns)


# ----------------------------------------------------------------------------- captions


def test_captions_are_coco_format_five_distinct_per_image(dataset):
    instances = load(dataset["instances"])
    question_images = {
        split: {q["image_id"] for q in load(dataset[f"{split}_questions"])["questions"]}
        for split in ("train", "val")
    }
    caption_ids = []
    for split in ("train", "val"):
        doc = load(dataset[f"{split}_captions"])
        coco = COCO(str(dataset[f"{split}_captions"]))
        assert set(coco.getImgIds()) == question_images[split]
        by_image: Dict[int, List[str]] = {}
        for row in doc["annotations"]:
            by_image.setdefault(row["image_id"], []).append(row["caption"])
            caption_ids.append(row["id"])
        assert set(by_image) == question_images[split]
        for captions in by_image.values():
            assert len(captions) == 5 and len(set(captions)) == 5
            assert all(isinstance(c, str) and len(c.split()) >= 4 for c in captions)
        for image in doc["images"]:
            assert image == next(i for i in instances["images"] if i["id"] == image["id"])
    assert len(caption_ids) == len(set(caption_ids)) == 5 * NUM_IMAGES


def test_captions_mention_what_is_in_the_image(dataset):
    objects = objects_by_image(load(dataset["instances"]))
    for split in ("train", "val"):
        captions: Dict[int, str] = {}
        for row in load(dataset[f"{split}_captions"])["annotations"]:
            captions[row["image_id"]] = captions.get(row["image_id"], "") + " " + row["caption"]
        for image_id, text in captions.items():
            words = set(re.findall(r"[a-z]+", text))
            present_colors = {o["color"] for o in objects[image_id]}
            assert (
                words & {w.name for w in COLORS} <= present_colors
            )  # never a colour that is not there
            largest = max(objects[image_id], key=lambda o: o["bbox"][2] * o["bbox"][3])
            assert largest["color"] in words


# ----------------------------------------------------------------------------- errors and overwrite


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_images": 0}, "number of images"),
        ({"num_images": 2.5}, "number of images"),
        ({"seed": -1}, "seed"),
        ({"val_fraction": 1.0}, "validation fraction"),
        ({"questions_per_image": 0}, "questions per image"),
    ],
)
def test_bad_arguments_are_rejected_with_a_reason(tmp_path, kwargs, message):
    args = {"num_images": 2, **kwargs}
    with pytest.raises(SyntheticDataError, match=message):
        make_synthetic(tmp_path / "out", **args)
    assert not (tmp_path / "out").exists()


def test_existing_data_set_needs_overwrite_and_only_our_files_are_replaced(tmp_path):
    root = tmp_path / "out"
    make_synthetic(root, 5)
    (root / "notes.txt").write_text("keep me")
    with pytest.raises(SyntheticDataError, match="overwrite"):
        make_synthetic(root, 2)
    make_synthetic(root, 2, overwrite=True)
    assert sorted(p.name for p in (root / "images").iterdir()) == ["000001.jpg", "000002.jpg"]
    assert (root / "notes.txt").read_text() == "keep me"


def test_output_path_that_is_a_file_is_rejected(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(SyntheticDataError, match="not a directory"):
        make_synthetic(target, 1)


def test_single_image_goes_to_train(tmp_path):
    paths = make_synthetic(tmp_path / "one", 1)
    assert {q["image_id"] for q in load(paths["train_questions"])["questions"]} == {1}
    assert load(paths["val_questions"])["questions"] == []
    assert load(paths["val_captions"])["annotations"] == []


# ----------------------------------------------------------------------------- command line


def test_cli_writes_the_data_set_and_refuses_to_clobber(tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli_main(["make-synthetic", "--out", str(out), "--num", "3", "--seed", "4"]) == 0
    assert "wrote 3 synthetic images" in capsys.readouterr().out
    assert all_files(out) == all_files(make_synthetic(tmp_path / "api", 3, seed=4)["root"])
    assert cli_main(["make-synthetic", "--out", str(out), "--num", "3"]) == 2
    err = capsys.readouterr().err
    assert "already holds synthetic data" in err and "Traceback" not in err
    assert cli_main(["make-synthetic", "--out", str(out), "--num", "2", "--overwrite"]) == 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--num", "0"], "must be in 1.."),
        (["--num", "ten"], "expected an integer"),
        (["--num", "2", "--val-fraction", "1.5"], "must be in [0, 1)"),
    ],
)
def test_cli_rejects_bad_options_with_a_reason(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["make-synthetic", "--out", str(tmp_path / "x"), *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_runs_as_a_module(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gridfeats",
            "make-synthetic",
            "--out",
            str(tmp_path / "m"),
            "--num",
            "2",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "m" / "images").iterdir())) == 2


# ----------------------------------------------------------------------------- vocab files


def test_vocab_round_trip_and_synonyms(tmp_path):
    path = tmp_path / "v.txt"
    write_vocab(path, [("stop sign", "stopsign"), ("yolk",)])
    assert path.read_text() == "stop sign,stopsign\nyolk"
    assert read_vocab(path) == [["stop sign", "stopsign"], ["yolk"]]
    assert read_vocab_names(path) == ["stop sign", "yolk"]
    assert parse_vocab("Gray, Grey\nred\n") == [["gray", "grey"], ["red"]]


@pytest.mark.parametrize("text, reason", [("", "empty"), ("red\n\nblue", "line 2 is empty")])
def test_vocab_rejects_files_that_would_shift_indices(text, reason):
    with pytest.raises(VocabError, match=reason):
        parse_vocab(text)


def test_vocab_rejects_non_utf8(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"\xff\xfe\x00red")
    with pytest.raises(VocabError, match="not UTF-8"):
        read_vocab(path)
