"""Dynamic batching: concurrent requests share one model forward.

A model forward on a batch of B images costs much less than B forwards of one image, but HTTP
requests arrive one at a time. The :class:`DynamicBatcher` holds arriving items in a bounded queue
and hands them to ``batch_fn`` in groups: a group leaves when it is full (``max_batch_size``) or
when its oldest item has waited ``max_wait_s``. Items that already waited while the previous forward
ran leave at once, so under load batches fill up by themselves and the wait only costs latency at
low load.

Properties the service relies on:

- ``batch_fn`` runs in one dedicated worker thread, never on the event loop, one batch at a time.
- The queue is bounded: :meth:`submit_many` raises :class:`QueueFullError` instead of queueing
  beyond ``max_queue`` items, so overload turns into fast 503s rather than unbounded latency.
- A cancelled caller (client disconnect, timeout) frees its queue slots at once and its items are
  skipped if they have not started; an item already in a forward is computed and dropped.
- One bad item cannot fail its neighbours: if ``batch_fn`` raises on a batch, the batch is re-run
  one item at a time so that only the offending item gets the exception. ``batch_fn`` may also
  return an exception instance in an item's place to fail just that item.

The batcher is generic (``batch_fn(list_of_inputs) -> list_of_outputs``) so it is tested without a
model and knows nothing about HTTP.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Deque, Generic, List, Optional, Sequence, Tuple, TypeVar

from gridfeats.errors import GridfeatsError

In = TypeVar("In")
Out = TypeVar("Out")

logger = logging.getLogger("gridfeats.service.batcher")

BatchFn = Callable[[List[Any]], Sequence[Any]]
BatchObserver = Callable[[int, float], None]


class QueueFullError(GridfeatsError, RuntimeError):
    """The bounded queue cannot take the submitted items now."""

    def __init__(self, depth: int, capacity: int, wanted: int) -> None:
        super().__init__(f"queue full: {depth} of {capacity} slots taken, {wanted} more requested")
        self.depth = depth
        self.capacity = capacity
        self.wanted = wanted


class BatcherClosedError(GridfeatsError, RuntimeError):
    """The batcher is shutting down and takes no new items."""


class _Entry:
    """One queued item and the future its caller awaits."""

    __slots__ = ("item", "future", "enqueued_at")

    def __init__(self, item: Any, future: "asyncio.Future[Any]", enqueued_at: float) -> None:
        self.item = item
        self.future = future
        self.enqueued_at = enqueued_at


class DynamicBatcher(Generic[In, Out]):
    """Groups submitted items into calls of ``batch_fn`` (see the module docstring)."""

    def __init__(
        self,
        batch_fn: Callable[[List[In]], Sequence[Out]],
        *,
        max_batch_size: int,
        max_wait_s: float,
        max_queue: int,
        on_batch: Optional[BatchObserver] = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self._batch_fn = batch_fn
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self._on_batch = on_batch
        self._queue: Deque[_Entry] = collections.deque()
        self._arrival: Optional[asyncio.Event] = None
        self._task: Optional["asyncio.Task[None]"] = None
        self._executor: Optional[ThreadPoolExecutor] = None
        self._closed = False
        self._in_flight = 0

    # ----------------------------------------------------------------------------------- state
    @property
    def queue_depth(self) -> int:
        """Items waiting for a forward (not counting the batch being computed)."""
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        """Items inside the forward that is running now."""
        return self._in_flight

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    # ------------------------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Start the worker task on the running event loop (idempotent)."""
        if self.running:
            return
        self._closed = False
        self._arrival = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gridfeats-model")
        self._task = asyncio.get_running_loop().create_task(self._work(), name="gridfeats-batcher")

    async def close(self) -> None:
        """Refuse new items, finish every queued one, then stop the worker and its thread."""
        self._closed = True
        if self._arrival is not None:
            self._arrival.set()
        if self._task is not None:
            await self._task
            self._task = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    # ------------------------------------------------------------------------------ submitting
    async def submit(self, item: In) -> Out:
        """Compute one item; see :meth:`submit_many`."""
        return (await self.submit_many([item]))[0]

    async def submit_many(self, items: Sequence[In]) -> List[Out]:
        """Queue all ``items`` (or none of them) and wait for their outputs, in order.

        Raises :class:`QueueFullError` when the queue lacks room for all of them, the item's own
        exception when ``batch_fn`` failed on it, or :class:`BatcherClosedError` while closing.
        """
        if self._closed or not self.running:
            raise BatcherClosedError("the batcher is not accepting work")
        if not items:
            return []
        if len(self._queue) + len(items) > self.max_queue:
            raise QueueFullError(len(self._queue), self.max_queue, len(items))
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        entries = [_Entry(item, loop.create_future(), now) for item in items]
        self._queue.extend(entries)
        assert self._arrival is not None
        self._arrival.set()
        try:
            return list(await asyncio.gather(*(entry.future for entry in entries)))
        except BaseException:
            self._discard(entries)
            raise

    def _discard(self, entries: Sequence[_Entry]) -> None:
        """Free the slots of a caller that stopped waiting, and settle its futures quietly."""
        gone = {id(entry) for entry in entries}
        if any(id(entry) in gone for entry in self._queue):
            self._queue = collections.deque(e for e in self._queue if id(e) not in gone)
        for entry in entries:
            if not entry.future.done():
                entry.future.cancel()
            elif not entry.future.cancelled():
                entry.future.exception()  # mark retrieved: no "exception never retrieved" noise

    # ---------------------------------------------------------------------------------- worker
    async def _work(self) -> None:
        assert self._arrival is not None
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._closed:
                    return
                self._arrival.clear()
                await self._arrival.wait()
                continue
            await self._wait_to_fill()
            batch = self._take_batch()
            if not batch:
                continue
            self._in_flight = len(batch)
            started = time.monotonic()
            try:
                outcomes = await loop.run_in_executor(
                    self._executor, self._run_isolated, [entry.item for entry in batch]
                )
            finally:
                self._in_flight = 0
            elapsed = time.monotonic() - started
            for entry, (ok, value) in zip(batch, outcomes):
                if entry.future.done():
                    continue  # its caller is gone
                if ok:
                    entry.future.set_result(value)
                else:
                    entry.future.set_exception(value)
            if self._on_batch is not None:
                try:
                    self._on_batch(len(batch), elapsed)
                except Exception:  # an observer must never stop the worker
                    logger.exception("batch observer failed")

    async def _wait_to_fill(self) -> None:
        """Wait until the queue holds a full batch or its oldest item has waited long enough."""
        assert self._arrival is not None
        deadline = self._queue[0].enqueued_at + self.max_wait_s
        while len(self._queue) < self.max_batch_size and not self._closed:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._arrival.clear()
            try:
                await asyncio.wait_for(self._arrival.wait(), remaining)
            except asyncio.TimeoutError:
                return
            if not self._queue:
                return

    def _take_batch(self) -> List[_Entry]:
        batch: List[_Entry] = []
        while self._queue and len(batch) < self.max_batch_size:
            entry = self._queue.popleft()
            if not entry.future.done():
                batch.append(entry)
        return batch

    def _run_isolated(self, items: List[In]) -> List[Tuple[bool, Any]]:
        """Run ``batch_fn`` on ``items`` (worker thread); on failure, retry one by one."""
        try:
            return self._checked_call(items)
        except Exception as exc:
            if len(items) == 1:
                return [(False, exc)]
            logger.warning("batch of %d failed (%s); retrying items one by one", len(items), exc)
        outcomes: List[Tuple[bool, Any]] = []
        for item in items:
            try:
                outcomes.extend(self._checked_call([item]))
            except Exception as exc:
                outcomes.append((False, exc))
        return outcomes

    def _checked_call(self, items: List[In]) -> List[Tuple[bool, Any]]:
        results = list(self._batch_fn(items))
        if len(results) != len(items):
            raise RuntimeError(f"batch_fn returned {len(results)} outputs for {len(items)} inputs")
        return [(not isinstance(r, BaseException), r) for r in results]
