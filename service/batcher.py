"""A model-agnostic dynamic batcher: merges concurrent requests into batched model calls.

One batcher per modality. A request goes through:

1. admission: its rows are counted against `max_queue`; over that, `Overloaded` (429);
2. per-request CPU work (`prepare`: decode, preprocess) in a thread pool, off the event
   loop; or none, when the payload is ready as it is (texts);
3. the queue, as a sliceable payload of `n` rows;
4. greedy batching, as TEI and Triton do: take everything waiting up to
   `max_batch_size` rows (optionally after `max_wait_ms`), splitting a request larger
   than a batch over several batches;
5. per-batch CPU work (`collate`: tokenize a whole batch of texts, decode a whole batch
   of JPEGs with nvJPEG) while the model still runs the previous batch. A collate may
   fail single requests (a bad image) without failing their batch-mates (`Collated`);
6. `infer` in the model executor; its result rows go back to each request in order.

Steps 4-6 run in one stager thread per batcher, not on the event loop: the model starts
the next batch the moment it finishes one, instead of after the event loop, busy parsing
and answering requests, gets round to it (each such hand-off cost a loop iteration, and
three of them per batch held one process near 1,500 texts/s on an H100; bench/NOTES.md).
The event loop only queues requests and hands the results back.

Every waiter resolves: with its rows, with the batch's error if `collate` or `infer`
raises, with `RequestTimeout` past its deadline, or with `ShuttingDown`. A request whose
client went away (or that timed out) is skipped before its rows reach the model.
A client that leaves is noticed once its request has waited `watch_after_s` (see
`_Guard`): watching every request from its start would cost more than it saves.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from collections.abc import Set as AbstractSet
from concurrent.futures import Executor, Future, wait
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np

from service.errors import ClipsearchError, InferenceError, Overloaded, RequestTimeout, ShuttingDown

log = logging.getLogger(__name__)

P = TypeVar("P")  # a prepared payload: anything sliceable by rows (tensor, array, list)


@dataclass(frozen=True)
class Collated:
    """What a collate returns when some requests failed on their own: `payload` still has
    rows for every chunk of the batch (placeholders for the failed ones, which are dropped
    before the model); `failed` maps a chunk's position in the batch to its error."""

    payload: Any
    failed: dict[int, Exception]


@dataclass
class _Job:
    payload: Any
    n: int
    future: asyncio.Future[np.ndarray]
    out: np.ndarray | None = None
    done_rows: int = 0


@dataclass
class _Chunk:
    job: _Job
    lo: int
    hi: int

    @property
    def rows(self) -> int:
        return self.hi - self.lo


class _Guard:
    """Ends a request's waits at its deadline, or when its client goes away.

    One timer per request for both of its waits (preparing, then queued/encoding). The
    disconnect watcher (a task awaiting the ASGI `receive`) starts only once the request
    has waited `watch_after` seconds: most requests are answered before that, and a task
    per request costs ~40 us of event-loop time, a fifth of the whole per-request budget
    (bench/NOTES.md). 250 ms, not less: at 256 clients requests wait ~200 ms, and watching
    them from 50 ms cost 1.3-1.6x in throughput (`bench/loop_cost.py --clients 256`). A
    client that leaves sooner costs at most its rows in one batch.
    """

    __slots__ = ("deadline", "fut", "loop", "name", "timer", "watcher", "why")

    def __init__(self, name: str, loop: asyncio.AbstractEventLoop, timeout: float,
                 disconnected: Callable[[], Awaitable[Any]] | None, watch_after: float) -> None:
        self.name = name
        self.loop = loop
        now = loop.time()
        self.deadline = now + timeout
        self.fut: asyncio.Future[Any] | None = None
        self.why: str | None = None
        self.watcher: asyncio.Future[Any] | None = None
        if disconnected is not None and watch_after < timeout:
            self.timer = loop.call_at(now + watch_after, self._watch, disconnected)
        else:
            self.timer = loop.call_at(self.deadline, self._end, "timeout")

    def _watch(self, disconnected: Callable[[], Awaitable[Any]]) -> None:
        self.watcher = asyncio.ensure_future(disconnected())
        self.watcher.add_done_callback(lambda _: self._end("disconnect"))
        self.timer = self.loop.call_at(self.deadline, self._end, "timeout")

    def _end(self, reason: str) -> None:
        if self.why is None:
            self.why = reason
        if self.fut is not None and not self.fut.done():
            self.fut.cancel()

    async def wait(self, fut: asyncio.Future[Any], *, cancel_on_exit: bool) -> Any:
        """Await `fut` unless the request has ended; a cancelled queued job drops its rows."""
        self.fut = fut
        if self.why is not None:
            fut.cancel()
        try:
            return await fut
        except asyncio.CancelledError:
            if not cancel_on_exit:
                # A thread-pool job cannot be stopped; consume its outcome so nothing is logged as lost.
                fut.add_done_callback(lambda f: f.cancelled() or f.exception())
            if self.why == "timeout":
                raise RequestTimeout(f"{self.name} request timed out after waiting for the model") from None
            raise  # the client left, or the request itself was cancelled
        finally:
            self.fut = None

    def close(self) -> None:
        self.timer.cancel()
        if self.watcher is not None and not self.watcher.done():
            self.watcher.cancel()


@dataclass
class BatcherStats:
    """Counters tests and metrics read: model calls made and rows encoded."""

    batches: int = 0
    rows: int = 0
    batch_sizes: list[int] = field(default_factory=list)


class DynamicBatcher(Generic[P]):
    def __init__(
        self,
        name: str,
        infer: Callable[[Any], np.ndarray],
        *,
        model_executor: Executor,
        prepare_executor: Executor | None = None,
        collate: Callable[[list[P]], Any] | None = None,
        max_batch_size: int = 64,
        max_wait_ms: float = 0.0,
        max_queue: int = 1024,
        watch_after_s: float = 0.25,
        on_batch: Callable[[int], None] | None = None,
        on_queue_depth: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self.name = name
        self._infer = infer
        self._collate = collate
        self._model_executor = model_executor
        self._prepare_executor = prepare_executor
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.watch_after = watch_after_s
        self._on_batch = on_batch or (lambda n: None)
        self._on_queue_depth = on_queue_depth or (lambda n: None)
        self._queue: deque[_Chunk] = deque()
        self._queued_rows = 0
        self._reserved_rows = 0
        self._staged_rows = 0  # taken from the queue, not yet in the model
        # Guards the queue, its counters and `_inflight` between the event loop and the stager.
        self._cond = threading.Condition()
        self._inflight: dict[int, list[_Chunk]] = {}  # batches staged or in the model, for stop()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._generation = 0  # a stager thread from before a stop() exits instead of serving
        self._closed = True
        self.stats = BatcherStats()

    # -- lifecycle ----------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        with self._cond:
            self._closed = False
            self._generation += 1
            generation = self._generation
        threading.Thread(target=self._stager, args=(generation,), name=f"batcher-{self.name}", daemon=True).start()

    async def stop(self) -> None:
        """Stop batching; every request queued, staged or in the model gets `ShuttingDown`.

        Returns at once: a model call under way finishes in its thread, and its rows are
        dropped."""
        with self._cond:
            self._closed = True
            self._generation += 1
            gone = [*self._queue, *(c for batch in self._inflight.values() for c in batch)]
            self._queue.clear()
            self._inflight.clear()
            self._queued_rows = 0
            self._staged_rows = 0
            self._cond.notify_all()
        _fail_all(gone, ShuttingDown(f"{self.name} batcher is shutting down"))
        self._on_queue_depth(0)

    @property
    def pending_rows(self) -> int:
        """Rows admitted and not yet in the model: what `max_queue` bounds."""
        return self._queued_rows + self._reserved_rows + self._staged_rows

    # -- the request side (event loop) ------------------------------------------------
    async def submit(
        self,
        n: int,
        prepare: Callable[[], P] | None = None,
        *,
        payload: P | None = None,
        timeout: float,
        disconnected: Callable[[], Awaitable[Any]] | None = None,
    ) -> np.ndarray:
        """Queue `n` rows and wait for their vectors: `payload` as it is, or what `prepare()`
        returns, run off the loop in the prepare pool.

        `disconnected`, if given, is awaited alongside once the request has waited
        `watch_after_s`; when it returns first the request is dropped (its rows never
        reach the model) and `asyncio.CancelledError` is raised.
        """
        if self._closed or self._loop is None:
            raise ShuttingDown(f"{self.name} batcher is not running")
        if n <= 0:
            return np.zeros((0, 0), np.float32)
        if self.pending_rows + n > self.max_queue:
            raise Overloaded(
                f"{self.name} queue is full ({self.pending_rows} of {self.max_queue} items waiting)",
                retry_after=1.0,
            )
        loop = asyncio.get_running_loop()
        guard = _Guard(self.name, loop, timeout, disconnected, self.watch_after)
        self._reserved_rows += n
        try:
            try:
                if prepare is not None:
                    prepared = asyncio.ensure_future(loop.run_in_executor(self._prepare_executor, prepare))
                    payload = await guard.wait(prepared, cancel_on_exit=False)
            finally:
                self._reserved_rows -= n
            job = _Job(payload=payload, n=n, future=loop.create_future())
            with self._cond:
                if self._closed:
                    raise ShuttingDown(f"{self.name} batcher is shutting down")
                self._queue.append(_Chunk(job, 0, n))
                self._queued_rows += n
                queued = self._queued_rows
                self._cond.notify()
            self._on_queue_depth(queued)
            return await guard.wait(job.future, cancel_on_exit=True)
        finally:
            guard.close()

    # -- the model side (stager thread) ---------------------------------------------
    def _take_batch(self) -> list[_Chunk]:
        """Up to `max_batch_size` rows from the queue (the caller holds `_cond`)."""
        batch: list[_Chunk] = []
        room = self.max_batch_size
        while self._queue and room > 0:
            chunk = self._queue[0]
            if chunk.job.future.done():  # cancelled, timed out, or failed already
                self._queue.popleft()
                self._queued_rows -= chunk.rows
                continue
            if chunk.rows <= room:
                self._queue.popleft()
                batch.append(chunk)
                taken = chunk.rows
            else:
                batch.append(_Chunk(chunk.job, chunk.lo, chunk.lo + room))
                chunk.lo += room
                taken = room
            self._queued_rows -= taken
            room -= taken
        return batch

    def _next_batch(self, generation: int) -> tuple[int, list[_Chunk]] | None:
        """Block until rows are queued; take a batch (staged: counted, and known to stop())."""
        with self._cond:
            while not self._queue and self._generation == generation:
                self._cond.wait()
            if self._generation != generation:
                return None
        if self.max_wait > 0 and self._queued_rows < self.max_batch_size:
            threading.Event().wait(self.max_wait)
        with self._cond:
            if self._generation != generation:
                return None
            batch = self._take_batch()
            self._staged_rows = sum(c.rows for c in batch)
            key = id(batch)
            if batch:
                self._inflight[key] = batch
            queued = self._queued_rows
        self._on_queue_depth(queued)
        return key, batch

    def _await_model_or_full_batch(self, running: Future[np.ndarray], generation: int) -> None:
        """While the model runs a batch, leave requests queued, so that the next batch takes
        everything that arrives meanwhile (greedy), unless a full batch is already waiting:
        that one is taken and collated now, overlapping the model. Taking the next batch at
        once instead made batches ever smaller under load (each held only what arrived
        during the previous collate), and their fixed costs cut throughput at 256 clients."""
        with self._cond:
            while (not running.done() and self._generation == generation
                   and (self._collate is None or self._queued_rows < self.max_batch_size)):
                self._cond.wait()

    def _stager(self, generation: int) -> None:
        """Take a batch, collate it while the model runs the previous one, hand it to the model."""
        running: Future[np.ndarray] | None = None
        while True:
            if running is not None:
                self._await_model_or_full_batch(running, generation)
            taken = self._next_batch(generation)
            if taken is None:
                return
            key, batch = taken
            if not batch:
                continue
            size = sum(c.rows for c in batch)
            payload: Any = [_slice(c.job.payload, c.lo, c.hi) for c in batch]
            failed: dict[int, Exception] = {}
            try:
                if self._collate is not None:
                    payload = self._collate(payload)
                if isinstance(payload, Collated):
                    failed, payload = payload.failed, payload.payload
            except Exception as exc:
                with self._cond:
                    self._staged_rows = 0
                self._settle(key, batch, size, exc)
                continue
            if running is not None:
                wait([running])  # the previous batch; this one is ready behind it
            with self._cond:
                self._staged_rows = 0
                if self._generation != generation:
                    return
            if failed:
                self._post(_fail_some, [(batch[i].job, exc) for i, exc in failed.items()])
            live, size, payload = _drop_gone(batch, size, payload, collated=self._collate is not None,
                                             failed=failed.keys())
            if not live:
                self._settle(key, batch, 0, None)
                continue
            self.stats.batches += 1
            self.stats.rows += size
            self.stats.batch_sizes.append(size)
            self._on_batch(size)
            try:
                running = self._model_executor.submit(self._infer, payload)
            except RuntimeError:  # the executor was shut down: the service is stopping
                self._settle(key, live, size, ShuttingDown(f"{self.name} batcher is shutting down"))
                return
            running.add_done_callback(functools.partial(self._settle, key, live, size))

    def _settle(self, key: int, batch: list[_Chunk], size: int, outcome: Future[np.ndarray] | Exception | None
                ) -> None:
        """From any thread: the batch leaves `_inflight`; its rows (or error) reach its
        requests on the event loop."""
        with self._cond:
            self._inflight.pop(key, None)
            self._cond.notify_all()  # a stager waiting for the model to finish
        if outcome is not None:
            self._post(self._finish, batch, size, outcome)

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
            loop.call_soon_threadsafe(fn, *args)

    # -- back on the event loop ---------------------------------------------------
    def _finish(self, batch: list[_Chunk], size: int, outcome: Future[np.ndarray] | Exception) -> None:
        if isinstance(outcome, Exception):
            self._fail_batch(batch, size, outcome)
            return
        if outcome.cancelled():
            _fail_all(batch, ShuttingDown(f"{self.name} batcher is shutting down"))
            return
        exc = outcome.exception()
        if isinstance(exc, Exception):
            self._fail_batch(batch, size, exc)
            return
        result = outcome.result()
        if not isinstance(result, np.ndarray) or result.shape[0] != size:
            self._fail_batch(batch, size, InferenceError(f"model returned {getattr(result, 'shape', None)} rows "
                                                         f"for {size}"))
            return
        self._distribute(batch, result)

    def _fail_batch(self, batch: list[_Chunk], size: int, exc: Exception) -> None:
        if not isinstance(exc, ShuttingDown):
            log.error("%s batch of %d failed", self.name, size, exc_info=exc)
        _fail_all(batch, exc if isinstance(exc, ClipsearchError) else InferenceError(f"{self.name} model call failed"))

    @staticmethod
    def _distribute(batch: Sequence[_Chunk], result: np.ndarray) -> None:
        offset = 0
        for chunk in batch:
            job = chunk.job
            rows = result[offset : offset + chunk.rows]
            offset += chunk.rows
            if job.future.done():
                continue
            if job.out is None:
                job.out = np.empty((job.n, result.shape[1]), dtype=result.dtype)
            job.out[chunk.lo : chunk.hi] = rows
            job.done_rows += chunk.rows
            if job.done_rows == job.n:
                job.future.set_result(job.out)


def _slice(payload: Any, lo: int, hi: int) -> Any:
    if lo == 0 and hi == len(payload):
        return payload
    return payload[lo:hi]


def _drop_gone(batch: list[_Chunk], size: int, payload: Any, *, collated: bool,
               failed: AbstractSet[int] = frozenset()) -> tuple[list[_Chunk], int, Any]:
    """Leave out requests that ended (client gone, timed out) while their batch was staged,
    and the chunks at positions `failed` (their collate failed them).

    A collated payload must be indexable by a list of rows (a tensor or an array).
    """
    keep = [i not in failed and not c.job.future.done() for i, c in enumerate(batch)]
    if all(keep):
        return batch, size, payload
    live = [c for c, k in zip(batch, keep, strict=True) if k]
    if not collated:
        return live, sum(c.rows for c in live), [p for p, k in zip(payload, keep, strict=True) if k]
    rows: list[int] = []
    offset = 0
    for c, k in zip(batch, keep, strict=True):
        if k:
            rows.extend(range(offset, offset + c.rows))
        offset += c.rows
    return live, len(rows), payload[rows] if rows else payload


def _fail_all(batch: Sequence[_Chunk], exc: BaseException) -> None:
    for chunk in batch:
        _fail(chunk.job, exc)


def _fail_some(failures: list[tuple[_Job, Exception]]) -> None:
    for job, exc in failures:
        _fail(job, exc)


def _fail(job: _Job, exc: BaseException) -> None:
    if not job.future.done():
        job.future.set_exception(exc)
