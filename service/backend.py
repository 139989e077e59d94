"""The model behind the service: a small interface, and its implementation on ``gridfeats.api.Detector``.

The app talks to a :class:`FeatureBackend` only, so it can be tested with a tiny fake model and
the dynamic batcher stays generic. :class:`DetectorBackend` is the real one; it adds no image
processing of its own: decoding and resizing are ``Detector.prepare`` (the project's one image
reader and one resize) and the forwards are ``Detector.grid_batch`` / ``Detector.detect_batch``,
the same calls ``gridfeats extract`` makes, so the service answers with the extraction's numbers.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, List, Optional, Protocol, Sequence, Tuple, Union

import numpy as np

from service.settings import ServiceSettings

logger = logging.getLogger("gridfeats.service.backend")


@dataclass(frozen=True)
class BackendInfo:
    """Static facts about the loaded model, reported by ``GET /v1/model``."""

    config: str
    weights_sha256: str
    random_init: bool
    device: str
    precision: str
    grid_dim: int
    region_dim: int
    num_classes: int
    num_attributes: int
    input_min_size: int
    input_max_size: int


@dataclass(frozen=True)
class ModelRequest:
    """One image to run: the backend's prepared input and the mode asked for."""

    mode: str
    image: Any


@dataclass
class GridOutput:
    """The ``[C, h, w]`` float32 C5 map of one image and its two sizes."""

    feature_map: np.ndarray
    image_hw: Tuple[int, int]
    input_hw: Tuple[int, int]


@dataclass
class RegionOutput:
    """Detections of one image (highest score first) as float32/int64 arrays."""

    features: np.ndarray  # [K, D]
    boxes: np.ndarray  # [K, 4] original-image pixels
    scores: np.ndarray  # [K]
    classes: np.ndarray  # [K]
    attr_scores: Optional[np.ndarray]  # [K, A] probabilities, None without an attribute head
    image_hw: Tuple[int, int]
    input_hw: Tuple[int, int]


ModelOutput = Union[GridOutput, RegionOutput]


class FeatureBackend(Protocol):
    """What the service needs from a model."""

    info: BackendInfo

    def prepare(self, source: Any) -> Any:
        """Decode and resize one image (bytes or an RGB array); raises ``ImageReadError``."""

    def run_batch(self, requests: Sequence[ModelRequest]) -> List[ModelOutput]:
        """Outputs for prepared images, in order; called from one worker thread at a time."""


def _hw(pair: Sequence[int]) -> Tuple[int, int]:
    return int(pair[0]), int(pair[1])


class DetectorBackend:
    """:class:`FeatureBackend` on a :class:`gridfeats.api.Detector`."""

    def __init__(self, detector: Any) -> None:
        from gridfeats.config import cfg_source_name

        self.detector = detector
        cfg = detector.cfg
        self.info = BackendInfo(
            config=cfg_source_name(cfg) or "default",
            weights_sha256=detector.weights_sha256,
            random_init=detector.random_init,
            device=str(detector.device),
            precision=detector.precision,
            grid_dim=int(detector.grid_dim),
            region_dim=int(detector.region_dim),
            num_classes=int(detector.num_classes),
            num_attributes=int(detector.num_attributes),
            input_min_size=int(cfg.INPUT.MIN_SIZE_TEST),
            input_max_size=int(cfg.INPUT.MAX_SIZE_TEST),
        )

    @classmethod
    def from_settings(cls, settings: ServiceSettings) -> "DetectorBackend":
        """Build the detector the settings describe (config, overrides, weights, device, precision)."""
        from gridfeats.api import Detector
        from gridfeats.config import get_cfg

        cfg = get_cfg(settings.config, list(settings.opts))
        detector = Detector(
            cfg,
            weights=settings.weights,
            device=settings.device,
            precision=settings.precision,
            max_pixels=settings.max_pixels,
        )
        return cls(detector)

    def prepare(self, source: Any) -> Any:
        return self.detector.prepare(source)

    def run_batch(self, requests: Sequence[ModelRequest]) -> List[ModelOutput]:
        outputs: List[Optional[ModelOutput]] = [None] * len(requests)
        grid_idx = [i for i, r in enumerate(requests) if r.mode == "grid"]
        region_idx = [i for i, r in enumerate(requests) if r.mode == "region"]
        unknown = [r.mode for r in requests if r.mode not in ("grid", "region")]
        if unknown:
            raise ValueError(f"unknown feature mode(s): {sorted(set(unknown))}")
        if grid_idx:
            prepared = [requests[i].image for i in grid_idx]
            for i, p, fmap in zip(grid_idx, prepared, self.detector.grid_batch(prepared)):
                outputs[i] = GridOutput(
                    feature_map=fmap.detach().cpu().numpy(), image_hw=_hw(p.orig_hw), input_hw=_hw(p.input_hw)
                )
        if region_idx:
            prepared = [requests[i].image for i in region_idx]
            for i, det in zip(region_idx, self.detector.detect_batch(prepared)):
                outputs[i] = RegionOutput(
                    features=det.features.detach().cpu().numpy(),
                    boxes=det.boxes.detach().cpu().numpy(),
                    scores=det.scores.detach().cpu().numpy(),
                    classes=det.classes.detach().cpu().numpy(),
                    attr_scores=None if det.attr_scores is None else det.attr_scores.detach().cpu().numpy(),
                    image_hw=_hw(det.orig_hw),
                    input_hw=_hw(det.input_hw),
                )
        return outputs  # type: ignore[return-value]
