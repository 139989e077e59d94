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
from typing import Any, Dict

from service.settings import ServiceSettings, SettingsError, load_settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "Every option also reads GRIDFEATS_<OPTION> from the environment, e.g. "
        "GRIDFEATS_MAX_BATCH=16. API keys: GRIDFEATS_API_KEYS=key1,key2 or --api-keys-file."
    )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--config", help="config YAML or shipped name (e.g. R-50-grid); default: project defaults"
    )
    model.add_argument(
        "--weights", help="checkpoint (.pth/.pkl); default: random init (for testing only)"
    )
    model.add_argument("--device", help="torch device: cpu (default), cuda, cuda:1")
    model.add_argument(
        "--precision",
        choices=("fp32", "bf16", "fp16"),
        help="compute precision (default fp32, exact); bf16/fp16 where the hardware has them",
    )
    model.add_argument(
        "--exact-kernels",
        action="store_const",
        const=True,
        help="no folded norms / channels-last (slower; as gridfeats extract --exact-kernels)",
    )
    model.add_argument(
        "--batched-forward",
        action="store_const",
        const=True,
        help="one forward per batch instead of per image: faster on GPUs, features then depend "
        "on the batch by float rounding (as gridfeats extract --batched-forward)",
    )
    model.add_argument("--objects-vocab", help="objects_vocab.txt: return class names")
    model.add_argument("--attributes-vocab", help="attributes_vocab.txt: return attribute names")

    server = parser.add_argument_group("server")
    server.add_argument("--host", help="bind address (default 127.0.0.1; 0.0.0.0 in containers)")
    server.add_argument("--port", type=int, help="port (default 8000)")
    server.add_argument("--max-batch", type=int, help="most images in one forward (default 8)")
    server.add_argument(
        "--max-wait-ms", type=float, help="how long a batch waits to fill (default 5)"
    )
    server.add_argument(
        "--max-queue", type=int, help="images queued before answering 503 (default 64)"
    )
    server.add_argument("--request-timeout-s", type=float, help="per-request deadline (default 60)")
    server.add_argument(
        "--graceful-timeout-s", type=float, help="drain time on shutdown (default 30)"
    )
    server.add_argument(
        "--no-warmup",
        dest="warmup",
        action="store_const",
        const=False,
        help="report ready without a warm-up forward",
    )
    server.add_argument("--log-level", choices=("debug", "info", "warning", "error"))

    limits = parser.add_argument_group("limits and security")
    limits.add_argument("--max-upload-bytes", type=int, help="request body limit (default 20 MiB)")
    limits.add_argument(
        "--max-pixels", type=int, help="decoded pixel limit per image (default 40e6)"
    )
    limits.add_argument("--max-images-per-request", type=int, help="default 16")
    limits.add_argument("--api-keys-file", help="file with one API key per line (enables auth)")
    limits.add_argument(
        "--cors-origins", help="comma-separated origins allowed by CORS (default: CORS off)"
    )

    parser.add_argument(
        "opts",
        nargs=argparse.REMAINDER,
        metavar="KEY VALUE",
        help="config overrides, as for gridfeats extract, e.g. INPUT.MIN_SIZE_TEST 800",
    )


def _overrides(args: argparse.Namespace) -> Dict[str, Any]:
    values = {name: getattr(args, name, None) for name in ServiceSettings.model_fields}
    if args.cors_origins is not None:
        values["cors_origins"] = tuple(o.strip() for o in args.cors_origins.split(",") if o.strip())
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
