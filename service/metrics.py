"""Prometheus metrics of the feature service.

Each app owns its own :class:`~prometheus_client.CollectorRegistry` (not the process-global one),
so several apps in one process (tests, benchmarks) do not collide and ``/metrics`` shows exactly
this server. Throughput is exported both the Prometheus way (a counter to ``rate()``) and as a
ready-made images/s gauge over a short sliding window, for dashboards without PromQL.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Callable, Deque, Tuple

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

#: Status recorded for requests whose client went away before the answer (nginx's convention).
CLIENT_CLOSED_REQUEST = 499


class ThroughputWindow:
    """Images per second over the last ``window_s`` seconds of completed batches."""

    def __init__(self, window_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self._clock = clock
        self._events: Deque[Tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()

    def add(self, images: int) -> None:
        with self._lock:
            self._events.append((self._clock(), images))

    def rate(self) -> float:
        now = self._clock()
        with self._lock:
            while self._events and self._events[0][0] < now - self.window_s:
                self._events.popleft()
            return sum(n for _, n in self._events) / self.window_s


class ServiceMetrics:
    """All metrics of one service instance, registered in a private registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "gridfeats_http_requests",
            "HTTP requests answered, by route, method and status",
            ("route", "method", "status"),
            registry=r,
        )
        self.latency = Histogram(
            "gridfeats_http_request_duration_seconds",
            "time from request start to the last byte sent",
            ("route",),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "gridfeats_http_requests_in_flight", "requests being handled", registry=r
        )
        self.images = Counter(
            "gridfeats_images",
            "images whose features were computed, by mode",
            ("mode",),
            registry=r,
        )
        self.batch_size = Histogram(
            "gridfeats_batch_size", "images per model forward", buckets=BATCH_BUCKETS, registry=r
        )
        self.forward_seconds = Histogram(
            "gridfeats_batch_duration_seconds",
            "wall time of one batched model forward",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "gridfeats_queue_wait_seconds",
            "time a request waited for and inside its forward(s)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "gridfeats_queue_depth", "images waiting for a forward", registry=r
        )
        self.queue_capacity = Gauge(
            "gridfeats_queue_capacity", "bound of the image queue", registry=r
        )
        self.rejected = Counter(
            "gridfeats_rejected_requests",
            "requests refused before the model, by reason",
            ("reason",),
            registry=r,
        )
        self.ready = Gauge(
            "gridfeats_model_ready", "1 when the model is loaded and warmed up", registry=r
        )
        self.throughput = ThroughputWindow()
        self.images_per_second = Gauge(
            "gridfeats_images_per_second",
            "images computed per second over the last 10 s",
            registry=r,
        )
        self.images_per_second.set_function(self.throughput.rate)
        self.mean_batch_seconds = 1.0  # moving average, for Retry-After estimates
        self._batches_seen = 0

    def observe_batch(self, size: int, seconds: float) -> None:
        """Record one model forward (called by the batcher after each batch)."""
        self.batch_size.observe(size)
        self.forward_seconds.observe(seconds)
        self.throughput.add(size)
        self._batches_seen += 1
        weight = max(0.1, 1.0 / self._batches_seen)
        self.mean_batch_seconds += weight * (seconds - self.mean_batch_seconds)

    def track_queue(self, depth: Callable[[], int], capacity: int) -> None:
        """Export the batcher's live queue depth."""
        self.queue_depth.set_function(lambda: float(depth()))
        self.queue_capacity.set(capacity)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route=route, method=method, status=str(status)).inc()
        self.latency.labels(route=route).observe(seconds)

    def exposition(self) -> Tuple[bytes, str]:
        """The text exposition format and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def count_rejection(self, reason: str) -> None:
        self.rejected.labels(reason=reason).inc()
