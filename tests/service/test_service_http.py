"""The feature service over real HTTP (uvicorn on 127.0.0.1) with a fake, controllable model.

Covers the API surface: answers in JSON / .npy / .npz, every bad-input class, auth, back-pressure,
timeouts, client disconnects, graceful shutdown, readiness, metrics and access logs. The real
detector is exercised in test_service_model.py.
"""

from __future__ import annotations

import io
import json
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from gridfeats.data.image_io import read_image
from gridfeats.features import FeatureSpec, top_attributes
from gridfeats.store.records import grid_map_to_rows
from service.backend import DetectorBackend
from service.settings import ServiceSettings
from tests.service.helpers import (
    FakeDetector,
    ServerThread,
    direct,
    fake_backend,
    fake_grid,
    image_bytes,
    metric_value,
)

PNG = {"content-type": "image/png"}


def wait_for(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def metrics_text(srv: ServerThread) -> str:
    return httpx.get(srv.url + "/metrics").text


def status_count(srv: ServerThread, status: int, route: str = "/v1/features") -> float:
    try:
        return metric_value(
            metrics_text(srv),
            "gridfeats_http_requests_total",
            f'method="POST",route="{route}",status="{status}"',
        )
    except KeyError:
        return 0.0


def zeros_png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def server():
    settings = ServiceSettings(
        max_wait_ms=20, max_upload_bytes=256 * 1024, max_pixels=10_000_000, max_images_per_request=4
    )
    backend = fake_backend(max_pixels=settings.max_pixels)
    with ServerThread(settings, lambda: backend) as srv:
        srv.backend = backend
        yield srv


# ------------------------------------------------------------------------------------ answers
def test_health_readiness_and_model_info(server):
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(server.url + "/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    info = httpx.get(server.url + "/v1/model").json()
    assert info["config"] == "defaults"
    assert info["feature_dims"] == {"grid": 4, "region": 3}
    assert info["modes"] == ["grid", "region"]
    assert info["max_images_per_request"] == 4


def test_grid_json_has_the_model_numbers_as_store_rows(server):
    data = image_bytes(40, 24)
    response = httpx.post(server.url + "/v1/features", content=data, headers=PNG)
    assert response.status_code == 200
    body = response.json()
    expected = grid_map_to_rows(fake_grid(read_image(data)))
    image = body["images"][0]
    assert body["mode"] == "grid" and body["dtype"] == "float32" and body["feature_dim"] == 4
    assert body["model"] == {"config": "defaults", "weights_sha256": ""}
    assert image["image_hw"] == [24, 40] and image["grid_hw"] == [3, 5]
    assert image["shape"] == list(expected.shape)
    np.testing.assert_array_equal(np.asarray(image["features"], dtype=np.float32), expected)


def test_npy_and_npz_answers_carry_the_same_arrays(server):
    data = image_bytes(33, 17, seed=3)
    expected = grid_map_to_rows(fake_grid(read_image(data)))
    npy = httpx.post(
        server.url + "/v1/features", content=data, headers={**PNG, "accept": "application/x-npy"}
    )
    assert npy.status_code == 200 and npy.headers["content-type"] == "application/x-npy"
    np.testing.assert_array_equal(np.load(io.BytesIO(npy.content)), expected)

    second = image_bytes(16, 16, fmt="JPEG", seed=4)
    npz = httpx.post(
        server.url + "/v1/features",
        headers={"accept": "application/x-npz"},
        files=[
            ("images", ("a.png", data, "image/png")),
            ("images", ("b.jpg", second, "image/jpeg")),
        ],
    )
    assert npz.status_code == 200
    arrays = np.load(io.BytesIO(npz.content))
    np.testing.assert_array_equal(arrays["0/features"], expected)
    np.testing.assert_array_equal(
        arrays["1/features"], grid_map_to_rows(fake_grid(read_image(second)))
    )
    assert arrays["0/image_hw"].tolist() == [17, 33] and arrays["1/grid_hw"].tolist() == [2, 2]


def test_region_answer_with_topk_attributes(server):
    data = image_bytes(30, 20, seed=5)
    response = httpx.post(
        server.url + "/v1/features?mode=region&attr_topk=2", content=data, headers=PNG
    )
    assert response.status_code == 200
    image = response.json()["images"][0]
    expected = direct(server.backend, data, FeatureSpec("region", attr_topk=2))
    assert image["shape"] == [3, 3]
    for field in ("features", "boxes", "scores", "attr_scores"):
        np.testing.assert_array_equal(np.asarray(image[field], np.float32), expected[field])
    assert image["boxes"][0] == [0.0, 0.0, 30.0, 20.0]
    assert image["classes"] == [1, 2, 3]
    softmax = torch.softmax(torch.arange(18, dtype=torch.float32).reshape(3, 6) % 5, dim=1)
    assert image["attr_ids"] == top_attributes(softmax, 2, 3)[0].tolist()
    assert "class_names" not in image  # no vocabulary configured

    none = httpx.post(
        server.url + "/v1/features?mode=region&attr_topk=0", content=data, headers=PNG
    ).json()
    assert none["images"][0]["attr_ids"] == [[], [], []]


def test_grid_pooling_and_float16_output(server):
    data = image_bytes(64, 48, seed=6)
    fmap = fake_grid(read_image(data))
    mean = httpx.post(server.url + "/v1/features?grid_pool=1x1", content=data, headers=PNG).json()
    np.testing.assert_allclose(mean["images"][0]["features"], [fmap.mean(axis=(1, 2))], rtol=1e-6)
    assert mean["images"][0]["grid_hw"] == [1, 1]
    pooled = httpx.post(
        server.url + "/v1/features?grid_pool=2x3",
        content=data,
        headers={**PNG, "accept": "application/x-npz"},
    )
    arrays = np.load(io.BytesIO(pooled.content))
    assert arrays["0/grid_hw"].tolist() == [2, 3]
    expected = direct(server.backend, data, FeatureSpec("grid", (2, 3)))["features"]
    np.testing.assert_array_equal(arrays["0/features"], expected)
    half = httpx.post(
        server.url + "/v1/features?precision=float16",
        content=data,
        headers={**PNG, "accept": "application/x-npy"},
    )
    rows = np.load(io.BytesIO(half.content))
    assert rows.dtype == np.float16
    np.testing.assert_array_equal(rows, grid_map_to_rows(fmap).astype(np.float16))


# ---------------------------------------------------------------------------------- bad input
def _chunks(data: bytes, size: int = 8192):
    for start in range(0, len(data), size):
        yield data[start : start + size]


def _multipart(parts):
    return {"files": parts}


BAD_INPUTS = [
    # (id, query, request kwargs, status, code, phrase in detail)
    (
        "too-many-bytes",
        "",
        dict(content=b"\x89PNG\r\n\x1a\n" + b"0" * 300_000, headers=PNG),
        413,
        "payload_too_large",
        "exceeds the limit of 262144 bytes",
    ),
    (
        "too-many-bytes-chunked",
        "",
        dict(
            content=_chunks(b"\xff\xd8\xff" + b"0" * 300_000),
            headers={"content-type": "image/jpeg"},
        ),
        413,
        "payload_too_large",
        "exceeds the limit",
    ),
    (
        "too-many-pixels",
        "",
        dict(content=zeros_png(4000, 3000), headers=PNG),
        413,
        "payload_too_large",
        "too many pixels: 12000000 > 10000000",
    ),
    (
        "too-many-images",
        "",
        _multipart([("images", (f"{i}.png", image_bytes(8, 8), "image/png")) for i in range(5)]),
        413,
        "payload_too_large",
        "5 images in one request; the limit is 4",
    ),
    (
        "unsupported-type",
        "",
        dict(content=b"hello", headers={"content-type": "text/plain"}),
        415,
        "unsupported_media_type",
        "unsupported content type 'text/plain'",
    ),
    (
        "missing-type",
        "",
        dict(content=image_bytes()),
        415,
        "unsupported_media_type",
        "missing Content-Type",
    ),
    (
        "mismatched-type",
        "",
        dict(content=image_bytes(), headers={"content-type": "image/jpeg"}),
        415,
        "unsupported_media_type",
        "does not match the data, which is image/png",
    ),
    (
        "mismatched-part",
        "",
        _multipart([("images", ("x.png", image_bytes(), "image/gif"))]),
        415,
        "unsupported_media_type",
        "image 0 (x.png): content type 'image/gif' does not match",
    ),
    (
        "text-part-type",
        "",
        _multipart([("images", ("x.txt", b"hello", "text/plain"))]),
        415,
        "unsupported_media_type",
        "unsupported content type 'text/plain'",
    ),
    (
        "truncated",
        "",
        dict(content=image_bytes(64, 64)[:300], headers=PNG),
        400,
        "bad_image",
        "image 0: truncated image",
    ),
    (
        "not-an-image",
        "",
        dict(content=b"definitely not pixels", headers=PNG),
        400,
        "bad_image",
        "not an image",
    ),
    (
        "truncated-part",
        "",
        _multipart(
            [
                ("images", ("ok.png", image_bytes(), "image/png")),
                ("images", ("cut.jpg", image_bytes(64, 64, fmt="JPEG")[:200], "image/jpeg")),
            ]
        ),
        400,
        "bad_image",
        "image 1 (cut.jpg)",
    ),
    ("empty-body", "", dict(content=b"", headers=PNG), 400, "bad_request", "empty request body"),
    (
        "wrong-form-field",
        "",
        _multipart([("picture", ("x.png", image_bytes(), "image/png"))]),
        400,
        "bad_request",
        "unexpected form field(s) 'picture'",
    ),
    (
        "bad-mode",
        "?mode=panoptic",
        dict(content=image_bytes(), headers=PNG),
        422,
        "invalid_parameter",
        "query parameter 'mode'",
    ),
    (
        "bad-pool-size",
        "?grid_pool=0x3",
        dict(content=image_bytes(), headers=PNG),
        422,
        "invalid_parameter",
        "grid_pool sides must be 1..64",
    ),
    (
        "bad-pool-syntax",
        "?grid_pool=big",
        dict(content=image_bytes(), headers=PNG),
        422,
        "invalid_parameter",
        "query parameter 'grid_pool'",
    ),
    (
        "min-above-max",
        "?mode=region&regions=bottom-up&min_boxes=50&max_boxes=10",
        dict(content=image_bytes(), headers=PNG),
        422,
        "invalid_parameter",
        "min_boxes (50) exceeds max_boxes (10)",
    ),
    (
        "unknown-parameter",
        "?image_url=http://example.com/a.jpg",
        dict(content=image_bytes(), headers=PNG),
        422,
        "invalid_parameter",
        "query parameter 'image_url'",
    ),
    (
        "region-option-on-grid",
        "?attr_topk=3",
        dict(content=image_bytes(), headers=PNG),
        422,
        "invalid_parameter",
        "attr_topk applies to mode=region only",
    ),
    (
        "bottom-up-option-on-detectron2",
        "?mode=region&max_boxes=36",
        dict(content=image_bytes(), headers=PNG),
        422,
        "invalid_parameter",
        "max_boxes applies to regions=bottom-up only",
    ),
    (
        "pool-on-regions",
        "?mode=region&grid_pool=2x2",
        dict(content=image_bytes(), headers=PNG),
        422,
        "invalid_parameter",
        "grid_pool applies to grid mode only",
    ),
    (
        "unacceptable",
        "",
        dict(content=image_bytes(), headers={**PNG, "accept": "text/html"}),
        406,
        "not_acceptable",
        "cannot answer with 'text/html'",
    ),
    (
        "npy-for-two",
        "",
        dict(
            files=[("images", ("a.png", image_bytes(), "image/png"))] * 2,
            headers={"accept": "application/x-npy"},
        ),
        406,
        "not_acceptable",
        "has 2 images",
    ),
]


@pytest.mark.parametrize(
    "query,kwargs,status,code,phrase",
    [case[1:] for case in BAD_INPUTS],
    ids=[case[0] for case in BAD_INPUTS],
)
def test_every_bad_input_class_gets_its_4xx_with_a_reason(
    server, query, kwargs, status, code, phrase
):
    response = httpx.post(server.url + "/v1/features" + query, **kwargs)
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == code
    assert phrase in body["detail"]


def test_bad_requests_do_not_disturb_good_ones_or_the_server(server):
    good = image_bytes(24, 24, seed=9)
    with ThreadPoolExecutor(8) as pool:
        futures = [
            pool.submit(
                httpx.post,
                server.url + "/v1/features",
                content=good if i % 2 else good[:200],
                headers=PNG,
            )
            for i in range(8)
        ]
        responses = [f.result() for f in futures]
    expected = grid_map_to_rows(fake_grid(read_image(good)))
    for i, response in enumerate(responses):
        if i % 2:
            np.testing.assert_array_equal(
                np.asarray(response.json()["images"][0]["features"], np.float32), expected
            )
        else:
            assert response.status_code == 400
    assert httpx.get(server.url + "/readyz").status_code == 200


def test_a_model_failure_fails_only_its_own_request_in_a_shared_batch():
    gate = threading.Event()
    fake = FakeDetector(fail_on=77, gate=gate)
    settings = ServiceSettings(max_wait_ms=0, max_batch=8, warmup=False)
    with (
        ServerThread(settings, lambda: DetectorBackend(fake)) as srv,
        ThreadPoolExecutor(4) as pool,
    ):

        def post(body):
            return httpx.post(srv.url + "/v1/features", content=body, headers=PNG, timeout=30)

        blocker = pool.submit(post, image_bytes(16, 16, seed=0, first_red=5))  # holds the model...
        assert fake.forward_started.wait(10)
        bodies = [
            image_bytes(16, 16, seed=1, first_red=10),
            image_bytes(16, 16, seed=2, first_red=77),
            image_bytes(16, 16, seed=3, first_red=20),
        ]
        futures = [pool.submit(post, body) for body in bodies]  # ...while these queue up together
        wait_for(
            lambda: metric_value(metrics_text(srv), "gridfeats_queue_depth") == 3,
            what="three queued",
        )
        gate.set()
        responses = [f.result() for f in futures]
        assert blocker.result().status_code == 200
        assert [r.status_code for r in responses] == [200, 500, 200]
        assert responses[1].json()["code"] == "model_error"
        assert "Traceback" not in responses[1].text
        assert fake.batches[:2] == [1, 3]  # the three really shared a forward before being isolated
        for body, response in zip(bodies[::2], responses[::2]):
            expected = grid_map_to_rows(fake_grid(read_image(body)))
            np.testing.assert_array_equal(
                np.asarray(response.json()["images"][0]["features"], np.float32), expected
            )


# --------------------------------------------------------------------------------------- auth
def test_api_keys_guard_the_feature_routes_but_not_probes(caplog, tmp_path):
    key_file = tmp_path / "keys.txt"
    key_file.write_text("# team keys\nfile-key-123\n")
    settings = ServiceSettings(api_keys=("inline-key-456",), api_keys_file=str(key_file))
    with (
        caplog.at_level(logging.INFO, logger="gridfeats.service.access"),
        ServerThread(settings, lambda: fake_backend()) as srv,
    ):
        missing = httpx.get(srv.url + "/v1/model")
        assert missing.status_code == 401 and "missing API key" in missing.json()["detail"]
        wrong = httpx.post(
            srv.url + "/v1/features", content=image_bytes(), headers={**PNG, "x-api-key": "nope"}
        )
        assert wrong.status_code == 401 and wrong.json()["detail"] == "invalid API key"
        for key in ("inline-key-456", "file-key-123"):
            ok = httpx.post(
                srv.url + "/v1/features", content=image_bytes(), headers={**PNG, "x-api-key": key}
            )
            assert ok.status_code == 200
        # A key misplaced in the query is refused and, like every key, never written to the log.
        misplaced = httpx.get(
            srv.url + "/v1/model?api_key=inline-key-456", headers={"x-api-key": "file-key-123"}
        )
        assert misplaced.status_code == 200
        for probe in ("/healthz", "/readyz", "/metrics"):
            assert httpx.get(srv.url + probe).status_code == 200
    logged = " ".join(r.getMessage() + json.dumps(getattr(r, "fields", {})) for r in caplog.records)
    assert "/v1/features" in logged
    assert "inline-key-456" not in logged and "file-key-123" not in logged


def test_without_keys_auth_is_off(server):
    assert httpx.get(server.url + "/v1/model").status_code == 200


# ------------------------------------------------------------------------ load and back-pressure
def test_overload_answers_503_with_retry_after_then_recovers():
    gate = threading.Event()
    fake = FakeDetector(gate=gate)
    settings = ServiceSettings(max_batch=1, max_wait_ms=0, max_queue=2, warmup=False)
    with (
        ServerThread(settings, lambda: DetectorBackend(fake)) as srv,
        ThreadPoolExecutor(8) as pool,
    ):

        def post(seed):
            return httpx.post(
                srv.url + "/v1/features",
                content=image_bytes(8, 8, seed=seed),
                headers=PNG,
                timeout=30,
            )

        busy = pool.submit(post, 0)
        assert fake.forward_started.wait(10)
        queued = [pool.submit(post, seed) for seed in (1, 2)]
        wait_for(
            lambda: metric_value(metrics_text(srv), "gridfeats_queue_depth") == 2, what="queue full"
        )
        refused = [post(seed) for seed in (3, 4, 5)]
        for response in refused:
            assert response.status_code == 503
            assert response.json()["code"] == "overloaded"
            assert int(response.headers["retry-after"]) >= 1
        gate.set()
        assert [f.result().status_code for f in [busy, *queued]] == [200, 200, 200]
        assert post(6).status_code == 200
        text = metrics_text(srv)
        assert metric_value(text, "gridfeats_rejected_requests_total", 'reason="queue_full"') == 3
        assert metric_value(text, "gridfeats_queue_depth") == 0


def test_request_timeout_answers_504_and_frees_the_slot():
    gate = threading.Event()
    fake = FakeDetector(gate=gate)
    settings = ServiceSettings(
        max_batch=1, max_wait_ms=0, max_queue=1, request_timeout_s=0.5, warmup=False
    )
    with (
        ServerThread(settings, lambda: DetectorBackend(fake)) as srv,
        ThreadPoolExecutor(2) as pool,
    ):
        blocked = pool.submit(
            httpx.post,
            srv.url + "/v1/features",
            content=image_bytes(seed=1),
            headers=PNG,
            timeout=30,
        )
        assert fake.forward_started.wait(10)
        late = httpx.post(
            srv.url + "/v1/features", content=image_bytes(seed=2, first_red=55), headers=PNG
        )
        assert late.status_code == 504 and late.json()["code"] == "timeout"
        assert metric_value(metrics_text(srv), "gridfeats_queue_depth") == 0
        gate.set()
        assert blocked.result().status_code == 504  # its forward outlived the deadline too
        assert (
            httpx.post(
                srv.url + "/v1/features", content=image_bytes(seed=3), headers=PNG
            ).status_code
            == 200
        )
        assert 55 not in fake.seen  # the timed-out queued image never reached the model


def test_slow_upload_answers_408_and_frees_the_connection():
    settings = ServiceSettings(request_timeout_s=0.5, warmup=False)
    with ServerThread(settings, lambda: fake_backend()) as srv:
        body = image_bytes(seed=8)
        sock = _raw_request(srv.port, body, send_bytes=len(body) // 2)
        sock.settimeout(10)
        answer = b""
        while b"}" not in answer:  # headers and the JSON body may arrive in separate reads
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
        sock.close()
        assert answer.startswith(b"HTTP/1.1 408")
        assert b"upload not completed within 0.5 s" in answer
        assert httpx.post(srv.url + "/v1/features", content=body, headers=PNG).status_code == 200


def _raw_request(
    port: int,
    body: bytes,
    send_bytes: int,
    content_type: bytes = b"image/png",
    path: bytes = b"/v1/features",
):
    sock = socket.create_connection(("127.0.0.1", port))
    head = (
        b"POST "
        + path
        + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
        + content_type
        + b"\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
    )
    sock.sendall(head + body[:send_bytes])
    return sock


def _abort(sock: socket.socket) -> None:
    """Close with a reset, as a killed client process would."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()


def test_client_killed_mid_upload_leaves_the_server_serving(server):
    before = status_count(server, 499)
    body = image_bytes(200, 200, seed=11)
    sock = _raw_request(server.port, body, send_bytes=len(body) // 3)
    time.sleep(0.1)
    _abort(sock)
    wait_for(
        lambda: status_count(server, 499) == before + 1, what="the aborted upload to be logged"
    )
    response = httpx.post(server.url + "/v1/features", content=image_bytes(), headers=PNG)
    assert response.status_code == 200


def test_client_gone_while_queued_frees_its_slot_and_is_never_computed():
    gate = threading.Event()
    fake = FakeDetector(gate=gate)
    settings = ServiceSettings(max_batch=1, max_wait_ms=0, max_queue=1, warmup=False)
    with (
        ServerThread(settings, lambda: DetectorBackend(fake)) as srv,
        ThreadPoolExecutor(2) as pool,
    ):
        busy = pool.submit(
            httpx.post,
            srv.url + "/v1/features",
            content=image_bytes(seed=1),
            headers=PNG,
            timeout=30,
        )
        assert fake.forward_started.wait(10)
        body = image_bytes(seed=2, first_red=123)
        sock = _raw_request(srv.port, body, send_bytes=len(body))
        wait_for(
            lambda: metric_value(metrics_text(srv), "gridfeats_queue_depth") == 1, what="queued"
        )
        _abort(sock)
        wait_for(lambda: status_count(srv, 499) == 1, what="the disconnect to be noticed")
        assert metric_value(metrics_text(srv), "gridfeats_queue_depth") == 0
        replacement = pool.submit(
            httpx.post,
            srv.url + "/v1/features",
            content=image_bytes(seed=3, first_red=7),
            headers=PNG,
            timeout=30,
        )
        wait_for(
            lambda: metric_value(metrics_text(srv), "gridfeats_queue_depth") == 1,
            what="replacement queued",
        )
        gate.set()
        assert busy.result().status_code == 200 and replacement.result().status_code == 200
        assert 123 not in fake.seen and 7 in fake.seen


def test_client_killed_mid_response_leaves_the_server_serving(server):
    big = zeros_png(2400, 2400)  # ~90k grid rows: several MB of JSON, more than the socket buffers
    sock = _raw_request(server.port, big, send_bytes=len(big))
    first = sock.recv(1024)
    assert first.startswith(b"HTTP/1.1 200")
    _abort(sock)
    for seed in range(3):
        response = httpx.post(
            server.url + "/v1/features", content=image_bytes(seed=seed), headers=PNG
        )
        assert response.status_code == 200


# ----------------------------------------------------------------------------------- lifecycle
def test_graceful_shutdown_finishes_in_flight_requests():
    gate = threading.Event()
    fake = FakeDetector(gate=gate)
    srv = ServerThread(ServiceSettings(warmup=False, max_wait_ms=0), lambda: DetectorBackend(fake))
    with srv, ThreadPoolExecutor(2) as pool:
        in_flight = pool.submit(
            httpx.post,
            srv.url + "/v1/features",
            content=image_bytes(seed=4),
            headers=PNG,
            timeout=30,
        )
        assert fake.forward_started.wait(10)
        stopping = pool.submit(srv.stop)  # what SIGTERM does: should_exit, then drain
        time.sleep(0.3)
        assert not stopping.done()  # waiting for the in-flight request
        gate.set()
        response = in_flight.result()
        stopping.result()
    assert response.status_code == 200
    assert len(response.json()["images"][0]["features"]) == 3 * 5


def test_not_ready_while_loading_then_ready():
    release = threading.Event()

    def slow_factory():
        assert release.wait(30)
        return fake_backend()

    with ServerThread(ServiceSettings(), slow_factory, wait_ready=False) as srv:
        assert httpx.get(srv.url + "/healthz").status_code == 200
        ready = httpx.get(srv.url + "/readyz")
        assert ready.status_code == 503 and "loading" in ready.json()["detail"]
        refused = httpx.post(srv.url + "/v1/features", content=image_bytes(), headers=PNG)
        assert refused.status_code == 503 and refused.json()["code"] == "not_ready"
        assert "retry-after" in refused.headers
        release.set()
        srv.wait_until_ready(30)
        assert (
            httpx.post(srv.url + "/v1/features", content=image_bytes(), headers=PNG).status_code
            == 200
        )


def test_a_model_that_fails_to_load_is_reported_not_served():
    def broken_factory():
        raise FileNotFoundError("weights.pth: no such file")

    with ServerThread(ServiceSettings(), broken_factory, wait_ready=False) as srv:
        wait_for(
            lambda: "failed" in httpx.get(srv.url + "/readyz").json()["detail"], what="load failure"
        )
        ready = httpx.get(srv.url + "/readyz").json()
        assert ready["ready"] is False and "weights.pth: no such file" in ready["detail"]
        assert (
            httpx.post(srv.url + "/v1/features", content=image_bytes(), headers=PNG).status_code
            == 503
        )


# ------------------------------------------------------------------------- metrics, logs, CORS
def test_concurrent_requests_are_batched_and_counted_in_metrics():
    fake = FakeDetector(delay_s=0.05)
    settings = ServiceSettings(max_batch=8, max_wait_ms=50, warmup=False)
    with ServerThread(settings, lambda: DetectorBackend(fake)) as srv:
        bodies = [image_bytes(16, 16, seed=s) for s in range(24)]
        with ThreadPoolExecutor(24) as pool:
            responses = list(
                pool.map(
                    lambda b: httpx.post(
                        srv.url + "/v1/features", content=b, headers=PNG, timeout=30
                    ),
                    bodies,
                )
            )
        for body, response in zip(bodies, responses):
            expected = grid_map_to_rows(fake_grid(read_image(body)))
            np.testing.assert_array_equal(
                np.asarray(response.json()["images"][0]["features"], np.float32), expected
            )
        assert sum(fake.batches) == 24  # one forward per image (the extraction's default)...
        text = metrics_text(srv)
        assert metric_value(text, "gridfeats_batch_size_sum") == 24
        assert (
            metric_value(text, "gridfeats_batch_size_count") < 24 / 2
        )  # ...inside shared dynamic batches
        assert metric_value(text, "gridfeats_images_total", 'mode="grid"') == 24
        assert metric_value(text, "gridfeats_images_per_second") > 0
        assert (
            metric_value(
                text, "gridfeats_http_request_duration_seconds_count", 'route="/v1/features"'
            )
            == 24
        )


def test_access_log_lines_are_structured(server, caplog):
    with caplog.at_level(logging.INFO, logger="gridfeats.service.access"):
        response = httpx.post(
            server.url + "/v1/features?mode=region",
            content=image_bytes(),
            headers={**PNG, "x-request-id": "req-42"},
        )
        wait_for(
            lambda: any(
                getattr(r, "fields", {}).get("request_id") == "req-42" for r in caplog.records
            )
        )
    assert response.headers["x-request-id"] == "req-42"
    fields = next(
        r.fields for r in caplog.records if getattr(r, "fields", {}).get("request_id") == "req-42"
    )
    assert (
        fields["event"] == "access"
        and fields["status"] == 200
        and fields["route"] == "/v1/features"
    )
    assert fields["mode"] == "region" and fields["images"] == 1 and fields["bytes_sent"] > 0
    assert fields["duration_ms"] >= 0 and fields["client"].startswith("127.0.0.1:")


def test_cors_is_off_by_default_and_on_for_configured_origins(server):
    preflight = {"origin": "https://app.example", "access-control-request-method": "POST"}
    off = httpx.options(server.url + "/v1/features", headers=preflight)
    assert "access-control-allow-origin" not in off.headers
    with ServerThread(
        ServiceSettings(cors_origins=("https://app.example",)), lambda: fake_backend()
    ) as srv:
        on = httpx.options(srv.url + "/v1/features", headers=preflight)
        assert on.headers["access-control-allow-origin"] == "https://app.example"
        other = httpx.options(
            srv.url + "/v1/features", headers={**preflight, "origin": "https://evil.example"}
        )
        assert "access-control-allow-origin" not in other.headers


def test_openapi_schema_documents_bodies_errors_and_examples(server):
    schema = httpx.get(server.url + "/openapi.json").json()
    post = schema["paths"]["/v1/features"]["post"]
    assert {"multipart/form-data", "image/jpeg", "image/png"} <= set(post["requestBody"]["content"])
    assert {"200", "400", "401", "413", "415", "422", "503"} <= set(post["responses"])
    assert {"application/json", "application/x-npy", "application/x-npz"} <= set(
        post["responses"]["200"]["content"]
    )
    names = {p["name"] for p in post["parameters"]}
    assert names == {
        "mode",
        "grid_pool",
        "regions",
        "min_boxes",
        "max_boxes",
        "bottom_up_thresh",
        "attr_topk",
        "precision",
    }
    assert schema["components"]["schemas"]["ErrorResponse"]["examples"]
    assert "X-API-Key" in json.dumps(schema["components"]["securitySchemes"])


def test_backbone_only_weights_serve_grids_and_refuse_regions_with_a_reason():
    """A converted (backbone-only) checkpoint: grids work, region requests get a 422 that says
    why, and /v1/model lists only the grid mode."""
    from gridfeats.checkpoint import CheckpointError

    fake = FakeDetector()

    def no_heads() -> None:
        raise CheckpointError("the checkpoint holds a backbone only")

    fake.require_heads = no_heads
    with ServerThread(ServiceSettings(max_wait_ms=5), lambda: DetectorBackend(fake)) as srv:
        assert httpx.get(srv.url + "/v1/model").json()["modes"] == ["grid"]
        body = image_bytes(16, 16, seed=1)
        grid = httpx.post(srv.url + "/v1/features?mode=grid", content=body, headers=PNG)
        assert grid.status_code == 200
        region = httpx.post(srv.url + "/v1/features?mode=region", content=body, headers=PNG)
        assert region.status_code == 422 and "backbone" in region.json()["detail"]
