"""Batching of dataset items into dicts of tensors (right padding plus masks).

Key names match the arguments of ``vqa.models`` (``feats``, ``feat_mask``, ``boxes``,
``question``, ``captions_in``), so a training step can call ``model(**subset_of_batch)``.
Masks are True for real rows/tokens. Image rows are padded to the longest image of the batch
(not to a fixed size), so small grids do not pay for large ones; every batch has at least one
row column so that an image without detections still gives valid shapes.

``collate_vqa`` output:
    question_id [B] long, question [B, L] long (padded with ``question_pad_id``),
    question_mask [B, L] bool, feats [B, N, D] float32, feat_mask [B, N] bool,
    boxes [B, N, 4] float32, grid_hw [B, 2] long (0, 0 for regions),
    target [B, A] float32 (only when the items carry soft targets).
``collate_captions`` output:
    image_index [B] long (index into ``CaptionDataset.image_ids``), feats, feat_mask, boxes,
    grid_hw as above, and when the items carry a caption: captions_in [B, L] (``<bos>`` w1 .. wk),
    captions_out [B, L] (w1 .. wk ``<eos>``), both padded with 0.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Sequence, Tuple

import torch

from vqa.data.image_rows import ImageRows


def pad_image_rows(rows: Sequence[ImageRows]) -> Dict[str, torch.Tensor]:
    """``feats``, ``feat_mask``, ``boxes``, ``grid_hw`` of a batch of images."""
    if not rows:
        raise ValueError("cannot collate an empty batch")
    dim = rows[0].features.shape[1]
    longest = max(1, max(r.features.shape[0] for r in rows))
    feats = torch.zeros(len(rows), longest, dim, dtype=torch.float32)
    boxes = torch.zeros(len(rows), longest, 4, dtype=torch.float32)
    mask = torch.zeros(len(rows), longest, dtype=torch.bool)
    for i, r in enumerate(rows):
        n = r.features.shape[0]
        if r.features.shape[1] != dim:
            raise ValueError(
                f"images of one batch have different feature sizes ({r.features.shape[1]} vs {dim})"
            )
        feats[i, :n] = r.features
        boxes[i, :n] = r.boxes
        mask[i, :n] = True
    grid_hw = torch.tensor([list(r.grid_hw) for r in rows], dtype=torch.long)
    return {"feats": feats, "feat_mask": mask, "boxes": boxes, "grid_hw": grid_hw}


def pad_token_ids(
    sequences: Sequence[Sequence[int]], pad_id: int = 0
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(ids [B, L], mask [B, L])`` with ``L`` the longest sequence (at least 1)."""
    longest = max(1, max((len(s) for s in sequences), default=0))
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    mask = torch.zeros(len(sequences), longest, dtype=torch.bool)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[i, : len(seq)] = True
    return ids, mask


def collate_vqa(
    items: Sequence[Mapping[str, Any]], question_pad_id: int = 0
) -> Dict[str, torch.Tensor]:
    """Batch of ``VQADataset`` items (see the module docstring for the keys)."""
    batch = pad_image_rows([item["rows"] for item in items])
    batch["question_id"] = torch.tensor(
        [int(item["question_id"]) for item in items], dtype=torch.long
    )
    batch["question"], batch["question_mask"] = pad_token_ids(
        [item["question"] for item in items], question_pad_id
    )
    targets: List[Any] = [item.get("target") for item in items]
    if any(t is not None for t in targets):
        if any(t is None for t in targets):
            raise ValueError("some items of the batch have targets and some do not")
        batch["target"] = torch.stack(targets)
    return batch


def collate_captions(items: Sequence[Mapping[str, Any]]) -> Dict[str, torch.Tensor]:
    """Batch of ``CaptionDataset`` items (see the module docstring for the keys)."""
    batch = pad_image_rows([item["rows"] for item in items])
    batch["image_index"] = torch.tensor(
        [int(item["image_index"]) for item in items], dtype=torch.long
    )
    captions = [item.get("caption") for item in items]
    if any(c is not None for c in captions):
        if any(c is None for c in captions):
            raise ValueError("some items of the batch have captions and some do not")
        batch["captions_in"], _ = pad_token_ids([c[:-1] for c in captions], 0)
        batch["captions_out"], _ = pad_token_ids([c[1:] for c in captions], 0)
    return batch
