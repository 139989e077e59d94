"""Running the app under uvicorn with the service's timeouts and shutdown behaviour.

Uvicorn already drains gracefully on SIGTERM/SIGINT: it stops accepting connections, lets in-flight
requests finish (up to ``graceful_timeout_s``), then runs the app's shutdown, which finishes the
batcher's queue. This module only maps settings onto uvicorn's options, turns off uvicorn's own
(unstructured) access log in favour of ours, and makes a model that fails to load stop the server
with an error instead of leaving it up and never ready.
"""

from __future__ import annotations

import logging
import signal
from typing import Any, Callable, Dict, Optional

import uvicorn

from service.access_log import configure_logging
from service.backend import FeatureBackend
from service.settings import ServiceSettings

logger = logging.getLogger("gridfeats.service")


def uvicorn_config(app: Any, settings: ServiceSettings, **overrides: Any) -> uvicorn.Config:
    """uvicorn options from the settings; ``overrides`` are passed through (tests use them)."""
    options = dict(
        host=settings.host,
        port=settings.port,
        log_config=None,  # logging is configured by configure_logging (JSON lines)
        access_log=False,  # the AccessLogMiddleware writes structured access lines
        server_header=False,
        proxy_headers=False,
        timeout_keep_alive=settings.keepalive_timeout_s,
        timeout_graceful_shutdown=settings.graceful_timeout_s,
        lifespan="on",
    )
    options.update(overrides)
    return uvicorn.Config(app, **options)


class _stop_signals_end_cleanly:
    """Make SIGTERM/SIGINT end the process with status 0 once uvicorn has drained.

    uvicorn handles the signal itself (stop accepting, drain, shut down) and afterwards re-raises it
    to whatever handler was installed before it started; with the default handler the process would
    die by the signal after a perfectly clean shutdown. A recording handler makes that re-raise a
    no-op, so ``gridfeats serve`` returns normally.
    """

    def __enter__(self) -> None:
        self._previous: Dict[int, Any] = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, lambda signum, frame: None)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def serve(
    settings: ServiceSettings, backend_factory: Optional[Callable[[], FeatureBackend]] = None
) -> int:
    """Serve in the foreground until SIGTERM/SIGINT; 0 on a clean stop, 1 if the model failed."""
    from service.app import create_app

    configure_logging(settings.log_level)
    failure = {}
    server_box = {}

    def on_load_failure(reason: str) -> None:
        failure["reason"] = reason
        server = server_box.get("server")
        if server is not None:
            server.should_exit = True

    app = create_app(settings, backend_factory, on_load_failure=on_load_failure)
    server = uvicorn.Server(uvicorn_config(app, settings))
    server_box["server"] = server
    with _stop_signals_end_cleanly():
        server.run()
    if failure:
        logger.error("stopped: the model failed to load: %s", failure["reason"])
        return 1
    return 0
