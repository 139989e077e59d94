"""Input listing of ``gridfeats extract``: folders, COCO json, path lists, ids, shards, bad input"""

from __future__ import annotations

import json
import os

import pytest

from gridfeats.extract.sources import ImageItem, SourceError, list_images, shard_items


def touch(path, data=b"x"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data)
    return str(path)


def test_folder_is_walked_recursively_with_relative_sorted_ids(tmp_path):
    for name in [
        "b.jpg",
        "a/c.PNG",
        "a/deep/d.webp",
        "notes.txt",
        ".hidden.jpg",
        ".cache/e.jpg",
        "z.tiff",
    ]:
        touch(tmp_path / name)
    items = list_images(str(tmp_path))
    assert [i.image_id for i in items] == ["a/c.PNG", "a/deep/d.webp", "b.jpg", "z.tiff"]
    assert all(os.path.isfile(i.path) for i in items)
    assert items[1].path == os.path.join(str(tmp_path), "a", "deep", "d.webp")


def test_coco_json_ids_are_decimal_text_and_files_come_from_the_image_root(tmp_path):
    touch(tmp_path / "imgs" / "x.jpg")
    touch(tmp_path / "imgs" / "sub" / "y.jpg")
    coco = {"images": [{"id": 139, "file_name": "x.jpg"}, {"id": 7, "file_name": "sub/y.jpg"}]}
    ann = tmp_path / "ann" / "val.json"
    ann.parent.mkdir()
    ann.write_text(json.dumps(coco))
    items = list_images(str(ann), image_root=str(tmp_path / "imgs"))
    assert items == [
        ImageItem("139", str(tmp_path / "imgs" / "x.jpg")),
        ImageItem("7", str(tmp_path / "imgs" / "sub" / "y.jpg")),
    ]
    with pytest.raises(SourceError, match="--image-root"):
        list_images(str(ann))  # the json's folder holds none of the images


def test_coco_json_problems_are_explained(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SourceError, match="not readable JSON"):
        list_images(str(bad))
    bad.write_text(json.dumps({"annotations": []}))
    with pytest.raises(SourceError, match="'images' list"):
        list_images(str(bad))
    bad.write_text(json.dumps({"images": [{"id": 1}]}))
    with pytest.raises(SourceError, match=r"images\[0\] needs 'id' and 'file_name'"):
        list_images(str(bad))
    touch(tmp_path / "a.jpg")
    bad.write_text(
        json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 1, "file_name": "a.jpg"}]})
    )
    with pytest.raises(SourceError, match="'1' appears twice"):
        list_images(str(bad))


def test_text_list_resolves_relative_paths_and_skips_comments(tmp_path):
    a = touch(tmp_path / "data" / "a.jpg")
    outside = touch(tmp_path / "elsewhere" / "b.png")
    listing = tmp_path / "data" / "list.txt"
    listing.write_text(f"# my images\n\na.jpg\n  {outside}  \n")
    items = list_images(str(listing))
    assert items == [ImageItem("a.jpg", a), ImageItem(outside, outside)]
    rooted = list_images(str(listing), image_root=str(tmp_path))
    assert rooted[0] == ImageItem("a.jpg", str(tmp_path / "a.jpg"))  # relative to the given root
    assert rooted[1].image_id == "elsewhere/b.png"
    listing.write_text("a.jpg\n./a.jpg\n")
    with pytest.raises(SourceError, match="appears twice"):
        list_images(str(listing))


def test_unusable_inputs_have_specific_messages(tmp_path):
    with pytest.raises(SourceError, match="input not found"):
        list_images(str(tmp_path / "missing"))
    with pytest.raises(SourceError, match="no images found"):
        list_images(str(tmp_path))
    image = touch(tmp_path / "one.jpg")
    with pytest.raises(SourceError, match="is an image file"):
        list_images(image)
    binary = touch(tmp_path / "blob.bin", bytes(range(256)))
    with pytest.raises(SourceError, match="not a UTF-8 text file"):
        list_images(binary)
    with pytest.raises(SourceError, match="only applies"):
        list_images(str(tmp_path), image_root=str(tmp_path))


def test_shards_partition_the_input_round_robin():
    items = [ImageItem(str(i), f"{i}.jpg") for i in range(11)]
    shards = [shard_items(items, i, 3) for i in range(3)]
    assert [len(s) for s in shards] == [4, 4, 3]
    assert sorted((x.image_id for s in shards for x in s), key=int) == [x.image_id for x in items]
    assert [x.image_id for x in shards[1]] == ["1", "4", "7", "10"]
    with pytest.raises(SourceError, match="invalid"):
        shard_items(items, 3, 3)


def test_file_names_that_are_not_utf8_get_escaped_ids(tmp_path):
    raw = os.path.join(os.fsencode(str(tmp_path)), b"caf\xe9.jpg")
    with open(raw, "wb") as fh:
        fh.write(b"x")
    (item,) = list_images(str(tmp_path))
    assert item.image_id == "caf\\xe9.jpg"
    item.image_id.encode("utf-8")
    assert os.path.exists(item.path)
