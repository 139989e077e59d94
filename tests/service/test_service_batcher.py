"""The dynamic batcher on its own, with plain Python batch functions (no model, no HTTP)."""

from __future__ import annotations

import asyncio
import threading
from typing import List

import pytest

from service.batcher import BatcherClosedError, DynamicBatcher, QueueFullError


class RecordingDoubler:
    """Doubles each item and records every batch it was called with (from the worker thread)."""

    def __init__(self, gate: threading.Event = None) -> None:
        self.batches: List[List[int]] = []
        self.gate = gate
        self.started = threading.Event()

    def __call__(self, items: List[int]) -> List[int]:
        self.batches.append(list(items))
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(10), "test gate never opened"
        return [item * 2 for item in items]


async def _wait_until(predicate, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


def test_concurrent_items_share_batches_and_keep_their_results():
    fn = RecordingDoubler()

    async def main():
        batcher = DynamicBatcher(fn, max_batch_size=4, max_wait_s=0.2, max_queue=100)
        await batcher.start()
        results = await asyncio.gather(*(batcher.submit(i) for i in range(10)))
        await batcher.close()
        return results

    results = asyncio.run(main())
    assert results == [2 * i for i in range(10)]
    assert [len(b) for b in fn.batches] == [4, 4, 2]
    assert sorted(x for b in fn.batches for x in b) == list(range(10))


def test_zero_wait_dispatches_a_lone_item_alone():
    fn = RecordingDoubler()

    async def main():
        batcher = DynamicBatcher(fn, max_batch_size=8, max_wait_s=0.0, max_queue=10)
        await batcher.start()
        value = await batcher.submit(21)
        await batcher.close()
        return value

    assert asyncio.run(main()) == 42
    assert fn.batches == [[21]]


def test_items_queued_during_a_forward_form_the_next_batch():
    gate = threading.Event()
    fn = RecordingDoubler(gate)

    async def main():
        batcher = DynamicBatcher(fn, max_batch_size=8, max_wait_s=0.02, max_queue=100)
        await batcher.start()
        first = asyncio.ensure_future(batcher.submit(0))
        await asyncio.get_running_loop().run_in_executor(None, fn.started.wait, 5)
        rest = [asyncio.ensure_future(batcher.submit(i)) for i in range(1, 6)]
        await _wait_until(lambda: batcher.queue_depth == 5)
        await asyncio.sleep(0.05)  # longer than max_wait: they are overdue when the model frees up
        gate.set()
        results = await asyncio.wait_for(asyncio.gather(first, *rest), 5)
        await batcher.close()
        return results

    assert asyncio.run(main()) == [0, 2, 4, 6, 8, 10]
    assert fn.batches == [[0], [1, 2, 3, 4, 5]]


def test_full_queue_refuses_then_recovers():
    gate = threading.Event()
    fn = RecordingDoubler(gate)

    async def main():
        batcher = DynamicBatcher(fn, max_batch_size=1, max_wait_s=0.0, max_queue=2)
        await batcher.start()
        busy = asyncio.ensure_future(batcher.submit(1))
        await asyncio.get_running_loop().run_in_executor(None, fn.started.wait, 5)
        queued = [asyncio.ensure_future(batcher.submit(i)) for i in (2, 3)]
        await _wait_until(lambda: batcher.queue_depth == 2)
        with pytest.raises(QueueFullError) as refused:
            await batcher.submit(4)
        with pytest.raises(QueueFullError):
            await batcher.submit_many([5])
        gate.set()
        done = await asyncio.gather(busy, *queued)
        after = await batcher.submit(6)
        await batcher.close()
        return refused.value, done, after

    refused, done, after = asyncio.run(main())
    assert (refused.depth, refused.capacity, refused.wanted) == (2, 2, 1)
    assert done == [2, 4, 6]
    assert after == 12


def test_submit_many_is_all_or_nothing():
    gate = threading.Event()
    fn = RecordingDoubler(gate)

    async def main():
        batcher = DynamicBatcher(fn, max_batch_size=1, max_wait_s=0.0, max_queue=3)
        await batcher.start()
        busy = asyncio.ensure_future(batcher.submit(1))
        await asyncio.get_running_loop().run_in_executor(None, fn.started.wait, 5)
        with pytest.raises(QueueFullError):
            await batcher.submit_many([10, 11, 12, 13])
        depth_after_refusal = batcher.queue_depth
        gate.set()
        await busy
        many = await batcher.submit_many([10, 11, 12])
        await batcher.close()
        return depth_after_refusal, many

    depth, many = asyncio.run(main())
    assert depth == 0
    assert many == [20, 22, 24]


def test_cancelled_caller_frees_its_slot_and_is_never_computed():
    gate = threading.Event()
    fn = RecordingDoubler(gate)

    async def main():
        batcher = DynamicBatcher(fn, max_batch_size=4, max_wait_s=0.0, max_queue=1)
        await batcher.start()
        busy = asyncio.ensure_future(batcher.submit(1))
        await asyncio.get_running_loop().run_in_executor(None, fn.started.wait, 5)
        abandoned = asyncio.ensure_future(batcher.submit(99))
        await _wait_until(lambda: batcher.queue_depth == 1)
        abandoned.cancel()
        await asyncio.gather(abandoned, return_exceptions=True)
        depth = batcher.queue_depth
        replacement = asyncio.ensure_future(
            batcher.submit(7)
        )  # would be refused if 99 held the slot
        await asyncio.sleep(0)
        gate.set()
        results = await asyncio.gather(busy, replacement)
        await batcher.close()
        return depth, results

    depth, results = asyncio.run(main())
    assert depth == 0
    assert results == [2, 14]
    assert 99 not in [x for b in fn.batches for x in b]


def test_timeout_of_a_waiting_caller_frees_its_slot():
    gate = threading.Event()
    fn = RecordingDoubler(gate)

    async def main():
        batcher = DynamicBatcher(fn, max_batch_size=1, max_wait_s=0.0, max_queue=1)
        await batcher.start()
        busy = asyncio.ensure_future(batcher.submit(1))
        await asyncio.get_running_loop().run_in_executor(None, fn.started.wait, 5)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(batcher.submit(50), 0.05)
        depth = batcher.queue_depth
        gate.set()
        await busy
        await batcher.close()
        return depth

    assert asyncio.run(main()) == 0
    assert fn.batches == [[1]]


class FailsOnNegative:
    """A batch function that raises for the whole batch when any item is negative."""

    def __init__(self) -> None:
        self.calls: List[List[int]] = []

    def __call__(self, items: List[int]) -> List[int]:
        self.calls.append(list(items))
        if any(item < 0 for item in items):
            raise ValueError(f"negative input in {items}")
        return [item + 100 for item in items]


def test_one_bad_item_fails_alone_and_its_batch_neighbours_succeed():
    fn = FailsOnNegative()

    async def main():
        batcher = DynamicBatcher(fn, max_batch_size=8, max_wait_s=0.2, max_queue=10)
        await batcher.start()
        results = await asyncio.gather(
            batcher.submit(1), batcher.submit(-5), batcher.submit(3), return_exceptions=True
        )
        await batcher.close()
        return results

    good1, bad, good3 = asyncio.run(main())
    assert (good1, good3) == (101, 103)
    assert isinstance(bad, ValueError) and "negative" in str(bad)
    assert fn.calls[0] == [1, -5, 3]  # really batched first
    assert fn.calls[1:] == [[1], [-5], [3]]  # then isolated


def test_batch_fn_may_fail_single_items_by_returning_exceptions():
    def fn(items):
        return [KeyError(item) if item == "bad" else item.upper() for item in items]

    async def main():
        batcher = DynamicBatcher(fn, max_batch_size=4, max_wait_s=0.1, max_queue=10)
        await batcher.start()
        results = await asyncio.gather(
            batcher.submit("a"), batcher.submit("bad"), return_exceptions=True
        )
        await batcher.close()
        return results

    ok, failed = asyncio.run(main())
    assert ok == "A"
    assert isinstance(failed, KeyError)


def test_wrong_output_count_is_an_error_not_a_silent_mismatch():
    async def main():
        batcher = DynamicBatcher(
            lambda items: items[:-1], max_batch_size=2, max_wait_s=0.1, max_queue=10
        )
        await batcher.start()
        results = await asyncio.gather(batcher.submit(1), batcher.submit(2), return_exceptions=True)
        await batcher.close()
        return results

    results = asyncio.run(main())
    assert all(isinstance(r, RuntimeError) and "outputs for" in str(r) for r in results)


def test_close_drains_queued_items_and_then_refuses_new_ones():
    fn = RecordingDoubler()

    async def main():
        batcher = DynamicBatcher(fn, max_batch_size=2, max_wait_s=5.0, max_queue=10)
        await batcher.start()
        pending = [asyncio.ensure_future(batcher.submit(i)) for i in range(5)]
        await asyncio.sleep(0)
        await batcher.close()  # must not wait 5 s for batches to fill
        results = await asyncio.gather(*pending)
        with pytest.raises(BatcherClosedError):
            await batcher.submit(9)
        return results

    assert asyncio.run(asyncio.wait_for(main(), 3)) == [0, 2, 4, 6, 8]


def test_observer_sees_every_batch_size():
    seen = []

    async def main():
        batcher = DynamicBatcher(
            lambda items: items,
            max_batch_size=3,
            max_wait_s=0.2,
            max_queue=10,
            on_batch=lambda n, s: seen.append((n, s)),
        )
        await batcher.start()
        await asyncio.gather(*(batcher.submit(i) for i in range(7)))
        await batcher.close()

    asyncio.run(main())
    assert [n for n, _ in seen] == [3, 3, 1]
    assert all(seconds >= 0 for _, seconds in seen)


@pytest.mark.parametrize("kwargs", [dict(max_batch_size=0), dict(max_wait_s=-1), dict(max_queue=0)])
def test_invalid_limits_are_rejected(kwargs):
    args = dict(max_batch_size=1, max_wait_s=0.0, max_queue=1)
    args.update(kwargs)
    with pytest.raises(ValueError):
        DynamicBatcher(lambda items: items, **args)
