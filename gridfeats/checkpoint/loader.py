"""Load Detectron2 ``.pth`` and Caffe2/Detectron ``.pkl`` checkpoints into a model, with a report.

Follows Detectron2's ``DetectionCheckpointer`` semantics (``{"model": ...}`` or a bare state dict,
``module.`` prefixes, Caffe2 renaming with suffix matching for ImageNet ``.pkl`` files, shape
mismatches skipped) but reports every missing, unexpected and mismatched key by name, and lets the
caller refuse a partial load: a detector silently running with random heads is the worst outcome.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import pathlib
import pickle
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Tuple, Union

import numpy as np
import torch
from torch import nn

from gridfeats.checkpoint.caffe2_names import convert_caffe2_state_dict
from gridfeats.checkpoint.safe_pickle import restricted_load
from gridfeats.errors import GridfeatsError

logger = logging.getLogger(__name__)

#: Buffers computed from the config; a checkpoint may or may not carry them (Detectron2 changed this).
DERIVED_SUFFIXES = ("anchor_generator.cell_anchors.0",)
#: Model tensors that grid extraction reads: the backbone, and the res5 stage a C4 box head owns.
#: A checkpoint that fills all of them (a converted SSL backbone) is enough for grids.
BACKBONE_PREFIXES = ("backbone.", "roi_heads.res5.")
#: What ``load_checkpoint(required=...)`` insists on: every model tensor, or the backbone ones.
REQUIRED_SCOPES = ("model", "backbone")


class CheckpointError(GridfeatsError, RuntimeError, ValueError):
    """A checkpoint that cannot be read, does not fit the model or is from another kind of run.

    The one checkpoint error of the project (the detector's weights and the heads' training
    checkpoints). It keeps the builtin bases of both former copies, so callers that catch
    ``RuntimeError`` (detector loading) or ``ValueError`` (the heads' commands) still catch it.
    """


@dataclass
class LoadReport:
    source: str
    loaded: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    shape_mismatch: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=list)
    derived: List[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Every model tensor came from the checkpoint (config-derived buffers aside)."""
        return not self.missing and not self.shape_mismatch

    @property
    def backbone_complete(self) -> bool:
        """Every backbone tensor (:data:`BACKBONE_PREFIXES`) came from the checkpoint."""
        return not any(k.startswith(BACKBONE_PREFIXES) for k in self.missing) and not any(
            k.startswith(BACKBONE_PREFIXES) for k, _, _ in self.shape_mismatch
        )

    @property
    def backbone_only(self) -> bool:
        """The checkpoint fills the backbone and nothing else (detector heads left at init)."""
        return (
            bool(self.loaded)
            and self.backbone_complete
            and all(k.startswith(BACKBONE_PREFIXES) for k in self.loaded)
            and not self.complete
        )

    def summary(self, limit: int = 20) -> str:
        lines = [f"checkpoint {self.source}: {len(self.loaded)} tensors loaded"]
        for title, items in (
            ("missing in checkpoint (left at init)", self.missing),
            ("unused from checkpoint", self.unexpected),
        ):
            if items:
                shown = ", ".join(items[:limit]) + (
                    f", ... ({len(items) - limit} more)" if len(items) > limit else ""
                )
                lines.append(f"  {title}: {len(items)}: {shown}")
        for key, ckpt_shape, model_shape in self.shape_mismatch[:limit]:
            lines.append(
                f"  shape mismatch {key}: checkpoint {list(ckpt_shape)} vs model {list(model_shape)}"
            )
        return "\n".join(lines)


def sha256_file(path: Union[str, os.PathLike], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # Some trainers store numpy arrays/scalars next to tensors, MAE and DINO their command line
        # as an argparse.Namespace (of strings, numbers and paths): allow exactly those.
        multiarray = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core
        allowed = [
            argparse.Namespace,
            pathlib.PosixPath,
            pathlib.PurePosixPath,
            np.ndarray,
            np.dtype,
            multiarray.multiarray._reconstruct,
            multiarray.multiarray.scalar,
        ]
        allowed += [
            type(np.dtype(t)) for t in ("float32", "float64", "int64", "int32", "uint8", "bool")
        ]
        try:
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            # torch's own message suggests weights_only=False, i.e. running the file's code: not shown.
            raise CheckpointError(
                f"{path}: holds objects other than tensors, numpy arrays, plain containers and "
                "argparse.Namespace; refusing "
                "to unpickle it (a checkpoint must not need code to load)"
            ) from None


def _to_tensors(state: Mapping[str, Any], source: str) -> "OrderedDict[str, torch.Tensor]":
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for key, value in state.items():
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(np.ascontiguousarray(value))
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{source}: value of {key!r} is a {type(value).__name__}, not a tensor"
            )
        out[key] = value
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        out._metadata = metadata  # type: ignore[attr-defined]
    return out


def _strip_prefix(
    state: "OrderedDict[str, torch.Tensor]", prefix: str = "module."
) -> "OrderedDict[str, torch.Tensor]":
    if not state or not all(k.startswith(prefix) for k in state):
        return state
    out = OrderedDict((k[len(prefix) :], v) for k, v in state.items())
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        out._metadata = OrderedDict(  # type: ignore[attr-defined]
            (k[len(prefix) :] if k.startswith(prefix) else ("" if k == prefix[:-1] else k), v)
            for k, v in metadata.items()
        )
    return out


def read_checkpoint(
    path: Union[str, os.PathLike],
) -> Tuple["OrderedDict[str, torch.Tensor]", bool, Dict[str, Any]]:
    """Read a checkpoint file: ``(state_dict, needs_name_matching, extra)``.

    ``needs_name_matching`` is True for Caffe2-style files whose names must be matched by suffix.
    ``extra`` holds what the file carries besides the model (optimizer, scheduler, iteration, ...).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".pkl":
        with open(path, "rb") as f:
            try:
                data = restricted_load(f)
            except pickle.UnpicklingError as e:
                raise CheckpointError(f"{path}: {e}") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{path}: expected a dict, found {type(data).__name__}")
        if "model" in data and "__author__" in data:
            heuristics = bool(data.get("matching_heuristics", False))
            state = _to_tensors(data["model"], str(path))
            if heuristics and data["__author__"] == "Caffe2":
                state = OrderedDict(convert_caffe2_state_dict(state))
            return state, heuristics, {k: v for k, v in data.items() if k != "model"}
        blobs = data.get("blobs", data)
        blobs = {k: v for k, v in blobs.items() if not k.endswith("_momentum")}
        state = OrderedDict(convert_caffe2_state_dict(_to_tensors(blobs, str(path))))
        return state, True, {"__author__": "Caffe2"}
    data = _torch_load(path)
    if not isinstance(data, Mapping):
        raise CheckpointError(
            f"{path}: expected a state dict or {{'model': ...}}, found {type(data).__name__}"
        )
    if "model" in data and isinstance(data["model"], Mapping):
        state, extra = data["model"], {k: v for k, v in data.items() if k != "model"}
    else:
        state, extra = data, {}
    return _strip_prefix(_to_tensors(state, str(path))), False, extra


def match_by_suffix(model_keys: List[str], ckpt_keys: List[str]) -> Dict[str, str]:
    """Detectron2's heuristic: a model key takes the longest checkpoint key it equals or ends with
    (after a dot). Raises if one checkpoint key would fill two model keys."""
    by_len = sorted(ckpt_keys, key=len, reverse=True)
    mapping: Dict[str, str] = {}
    for mk in model_keys:
        for ck in by_len:
            if mk == ck or mk.endswith("." + ck):
                mapping[mk] = ck
                break
    used: Dict[str, str] = {}
    for mk, ck in mapping.items():
        if ck in used:
            raise CheckpointError(
                f"ambiguous checkpoint key {ck!r} matches both {used[ck]!r} and {mk!r}"
            )
        used[ck] = mk
    return mapping


def load_state(
    model: nn.Module,
    state: "OrderedDict[str, torch.Tensor]",
    source: str,
    needs_name_matching: bool = False,
) -> LoadReport:
    """Copy ``state`` into ``model``; shape mismatches are skipped and everything is reported."""
    target = model.state_dict()
    report = LoadReport(source=source)
    if needs_name_matching:
        mapping = match_by_suffix(list(target), list(state))
        matched = OrderedDict((mk, state[ck]) for mk, ck in mapping.items())
        report.unexpected = sorted(set(state) - set(mapping.values()))
        # Write into a copy of the model's own state dict so module versions are the current ones.
        incoming: "OrderedDict[str, torch.Tensor]" = target.copy()  # keeps _metadata
        provided = set()
        for key, value in matched.items():
            incoming[key] = value
            provided.add(key)
    else:
        incoming = state
        provided = set(state)
        report.unexpected = sorted(k for k in state if k not in target)
    to_load: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for key, value in incoming.items():
        if key not in target:
            continue
        if tuple(value.shape) != tuple(target[key].shape):
            report.shape_mismatch.append((key, tuple(value.shape), tuple(target[key].shape)))
            continue
        to_load[key] = value
    metadata = getattr(incoming, "_metadata", None)
    if metadata is not None:
        to_load._metadata = metadata  # type: ignore[attr-defined]
    model.load_state_dict(to_load, strict=False)
    mismatched = {k for k, _, _ in report.shape_mismatch}
    for key in target:
        if key in provided and key not in mismatched:
            report.loaded.append(key)
        elif key.endswith(DERIVED_SUFFIXES) and key not in mismatched:
            report.derived.append(key)
        elif key not in mismatched:
            report.missing.append(key)
    return report


def check_complete(
    report: LoadReport, required: str = "model", allow_partial: bool = False
) -> None:
    """Raise :class:`CheckpointError` unless the load filled what ``required`` names.

    ``required="model"``: every model tensor; ``"backbone"``: every backbone tensor (grid
    extraction needs nothing else). ``allow_partial=True`` accepts anything that loaded at least
    one tensor. A load that matched no tensor at all is refused always: it is a wrong file, not a
    partial one (the classic "only unexpected keys" SSL mistake).
    """
    if required not in REQUIRED_SCOPES:
        raise ValueError(f"required must be one of {REQUIRED_SCOPES}, got {required!r}")
    if not report.loaded and (report.missing or report.shape_mismatch):
        raise CheckpointError(
            "no tensor of the checkpoint matches the model (wrong file or an unconverted "
            "self-supervised checkpoint? see `gridfeats convert-backbone`):\n" + report.summary()
        )
    if allow_partial or report.complete:
        return
    if required == "backbone" and report.backbone_complete:
        return
    if report.backbone_only:
        raise CheckpointError(
            f"{report.source} holds only backbone tensors (e.g. written by `gridfeats "
            "convert-backbone`): it is enough for grid features, but detections and region "
            "features need trained RPN and box heads. Use a detector checkpoint, or pass "
            "allow_partial=True / --allow-partial to run randomly initialised heads:\n"
            + report.summary()
        )
    raise CheckpointError(
        "incomplete checkpoint (pass allow_partial=True / --allow-partial to use it anyway):\n"
        + report.summary()
    )


def load_checkpoint(
    model: nn.Module,
    path: Union[str, os.PathLike],
    allow_partial: bool = False,
    required: str = "model",
) -> Tuple[LoadReport, Dict[str, Any]]:
    """Read ``path`` and load it into ``model``.

    With ``allow_partial=False`` a checkpoint that leaves any required tensor at its initial value
    (or whose shapes do not fit) raises :class:`CheckpointError` naming the keys; pass True to
    accept it (e.g. ImageNet backbone weights as a training initialisation). ``required="backbone"``
    accepts a checkpoint that fills every backbone tensor and nothing else (grid extraction); see
    :func:`check_complete`.
    """
    state, needs_matching, extra = read_checkpoint(path)
    report = load_state(model, state, str(path), needs_matching)
    for line in report.summary().splitlines():
        logger.info(line)
    check_complete(report, required=required, allow_partial=allow_partial)
    return report, extra
