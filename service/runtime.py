"""The model side of the service: loading, warm-up, readiness, decoding and batched compute.

The HTTP layer (:mod:`service.app`) calls three things here: :meth:`ServiceRuntime.decode` (image
bytes -> model input, in a worker thread), :meth:`ServiceRuntime.compute` (model inputs ->
outputs through the dynamic batcher, bounded by the request deadline and cancelled when the client
goes away) and the readiness facts. Loading happens in the background after the server starts, so
``/healthz`` answers while a large checkpoint loads and ``/readyz`` turns true only after one
warm-up forward per mode has run (the first forward is several times slower than the rest).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from typing import Any, Awaitable, Callable, List, Optional, Sequence

import anyio
import numpy as np

from gridfeats.data.image_io import ImageReadError
from gridfeats.errors import GridfeatsError
from gridfeats.features import FeatureSpec
from gridfeats.store.records import Record
from service.backend import FeatureBackend, ModelRequest
from service.batcher import BatcherClosedError, DynamicBatcher, QueueFullError
from service.errors import (
    ApiError,
    BadImage,
    ModelFailure,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
)
from service.metrics import ServiceMetrics
from service.results import Vocabulary, feature_spec
from service.schemas import FeatureQuery
from service.settings import ServiceSettings
from service.uploads import Upload

logger = logging.getLogger("gridfeats.service")

BackendFactory = Callable[[], FeatureBackend]
#: One warm-up forward per mode, with the default options of each.
WARMUP_SPECS = (feature_spec(FeatureQuery(mode="grid")), feature_spec(FeatureQuery(mode="region")))


class ClientGone(GridfeatsError):
    """The client disconnected while its request was being handled."""


class ServiceRuntime:
    """Owns the backend, the batcher and the readiness state of one server."""

    def __init__(
        self,
        settings: ServiceSettings,
        metrics: ServiceMetrics,
        backend_factory: BackendFactory,
        on_load_failure: Optional[Callable[[str], None]] = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self._backend_factory = backend_factory
        self._on_load_failure = on_load_failure
        self.backend: Optional[FeatureBackend] = None
        self.vocab = Vocabulary()
        self.batcher = DynamicBatcher(
            self._run_batch,
            max_batch_size=settings.max_batch,
            max_wait_s=settings.max_wait_ms / 1000.0,
            max_queue=settings.max_queue,
            on_batch=metrics.observe_batch,
        )
        metrics.track_queue(lambda: self.batcher.queue_depth, settings.max_queue)
        self.state = "starting"
        self.detail = "server starting"
        self._loader: Optional["asyncio.Task[None]"] = None
        # Decoding and encoding threads: half the cores. Decoding and resizing one image costs a few
        # milliseconds against tens for its forward, so this keeps the model fed while leaving the
        # model's intra-op threads their cores (more busy threads than cores stalls those threads).
        self.cpu_limiter = anyio.CapacityLimiter(max(1, (os.cpu_count() or 2) // 2))

    # -------------------------------------------------------------------------------- lifecycle
    @property
    def ready(self) -> bool:
        return self.state == "ready"

    async def start(self) -> None:
        """Start the batcher and load + warm up the model in the background."""
        await self.batcher.start()
        self._loader = asyncio.get_running_loop().create_task(self._load(), name="gridfeats-load")

    async def _load(self) -> None:
        try:
            self._set_state("loading", "loading the model")
            self.backend = await anyio.to_thread.run_sync(self._backend_factory)
            info = self.backend.info
            self.vocab = await anyio.to_thread.run_sync(
                Vocabulary.load,
                self.settings.objects_vocab,
                self.settings.attributes_vocab,
                info.num_classes,
                info.num_attributes,
            )
            if self.settings.warmup:
                self._set_state("warming_up", "running one warm-up forward per mode")
                await self._warm_up()
            self._set_state("ready", "model loaded and warmed up")
            self.metrics.ready.set(1)
            logger.info(
                "model ready", extra={"fields": {"config": info.config, "device": info.device}}
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any load failure: report it, never serve half a model
            reason = f"{exc.__class__.__name__}: {exc}"
            self._set_state("failed", f"model failed to load: {reason}")
            logger.error("model failed to load: %s", reason, exc_info=True)
            if self._on_load_failure is not None:
                self._on_load_failure(reason)

    async def _warm_up(self) -> None:
        assert self.backend is not None
        # A smooth gradient at the network's own input size: no decoding, but every layer runs.
        size = max(32, min(self.backend.info.input_min_size, 256))
        ramp = np.linspace(0, 255, size, dtype=np.float32)
        image = np.stack(
            np.broadcast_arrays(ramp[:, None], ramp[None, :], ramp[::-1, None]), axis=-1
        )
        prepared = await anyio.to_thread.run_sync(self.backend.prepare, image.astype(np.uint8))
        for spec in WARMUP_SPECS:
            await self.batcher.submit(ModelRequest(spec, prepared))

    async def stop(self) -> None:
        """Stop taking work, finish what is queued, release the model thread."""
        if self.state != "failed":
            self._set_state("stopping", "server shutting down")
        self.metrics.ready.set(0)
        if self._loader is not None and not self._loader.done():
            self._loader.cancel()
            await asyncio.gather(self._loader, return_exceptions=True)
        await self.batcher.close()

    def _set_state(self, state: str, detail: str) -> None:
        self.state, self.detail = state, detail

    def require_ready(self) -> FeatureBackend:
        """The backend, or :class:`NotReady` (503) while loading, after a failure, or stopping."""
        if not self.ready or self.backend is None:
            raise NotReady(
                f"not ready: {self.detail}", retry_after_s=5 if self.state != "failed" else 60
            )
        return self.backend

    def retry_after_s(self) -> int:
        """A fair guess of when the queue will have room: its batches times the mean batch time."""
        pending_batches = math.ceil((self.batcher.queue_depth + 1) / self.settings.max_batch)
        return max(1, math.ceil(pending_batches * self.metrics.mean_batch_seconds))

    # ---------------------------------------------------------------------------------- decoding
    def decode(self, uploads: Sequence[Upload]) -> List[Any]:
        """Model inputs for ``uploads`` (runs in a worker thread); errors name the image."""
        backend = self.require_ready()
        prepared = []
        for upload in uploads:
            try:
                prepared.append(backend.prepare(upload.data))
            except ImageReadError as exc:
                if exc.reason.startswith("too many pixels"):
                    raise PayloadTooLarge(f"{upload.label}: {exc.reason}") from None
                raise BadImage(f"{upload.label}: {exc.reason}") from None
        return prepared

    async def run_in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run CPU work (decode, encode) off the event loop, bounded by the CPU limiter."""
        return await anyio.to_thread.run_sync(fn, *args, limiter=self.cpu_limiter)

    # ----------------------------------------------------------------------------------- compute
    def _run_batch(self, requests: List[ModelRequest]) -> List[Record]:
        assert self.backend is not None
        return self.backend.run_batch(requests)

    async def compute(
        self,
        spec: FeatureSpec,
        prepared: Sequence[Any],
        timeout_s: float,
        disconnected: Callable[[], Awaitable[None]],
    ) -> List[Record]:
        """Outputs for ``prepared`` through the batcher, within ``timeout_s``.

        Raises :class:`Overloaded` (queue full), :class:`RequestTimeout`, :class:`ClientGone`
        (``disconnected()`` finished first; the request's queue slots are freed), or
        :class:`ModelFailure` when the model raised on one of the images.
        """
        if timeout_s <= 0:
            raise RequestTimeout(f"request timed out after {self.settings.request_timeout_s:g} s")
        work = asyncio.ensure_future(
            self.batcher.submit_many([ModelRequest(spec, p) for p in prepared])
        )
        watcher = asyncio.ensure_future(disconnected())
        try:
            done, _ = await asyncio.wait(
                {work, watcher}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
        except asyncio.CancelledError:
            work.cancel()
            raise
        finally:
            watcher.cancel()
        if work in done:
            return self._outputs(work)
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)
        if watcher in done:
            raise ClientGone()
        raise RequestTimeout(
            f"request timed out after {self.settings.request_timeout_s:g} s waiting for the model"
        )

    def _outputs(self, work: "asyncio.Future[List[Record]]") -> List[Record]:
        try:
            return work.result()
        except QueueFullError as exc:
            self.metrics.count_rejection("queue_full")
            raise Overloaded(
                f"server overloaded: {exc.depth} of {exc.capacity} queue slots taken; retry later",
                retry_after_s=self.retry_after_s(),
            ) from None
        except BatcherClosedError:
            raise NotReady("server shutting down") from None
        except ApiError:
            raise
        except Exception as exc:
            logger.error("model failed: %s", exc, exc_info=exc)
            raise ModelFailure(
                f"the model failed on this request ({exc.__class__.__name__})"
            ) from None
