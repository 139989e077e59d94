"""``GeneralizedRCNN``: normalise -> backbone -> RPN -> ROI heads, Detectron2's meta-architecture.

The model takes its parts already built (:meth:`GeneralizedRCNN.from_config` builds them from a
config), and the module tree and names (``backbone``, ``proposal_generator``, ``roi_heads``) are
Detectron2's, so its checkpoints load without renaming. It never reads files: it takes uint8
tensors already decoded and resized by :mod:`gridfeats.data.preprocess` (inference) or by the
training mapper, in ``INPUT.FORMAT`` channel order.

``forward`` follows Detectron2's contract: a list of dicts with ``"image"`` (and optionally
``"height"``/``"width"``, the original size) gives ``[{"instances": Instances}]`` in original-image
pixels in eval mode; in training mode the items also carry ``"instances"`` (targets) and
optionally ``"proposals"`` (precomputed proposals used by the ROI heads instead of the RPN's, while
the RPN still runs for its losses), and the result is the loss dict. Items may also carry an
integer ``"sampling_seed"`` (every item or none; the training loader adds it with
``SOLVER.RANK_INVARIANT``): the RPN's and the ROI heads' ``torch.randperm`` draws for that image
then come from a ``torch.Generator`` seeded with it (RPN first, then ROI heads), not from the
global RNG, so an image is sampled the same whichever batch or rank it is in.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from gridfeats.modeling.backbone import Backbone, build_backbone
from gridfeats.modeling.postprocessing import detector_postprocess
from gridfeats.modeling.roi_heads import build_roi_heads
from gridfeats.modeling.rpn import RPN
from gridfeats.structures import ImageList, Instances

TARGET_FIELDS = ("gt_boxes", "gt_classes", "gt_attributes")
PROPOSAL_FIELDS = ("proposal_boxes", "objectness_logits")
SAMPLING_SEED = "sampling_seed"


class GeneralizedRCNN(nn.Module):
    def __init__(
        self,
        *,
        backbone: Backbone,
        proposal_generator: nn.Module,
        roi_heads: nn.Module,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        input_format: str = "BGR",
    ):
        super().__init__()
        self.backbone = backbone
        self.proposal_generator = proposal_generator
        self.roi_heads = roi_heads
        self.input_format = input_format
        channels = len(pixel_mean)
        if len(pixel_std) != channels:
            raise ValueError(f"{channels} pixel means but {len(pixel_std)} pixel stds")
        mean = torch.tensor(pixel_mean, dtype=torch.float32).view(channels, 1, 1)
        std = torch.tensor(pixel_std, dtype=torch.float32).view(channels, 1, 1)
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)

    @classmethod
    def from_config(cls, cfg) -> "GeneralizedRCNN":
        """Build every part from ``cfg`` and check the options this implementation covers."""
        if cfg.MODEL.META_ARCHITECTURE != "GeneralizedRCNN":
            raise ValueError(
                f"MODEL.META_ARCHITECTURE {cfg.MODEL.META_ARCHITECTURE!r} is not supported"
            )
        if cfg.MODEL.PROPOSAL_GENERATOR.NAME != "RPN":
            raise ValueError(
                f"MODEL.PROPOSAL_GENERATOR.NAME {cfg.MODEL.PROPOSAL_GENERATOR.NAME!r} "
                "is not supported (RPN)"
            )
        if cfg.MODEL.MASK_ON or cfg.MODEL.KEYPOINT_ON or cfg.MODEL.LOAD_PROPOSALS:
            raise ValueError("mask, keypoint and MODEL.LOAD_PROPOSALS models are not supported")
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        return cls(
            backbone=backbone,
            proposal_generator=RPN(cfg, shapes),
            roi_heads=build_roi_heads(cfg, shapes),
            pixel_mean=cfg.MODEL.PIXEL_MEAN,
            pixel_std=cfg.MODEL.PIXEL_STD,
            input_format=cfg.INPUT.FORMAT,
        )

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    # -- input -------------------------------------------------------------------------------------
    def normalize(self, images: Sequence[torch.Tensor]) -> ImageList:
        """``(uint8 - mean) / std`` per channel, padded into one batch (bottom/right, value 0) to a
        multiple of the backbone's ``size_divisibility``."""
        normalised = [
            (img.to(self.device, non_blocking=True) - self.pixel_mean) / self.pixel_std
            for img in images
        ]
        return ImageList.from_tensors(normalised, self.backbone.size_divisibility)

    def preprocess_image(self, batched_inputs: Sequence[Mapping[str, Any]]) -> ImageList:
        return self.normalize([x["image"] for x in batched_inputs])

    # -- forward -----------------------------------------------------------------------------------
    def forward(
        self, batched_inputs: Sequence[Mapping[str, Any]]
    ) -> Union[Dict[str, torch.Tensor], List[Dict[str, Instances]]]:
        if not self.training:
            images = self.preprocess_image(batched_inputs)
            _, detections = self.inference(images)
            results = []
            for det, x, hw in zip(detections, batched_inputs, images.image_sizes):
                out_hw = (int(x.get("height", hw[0])), int(x.get("width", hw[1])))
                results.append({"instances": detector_postprocess(det, out_hw)[0]})
            return results
        images = self.preprocess_image(batched_inputs)
        targets = [
            as_instances(x["instances"], hw, TARGET_FIELDS, self.device)
            for x, hw in zip(batched_inputs, images.image_sizes)
        ]
        generators = sampling_generators(batched_inputs, self.device)
        sampling = {} if generators is None else {"generators": generators}
        features = self.backbone(images.tensor)
        proposals, proposal_losses = self.proposal_generator(images, features, targets, **sampling)
        if all("proposals" in x for x in batched_inputs):
            proposals = [
                as_instances(x["proposals"], hw, PROPOSAL_FIELDS, self.device)
                for x, hw in zip(batched_inputs, images.image_sizes)
            ]
        elif any("proposals" in x for x in batched_inputs):
            raise ValueError("either every batch item carries 'proposals' or none does")
        _, detector_losses = self.roi_heads(images, features, proposals, targets, **sampling)
        return {**detector_losses, **proposal_losses}

    def inference(self, images: ImageList) -> Tuple[Dict[str, torch.Tensor], List[Instances]]:
        """Backbone features and detections in input pixels (before rescaling to the original)."""
        features = self.backbone(images.tensor)
        proposals, _ = self.proposal_generator(images, features)
        detections, _ = self.roi_heads(images, features, proposals)
        return features, detections

    def grid_features(self, images: ImageList) -> torch.Tensor:
        """The grid-feature map ``[N, C, H', W']``: the backbone's own grid rule, then the ROI
        heads' whole-image view of it (the map itself, or the res5 head run over res4 for the
        "updn" models whose backbone stops at res4)."""
        return self.roi_heads.conv5_features(self.backbone.grid_features(images.tensor))


def sampling_generators(
    batched_inputs: Sequence[Mapping[str, Any]], device: torch.device
) -> Optional[List[torch.Generator]]:
    """One generator on ``device`` per item, seeded with its ``"sampling_seed"``; ``None`` when no
    item has one (the global RNG samples, as in Detectron2)."""
    has = [SAMPLING_SEED in x for x in batched_inputs]
    if not any(has):
        return None
    if not all(has):
        raise ValueError(f"either every batch item carries {SAMPLING_SEED!r} or none does")
    generators = []
    for x in batched_inputs:
        g = torch.Generator(device=device)
        g.manual_seed(int(x[SAMPLING_SEED]))
        generators.append(g)
    return generators


def as_instances(
    value: Union[Instances, Mapping[str, Any]],
    image_size: Tuple[int, int],
    fields: Sequence[str],
    device: torch.device,
) -> Instances:
    """A batch item's targets or proposals as :class:`Instances` on ``device``.

    Accepts an ``Instances`` or a plain dict of tensors (the documented training-batch format).
    """
    if isinstance(value, Instances):
        return value.to(device)
    missing = [f for f in fields if f not in value]
    if fields is PROPOSAL_FIELDS and missing:
        raise ValueError(f"batch proposals need the fields {list(fields)}; missing {missing}")
    data = {k: torch.as_tensor(v).to(device) for k, v in value.items()}
    if "gt_boxes" in data or "proposal_boxes" in data:
        for key in ("gt_boxes", "proposal_boxes"):
            if key in data:
                data[key] = data[key].float().reshape(-1, 4)
    if "gt_classes" in data:
        data["gt_classes"] = data["gt_classes"].long()
    if "gt_attributes" in data:
        data["gt_attributes"] = data["gt_attributes"].long()
    return Instances(image_size, **data)
