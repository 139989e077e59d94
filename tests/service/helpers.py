"""Helpers for the service tests (no tests here): a tiny fake detector, a real uvicorn thread.

The fake detector stands in for the network only: images are decoded and resized by the project's
own ``prepare_image`` (resizing is switched off with ``INPUT.MIN_SIZE_TEST 0``, so pixels stay
recognisable), and features go through the real :class:`service.backend.DetectorBackend` and the
extraction's feature makers. Its "forward" is cheap pixel arithmetic that tests can hold (``gate``),
slow down (``delay_s``) or make fail (``fail_on``) to create load and faults.
"""

from __future__ import annotations

import io
import socket
import threading
import time
from typing import Any, Callable, List, Optional, Sequence

import httpx
import numpy as np
import torch
import uvicorn
from PIL import Image

from gridfeats.config import get_cfg
from gridfeats.data.image_io import DEFAULT_MAX_PIXELS
from gridfeats.data.preprocess import PreparedImage, prepare_image
from gridfeats.features import FeatureSpec
from gridfeats.structures import Instances
from service.app import create_app
from service.backend import DetectorBackend, ModelRequest
from service.server import uvicorn_config
from service.settings import ServiceSettings


class FakeDetector:
    """The parts of :class:`gridfeats.api.Detector` the backend and the feature makers use.

    Grid: ``[4, ceil(h/8), ceil(w/8)]``, the RGB of every 8th pixel in [0, 1] plus the row index.
    Regions: three boxes (whole image, top-left and bottom-right quarters) with features from the
    mean colour and fixed attribute probabilities. ``seen`` records each image's top-left red value.
    """

    def __init__(
        self,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        delay_s: float = 0.0,
        gate: Optional[threading.Event] = None,
        fail_on: Optional[int] = None,
    ) -> None:
        self.cfg = get_cfg(None, ["INPUT.MIN_SIZE_TEST", "0", "INPUT.MAX_SIZE_TEST", "100000"])
        self.weights_sha256 = ""
        self.random_init = True
        self.device = torch.device("cpu")
        self.precision = "fp32"
        self.grid_dim, self.region_dim, self.num_classes, self.num_attributes = 4, 3, 5, 6
        self.max_pixels = max_pixels
        self.delay_s = delay_s
        self.gate = gate
        self.fail_on = fail_on
        self.batches: List[int] = []
        self.seen: List[int] = []
        self.forward_started = threading.Event()

    def prepare(self, source: Any) -> PreparedImage:
        return prepare_image(
            source,
            self.cfg.INPUT.MIN_SIZE_TEST,
            self.cfg.INPUT.MAX_SIZE_TEST,
            self.cfg.INPUT.FORMAT,
            self.max_pixels,
        )

    def _forward(self, prepared: Sequence[PreparedImage]) -> List[np.ndarray]:
        self.batches.append(len(prepared))
        reds = [int(p.image[2, 0, 0]) for p in prepared]  # BGR network input
        self.seen.extend(reds)
        self.forward_started.set()
        if self.gate is not None:
            assert self.gate.wait(30), "test gate never opened"
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail_on is not None and self.fail_on in reds:
            raise RuntimeError("fake model failure")
        return [p.image.numpy()[::-1].transpose(1, 2, 0) for p in prepared]  # back to HxWx3 RGB

    def grid_batch(self, prepared: Sequence[PreparedImage]) -> List[torch.Tensor]:
        return [torch.from_numpy(fake_grid(rgb)) for rgb in self._forward(prepared)]

    def detect_batch(self, prepared: Sequence[PreparedImage]) -> List[Instances]:
        out = []
        for p, rgb in zip(prepared, self._forward(prepared)):
            h, w = p.orig_hw
            mean = torch.from_numpy(rgb.reshape(-1, 3).mean(axis=0).astype(np.float32) / 255.0)
            boxes = torch.tensor(
                [[0, 0, w, h], [0, 0, w / 2, h / 2], [w / 2, h / 2, w, h]], dtype=torch.float32
            )
            logits = torch.arange(18, dtype=torch.float32).reshape(3, 6) % 5
            out.append(
                Instances(
                    p.orig_hw,
                    pred_boxes=boxes,
                    pred_boxes_input=boxes,
                    scores=torch.tensor([0.9, 0.5, 0.1]),
                    pred_classes=torch.tensor([1, 2, 3]),
                    box_features=torch.stack([mean + k for k in range(3)]),
                    attr_probs=torch.softmax(logits, dim=1),
                )
            )
        return out


def fake_grid(rgb: np.ndarray) -> np.ndarray:
    """``[4, ceil(h/8), ceil(w/8)]``: the RGB of every 8th pixel in [0, 1] and the row index."""
    cells = rgb[::8, ::8].astype(np.float32) / 255.0
    rows = np.broadcast_to(np.arange(cells.shape[0], dtype=np.float32)[:, None], cells.shape[:2])
    return np.ascontiguousarray(np.concatenate([cells, rows[..., None]], axis=2).transpose(2, 0, 1))


def fake_backend(**kwargs: Any) -> DetectorBackend:
    """The real backend on a :class:`FakeDetector` (``backend.detector``) built with ``kwargs``."""
    return DetectorBackend(FakeDetector(**kwargs))


def direct(backend: DetectorBackend, data: bytes, spec: FeatureSpec):
    """What the backend computes for ``data`` when called in-process (the reference for answers)."""
    return backend.run_batch([ModelRequest(spec, backend.prepare(data))])[0]


def image_bytes(
    width: int = 40,
    height: int = 24,
    fmt: str = "PNG",
    seed: int = 0,
    first_red: Optional[int] = None,
) -> bytes:
    """A random RGB image as ``fmt``; ``first_red`` fixes the top-left red value (PNG keeps it)."""
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

    def __init__(
        self, settings: ServiceSettings, backend_factory: Callable[[], Any], wait_ready: bool = True
    ) -> None:
        self.settings = settings
        self.app = create_app(settings, backend_factory)
        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn_config(self.app, settings, host="127.0.0.1", port=self.port)
        )
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
    """One sample's value in a Prometheus exposition (``labels`` as written, e.g. 'mode="grid"')."""
    wanted = f"{name}{{{labels}}}" if labels else name
    for line in metrics_text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        if key == wanted:
            return float(value)
    raise KeyError(f"{wanted} not in metrics")
