"""COCO captions joined with stored image features, for training and decoding the captioner.

Two views of one file:

* ``per_image=False`` (training): one item per reference caption, encoded as
  ``<bos> w1 .. wk <eos>`` with at most ``max_length`` words (16, as in the usual COCO
  preprocessing of Up-Down/self-critical code);
* ``per_image=True`` (decoding, evaluation, self-critical training): one item per image, without
  a caption; ``references(image_index)`` gives that image's raw captions for CIDEr rewards.

``image_ids`` lists the images in file order (from ``images`` when present, else from the
annotations); items carry an ``image_index`` into it, because COCO ids are ints while ids
elsewhere may be strings, and a tensor batch can only carry numbers. Results for
``vqa.metrics.evaluate_captions`` are ``{"image_id": dataset.image_ids[i], "caption": ...}``.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch.utils.data import Dataset

from vqa.data.collate import collate_captions
from vqa.data.image_rows import ImageRowReader, StoreLike, as_row_reader, find_missing_images
from vqa.data.json_files import DataFormatError, JsonSource, read_json, require_keys
from vqa.data.word_vocab import WordVocab

log = logging.getLogger(__name__)

DEFAULT_MAX_CAPTION_LENGTH = 16


class CaptionDataset(Dataset):
    """Items: ``{"image_index", "image_id", "rows", "caption" [k + 2] (training view only)}``."""

    collate = staticmethod(collate_captions)

    def __init__(
        self,
        captions: JsonSource,
        features: Union[ImageRowReader, StoreLike],
        vocab: WordVocab,
        max_length: int = DEFAULT_MAX_CAPTION_LENGTH,
        per_image: bool = False,
        max_rows: Optional[int] = None,
        missing_images: str = "error",
    ) -> None:
        if max_length < 1:
            raise ValueError(f"max_length must be at least 1, got {max_length}")
        self.vocab = vocab
        self.max_length = max_length
        self.per_image = per_image
        self.rows = as_row_reader(features, max_rows)
        loaded = read_json(captions, "COCO captions")
        if not isinstance(loaded, Mapping):
            raise DataFormatError(
                "COCO captions must be a JSON object with 'images' and/or 'annotations'"
            )
        self._references = _references_by_image(loaded)
        self.image_ids: List[Any] = _image_ids(loaded, self._references)
        missing = find_missing_images(self.rows, self.image_ids, missing_images, "captions")
        if missing:
            log.warning(
                "skipping %d of %d images: not in the feature store",
                len(missing),
                len(self.image_ids),
            )
            self.image_ids = [i for i in self.image_ids if i not in missing]
        if per_image:
            self.items: List[Any] = list(range(len(self.image_ids)))
        else:
            self.items = [
                (index, caption)
                for index, image_id in enumerate(self.image_ids)
                for caption in self._references.get(image_id, [])
            ]
        if not self.items:
            raise DataFormatError(
                "the caption dataset has nothing to serve"
                + ("" if per_image else " (no reference captions)")
            )

    def references(self, image_index: int) -> List[str]:
        """Raw reference captions of ``image_ids[image_index]`` (empty for a test image)."""
        return list(self._references.get(self.image_ids[image_index], []))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        if self.per_image:
            image_index, caption = self.items[index], None
        else:
            image_index, caption = self.items[index]
        image_id = self.image_ids[image_index]
        item: Dict[str, Any] = {
            "image_index": image_index,
            "image_id": image_id,
            "rows": self.rows.read(image_id),
        }
        if caption is not None:
            ids = self.vocab.encode(caption, self.max_length, add_bos_eos=True)
            item["caption"] = torch.tensor(ids, dtype=torch.long)
        return item


def _references_by_image(captions: Mapping[str, Any]) -> Dict[Any, List[str]]:
    annotations = captions.get("annotations", [])
    if not isinstance(annotations, list):
        raise DataFormatError("COCO captions: 'annotations' must be a list")
    references: Dict[Any, List[str]] = {}
    for position, entry in enumerate(annotations):
        require_keys(entry, ("image_id", "caption"), f"caption annotation #{position}")
        references.setdefault(entry["image_id"], []).append(str(entry["caption"]))
    return references


def _image_ids(captions: Mapping[str, Any], references: Mapping[Any, Sequence[str]]) -> List[Any]:
    images = captions.get("images")
    if images is None:
        return list(references)
    if not isinstance(images, list):
        raise DataFormatError("COCO captions: 'images' must be a list")
    ids = []
    for position, entry in enumerate(images):
        require_keys(entry, ("id",), f"caption image #{position}")
        ids.append(entry["id"])
    ids = list(dict.fromkeys(ids))  # an image listed twice is still one image
    listed = set(ids)
    unknown = [i for i in references if i not in listed]
    if unknown:
        raise DataFormatError(
            f"{len(unknown)} captioned image id(s) are not listed in 'images' "
            f"(e.g. {', '.join(map(repr, unknown[:5]))})"
        )
    return ids
