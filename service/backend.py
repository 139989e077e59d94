"""The model behind the service: a small interface, and its implementation on the feature makers.

The app talks to a :class:`FeatureBackend` only, so it can be tested with a tiny fake model and
the dynamic batcher stays generic. :class:`DetectorBackend` is the real one and adds no image or
feature processing of its own: decoding and resizing are ``Detector.prepare`` (the project's one
image reader and one resize), and features come from :mod:`gridfeats.features`, the makers
``gridfeats extract`` uses too (:func:`~gridfeats.features.make_feature_maker`), on a detector built
the way the job builds it (same config, fast kernels unless ``exact_kernels``, one forward per
image unless ``batched_forward``). So an answer holds the numbers ``gridfeats extract`` stores for
the same image and options, as the feature store's records.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Protocol, Sequence, Tuple

from gridfeats.features import FeatureSpec, make_feature_maker
from gridfeats.store.records import Record
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
    #: what the weights can compute: ("grid",) for a backbone-only checkpoint (convert-backbone)
    modes: Tuple[str, ...] = ("grid", "region")


@dataclass(frozen=True)
class ModelRequest:
    """One image to run: the backend's prepared input and what to compute."""

    spec: FeatureSpec
    image: Any


class FeatureBackend(Protocol):
    """What the service needs from a model."""

    info: BackendInfo

    def prepare(self, source: Any) -> Any:
        """Decode and resize one image (bytes or an RGB array); raises ``ImageReadError``."""

    def run_batch(self, requests: Sequence[ModelRequest]) -> List[Record]:
        """Feature-store records for prepared images, in order; called from one thread at a time."""


def group_by_spec(requests: Sequence[ModelRequest]) -> "OrderedDict[FeatureSpec, List[int]]":
    """Indices of ``requests`` per distinct spec, in first-seen order."""
    groups: "OrderedDict[FeatureSpec, List[int]]" = OrderedDict()
    for index, request in enumerate(requests):
        groups.setdefault(request.spec, []).append(index)
    return groups


class DetectorBackend:
    """:class:`FeatureBackend` on a :class:`gridfeats.api.Detector` and the shared makers."""

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
            modes=("grid", "region") if _has_heads(detector) else ("grid",),
        )
        self._makers: Dict[FeatureSpec, Any] = {}

    @classmethod
    def from_settings(cls, settings: ServiceSettings) -> "DetectorBackend":
        """Build the detector as ``gridfeats extract`` does with the same config and options."""
        from gridfeats.api import Detector
        from gridfeats.config import get_cfg

        cfg = get_cfg(settings.config, list(settings.opts))
        detector = Detector(
            cfg,
            weights=settings.weights,
            device=settings.device,
            precision=settings.precision,
            max_pixels=settings.max_pixels,
            fast=not settings.exact_kernels,
            batch_forward=settings.batched_forward,
        )
        return cls(detector)

    def prepare(self, source: Any) -> Any:
        return self.detector.prepare(source)

    def _maker(self, spec: FeatureSpec) -> Any:
        maker = self._makers.get(spec)
        if maker is None:
            maker = make_feature_maker(self.detector, spec)
            if len(self._makers) > 256:  # specs come from clients: keep the cache bounded
                self._makers.clear()
            self._makers[spec] = maker
        return maker

    def run_batch(self, requests: Sequence[ModelRequest]) -> List[Record]:
        records: List[Optional[Record]] = [None] * len(requests)
        for spec, indices in group_by_spec(requests).items():
            made = self._maker(spec).records([requests[i].image for i in indices])
            for index, record in zip(indices, made):
                records[index] = record
        return records  # type: ignore[return-value]


def _has_heads(detector: Any) -> bool:
    """Whether the detector's weights cover its heads (region mode needs them)."""
    from gridfeats.checkpoint import CheckpointError

    require = getattr(detector, "require_heads", None)
    if require is None:
        return True
    try:
        require()
    except CheckpointError:
        return False
    return True
