"""The FastAPI application: routes, auth, error bodies, CORS, logging middleware.

``create_app(settings, backend_factory)`` builds one self-contained server: its own metrics
registry, its own batcher and model. The factory is injectable so tests and benchmarks can run the
real HTTP stack on a tiny fake model; ``gridfeats serve`` passes the detector-backed one.

Order of checks on ``POST /v1/features`` (cheapest refusal first, before any bytes are decoded):
API key (401) -> query parameters (422) -> readiness (503) -> Accept (406) -> content type (415)
-> upload size (413) -> image decoding and pixel limit (400/413) -> queue room (503) -> model.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from typing import Annotated, AsyncIterator, Callable, Dict, Optional

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from gridfeats.version import __version__
from service.access_log import STATE_ACCESS_FIELDS, STATE_CLIENT_GONE, AccessLogMiddleware
from service.auth import API_KEY_HEADER, ApiKeyChecker
from service.backend import FeatureBackend
from service.encoding import choose_media_type, encode
from service.errors import ApiError, InvalidParameter, NotAcceptable, Unauthorized, UploadTimeout
from service.metrics import CLIENT_CLOSED_REQUEST, ServiceMetrics
from service.results import feature_spec, shape_results
from service.runtime import ClientGone, ServiceRuntime
from service.schemas import (
    NPY_MEDIA_TYPE,
    ErrorResponse,
    FeatureQuery,
    HealthResponse,
    ModelInfo,
    ModelRef,
    ReadyResponse,
    error_responses,
    features_request_body,
    features_success_response,
)
from service.settings import ServiceSettings
from service.uploads import read_uploads

logger = logging.getLogger("gridfeats.service")

DESCRIPTION = """\
Grid and region features of a Detectron2-compatible Visual Genome detector, computed online.

Send one image as the raw body (`Content-Type: image/jpeg`, `image/png`, ...) or several as
`multipart/form-data` file parts named `images`. Answers are JSON by default, or NumPy files with
`Accept: application/x-npy` (one image's features) / `application/x-npz` (everything).
Concurrent requests are batched into shared model forwards; when the queue is full the service
answers 503 with `Retry-After`. When API keys are configured, send one in the `X-API-Key` header.
"""

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 400: "bad_request"}


def _error_response(
    status: int, code: str, detail: str, headers: Optional[Dict[str, str]] = None
) -> JSONResponse:
    body = ErrorResponse(code=code, detail=detail).model_dump()
    return JSONResponse(body, status_code=status, headers=headers)


def _readable_validation_error(exc: RequestValidationError) -> str:
    problems = []
    for err in exc.errors():
        location = [str(part) for part in err.get("loc", ()) if part not in ("query", "body")]
        where = f"query parameter '{'.'.join(location)}'" if location else "query parameters"
        message = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        problems.append(f"{where}: {message}")
    return "; ".join(problems) or "invalid request parameters"


async def _wait_for_disconnect(request: Request) -> None:
    """Return when the client closes the connection (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def create_app(
    settings: ServiceSettings,
    backend_factory: Optional[Callable[[], FeatureBackend]] = None,
    on_load_failure: Optional[Callable[[str], None]] = None,
) -> FastAPI:
    """Build the service. ``backend_factory`` defaults to the detector the settings describe.

    Raises ``ApiKeyFileError`` when the configured key file is unusable (a start-up error).
    """
    if backend_factory is None:
        from service.backend import DetectorBackend

        def backend_factory() -> FeatureBackend:
            return DetectorBackend.from_settings(settings)

    metrics = ServiceMetrics()
    keys = ApiKeyChecker.from_sources(
        (key.get_secret_value() for key in settings.api_keys), settings.api_keys_file
    )
    runtime = ServiceRuntime(settings, metrics, backend_factory, on_load_failure)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()

    app = FastAPI(
        title="gridfeats feature service",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    app.state.metrics = metrics
    app.state.settings = settings

    # ------------------------------------------------------------------------------ middleware
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=[API_KEY_HEADER, "Content-Type", "Accept", "X-Request-ID"],
        )
    app.add_middleware(AccessLogMiddleware, metrics=metrics)

    # ------------------------------------------------------------------------------ errors
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc.status_code, exc.code, exc.detail, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(
            InvalidParameter.status_code, InvalidParameter.code, _readable_validation_error(exc)
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
        return _error_response(
            exc.status_code, code, str(exc.detail), getattr(exc, "headers", None)
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled error: %s", exc, exc_info=exc)
        return _error_response(500, "internal_error", "internal server error")

    # ------------------------------------------------------------------------------ auth
    api_key_header = APIKeyHeader(
        name=API_KEY_HEADER, auto_error=False, description="an API key, when keys are configured"
    )

    async def require_api_key(key: Optional[str] = Depends(api_key_header)) -> None:
        if not keys.enabled:
            return
        if not key:
            raise Unauthorized(f"missing API key: send it in the {API_KEY_HEADER} header")
        if not keys.is_valid(key):
            raise Unauthorized("invalid API key")

    protected = [Depends(require_api_key)]

    # ------------------------------------------------------------------------------ routes
    @app.get(
        "/healthz",
        response_model=HealthResponse,
        tags=["operations"],
        summary="the process is alive",
    )
    async def healthz() -> HealthResponse:
        return HealthResponse()

    @app.get(
        "/readyz",
        response_model=ReadyResponse,
        tags=["operations"],
        summary="the model is loaded and warmed up",
        responses={
            503: {"model": ReadyResponse, "description": "loading, warming up, failed or stopping"}
        },
    )
    async def readyz() -> JSONResponse:
        body = ReadyResponse(ready=runtime.ready, detail=runtime.detail).model_dump()
        return JSONResponse(body, status_code=200 if runtime.ready else 503)

    @app.get(
        "/metrics",
        tags=["operations"],
        summary="Prometheus metrics",
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    async def prometheus_metrics() -> Response:
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    @app.get(
        "/v1/model",
        response_model=ModelInfo,
        dependencies=protected,
        tags=["features"],
        summary="the loaded model, its feature sizes and the service limits",
        responses=error_responses(401, 503),
    )
    async def model_info() -> ModelInfo:
        info = runtime.require_ready().info
        return ModelInfo(
            config=info.config,
            weights_sha256=info.weights_sha256,
            random_init=info.random_init,
            device=info.device,
            precision=info.precision,
            modes=list(info.modes),
            feature_dims={"grid": info.grid_dim, "region": info.region_dim},
            num_classes=info.num_classes,
            num_attributes=info.num_attributes,
            input_min_size=info.input_min_size,
            input_max_size=info.input_max_size,
            vocabulary=runtime.vocab.loaded,
            max_batch=settings.max_batch,
            max_images_per_request=settings.max_images_per_request,
            max_upload_bytes=settings.max_upload_bytes,
            max_pixels=settings.max_pixels,
        )

    @app.post(
        "/v1/features",
        dependencies=protected,
        tags=["features"],
        summary="grid or region features of one or several images",
        response_class=Response,
        responses={
            **features_success_response(),
            **error_responses(400, 401, 406, 408, 413, 415, 422, 500, 503, 504),
        },
        openapi_extra={"requestBody": features_request_body()},
    )
    async def features(request: Request, query: Annotated[FeatureQuery, Query()]) -> Response:
        deadline = time.monotonic() + settings.request_timeout_s
        backend = runtime.require_ready()
        if query.mode not in backend.info.modes:
            raise InvalidParameter(
                f"mode={query.mode} needs detector heads, but the loaded weights hold a backbone "
                f"only (e.g. from gridfeats convert-backbone); this service offers mode="
                + "|".join(backend.info.modes)
            )
        media_type = choose_media_type(request.headers.get("accept"))
        try:
            uploads = await asyncio.wait_for(
                read_uploads(
                    request,
                    max_bytes=settings.max_upload_bytes,
                    max_images=settings.max_images_per_request,
                ),
                timeout=settings.request_timeout_s,
            )
        except ClientDisconnect:
            setattr(request.state, STATE_CLIENT_GONE, True)
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        except asyncio.TimeoutError:
            raise UploadTimeout(
                f"upload not completed within {settings.request_timeout_s:g} s"
            ) from None
        if media_type == NPY_MEDIA_TYPE and len(uploads) != 1:
            raise NotAcceptable(
                f"{NPY_MEDIA_TYPE} holds one image's features but the request has {len(uploads)} "
                "images; use application/x-npz or JSON"
            )
        setattr(request.state, STATE_ACCESS_FIELDS, {"mode": query.mode, "images": len(uploads)})
        prepared = await runtime.run_in_thread(runtime.decode, uploads)
        try:
            outputs = await runtime.compute(
                feature_spec(query),
                prepared,
                deadline - time.monotonic(),
                lambda: _wait_for_disconnect(request),
            )
        except ClientGone:
            setattr(request.state, STATE_CLIENT_GONE, True)
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        metrics.images.labels(mode=query.mode).inc(len(outputs))
        header = {
            "mode": query.mode,
            "dtype": query.precision,
            "feature_dim": backend.info.grid_dim
            if query.mode == "grid"
            else backend.info.region_dim,
            "model": ModelRef(
                config=backend.info.config, weights_sha256=backend.info.weights_sha256
            ).model_dump(),
        }

        def shape_and_encode() -> bytes:
            return encode(media_type, shape_results(outputs, query, runtime.vocab), header)

        body = await runtime.run_in_thread(shape_and_encode)
        return Response(body, media_type=media_type)

    return app
