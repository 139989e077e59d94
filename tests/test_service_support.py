"""Helpers for the service tests (no tests here): a tiny fake model and a real uvicorn server thread.

The fake model decodes with the project's one image reader, so every bad-input path is the real
one; only the forward is replaced by a cheap, deterministic function of the pixels, which lets the
HTTP tests check numbers exactly and hold or slow the "model" to create load.
"""
from __future__ import annotations

import io
import socket
import threading
import time
from typing import Any, Callable, List, Optional, Sequence

import httpx
import numpy as np
import uvicorn
from PIL import Image

from gridfeats.data.image_io import read_image
from service.app import create_app
from service.backend import BackendInfo, GridOutput, ModelRequest, RegionOutput
from service.server import uvicorn_config
from service.settings import ServiceSettings

FAKE_INFO = BackendInfo(
    config="fake", weights_sha256="", random_init=True, device="cpu", precision="fp32",
    grid_dim=4, region_dim=3, num_classes=5, num_attributes=6, input_min_size=32, input_max_size=64,
)


def fake_grid(rgb: np.ndarray) -> np.ndarray:
    """``[4, ceil(h/8), ceil(w/8)]``: the RGB of every 8th pixel in [0, 1] and the row index."""
    cells = rgb[::8, ::8].astype(np.float32) / 255.0
    rows = np.broadcast_to(np.arange(cells.shape[0], dtype=np.float32)[:, None], cells.shape[:2])
    return np.ascontiguousarray(np.concatenate([cells, rows[..., None]], axis=2).transpose(2, 0, 1))


def fake_regions(rgb: np.ndarray) -> RegionOutput:
    """Three boxes over the image with features from its mean colour and fixed attribute scores."""
    h, w = rgb.shape[:2]
    mean = rgb.reshape(-1, 3).mean(axis=0).astype(np.float32) / 255.0
    boxes = np.array([[0, 0, w, h], [0, 0, w / 2, h / 2], [w / 2, h / 2, w, h]], dtype=np.float32)
    attr_logits = np.arange(18, dtype=np.float32).reshape(3, 6) % 5
    attr = np.exp(attr_logits) / np.exp(attr_logits).sum(axis=1, keepdims=True)
    return RegionOutput(
        features=np.stack([mean + k for k in range(3)]).astype(np.float32),
        boxes=boxes,
        scores=np.array([0.9, 0.5, 0.1], dtype=np.float32),
        classes=np.array([1, 2, 3]),
        attr_scores=attr.astype(np.float32),
        image_hw=(h, w),
        input_hw=(h, w),
    )


class FakeBackend:
    """A :class:`service.backend.FeatureBackend` with a pixel-arithmetic "model".

    ``gate`` (when set) holds every forward until it is opened; ``delay_s`` slows each forward;
    ``batches`` records the size of each forward and ``seen`` every image's top-left pixel value.
    ``fail_on`` makes the forward raise for a batch containing an image whose top-left red value
    equals it, to test isolation of model failures.
    """

    info = FAKE_INFO

    def __init__(self, max_pixels: int = 40_000_000, delay_s: float = 0.0, gate: Optional[threading.Event] = None,
                 fail_on: Optional[int] = None) -> None:
        self.max_pixels = max_pixels
        self.delay_s = delay_s
        self.gate = gate
        self.fail_on = fail_on
        self.batches: List[int] = []
        self.seen: List[int] = []
        self.forward_started = threading.Event()

    def prepare(self, source: Any) -> np.ndarray:
        return read_image(source, max_pixels=self.max_pixels)

    def run_batch(self, requests: Sequence[ModelRequest]):
        self.batches.append(len(requests))
        self.seen.extend(int(r.image[0, 0, 0]) for r in requests)
        self.forward_started.set()
        if self.gate is not None:
            assert self.gate.wait(30), "test gate never opened"
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail_on is not None and any(int(r.image[0, 0, 0]) == self.fail_on for r in requests):
            raise RuntimeError("fake model failure")
        out = []
        for r in requests:
            hw = tuple(r.image.shape[:2])
            out.append(GridOutput(fake_grid(r.image), hw, hw) if r.mode == "grid" else fake_regions(r.image))
        return out


def image_bytes(width: int = 40, height: int = 24, fmt: str = "PNG", seed: int = 0, first_red: Optional[int] = None) -> bytes:
    """A random RGB image encoded as ``fmt``; ``first_red`` fixes the top-left red value (PNG keeps it)."""
    rng = np.random.RandomState(seed)
    pixels = rng.randint(0, 256, size=(height, width, 3), dtype=np.uint8)
    if first_red is not None:
        pixels[0, 0, 0] = first_red
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerThread:
    """A real uvicorn server on 127.0.0.1 running the service app in a background thread."""

    def __init__(self, settings: ServiceSettings, backend_factory: Callable[[], Any], wait_ready: bool = True) -> None:
        self.settings = settings
        self.app = create_app(settings, backend_factory)
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn_config(self.app, settings, host="127.0.0.1", port=self.port))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn-test", daemon=True)
        self.wait_ready = wait_ready

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive(), "server thread died during start-up"
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        if self.wait_ready:
            self.wait_until_ready()
        return self

    def wait_until_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while httpx.get(self.url + "/readyz").status_code != 200:
            assert time.monotonic() < deadline, "server never became ready"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        assert not self.thread.is_alive(), "server did not stop"

    def __exit__(self, *exc: Any) -> None:
        if self.thread.is_alive():
            self.stop()


def metric_value(metrics_text: str, name: str, labels: str = "") -> float:
    """The value of one sample in a Prometheus exposition (``labels`` as written, e.g. 'mode="grid"')."""
    wanted = f"{name}{{{labels}}}" if labels else name
    for line in metrics_text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        if key == wanted:
            return float(value)
    raise KeyError(f"{wanted} not in metrics")
