"""make-synthetic's detection splits: the VQA files' train/val images, every object once."""

from __future__ import annotations

import json


def _load(path):
    return json.loads(path.read_text())


def test_instance_splits_follow_the_vqa_split_and_partition_instances_json(data):
    everything = _load(data["instances"])
    train, val = _load(data["train_instances"]), _load(data["val_instances"])
    for split, doc in (("train", train), ("val", val)):
        vqa_images = {q["image_id"] for q in _load(data[f"{split}_questions"])["questions"]}
        assert {i["id"] for i in doc["images"]} == vqa_images
        assert doc["categories"] == everything["categories"]
        assert doc["attributes"] == everything["attributes"]
        assert doc["info"]["split"] == split
        assert all(a["image_id"] in vqa_images for a in doc["annotations"])
    assert sorted(train["images"] + val["images"], key=lambda i: i["id"]) == everything["images"]
    assert (
        sorted(train["annotations"] + val["annotations"], key=lambda a: a["id"])
        == (everything["annotations"])
    )
    assert train["images"] and val["images"]
