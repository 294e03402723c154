"""The dynamic batcher, model-agnostic: a fake model whose output is a known function of its input."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from clipsearch.core.errors import ClientGone, InferenceError, InvalidInput, Overloaded, RequestTimeout, ShuttingDown
from clipsearch.service.batcher import Collated, DynamicBatcher, Stages, concat_rows


def fake_model(calls: list[int], delay: float = 0.0, fail_when=None):
    """Row i of the output is [x, 2x] for input row value x; records each batch size."""

    def infer(x: np.ndarray) -> np.ndarray:
        calls.append(len(x))
        if delay:
            time.sleep(delay)
        if fail_when is not None and fail_when(x):
            raise RuntimeError("boom: CUDA out of memory (internal detail)")
        return np.stack([x, 2 * x], axis=1).astype(np.float32)

    return infer


async def _client_leaves(b: DynamicBatcher, items, *, after: float) -> None:
    """Submit `items` from a client that goes away `after` seconds later: it gets ClientGone."""
    gone = asyncio.Event()
    leaver = asyncio.ensure_future(b.submit(items, timeout=10, disconnected=gone.wait))
    await asyncio.sleep(after)
    gone.set()
    with pytest.raises(ClientGone):
        await leaver


def held_model(gate: threading.Event, calls: list[int]):
    """`fake_model` that waits for `gate` (5 s at most) before each batch."""
    model = fake_model(calls)

    def infer(x):
        gate.wait(5)
        return model(x)

    return infer


@pytest.fixture
def executors():
    model, prep = ThreadPoolExecutor(1), ThreadPoolExecutor(4)
    yield model, prep
    model.shutdown(wait=False, cancel_futures=True)
    prep.shutdown(wait=False, cancel_futures=True)


def _prepare(items, field: str, start: int) -> np.ndarray:
    """Items are numbers; "bad" is an item that fails its request."""
    if "bad" in items:
        raise ValueError(f"bad item {field}[{start + list(items).index('bad')}]")
    return np.asarray(items, dtype=np.float32)


async def _started(forward, executors, *, collate=concat_rows, prepare=_prepare, **kw) -> DynamicBatcher:
    stages = Stages(forward=forward, prepare=prepare, collate=collate)
    b = DynamicBatcher("test", stages, model_executor=executors[0], prepare_executor=executors[1], **kw)
    await b.start()
    return b


def _payload(start: int, n: int) -> np.ndarray:
    return np.arange(start, start + n, dtype=np.float32)


def _items(start: int, n: int) -> list[float]:
    return [float(x) for x in range(start, start + n)]


async def test_concurrent_requests_are_merged_and_exact(executors) -> None:
    calls: list[int] = []
    b = await _started(fake_model(calls, delay=0.02), executors, max_batch_size=16)
    sizes = [1, 3, 2, 5, 1, 1, 4, 2, 7, 1] * 3
    starts = np.cumsum([0, *sizes[:-1]]) * 10
    results = await asyncio.gather(*[
        b.submit(_items(s, n), timeout=10) for s, n in zip(starts, sizes, strict=True)
    ])
    for s, n, r in zip(starts, sizes, results, strict=True):
        x = _payload(int(s), n)
        np.testing.assert_array_equal(r, np.stack([x, 2 * x], axis=1))
    assert sum(calls) == sum(sizes)
    assert len(calls) < len(sizes)  # fewer model calls than requests
    assert max(calls) <= 16 and max(calls) > 1
    await b.stop()


async def test_request_larger_than_a_batch_is_split(executors) -> None:
    calls: list[int] = []
    b = await _started(fake_model(calls), executors, max_batch_size=4)
    r = await b.submit(_items(100, 10), timeout=10)
    np.testing.assert_array_equal(r[:, 0], _payload(100, 10))
    assert calls == [4, 4, 2]
    await b.stop()


async def test_failed_batch_fails_every_waiter_and_service_continues(executors) -> None:
    calls: list[int] = []
    gate = threading.Event()

    def infer(x):
        gate.wait(5)
        return fake_model(calls, fail_when=lambda x: (x < 0).any())(x)

    b = await _started(infer, executors, max_batch_size=64)
    # The first request occupies the model; the next ones queue up and form one batch
    # containing a poisoned row.
    first = asyncio.ensure_future(b.submit(_items(1, 1), timeout=10))
    await asyncio.sleep(0.05)
    rest = [asyncio.ensure_future(b.submit(_items(s, 2), timeout=10)) for s in (10, 20, -5)]
    await asyncio.sleep(0.1)
    gate.set()
    assert (await first)[0, 0] == 1
    outcomes = await asyncio.gather(*rest, return_exceptions=True)
    assert all(isinstance(o, InferenceError) for o in outcomes), outcomes
    assert "CUDA" not in str(outcomes[0])  # internals stay in the log
    ok = await b.submit(_items(7, 1), timeout=10)
    assert ok[0, 1] == 14
    await b.stop()


async def test_prepare_error_fails_only_that_request(executors) -> None:
    calls: list[int] = []
    b = await _started(fake_model(calls), executors)

    with pytest.raises(ValueError, match=r"bad item items\[1\]"):
        await b.submit([1.0, "bad"], timeout=5)
    assert calls == [] and b.pending_rows == 0
    assert (await b.submit(_items(3, 1), timeout=5))[0, 0] == 3
    await b.stop()


async def test_full_queue_answers_overloaded(executors) -> None:
    gate = threading.Event()
    calls: list[int] = []
    infer = held_model(gate, calls)

    b = await _started(infer, executors, max_batch_size=4, max_queue=6)
    running = asyncio.ensure_future(b.submit(_items(0, 4), timeout=10))
    await asyncio.sleep(0.05)  # taken by the model; the queue is empty again
    queued = asyncio.ensure_future(b.submit(_items(10, 5), timeout=10))
    await asyncio.sleep(0.05)
    with pytest.raises(Overloaded) as exc:
        await b.submit(_items(20, 2), timeout=10)
    assert exc.value.retry_after > 0
    gate.set()
    assert (await running).shape == (4, 2) and (await queued).shape == (5, 2)
    await b.stop()


async def test_a_full_queue_is_waited_on_for_room_before_429(executors) -> None:
    """With overload_wait_ms, a request finding the queue full is admitted as soon as rows
    leave it (not after a fixed sleep), and one still without room when the wait ends gets 429."""
    gate = threading.Event()
    calls: list[int] = []
    infer = held_model(gate, calls)

    b = await _started(infer, executors, max_batch_size=4, max_queue=4, overload_wait_ms=300)
    running = asyncio.ensure_future(b.submit(_items(0, 4), timeout=10))
    await asyncio.sleep(0.05)  # in the model: the queue is empty
    queued = asyncio.ensure_future(b.submit(_items(10, 4), timeout=10))  # fills the queue
    await asyncio.sleep(0.05)
    rejected = asyncio.ensure_future(b.submit(_items(20, 1), timeout=10))
    await asyncio.sleep(0.05)
    assert not rejected.done()  # it waits for room instead of failing at once
    with pytest.raises(Overloaded):
        await asyncio.wait_for(rejected, 10)  # no room within 300 ms: the model is held
    assert calls == [] and not running.done()  # the wait ended while the first batch was still held
    waiter = asyncio.ensure_future(b.submit(_items(30, 2), timeout=10))
    await asyncio.sleep(0.1)
    gate.set()  # the first batch ends; `queued` goes to the model, and its rows leave the queue
    np.testing.assert_array_equal((await waiter)[:, 0], [30, 31])
    assert (await running).shape == (4, 2) and (await queued).shape == (4, 2)
    await b.stop()


async def test_timeout_resolves_and_skips_the_rows(executors) -> None:
    gate = threading.Event()
    calls: list[int] = []
    infer = held_model(gate, calls)

    b = await _started(infer, executors, max_batch_size=8)
    blocker = asyncio.ensure_future(b.submit(_items(0, 1), timeout=10))
    await asyncio.sleep(0.05)
    with pytest.raises(RequestTimeout):
        await asyncio.wait_for(b.submit(_items(10, 3), timeout=0.2), 10)
    assert not blocker.done()  # it timed out while the model was still held, not after
    gate.set()
    await blocker
    await b.submit(_items(50, 1), timeout=5)
    assert calls == [1, 1]  # the timed-out rows never reached the model
    await b.stop()


async def test_disconnected_client_is_dropped_before_the_model(executors) -> None:
    gate = threading.Event()
    calls: list[int] = []
    infer = held_model(gate, calls)

    b = await _started(infer, executors)
    blocker = asyncio.ensure_future(b.submit(_items(0, 1), timeout=10))
    await asyncio.sleep(0.05)
    await _client_leaves(b, _items(5, 2), after=0.05)
    gate.set()
    await blocker
    await b.submit(_items(9, 1), timeout=5)
    assert calls == [1, 1]
    await b.stop()


async def test_disconnect_watcher_starts_only_for_requests_that_wait(executors) -> None:
    """A request answered within `watch_after_s` never starts a watcher; one that waits
    longer does, and is still dropped before the model when its client leaves."""
    gate = threading.Event()
    calls: list[int] = []
    watched: list[str] = []

    def watcher(name: str, gone: asyncio.Event):
        async def wait() -> None:
            watched.append(name)
            await gone.wait()

        return wait

    def infer(x):
        gate.wait(5)
        return fake_model(calls)(x)

    b = await _started(infer, executors, watch_after_s=0.2)
    gate.set()
    never = asyncio.Event()
    r = await b.submit(_payload(3, 1), timeout=10, disconnected=watcher("fast", never))
    np.testing.assert_array_equal(r, [[3, 6]])
    await asyncio.sleep(0.3)  # past watch_after_s: the fast request's timer was cancelled
    assert watched == []

    gate.clear()
    blocker = asyncio.ensure_future(b.submit(_payload(0, 1), timeout=10))
    await asyncio.sleep(0.05)
    gone = asyncio.Event()
    slow = asyncio.ensure_future(b.submit(_payload(5, 2), timeout=10, disconnected=watcher("slow", gone)))
    await asyncio.sleep(0.1)
    assert watched == []  # still within watch_after_s
    await asyncio.sleep(0.2)
    assert watched == ["slow"]
    gone.set()
    with pytest.raises(ClientGone):
        await slow
    gate.set()
    await blocker
    assert calls == [1, 1]  # the slow request's rows never reached the model
    await b.stop()


async def test_stop_resolves_every_waiter(executors) -> None:
    gate = threading.Event()

    def infer(x):
        gate.wait(5)
        return fake_model([])(x)

    b = await _started(infer, executors, max_batch_size=2)
    waiters = [asyncio.ensure_future(b.submit(_items(s, 2), timeout=10)) for s in range(5)]
    await asyncio.sleep(0.1)
    await b.stop()
    gate.set()
    outcomes = await asyncio.wait_for(asyncio.gather(*waiters, return_exceptions=True), 5)
    assert all(isinstance(o, ShuttingDown) for o in outcomes), outcomes
    with pytest.raises(ShuttingDown):
        await b.submit(_items(0, 1), timeout=1)


async def test_wrong_row_count_from_model_is_an_error(executors) -> None:
    b = await _started(lambda p: np.zeros((1, 2), np.float32), executors)
    with pytest.raises(InferenceError):
        await b.submit(_items(0, 3), timeout=5)
    await b.stop()


# -- per-batch collate (how texts are tokenized) -----------------------------------------
def _collate_recorder(events: list[str], fail_when=None, per_request: bool = False):
    """Collates int rows; with `per_request`, a request holding a negative row fails alone."""

    def collate(payloads: list[list[int]]) -> np.ndarray | Collated:
        rows = [x for p in payloads for x in p]
        events.append(f"collate {len(rows)}")
        if fail_when is not None and fail_when(rows):
            raise RuntimeError("collate broke (internal detail)")
        if per_request:
            failed = {i: InvalidInput(f"negative row {min(p)}", field=f"request {i}")
                      for i, p in enumerate(payloads) if min(p) < 0}
            return Collated(np.asarray(rows, dtype=np.float32), failed)
        return np.asarray(rows, dtype=np.float32)

    return collate


def _collated_model(events: list[str], gate: threading.Event | None = None):
    def infer(x: np.ndarray) -> np.ndarray:
        events.append(f"model start {len(x)}")
        if gate is not None:
            gate.wait(5)
        events.append(f"model end {len(x)}")
        return np.stack([x, 2 * x], axis=1).astype(np.float32)

    return infer


async def _collating_with_model_busy(executors, per_request: bool = False, **kw):
    """A collating batcher whose model is held (by `gate`) on a first 1-row batch."""
    events: list[str] = []
    gate = threading.Event()
    b = await _started(_collated_model(events, gate), executors,
                       collate=_collate_recorder(events, per_request=per_request), **kw)
    first = asyncio.ensure_future(b.submit([1], timeout=10))
    await asyncio.sleep(0.1)
    return b, events, gate, first


async def test_collated_batches_are_exact_and_merged(executors) -> None:
    events: list[str] = []
    b = await _started(_collated_model(events), executors, collate=_collate_recorder(events), max_batch_size=8)
    sizes = [1, 3, 2, 5, 1, 4, 2, 7, 1, 1] * 3
    starts = np.cumsum([0, *sizes[:-1]]) * 10
    results = await asyncio.gather(*[
        b.submit(list(range(int(s), int(s) + n)), timeout=10) for s, n in zip(starts, sizes, strict=True)
    ])
    for s, n, r in zip(starts, sizes, results, strict=True):
        x = _payload(int(s), n)
        np.testing.assert_array_equal(r, np.stack([x, 2 * x], axis=1))
    assert b.stats.batches < len(sizes) and b.stats.largest_batch <= 8
    assert all(isinstance(v, int) for v in vars(b.stats).values())  # counters, nothing that grows per batch
    await b.stop()


async def test_next_batch_is_collated_while_the_model_runs(executors) -> None:
    b, events, gate, first = await _collating_with_model_busy(executors, max_batch_size=2)
    second = asyncio.ensure_future(b.submit([2, 3], timeout=10))
    await asyncio.sleep(0.1)
    # The model is still busy with the first batch, and the second, a full batch, is already collated.
    assert events == ["collate 1", "model start 1", "collate 2"], events
    gate.set()
    await asyncio.gather(first, second)
    assert events[3:] == ["model end 1", "model start 2", "model end 2"], events
    await b.stop()


async def test_request_gone_while_staged_never_reaches_the_model(executors) -> None:
    b, events, gate, blocker = await _collating_with_model_busy(executors, max_batch_size=5)
    gone = asyncio.Event()
    leaver = asyncio.ensure_future(b.submit([5, 6, 7], timeout=10, disconnected=gone.wait))
    stayer = asyncio.ensure_future(b.submit([8, 9], timeout=10))
    await asyncio.sleep(0.1)
    assert "collate 5" in events  # both staged together behind the blocker
    gone.set()
    with pytest.raises(ClientGone):
        await leaver
    gate.set()
    await blocker
    r = await stayer
    np.testing.assert_array_equal(r[:, 0], [8, 9])
    assert [e for e in events if e.startswith("model start")] == ["model start 1", "model start 2"], events
    await b.stop()


async def test_staged_rows_count_against_the_queue(executors) -> None:
    b, _, gate, blocker = await _collating_with_model_busy(executors, max_queue=4, max_batch_size=4)
    staged = asyncio.ensure_future(b.submit([1, 2, 3, 4], timeout=10))
    await asyncio.sleep(0.1)
    with pytest.raises(Overloaded):
        await b.submit([9], timeout=10)
    gate.set()
    await asyncio.gather(blocker, staged)
    await b.stop()


async def test_collate_failure_fails_its_batch_only(executors) -> None:
    events: list[str] = []
    b = await _started(_collated_model(events), executors,
                       collate=_collate_recorder(events, fail_when=lambda rows: -1 in rows))
    with pytest.raises(InferenceError) as err:
        await b.submit([3, -1], timeout=5)
    assert "internal detail" not in str(err.value)
    r = await b.submit([4], timeout=5)
    assert r[0, 1] == 8
    await b.stop()


async def test_collate_can_fail_one_request_and_not_its_batch_mates(executors) -> None:
    """A bad image found while decoding a whole batch fails its own request only; its rows
    never reach the model, and the others get exactly their rows."""
    b, events, gate, blocker = await _collating_with_model_busy(executors, per_request=True, max_batch_size=5)
    good = asyncio.ensure_future(b.submit([2, 3], timeout=10))
    bad = asyncio.ensure_future(b.submit([4, -1], timeout=10))
    also_good = asyncio.ensure_future(b.submit([5], timeout=10))
    await asyncio.sleep(0.1)
    assert "collate 5" in events  # the three were staged as one batch behind the blocker
    gate.set()
    await blocker
    with pytest.raises(InvalidInput) as err:
        await bad
    assert err.value.message.startswith("negative row -1")  # its own error, not a batch-mate's
    np.testing.assert_array_equal((await good)[:, 0], [2, 3])
    np.testing.assert_array_equal((await also_good)[:, 0], [5])
    assert [e for e in events if e.startswith("model start")] == ["model start 1", "model start 3"], events
    await b.stop()


async def test_stop_resolves_a_staged_batch(executors) -> None:
    events: list[str] = []
    gate = threading.Event()
    b = await _started(_collated_model(events, gate), executors, collate=_collate_recorder(events))
    waiters = [asyncio.ensure_future(b.submit([i], timeout=10)) for i in range(3)]
    await asyncio.sleep(0.1)
    stopping = asyncio.ensure_future(b.stop())
    await asyncio.sleep(0.1)
    gate.set()
    await stopping
    outcomes = await asyncio.wait_for(asyncio.gather(*waiters, return_exceptions=True), 5)
    assert all(isinstance(o, ShuttingDown) for o in outcomes), outcomes


async def test_the_model_takes_the_next_batch_while_the_event_loop_is_busy(executors) -> None:
    """The hand-off from one batch to the next happens in the batcher's own thread: a busy
    event loop (parsing and answering requests) does not hold the model idle."""
    b, events, gate, first = await _collating_with_model_busy(executors, max_batch_size=2)
    second = asyncio.ensure_future(b.submit([2, 3], timeout=10))
    await asyncio.sleep(0.1)  # a full batch: collated, behind the first batch
    gate.set()
    time.sleep(0.3)  # the point: no event-loop callback can run meanwhile
    assert events[-2:] == ["model start 2", "model end 2"], events
    await asyncio.gather(first, second)
    await b.stop()


async def test_while_the_model_runs_requests_gather_into_one_batch(executors) -> None:
    """Short of a full batch, requests arriving while the model runs wait for it, and then go
    as one batch (taking them at once would split them into ever smaller batches)."""
    b, events, gate, first = await _collating_with_model_busy(executors, max_batch_size=8)
    rest = [asyncio.ensure_future(b.submit([i], timeout=10)) for i in range(2, 6)]
    await asyncio.sleep(0.1)
    assert events == ["collate 1", "model start 1"], events  # nothing taken behind a busy model
    gate.set()
    await asyncio.gather(first, *rest)
    assert [e for e in events if e.startswith("collate")] == ["collate 1", "collate 4"], events
    await b.stop()


async def test_prepare_is_fair_between_requests_and_stops_when_a_request_ends(executors) -> None:
    """A request of many slow items cannot hold the prepare pool: a later one-item request
    is prepared between its items; and once a request ends (client gone), its remaining
    items are never prepared."""
    prepared: list[float] = []

    def slow(items, field, start):
        time.sleep(0.05)
        prepared.extend(float(x) for x in items)
        return np.asarray(items, dtype=np.float32)

    model, _ = executors
    one_thread = ThreadPoolExecutor(1)
    try:
        stages = Stages(forward=fake_model([]), prepare=slow)
        b = DynamicBatcher("test", stages, model_executor=model, prepare_executor=one_thread, watch_after_s=0.0)
        await b.start()
        big = asyncio.ensure_future(b.submit(_items(100, 20), timeout=10))
        await asyncio.sleep(0.12)
        small = await b.submit(_items(7, 1), timeout=10)
        assert small[0, 0] == 7 and not big.done()  # answered while the big request was still preparing
        assert prepared.index(7.0) < 6
        np.testing.assert_array_equal((await big)[:, 0], np.arange(100, 120))

        prepared.clear()
        await _client_leaves(b, _items(200, 20), after=0.12)
        await asyncio.sleep(0.3)
        assert len(prepared) in range(1, 5), prepared  # the items under way, then nothing more
        await b.stop()
    finally:
        one_thread.shutdown(wait=False, cancel_futures=True)
