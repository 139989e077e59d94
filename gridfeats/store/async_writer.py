"""AsyncFeatureWriter: run a FeatureWriter in a background thread behind a bounded queue.

Converting, compressing and fsyncing part files takes time that should not stall the model. The
extraction loop hands records to :meth:`add` and goes on; a single background thread does the
writing in order. The queue is bounded so a slow disk applies back-pressure instead of letting
buffered features grow without limit. A failure in the thread is re-raised (as the cause of a
``RuntimeError``) by the next call, so it cannot be lost silently.

Records are passed by reference: do not modify their arrays after handing them over (fresh model
outputs, as the extraction job produces, are fine).
"""

from __future__ import annotations

import queue
import threading
from typing import Any, FrozenSet, Mapping, Optional, Tuple

from gridfeats.store.writer import FeatureWriter

_STOP = object()


class AsyncFeatureWriter:
    """Wrap ``writer``; ``add``/``add_error`` return once the item is queued."""

    def __init__(self, writer: FeatureWriter, max_pending: int = 64):
        if max_pending < 1:
            raise ValueError("max_pending must be at least 1")
        self.writer = writer
        self._queue: "queue.Queue[Any]" = queue.Queue(maxsize=max_pending)
        self._failure: Optional[BaseException] = None
        self._closed = False
        self._thread = threading.Thread(
            target=self._work, name="gridfeats-store-writer", daemon=True
        )
        self._thread.start()

    def done_ids(self) -> FrozenSet[str]:
        """The wrapped writer's ``done_ids`` (call it before queueing work)."""
        return self.writer.done_ids()

    def add(self, image_id: Any, record: Mapping[str, Any]) -> None:
        self._put(("add", image_id, record))

    def add_error(self, image_id: Any, reason: str) -> None:
        self._put(("error", image_id, reason))

    def close(self) -> None:
        """Wait for the queue to drain, then close (consolidate) the writer."""
        self._finish()
        self.writer.close()

    def abort(self) -> None:
        """Wait for the queue to drain, commit, and leave the run resumable."""
        self._finish(raise_failure=False)
        self.writer.abort()

    def __enter__(self) -> "AsyncFeatureWriter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            try:
                self.abort()
            except Exception:
                pass

    # --- internals --------------------------------------------------------------------------------
    def _put(self, item: Tuple[Any, ...]) -> None:
        if self._closed:
            raise RuntimeError("the async feature writer is closed")
        self._raise_failure()
        while True:  # wake up now and then so a writer failure cannot leave us blocked forever
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                self._raise_failure()

    def _finish(self, raise_failure: bool = True) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put(_STOP)
            self._thread.join()
        if raise_failure:
            self._raise_failure()

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise RuntimeError(
                f"the feature writer thread failed: {self._failure}"
            ) from self._failure

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            if self._failure is not None:
                continue  # drain without writing after a failure
            kind, image_id, payload = item
            try:
                if kind == "add":
                    self.writer.add(image_id, payload)
                else:
                    self.writer.add_error(image_id, payload)
            except BaseException as exc:  # reported to the producer by the next call
                self._failure = exc
