"""Structured (JSON lines) logging and the access-log/metrics middleware.

Access lines are machine-readable so a log pipeline can aggregate them without regexes. They hold
the method, path (never the query string or headers, so nothing secret a client puts there is
written), status, duration, bytes sent, client address, request id and, for feature requests, the
mode and image count the handler recorded. The same middleware feeds the per-route request
counters and latency histograms, so logs and metrics always agree.

It is a plain ASGI middleware rather than Starlette's ``BaseHTTPMiddleware``, which would wrap
``receive`` and hide client disconnects from the handlers.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import Any, Dict, MutableMapping, Optional

from service.metrics import CLIENT_CLOSED_REQUEST, ServiceMetrics

ACCESS_LOGGER = "gridfeats.service.access"
REQUEST_ID_HEADER = "x-request-id"
_SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")

# Handlers put facts for the access line here: request.state.<key> lands in scope["state"].
STATE_CLIENT_GONE = "client_gone"
STATE_ACCESS_FIELDS = "access_fields"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any ``extra={"fields": ...}``."""

    def format(self, record: logging.LogRecord) -> str:
        entry: Dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str = "info") -> None:
    """Send every log record (ours and uvicorn's) to stderr as JSON lines."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True


def _request_id(headers: Any) -> str:
    for key, value in headers:
        if key == REQUEST_ID_HEADER.encode():
            candidate = value.decode("latin-1")
            if _SAFE_REQUEST_ID.match(candidate):
                return candidate
            break
    return uuid.uuid4().hex


def route_label(scope: MutableMapping[str, Any]) -> str:
    """The route's path template (bounded label cardinality), or 'unmatched' for 404s."""
    path = getattr(scope.get("route"), "path", None)
    if isinstance(path, str):
        return path
    if (
        scope.get("endpoint") is not None
    ):  # plain Starlette routes (/openapi.json, /docs) have fixed paths
        return str(scope["path"])
    return "unmatched"


class AccessLogMiddleware:
    """Times every HTTP request, tags it with a request id, logs it and counts it."""

    def __init__(
        self, app: Any, metrics: ServiceMetrics, logger: Optional[logging.Logger] = None
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.logger = logger or logging.getLogger(ACCESS_LOGGER)

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = _request_id(scope.get("headers", ()))
        outcome = {"status": 500, "bytes": 0}

        async def send_with_id(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                outcome["status"] = message["status"]
                headers = list(message.get("headers", ()))
                headers.append((REQUEST_ID_HEADER.encode(), request_id.encode()))
                message = dict(message, headers=headers)
            elif message["type"] == "http.response.body":
                outcome["bytes"] += len(message.get("body", b""))
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self.metrics.in_flight.dec()
            elapsed = time.perf_counter() - started
            state = scope.get("state") or {}
            status = CLIENT_CLOSED_REQUEST if state.get(STATE_CLIENT_GONE) else outcome["status"]
            route = route_label(scope)
            self.metrics.observe_request(route, scope["method"], status, elapsed)
            client = scope.get("client")
            fields: Dict[str, Any] = {
                "event": "access",
                "method": scope["method"],
                "path": scope["path"],
                "route": route,
                "status": status,
                "duration_ms": round(elapsed * 1000.0, 2),
                "bytes_sent": outcome["bytes"],
                "client": f"{client[0]}:{client[1]}" if client else None,
                "request_id": request_id,
            }
            fields.update(state.get(STATE_ACCESS_FIELDS) or {})
            self.logger.info(
                "%s %s %d", scope["method"], scope["path"], status, extra={"fields": fields}
            )
