"""``Instances``: the one per-image result structure, from the RPN to the store and the service.

Detectron2's container, written here: a fixed ``image_size`` and any number of per-instance fields
of equal length (tensors, or lists). Every stage passes it on and adds fields instead of repacking
into its own type: proposals (``proposal_boxes``, ``objectness_logits``), training targets
(``gt_boxes``, ``gt_classes``, ``gt_attributes``), the box branch's per-proposal outputs
(``box_features``, ``class_probs``, ``pred_boxes_per_class``) and detections (``pred_boxes``,
``scores``, ``pred_classes`` and, once region features are pooled, ``box_features`` and
``attr_probs``). Boxes are plain ``[N, 4]`` xyxy tensors; which pixel frame they are in is the
instance set's ``image_size`` (network input, or the original image after
:func:`gridfeats.modeling.postprocessing.detector_postprocess`).
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, Tuple, Union

import torch

Index = Union[int, slice, torch.Tensor, List[int]]


class Instances:
    """Per-instance fields of one image, all of the same length.

    ``inst.scores`` reads a field, ``inst.scores = t`` sets one (the length must agree),
    ``inst[mask]`` / ``inst[indices]`` / ``inst[i]`` select instances in every field at once.
    """

    def __init__(self, image_size: Tuple[int, int], **fields: Any):
        self._image_size = (int(image_size[0]), int(image_size[1]))
        self._fields: Dict[str, Any] = {}
        for name, value in fields.items():
            self.set(name, value)

    @property
    def image_size(self) -> Tuple[int, int]:
        """``(height, width)`` of the image the boxes are expressed in."""
        return self._image_size

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            super().__setattr__(name, value)
        else:
            self.set(name, value)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            # Private and dunder names never are fields. Unpickling (DataLoader workers) asks for
            # ``__setstate__`` before ``_fields`` exists, so this must not read ``_fields``.
            raise AttributeError(name)
        if name not in self._fields:
            raise AttributeError(
                f"Instances has no field {name!r} (fields: {sorted(self._fields)})"
            )
        return self._fields[name]

    def set(self, name: str, value: Any) -> None:
        n = len(value)
        if self._fields and n != len(self):
            raise ValueError(f"field {name!r} has {n} entries but the instances have {len(self)}")
        self._fields[name] = value

    def has(self, name: str) -> bool:
        return name in self._fields

    def get(self, name: str) -> Any:
        return self._fields[name]

    def remove(self, name: str) -> None:
        del self._fields[name]

    def get_fields(self) -> Dict[str, Any]:
        return dict(self._fields)

    def to(self, *args: Any, **kwargs: Any) -> "Instances":
        """A copy with every tensor field moved (``.to(device)`` / ``.to(dtype)`` semantics)."""
        moved = {
            k: v.to(*args, **kwargs) if isinstance(v, torch.Tensor) else v
            for k, v in self._fields.items()
        }
        return Instances(self._image_size, **moved)

    def __getitem__(self, item: Index) -> "Instances":
        if isinstance(item, int):
            if item >= len(self) or item < -len(self):
                raise IndexError(f"instance {item} out of range for {len(self)} instances")
            item = item % len(self)
            item = slice(item, item + 1)
        out = Instances(self._image_size)
        for name, value in self._fields.items():
            if isinstance(value, torch.Tensor):
                out.set(name, value[item])
            elif isinstance(item, torch.Tensor):
                index = item.nonzero().view(-1) if item.dtype == torch.bool else item.view(-1)
                out.set(name, [value[i] for i in index.tolist()])
            elif isinstance(item, list):
                out.set(name, [value[i] for i in item])
            else:
                out.set(name, value[item])
        return out

    def __len__(self) -> int:
        for value in self._fields.values():
            return len(value)
        return 0

    def __iter__(self) -> Iterator[Any]:
        raise NotImplementedError("Instances is not iterable; index it or read its fields")

    @staticmethod
    def cat(instance_lists: List["Instances"]) -> "Instances":
        """Concatenate instances of one image (same ``image_size`` and fields)."""
        if not instance_lists:
            raise ValueError("Instances.cat needs at least one Instances")
        first = instance_lists[0]
        for other in instance_lists[1:]:
            if other.image_size != first.image_size:
                raise ValueError("Instances.cat: image sizes differ")
        out = Instances(first.image_size)
        for name, value in first._fields.items():
            values = [i.get(name) for i in instance_lists]
            if isinstance(value, torch.Tensor):
                out.set(name, torch.cat(values, dim=0))
            else:
                out.set(name, [v for vs in values for v in vs])
        return out

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{k}: {tuple(v.shape) if isinstance(v, torch.Tensor) else len(v)}"
            for k, v in self._fields.items()
        )
        return f"Instances(num={len(self)}, image_size={self._image_size}, {fields})"
