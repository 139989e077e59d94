"""Client-facing errors of the feature service.

Every refusal the service makes is an :class:`ApiError` carrying the HTTP status, a stable machine
code and a human reason. One exception type (turned into one JSON body by the app) keeps the
status codes of the API in one place instead of scattered ``HTTPException`` calls, and lets the
batcher and the request readers raise errors without importing FastAPI.
"""

from __future__ import annotations

from typing import Dict, Optional

from gridfeats.errors import GridfeatsError


class ApiError(GridfeatsError):
    """A request the service refuses, answered with ``status_code`` and ``{"code", "detail"}``."""

    status_code: int = 400
    code: str = "bad_request"

    def __init__(self, detail: str, *, headers: Optional[Dict[str, str]] = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = dict(headers or {})


class BadImage(ApiError):
    """The bytes could not be decoded as an image (truncated, not an image, malformed form)."""

    status_code = 400
    code = "bad_image"


class BadRequest(ApiError):
    """The request is malformed in a way that is not about one image (empty body, bad multipart)."""

    status_code = 400
    code = "bad_request"


class Unauthorized(ApiError):
    """API keys are enabled and the request carried none or a wrong one."""

    status_code = 401
    code = "unauthorized"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, headers={"WWW-Authenticate": "X-API-Key"})


class NotAcceptable(ApiError):
    """The client asked for a response type the service cannot produce for this request."""

    status_code = 406
    code = "not_acceptable"


class UploadTimeout(ApiError):
    """The client did not finish sending its body within the request deadline."""

    status_code = 408
    code = "upload_timeout"


class PayloadTooLarge(ApiError):
    """The upload exceeds the byte limit, or the image exceeds the pixel limit."""

    status_code = 413
    code = "payload_too_large"


class UnsupportedMediaType(ApiError):
    """The content type is not an image type we decode, or it contradicts the bytes sent."""

    status_code = 415
    code = "unsupported_media_type"


class InvalidParameter(ApiError):
    """A query parameter failed validation (FastAPI's own validation errors map here too)."""

    status_code = 422
    code = "invalid_parameter"


class Overloaded(ApiError):
    """The bounded queue is full: the client should retry after ``retry_after_s`` seconds."""

    status_code = 503
    code = "overloaded"

    def __init__(self, detail: str, *, retry_after_s: int) -> None:
        super().__init__(detail, headers={"Retry-After": str(max(1, int(retry_after_s)))})


class NotReady(ApiError):
    """The model is still loading or warming up, or the server is shutting down."""

    status_code = 503
    code = "not_ready"

    def __init__(self, detail: str, *, retry_after_s: int = 1) -> None:
        super().__init__(detail, headers={"Retry-After": str(max(1, int(retry_after_s)))})


class RequestTimeout(ApiError):
    """The request waited longer than the per-request timeout for its features."""

    status_code = 504
    code = "timeout"


class ModelFailure(ApiError):
    """The model raised on this input: a server-side fault, reported without a traceback."""

    status_code = 500
    code = "model_error"
