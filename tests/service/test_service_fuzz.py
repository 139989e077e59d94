"""Schemathesis against the OpenAPI schema of a real server on the real detector: never a 5xx.

Request bodies of each image media type are drawn from a strategy that mixes valid images
(several sizes down to 1x1, grey and colour), truncated ones and arbitrary bytes, so that fuzzed
query parameters (pooling, top-K, region caps, precision, modes) reach the model as well as the
input checks. Besides "no server error", answers must match the documented status codes, content
types and response schemas.
"""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.backend import DetectorBackend
from service.settings import ServiceSettings
from service.uploads import IMAGE_MEDIA_TYPES
from tests.service.helpers import ServerThread, metric_value
from tests.service.test_service_model import CONFIG, OPTS

_PIL_FORMATS = {
    "image/jpeg": "JPEG",
    "image/png": "PNG",
    "image/webp": "WEBP",
    "image/bmp": "BMP",
    "image/gif": "GIF",
    "image/tiff": "TIFF",
}


@st.composite
def _encoded_image(draw, media_type: str) -> bytes:
    kind = draw(st.sampled_from(["valid", "valid", "truncated", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=256))
    width, height = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    mode = draw(st.sampled_from(["RGB", "L"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    shape = (height, width, 3) if mode == "RGB" else (height, width)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode=mode).save(
        buffer, format=_PIL_FORMATS[media_type]
    )
    data = buffer.getvalue()
    if kind == "truncated":
        return data[: draw(st.integers(1, max(1, len(data) - 1)))]
    return data


for _media_type in IMAGE_MEDIA_TYPES:
    schemathesis.openapi.media_type(_media_type, _encoded_image(_media_type))


@pytest.fixture(scope="module")
def fuzz_server():
    settings_ = ServiceSettings(
        config=CONFIG,
        opts=OPTS,
        max_batch=4,
        max_wait_ms=2,
        max_queue=256,
        max_upload_bytes=64 * 1024,
        max_pixels=1_000_000,
    )
    with ServerThread(settings_, lambda: DetectorBackend.from_settings(settings_)) as srv:
        yield srv


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    return schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def _feature_answers(srv: ServerThread) -> dict:
    text = httpx.get(srv.url + "/metrics").text
    counts = {}
    for status in (200, 400, 406, 413, 415, 422):
        try:
            counts[status] = metric_value(
                text,
                "gridfeats_http_requests_total",
                f'method="POST",route="/v1/features",status="{status}"',
            )
        except KeyError:
            counts[status] = 0.0
    return counts


def _run_operation(operation, generation_mode, base_url: str, examples: int) -> None:
    @given(case=operation.as_strategy(generation_mode=generation_mode))
    @settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
    def call(case):
        case.call_and_validate(base_url=base_url, timeout=60, checks=CHECKS)

    call()


# Driven through hypothesis directly: schemathesis' own pytest plugin (from_fixture/parametrize)
# does not run under the project's pytest 9.
def test_schema_valid_requests_never_get_a_server_error(api_schema, fuzz_server, request):
    thorough = request.config.getoption("--runslow", default=False)
    before = _feature_answers(fuzz_server)
    covered = []
    for result in api_schema.get_all_operations():
        operation = result.ok()
        examples = (300 if thorough else 30) if operation.path == "/v1/features" else 5
        _run_operation(operation, GenerationMode.POSITIVE, fuzz_server.url, examples)
        covered.append(f"{operation.method.upper()} {operation.path}")
    assert {"POST /v1/features", "GET /v1/model", "GET /readyz", "GET /metrics"} <= set(covered)
    after = _feature_answers(fuzz_server)
    # The fuzz really reached the model (valid images) and the input checks (broken ones).
    assert after[200] > before[200] and after[400] > before[400]


def test_schema_invalid_requests_get_4xx_not_5xx(api_schema, fuzz_server, request):
    # Only the feature route has parameters and a body to break; the GET routes take none.
    thorough = request.config.getoption("--runslow", default=False)
    before = _feature_answers(fuzz_server)
    _run_operation(
        api_schema["/v1/features"]["POST"],
        GenerationMode.NEGATIVE,
        fuzz_server.url,
        300 if thorough else 40,
    )
    after = _feature_answers(fuzz_server)
    assert after[422] > before[422]  # invalid parameters were sent and refused as such
