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
   of JPEGs with nvJPEG) in the thread pool, while the model still runs the previous
   batch: one thread hop per batch instead of one per request. A collate may fail
   single requests (a bad image) without failing their batch-mates (`Collated`);
6. `infer` in the model executor, off the event loop; its result rows go back to each
   request in order. The next batch is taken and collated while this one runs.

Every waiter resolves: with its rows, with the batch's error if `collate` or `infer`
raises, with `RequestTimeout` past its deadline, or with `ShuttingDown`. A request whose
client went away (or that timed out) is skipped before its rows reach the model.
A client that leaves is noticed once its request has waited `watch_after_s` (see
`_Guard`): watching every request from its start would cost more than it saves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
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
    (bench/NOTES.md). A client that leaves sooner costs at most its rows in one batch.
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
        watch_after_s: float = 0.05,
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
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._running: asyncio.Task[None] | None = None  # the batch in the model
        self._closed = False
        self.stats = BatcherStats()

    # -- lifecycle ----------------------------------------------------------------
    async def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._closed = False
        self._task = asyncio.create_task(self._loop(), name=f"batcher-{self.name}")

    async def stop(self) -> None:
        """Stop batching; every request still queued gets `ShuttingDown`."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._running is not None:
            self._running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._running
            self._running = None
        while self._queue:
            chunk = self._queue.popleft()
            _fail(chunk.job, ShuttingDown(f"{self.name} batcher is shutting down"))
        self._queued_rows = 0
        self._on_queue_depth(0)

    @property
    def pending_rows(self) -> int:
        """Rows admitted and not yet in the model: what `max_queue` bounds."""
        return self._queued_rows + self._reserved_rows + self._staged_rows

    # -- the request side ---------------------------------------------------------
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
        if self._closed or self._task is None or self._wakeup is None:
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
            if self._closed:
                raise ShuttingDown(f"{self.name} batcher is shutting down")
            job = _Job(payload=payload, n=n, future=loop.create_future())
            self._queue.append(_Chunk(job, 0, n))
            self._queued_rows += n
            self._on_queue_depth(self._queued_rows)
            self._wakeup.set()
            return await guard.wait(job.future, cancel_on_exit=True)
        finally:
            guard.close()

    # -- the model side -----------------------------------------------------------
    def _take_batch(self) -> list[_Chunk]:
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
        self._on_queue_depth(self._queued_rows)
        return batch

    async def _loop(self) -> None:
        wakeup = self._wakeup
        if wakeup is None:  # start() sets it before creating this task
            return
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                wakeup.clear()
                await wakeup.wait()
            if self.max_wait > 0 and self._queued_rows < self.max_batch_size:
                await asyncio.sleep(self.max_wait)
            if self._running is not None and self._collate is None:
                # Nothing to overlap: leave requests queued until the model is free, so the
                # batch takes everything that arrived meanwhile (greedy).
                await asyncio.wait([self._running])
            batch = self._take_batch()
            if not batch:
                continue
            size = sum(c.rows for c in batch)
            payloads = [_slice(c.job.payload, c.lo, c.hi) for c in batch]
            self._staged_rows = size
            try:
                ok, payload = await self._guarded(batch, size, self._stage(loop, payloads))
            finally:
                self._staged_rows = 0
            if not ok:
                continue
            if isinstance(payload, Collated):
                for i, exc in payload.failed.items():
                    _fail(batch[i].job, exc)
                payload = payload.payload
            batch, size, payload = _drop_gone(batch, size, payload, collated=self._collate is not None)
            if not batch:
                continue
            self._running = asyncio.create_task(self._run(batch, size, payload), name=f"batch-{self.name}")

    async def _stage(self, loop: asyncio.AbstractEventLoop, payloads: list[Any]) -> Any:
        """Collate the batch (overlapping the batch in the model, if any), then wait for the model."""
        payload = payloads
        if self._collate is not None:
            payload = await loop.run_in_executor(self._prepare_executor, self._collate, payloads)
        if self._running is not None:
            await asyncio.wait([self._running])
        return payload

    async def _run(self, batch: list[_Chunk], size: int, payload: Any) -> None:
        """One model call; its rows (or its error) go to every request in the batch."""
        self.stats.batches += 1
        self.stats.rows += size
        self.stats.batch_sizes.append(size)
        self._on_batch(size)
        loop = asyncio.get_running_loop()
        ok, result = await self._guarded(batch, size, loop.run_in_executor(self._model_executor, self._infer, payload))
        if not ok:
            return
        if not isinstance(result, np.ndarray) or result.shape[0] != size:
            self._fail_batch(batch, size, InferenceError(f"model returned {getattr(result, 'shape', None)} rows "
                                                         f"for {size}"))
            return
        self._distribute(batch, result)

    async def _guarded(self, batch: list[_Chunk], size: int, step: Awaitable[Any]) -> tuple[bool, Any]:
        """Await one step of a batch; if it fails, every request in the batch gets the error
        (`ShuttingDown` when the batcher is being stopped) and (False, None) comes back."""
        try:
            return True, await step
        except asyncio.CancelledError:
            _fail_all(batch, ShuttingDown(f"{self.name} batcher is shutting down"))
            raise
        except Exception as exc:
            self._fail_batch(batch, size, exc)
            return False, None

    def _fail_batch(self, batch: list[_Chunk], size: int, exc: Exception) -> None:
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


def _drop_gone(batch: list[_Chunk], size: int, payload: Any, *, collated: bool) -> tuple[list[_Chunk], int, Any]:
    """Leave out requests that ended (client gone, timed out) while their batch was staged.

    A collated payload must be indexable by a list of rows (a tensor or an array).
    """
    keep = [not c.job.future.done() for c in batch]
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


def _fail(job: _Job, exc: BaseException) -> None:
    if not job.future.done():
        job.future.set_exception(exc)
