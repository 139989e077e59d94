"""Optional API-key authentication.

Keys come from the settings (flag or ``GRIDFEATS_API_KEYS``) and/or a key file, one per line.
Only SHA-256 digests are kept in memory after start-up, and a presented key is compared with
:func:`hmac.compare_digest` against every digest (no early exit), so neither the timing nor a
heap dump of the request path reveals a key. Keys are never logged: the access log records only
whether a request was authenticated.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path
from typing import Iterable, List, Optional, Tuple

from gridfeats.errors import GridfeatsError

API_KEY_HEADER = "X-API-Key"


class ApiKeyFileError(GridfeatsError, ValueError):
    """The key file is missing, unreadable or has no keys; raised at start-up."""


def read_key_file(path: str) -> List[str]:
    """Keys from ``path``: one per line, blank lines and ``#`` comments ignored."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ApiKeyFileError(f"API key file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ApiKeyFileError(
            f"cannot read API key file {path}: {exc.__class__.__name__}"
        ) from None
    keys = [line.strip() for line in text.splitlines()]
    keys = [key for key in keys if key and not key.startswith("#")]
    if not keys:
        raise ApiKeyFileError(f"API key file {path} holds no keys")
    return keys


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class ApiKeyChecker:
    """Whether a presented key is one of the configured keys; disabled when there are none."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests: Tuple[bytes, ...] = tuple(_digest(key) for key in keys if key)

    @classmethod
    def from_sources(cls, inline_keys: Iterable[str], key_file: Optional[str]) -> "ApiKeyChecker":
        """Combine keys given inline (flag/env) with those of ``key_file``."""
        keys = list(inline_keys)
        if key_file:
            keys.extend(read_key_file(key_file))
        return cls(keys)

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def is_valid(self, presented: Optional[str]) -> bool:
        """True when ``presented`` equals a configured key (always True when auth is off)."""
        if not self.enabled:
            return True
        if not presented:
            return False
        candidate = _digest(presented)
        matched = False
        for digest in self._digests:
            matched |= hmac.compare_digest(candidate, digest)
        return matched
