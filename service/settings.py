"""Settings of ``gridfeats serve``: defaults, then ``GRIDFEATS_*`` environment, then flags.

Containers are configured through the environment and people through flags, so both feed one
validated model: :class:`ServiceSettings` is a pydantic-settings ``BaseSettings`` that reads
``GRIDFEATS_<NAME>`` itself, and ``service.cli`` builds its flags from the same fields, so a
setting is declared once (name, type, default, limits, help). Validation happens once, at
start-up, with a message that names the setting; the running server never reads the environment
again.
"""

from __future__ import annotations

import shlex
from typing import Any, Literal, Mapping, Optional, Tuple

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from typing_extensions import Annotated

from gridfeats.data.image_io import DEFAULT_MAX_PIXELS
from gridfeats.errors import GridfeatsError
from gridfeats.precision import PRECISIONS

ENV_PREFIX = "GRIDFEATS_"

#: Settings without a command-line flag: a key on a command line is visible to every user of the
#: machine (``ps``), so API keys come only from ``GRIDFEATS_API_KEYS`` or ``--api-keys-file``.
ENV_ONLY = ("api_keys",)

#: ``--help`` groups of the flags, keyed by the ``group`` each field declares.
GROUPS = {"model": "model", "server": "server", "limits": "limits and security"}

LOG_LEVELS = ("debug", "info", "warning", "error")


class SettingsError(GridfeatsError, ValueError):
    """A setting has an invalid value; the message names the setting and the reason."""


def _setting(default: Any, group: str, description: str, **limits: Any) -> Any:
    return Field(default, description=description, json_schema_extra={"group": group}, **limits)


class ServiceSettings(BaseSettings):
    """Everything the server needs to start; immutable once built.

    Keyword arguments (the flags) win over ``GRIDFEATS_<NAME>`` variables, which win over the
    defaults. List settings read from the environment are comma-separated (``api_keys``,
    ``cors_origins``) or shell-split (``opts``, so that quoted values may hold spaces).
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_ignore_empty=True, frozen=True, extra="forbid"
    )

    # The model.
    config: Optional[str] = _setting(
        None, "model", "config YAML or shipped name (e.g. R-50-grid); default: project defaults"
    )
    weights: Optional[str] = _setting(
        None, "model", "checkpoint (.pth/.pkl); default: random init (for testing only)"
    )
    opts: Annotated[Tuple[str, ...], NoDecode] = _setting(
        (), "model", "config overrides as KEY VALUE pairs, e.g. INPUT.MIN_SIZE_TEST 800"
    )
    device: str = _setting("cpu", "model", "torch device for the model: cpu, cuda, cuda:1")
    precision: Literal[PRECISIONS] = _setting(
        "fp32", "model", "compute precision (fp32 is exact); bf16/fp16 where the hardware has them"
    )
    exact_kernels: bool = _setting(
        False, "model", "no folded norms / channels-last (slower; as gridfeats extract's flag)"
    )
    batched_forward: bool = _setting(
        False,
        "model",
        "one forward per batch instead of per image: faster on GPUs, features then depend on the "
        "batch by float rounding (as gridfeats extract's flag)",
    )
    objects_vocab: Optional[str] = _setting(
        None, "model", "objects_vocab.txt: class names in answers"
    )
    attributes_vocab: Optional[str] = _setting(
        None, "model", "attributes_vocab.txt: attribute names in answers"
    )

    # The socket.
    host: str = _setting("127.0.0.1", "server", "bind address (0.0.0.0 in containers)")
    port: int = _setting(8000, "server", "port", ge=0, le=65535)

    # Dynamic batching and back-pressure.
    max_batch: int = _setting(8, "server", "most images in one model forward", ge=1, le=512)
    max_wait_ms: float = _setting(5.0, "server", "how long a batch waits to fill", ge=0, le=60_000)
    max_queue: int = _setting(64, "server", "images queued before answering 503", ge=1, le=100_000)
    request_timeout_s: float = _setting(60.0, "server", "per-request deadline (504)", gt=0, le=3600)

    # Process behaviour.
    graceful_timeout_s: float = _setting(
        30.0, "server", "drain time for in-flight requests on shutdown", ge=0
    )
    keepalive_timeout_s: float = _setting(
        5.0, "server", "idle keep-alive connection timeout", gt=0, le=600
    )
    log_level: Literal[LOG_LEVELS] = _setting("info", "server", "log level")
    warmup: bool = _setting(True, "server", "run one forward per mode before reporting ready")

    # Input limits.
    max_upload_bytes: int = _setting(
        20 * 1024 * 1024, "limits", "request body limit in bytes (413)", ge=1024
    )
    max_pixels: int = _setting(
        DEFAULT_MAX_PIXELS,
        "limits",
        "decoded pixel limit per image (413); the image reader's, as for gridfeats extract",
        ge=1,
    )
    max_images_per_request: int = _setting(16, "limits", "images in one request", ge=1, le=1024)

    # Security.
    api_keys: Annotated[Tuple[SecretStr, ...], NoDecode] = _setting(
        (), "limits", "accepted API keys, comma-separated (empty: auth off)"
    )
    api_keys_file: Optional[str] = _setting(
        None, "limits", "file with one API key per line (enables auth)"
    )
    cors_origins: Annotated[Tuple[str, ...], NoDecode] = _setting(
        (), "limits", "comma-separated origins allowed by CORS (empty: CORS off)"
    )

    @field_validator("api_keys", "cors_origins", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(item.strip() for item in value.split(",") if item.strip())
        return value

    @field_validator("opts", mode="before")
    @classmethod
    def _shell_list(cls, value: Any) -> Any:
        return tuple(shlex.split(value)) if isinstance(value, str) else value


def load_settings(overrides: Optional[Mapping[str, Any]] = None) -> ServiceSettings:
    """Build settings from ``GRIDFEATS_*`` and ``overrides`` (flags; ``None`` values are unset).

    Raises :class:`SettingsError` naming the offending setting, so ``gridfeats serve`` can print one
    line instead of a pydantic traceback.
    """
    values = {k: v for k, v in (overrides or {}).items() if v is not None}
    try:
        return ServiceSettings(**values)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            name = ".".join(str(part) for part in err["loc"]) or "settings"
            env_hint = f" (flag or {ENV_PREFIX}{str(err['loc'][0]).upper()})" if err["loc"] else ""
            problems.append(f"{name}{env_hint}: {err['msg']}")
        raise SettingsError("invalid settings: " + "; ".join(problems)) from None
