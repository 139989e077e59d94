"""``Detector``: the one entry point the CLI, the batch job, the service and the tests use.

It owns a :class:`~gridfeats.modeling.GeneralizedRCNN` in eval mode and turns images into
grid features (grid-feats-vqa's C5 map) or detections with region features. Every path goes through
:func:`gridfeats.data.preprocess.prepare_image`, so the numbers are the same whoever calls.

Batches: Detectron2 pads a batch to its largest image, which changes the features near the
bottom/right borders of the smaller images, and CPU/GPU kernels pick different algorithms for
different batch sizes (float-rounding differences). So a list of images is run one forward per
image by default, which gives exactly the single-image results; ``batch_forward=True`` runs one
forward per group of images of the same input size instead (faster on GPUs, rounding-level
differences, never padding).
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from gridfeats.allocator import retain_freed_memory
from gridfeats.checkpoint import LoadReport, check_complete, load_checkpoint, sha256_file
from gridfeats.data.image_io import DEFAULT_MAX_PIXELS, ImageSource
from gridfeats.data.preprocess import PreparedImage, prepare_image
from gridfeats.layers import Conv2d
from gridfeats.modeling import build_model, detector_postprocess
from gridfeats.precision import (
    FAST_MEMORY_FORMAT,
    autocast,
    check_precision,
    compute_dtype,
    conv_memory_format,
)
from gridfeats.structures import ImageList, Instances

logger = logging.getLogger(__name__)


def _is_batch(images: Any) -> bool:
    return isinstance(images, (list, tuple))


class Detector:
    """A Detectron2-compatible grid-feats-vqa detector in inference mode.

    Args:
        cfg: a config from :func:`gridfeats.get_cfg`, or a path / shipped name passed to it.
        weights: a ``.pth``/``.pkl`` checkpoint; ``None`` keeps the seeded random initialisation.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        allow_partial: accept a checkpoint that leaves some tensors at init (refused by default).
            A checkpoint that fills the whole backbone and nothing else (``gridfeats
            convert-backbone``) serves grids without it; detections then need it.
        precision: ``"fp32"`` (exact), ``"bf16"`` or ``"fp16"`` (fast modes, where the hardware
            has them).
        seed: seed of the random initialisation (used for every tensor the checkpoint does not set).
        max_pixels: decompression-bomb guard of the image reader.
        batch_forward: run a list as one forward per group of same-size images (see module doc).
        fast: fold every FrozenBN into its convolution, stored in the compute dtype and in the
            layout the kernels run fastest (``gridfeats.precision.conv_memory_format``). In
            fp32 results differ from the exact mode by float32 rounding only (relative ~1e-6);
            the checkpoint tensors are untouched. bf16/fp16 always run the fast kernels.
    """

    def __init__(
        self,
        cfg: Any,
        weights: Optional[Union[str, os.PathLike]] = None,
        device: Union[str, torch.device] = "cpu",
        allow_partial: bool = False,
        precision: str = "fp32",
        seed: int = 0,
        max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
        fast: bool = False,
        batch_forward: bool = False,
    ):
        if not hasattr(cfg, "MODEL"):
            from gridfeats.config import get_cfg

            cfg = get_cfg(cfg)
        self.cfg = cfg
        self.device = torch.device(device)
        check_precision(precision, self.device)
        if self.device.type == "cpu":
            retain_freed_memory()  # no page faults on every pass's activations (allocator.py)
        self.precision = precision
        self.max_pixels = max_pixels
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_model(cfg)
        self.load_report: Optional[LoadReport] = None
        self.weights_sha256 = ""
        if weights is not None:
            # Grids need only the backbone; detect() checks the heads (a converted SSL backbone).
            self.load_report, _ = load_checkpoint(model, weights, allow_partial, "backbone")
            self.weights_sha256 = sha256_file(weights)
        else:
            logger.warning(
                "no weights given: the detector uses a seeded random initialisation (seed %d)", seed
            )
        self.model = model.eval().to(self.device)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.allow_partial = allow_partial
        self.fast = fast or precision != "fp32"
        self.batch_forward = batch_forward
        self.memory_format = torch.contiguous_format
        if self.fast:
            self.memory_format = FAST_MEMORY_FORMAT
            dtype = compute_dtype(precision)
            # fp32 on a CPU also computes wide 3x3 convolutions by Winograd F(4x4, 3x3)
            # (layers/winograd.py; float rounding only).
            cpu_fp32 = precision == "fp32" and self.device.type == "cpu"
            for module in self.model.modules():
                if isinstance(module, Conv2d):
                    layout = conv_memory_format(
                        module.in_channels, module.kernel_size, precision, self.device
                    )
                    module.fold_norm(dtype, layout, winograd=cpu_fp32)
            if hasattr(self.model.roi_heads, "sparse_box_deltas"):
                # Class-specific box deltas only where a class passes the score threshold.
                self.model.roi_heads.sparse_box_deltas = True
            if hasattr(self.model.proposal_generator, "exact_tie_order"):
                # No full NMS just to order exactly tied objectness scores as Detectron2 does.
                self.model.proposal_generator.exact_tie_order = False
            self.model.to(memory_format=self.memory_format)
        if self.device.type == "cuda" and precision == "fp32":
            # Ampere+ GPUs default to TF32 convolutions (~1e-3 relative error): exact mode: off.
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False

    @classmethod
    def from_model(cls, model: torch.nn.Module, cfg: Any, precision: str = "fp32") -> "Detector":
        """Wrap an in-memory ``GeneralizedRCNN`` (e.g. the one being trained) without copying it.

        The model is put in eval mode (the caller restores train mode); its parameters and the
        global TF32 switches are left alone. Used by training-time evaluation so that it runs
        the same ``prepare``/``detect_batch`` code as extraction.
        """
        detector = cls.__new__(cls)
        detector.cfg = cfg
        detector.device = model.pixel_mean.device
        check_precision(precision, detector.device)
        detector.precision = precision
        detector.max_pixels = DEFAULT_MAX_PIXELS
        detector.load_report = None
        detector.weights_sha256 = ""
        detector.allow_partial = True  # the in-memory model has all its heads, trained or not
        detector.model = model.eval()
        detector.fast = False  # folding norms would change the wrapped model's modules
        detector.memory_format = torch.contiguous_format
        detector.batch_forward = False
        return detector

    # -- properties --------------------------------------------------------------------------------
    @property
    def random_init(self) -> bool:
        return self.load_report is None

    @property
    def grid_dim(self) -> int:
        return self.model.roi_heads.grid_dim

    @property
    def region_dim(self) -> int:
        return self.model.roi_heads.feature_dim

    @property
    def num_classes(self) -> int:
        return self.model.roi_heads.num_classes

    @property
    def num_attributes(self) -> int:
        return self.cfg.MODEL.ROI_ATTRIBUTE_HEAD.NUM_CLASSES if self.cfg.MODEL.ATTRIBUTE_ON else 0

    # -- input -------------------------------------------------------------------------------------
    def prepare(self, image: Union[ImageSource, PreparedImage]) -> PreparedImage:
        """Decode and resize one image as the config says (Detectron2's test mapper).

        Pure CPU work with no model state: call it in DataLoader workers or decode threads.
        """
        if isinstance(image, PreparedImage):
            return image
        return prepare_image(
            image,
            self.cfg.INPUT.MIN_SIZE_TEST,
            self.cfg.INPUT.MAX_SIZE_TEST,
            self.cfg.INPUT.FORMAT,
            self.max_pixels,
        )

    def _prepare_all(
        self, images: Sequence[Union[ImageSource, PreparedImage]]
    ) -> List[PreparedImage]:
        return [self.prepare(im) for im in images]

    def _groups(self, prepared: Sequence[PreparedImage]) -> List[List[int]]:
        if not self.batch_forward:
            return [[i] for i in range(len(prepared))]
        groups: Dict[Tuple[int, int], List[int]] = defaultdict(list)
        for i, p in enumerate(prepared):
            groups[p.input_hw].append(i)
        return list(groups.values())

    def _context(self):
        return autocast(self.precision, self.device)

    def _batch(self, prepared: Sequence[PreparedImage], group: Sequence[int]) -> ImageList:
        images = self.model.normalize([prepared[i].image for i in group])
        if self.memory_format != torch.contiguous_format:
            images.tensor = images.tensor.contiguous(memory_format=self.memory_format)
        return images

    # -- grid features -----------------------------------------------------------------------------
    def grid_batch(self, prepared: Sequence[PreparedImage]) -> List[torch.Tensor]:
        """Grid features ``[C, H', W']`` (float32, on the model device) for prepared images: the
        backbone's grid rule (ResNets: the C5 map, ``ceil(h/32) x ceil(w/32)`` at stride 32, or
        stride 16 with ``MODEL.GRID.RES5_DILATION 2``)."""
        out: List[Optional[torch.Tensor]] = [None] * len(prepared)
        with torch.inference_mode(), self._context():
            for group in self._groups(prepared):
                grids = self.model.grid_features(self._batch(prepared, group)).float()
                for j, i in enumerate(group):
                    out[i] = grids[j].contiguous()
        return out  # type: ignore[return-value]

    def extract_grid(
        self, images: Union[ImageSource, Sequence[ImageSource]]
    ) -> Union[torch.Tensor, List[torch.Tensor]]:
        """grid-feats-vqa's grid feature: the C5 map (stride 32 unless ``MODEL.GRID.RES5_DILATION``
        is 2) as a CPU float32 ``[C, H', W']`` tensor.

        Accepts one image (path, PIL image, HxWx3 uint8 RGB array) or a list of them.
        """
        single = not _is_batch(images)
        grids = [
            g.cpu() for g in self.grid_batch(self._prepare_all([images] if single else images))
        ]
        return grids[0] if single else grids

    # -- detections --------------------------------------------------------------------------------
    def require_heads(self) -> None:
        """Raise CheckpointError when the weights hold no detector heads (a backbone-only file from
        `gridfeats convert-backbone`) and allow_partial was not given; call before region work."""
        if self.load_report is not None:
            check_complete(self.load_report, allow_partial=self.allow_partial)

    def detect_batch(self, prepared: Sequence[PreparedImage]) -> List[Instances]:
        """Detectron2 inference as configured, with region features and attribute probabilities.

        Each result is an :class:`Instances` of the original image size with ``pred_boxes``
        (original pixels), ``pred_boxes_input`` (the same boxes in network-input pixels),
        ``scores``, ``pred_classes`` (0-based), ``box_features`` and, with an attribute head,
        ``attr_probs``: one row per returned detection (boxes left empty by the rescale are
        dropped, as Detectron2 does). A detection's feature is the box head applied at its own box
        on the feature map it was detected on (network-input pixels), and its attribute
        probabilities are read from that feature with its predicted class.
        """
        self.require_heads()
        out: List[Optional[Instances]] = [None] * len(prepared)
        heads = self.model.roi_heads
        with torch.inference_mode(), self._context():
            for group in self._groups(prepared):
                features, detections = self.model.inference(self._batch(prepared, group))
                for j, i in enumerate(group):
                    final, kept = detector_postprocess(detections[j], prepared[i].orig_hw)
                    boxes_input = detections[j].pred_boxes[kept]
                    single = {k: v[j : j + 1] for k, v in features.items()}
                    feats = heads.box_features(single, [boxes_input]).float()
                    final.pred_boxes = final.pred_boxes.float()
                    final.pred_boxes_input = boxes_input.float()
                    final.scores = final.scores.float()
                    final.box_features = feats
                    if heads.attribute_on:
                        final.attr_probs = heads.attribute_probs(feats, final.pred_classes).float()
                    final.remove("proposal_index")
                    out[i] = final
        return out  # type: ignore[return-value]

    def detect(
        self, images: Union[ImageSource, Sequence[ImageSource]]
    ) -> Union[Dict[str, torch.Tensor], List[Dict[str, torch.Tensor]]]:
        """Detections as a dict of CPU tensors: ``boxes [K,4]`` (xyxy, original pixels), ``scores``,
        ``classes`` (0-based), ``features [K,D]`` and ``attr_scores [K,A]``, in Detectron2's
        order."""
        single = not _is_batch(images)
        results = self.detect_batch(self._prepare_all([images] if single else images))
        dicts = [detection_dict(r) for r in results]
        return dicts[0] if single else dicts

    def region_candidates(
        self, prepared: Sequence[PreparedImage], class_boxes: bool = True
    ) -> List[Instances]:
        """Every proposal's box-branch output (:meth:`ROIHeads.predict`: ``proposal_boxes``,
        ``box_features``, ``class_probs`` and, with ``class_boxes``, ``pred_boxes_per_class``, in
        network-input pixels), for selection rules other than Detectron2's (e.g.
        bottom-up-attention's), computed on the detection model (dilated res5)."""
        self.require_heads()
        out: List[Optional[Instances]] = [None] * len(prepared)
        with torch.inference_mode(), self._context():
            for group in self._groups(prepared):
                images = self._batch(prepared, group)
                features = self.model.backbone(images.tensor)
                proposals, _ = self.model.proposal_generator(images, features)
                predictions = self.model.roi_heads.predict(features, proposals, class_boxes)
                for j, i in enumerate(group):
                    out[i] = predictions[j]
        return out  # type: ignore[return-value]


#: ``Detector.detect``'s keys for the fields of a detection :class:`Instances`.
DETECTION_KEYS = {
    "pred_boxes": "boxes",
    "scores": "scores",
    "pred_classes": "classes",
    "box_features": "features",
    "attr_probs": "attr_scores",
}


def detection_dict(detections: Instances) -> Dict[str, torch.Tensor]:
    """The public dict form of one image's detections (CPU tensors)."""
    return {
        key: detections.get(field).cpu()
        for field, key in DETECTION_KEYS.items()
        if detections.has(field)
    }
