"""``gridfeats serve``: run the REST feature endpoint.

Every flag has a ``GRIDFEATS_<NAME>`` environment variable (flags win), so a container can be
configured without a command line. API keys are deliberately not a flag, because command lines are
visible to every user of the machine (``ps``): pass them in ``GRIDFEATS_API_KEYS`` (comma-separated)
or a key file. Settings are checked before the server starts, so a typo in a path fails with one
line instead of a server that never becomes ready.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, Literal, Union, get_args, get_origin

from pydantic.fields import FieldInfo

from service.settings import ENV_ONLY, GROUPS, ServiceSettings, SettingsError, load_settings


def _flag_type(annotation: Any) -> Dict[str, Any]:
    """argparse ``type``/``choices`` for a settings field: Literal -> choices, numbers -> type."""
    if get_origin(annotation) is Union:  # Optional[X]
        annotation = next(a for a in get_args(annotation) if a is not type(None))
    if get_origin(annotation) is Literal:
        return {"choices": get_args(annotation)}
    if annotation in (int, float):
        return {"type": annotation}
    return {}  # strings, and lists given as one comma-separated string


def _add_flag(group: argparse._ArgumentGroup, name: str, field: FieldInfo) -> None:
    dashed = name.replace("_", "-")
    if field.annotation is bool:
        # A switch that is off by default is --NAME; one that is on by default is --no-NAME.
        turns_on = not field.default
        group.add_argument(
            f"--{dashed}" if turns_on else f"--no-{dashed}",
            dest=name,
            action="store_const",
            const=turns_on,
            help=field.description if turns_on else f"skip this: {field.description}",
        )
        return
    default = "" if field.default in (None, ()) else f" (default {field.default})"
    group.add_argument(
        f"--{dashed}", **_flag_type(field.annotation), help=f"{field.description}{default}"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting (``--max-batch`` for ``max_batch``), built from the settings model.

    Flags default to ``None`` so that an absent flag leaves the ``GRIDFEATS_*`` value or the
    model's default in place; config overrides are the trailing ``KEY VALUE`` words.
    """
    parser.epilog = (
        "Every option also reads GRIDFEATS_<OPTION> from the environment, e.g. "
        "GRIDFEATS_MAX_BATCH=16. API keys: GRIDFEATS_API_KEYS=key1,key2 or --api-keys-file."
    )
    groups = {key: parser.add_argument_group(title) for key, title in GROUPS.items()}
    for name, field in ServiceSettings.model_fields.items():
        if name in ENV_ONLY or name == "opts":
            continue
        _add_flag(groups[field.json_schema_extra["group"]], name, field)
    parser.add_argument(
        "opts",
        nargs=argparse.REMAINDER,
        metavar="KEY VALUE",
        help="config overrides, as for gridfeats extract, e.g. INPUT.MIN_SIZE_TEST 800",
    )


def _overrides(args: argparse.Namespace) -> Dict[str, Any]:
    values = {name: getattr(args, name, None) for name in ServiceSettings.model_fields}
    values["opts"] = tuple(args.opts) if args.opts else None
    return values


def check_model_settings(settings: ServiceSettings) -> None:
    """Fail fast on what can be checked without loading the weights; raises ``SettingsError``."""
    import torch

    from gridfeats.config import get_cfg
    from gridfeats.precision import PrecisionError, check_precision

    if len(settings.opts) % 2:
        raise SettingsError(
            f"config overrides come in KEY VALUE pairs, got: {' '.join(settings.opts)}"
        )
    try:
        get_cfg(settings.config, list(settings.opts))
    except (FileNotFoundError, KeyError, ValueError) as exc:
        raise SettingsError(f"config: {exc}") from None
    for name in ("weights", "objects_vocab", "attributes_vocab", "api_keys_file"):
        path = getattr(settings, name)
        if path is not None and not Path(path).is_file():
            raise SettingsError(f"{name}: file not found: {path}")
    try:
        device = torch.device(settings.device)
    except RuntimeError as exc:
        raise SettingsError(f"device: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SettingsError(f"device: {settings.device} requested but CUDA is not available")
    try:
        check_precision(settings.precision, device)
    except PrecisionError as exc:
        raise SettingsError(f"precision: {exc}") from None


def run(args: argparse.Namespace) -> int:
    from service.auth import ApiKeyFileError

    try:
        settings = load_settings(_overrides(args))
        check_model_settings(settings)
    except SettingsError as exc:
        print(f"gridfeats serve: error: {exc}", file=sys.stderr)
        return 2
    from service.server import serve

    try:
        return serve(settings)
    except ApiKeyFileError as exc:
        print(f"gridfeats serve: error: {exc}", file=sys.stderr)
        return 2
