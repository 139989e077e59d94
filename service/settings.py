"""Settings of ``gridfeats serve``: defaults, then ``GRIDFEATS_*`` environment, then flags.

Containers are configured through the environment and people through flags, so both feed one
validated model. Validation happens once, at start-up, with a message that names the setting;
the running server never reads the environment again.
"""

from __future__ import annotations

import os
import shlex
from typing import Any, Dict, Literal, Mapping, Optional, Tuple

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from gridfeats.errors import GridfeatsError

ENV_PREFIX = "GRIDFEATS_"

# Settings whose environment value is a list: comma-separated, except config overrides which are
# shell-split so that values with spaces can be quoted.
_COMMA_LISTS = ("api_keys", "cors_origins")
_SHELL_LISTS = ("opts",)


class SettingsError(GridfeatsError, ValueError):
    """A setting has an invalid value; the message names the setting and the reason."""


class ServiceSettings(BaseModel):
    """Everything the server needs to start; immutable once built."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # The model.
    config: Optional[str] = Field(None, description="detector config YAML (None: project defaults)")
    weights: Optional[str] = Field(None, description="checkpoint file (None: random init)")
    opts: Tuple[str, ...] = Field((), description="config overrides as KEY VALUE pairs")
    device: str = Field("cpu", description="torch device for the model, e.g. cpu, cuda, cuda:1")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="compute precision of the model (gridfeats.precision; fp32 is exact)"
    )
    exact_kernels: bool = Field(
        False, description="no folded norms / channels-last (as gridfeats extract --exact-kernels)"
    )
    batched_forward: bool = Field(
        False,
        description="one forward per batch instead of per image: faster on GPUs, features then "
        "depend on the batch by float rounding (as gridfeats extract --batched-forward)",
    )
    objects_vocab: Optional[str] = Field(
        None, description="objects_vocab.txt: class names in answers"
    )
    attributes_vocab: Optional[str] = Field(
        None, description="attributes_vocab.txt: attribute names in answers"
    )

    # The socket.
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)

    # Dynamic batching and back-pressure.
    max_batch: int = Field(8, ge=1, le=512, description="most images in one model forward")
    max_wait_ms: float = Field(5.0, ge=0, le=60_000, description="how long a batch waits to fill")
    max_queue: int = Field(64, ge=1, le=100_000, description="images waiting before 503")
    request_timeout_s: float = Field(60.0, gt=0, le=3600, description="per-request deadline (504)")

    # Input limits.
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1024, description="request body limit (413)")
    max_pixels: int = Field(40_000_000, ge=1, description="decoded image pixel limit (413)")
    max_images_per_request: int = Field(16, ge=1, le=1024)

    # Security.
    api_keys: Tuple[SecretStr, ...] = Field((), description="accepted API keys (empty: auth off)")
    api_keys_file: Optional[str] = Field(None, description="file with one API key per line")
    cors_origins: Tuple[str, ...] = Field(
        (), description="origins allowed by CORS (empty: CORS off)"
    )

    # Process behaviour.
    graceful_timeout_s: float = Field(30.0, ge=0, description="drain time for in-flight requests")
    keepalive_timeout_s: float = Field(5.0, gt=0, le=600)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    warmup: bool = Field(True, description="run one forward per mode before reporting ready")


def _env_value(name: str, raw: str) -> Any:
    if name in _COMMA_LISTS:
        return tuple(item.strip() for item in raw.split(",") if item.strip())
    if name in _SHELL_LISTS:
        return tuple(shlex.split(raw))
    return raw


def settings_from_env(environ: Mapping[str, str]) -> Dict[str, Any]:
    """The ``GRIDFEATS_<NAME>`` variables that name a setting, as raw values keyed by setting."""
    values: Dict[str, Any] = {}
    for name in ServiceSettings.model_fields:
        raw = environ.get(ENV_PREFIX + name.upper())
        if raw is not None and raw != "":
            values[name] = _env_value(name, raw)
    return values


def load_settings(
    overrides: Optional[Mapping[str, Any]] = None, environ: Optional[Mapping[str, str]] = None
) -> ServiceSettings:
    """Build settings from the environment and ``overrides`` (flags; ``None`` values are unset).

    Raises :class:`SettingsError` naming the offending setting, so ``gridfeats serve`` can print one
    line instead of a pydantic traceback.
    """
    values = settings_from_env(os.environ if environ is None else environ)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return ServiceSettings(**values)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            name = ".".join(str(part) for part in err["loc"]) or "settings"
            env_hint = f" (flag or {ENV_PREFIX}{str(err['loc'][0]).upper()})" if err["loc"] else ""
            problems.append(f"{name}{env_hint}: {err['msg']}")
        raise SettingsError("invalid settings: " + "; ".join(problems)) from None
