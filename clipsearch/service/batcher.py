"""The one request pipeline: every request kind runs the same stages through a dynamic batcher.

A request of `n` items goes through:

1. admission: its items are counted against `max_queue`; over that, `Overloaded` (429);
2. `prepare`, per request, off the event loop: decode and check its items (an error names
   the item). In the prepare thread pool, or, when the stages say it is cheap
   (`prepare_in_batch`), in the batcher's own thread as the batch is formed;
3. greedy batching, as TEI and Triton do: everything waiting, up to `max_batch_size` rows
   (optionally after `max_wait_ms`); a request larger than a batch is split;
4. `collate`, per batch (tokenize all texts, decode all JPEGs in one call), while the
   model still runs the previous batch; it may fail single requests (`Collated`);
5. `forward`, per batch, in the one model thread;
6. `post`, per batch, in the model thread: vectors to the host, or searched where the
   index lives; a result may be a Future when the work goes on elsewhere (FAISS on the CPU).

Steps 2 (in batch) to 4 run in one stager thread per batcher, so the model starts the next
batch the moment it finishes one, whatever the event loop is doing. The event loop only
queues requests and hands results back: a request crosses at most three threads (the
prepare pool when it needs one, the batcher's, the model's) and comes back once.

Every waiter resolves: with its rows, with the batch's error if a stage raises, with
`RequestTimeout` past its deadline, or with `ShuttingDown`. A request whose client went
away (or that timed out) is skipped before its rows reach the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from collections.abc import Set as AbstractSet
from concurrent.futures import Executor, Future, wait
from dataclasses import dataclass
from typing import Any

import numpy as np

from clipsearch.core.errors import (
    ClientGone,
    ClipsearchError,
    InferenceError,
    Overloaded,
    RequestTimeout,
    ShuttingDown,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Collated:
    """What a collate returns when some requests failed on their own: `payload` still has
    rows for every chunk of the batch (placeholders for the failed ones, dropped before the
    model); `failed` maps a chunk's position in the batch to its error."""

    payload: Any
    failed: dict[int, Exception]


def concat_rows(rows: list[Any]) -> Any:
    """The default collate: the chunks' rows as one array, tensor or list."""
    if len(rows) == 1:
        return rows[0]
    first = rows[0]
    if isinstance(first, np.ndarray):
        return np.concatenate(rows)
    if _is_tensor(first):
        import torch

        return torch.cat(rows)
    return [item for r in rows for item in r]


def split_rows(out: Any, chunks: Sequence[tuple[Any, int]]) -> list[Any]:
    """The default post: the forward's output rows, on the host, split by chunk."""
    if _is_tensor(out):
        out = out.cpu().numpy()
    if len(chunks) == 1:
        return [out]
    bounds = np.cumsum([0, *(rows for _, rows in chunks)])
    return [out[lo:hi] for lo, hi in itertools.pairwise(bounds)]


def _is_tensor(x: Any) -> bool:
    """A torch tensor, told without importing torch (a torch-free install has none)."""
    return type(x).__module__.startswith("torch")


def _never(items: Sequence[Any]) -> bool:
    return False


@dataclass(frozen=True)
class Stages:
    """What a request kind runs, stage by stage (infinity's pre / core / post).

    - `prepare(items, field, start)`: per request (or per chunk of a split one), off the
      event loop: the items' rows, sliceable; errors name the item (`field[start + i]`).
      None: the items are their own rows.
    - `prepare_in_batch(items)`: True when `prepare` is cheaper than a hop through the
      prepare pool; it then runs in the batcher's thread, failing its request alone.
    - `collate(rows per chunk)`: per batch, the model's input (or `Collated`).
    - `forward(input)`: per batch, in the model thread.
    - `post(output, [(post, rows) per chunk])`: per batch, in the model thread: one result
      per chunk, an array of its rows or a `Future` of one; `post` is what the request
      was submitted with (a search to run on its vector, say).
    """

    forward: Callable[[Any], Any]
    prepare: Callable[[Sequence[Any], str, int], Any] | None = None
    prepare_in_batch: Callable[[Sequence[Any]], bool] = _never
    collate: Callable[[list[Any]], Any] = concat_rows
    post: Callable[[Any, list[tuple[Any, int]]], list[Any]] = split_rows


@dataclass
class _Job:
    items: Sequence[Any]
    field: str
    post: Any
    n: int
    future: asyncio.Future[np.ndarray]
    offset: int = 0  # where these items start in their request (errors name them by it)
    prepared: Any = None  # rows from the prepare pool; None: prepared in the batch (or not at all)
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
    disconnect watcher (a task awaiting the ASGI `receive`) starts only once the request has
    waited `watch_after` seconds: most requests are answered sooner, and a task per request
    costs a noticeable share of the event loop (docs/benchmarks.md). A client that leaves
    sooner costs at most its rows in one batch.
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
            if self.why == "disconnect":
                raise ClientGone(f"{self.name} request dropped: the client went away") from None
            raise  # the request itself was cancelled (the server is stopping)
        finally:
            self.fut = None

    def close(self) -> None:
        self.timer.cancel()
        if self.watcher is not None and not self.watcher.done():
            self.watcher.cancel()


@dataclass
class BatcherStats:
    """Counters tests and metrics read: model calls made, rows encoded, the largest batch.
    Fixed size: the distribution of batch sizes is the `clipsearch_batch_size` histogram."""

    batches: int = 0
    rows: int = 0
    largest_batch: int = 0


class DynamicBatcher:
    def __init__(
        self,
        name: str,
        stages: Stages,
        *,
        model_executor: Executor,
        prepare_executor: Executor | None = None,
        max_batch_size: int = 64,
        max_wait_ms: float = 0.0,
        max_queue: int = 1024,
        overload_wait_ms: float = 0.0,
        prepare_window: int = 1,
        watch_after_s: float = 0.25,
        on_batch: Callable[[int], None] | None = None,
        on_queue_depth: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self.name = name
        self.stages = stages
        self._model_executor = model_executor
        self._prepare_executor = prepare_executor
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.overload_wait = overload_wait_ms / 1000.0
        self.prepare_window = max(1, prepare_window)  # items of one request in the prepare pool at once
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
        self._room_waiters: deque[tuple[int, asyncio.Future[bool]]] = deque()  # requests waiting for room
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
        items: Sequence[Any],
        *,
        field: str = "items",
        post: Any = None,
        timeout: float,
        disconnected: Callable[[], Awaitable[Any]] | None = None,
        offset: int = 0,
    ) -> Any:
        """Run `items` through the stages and wait for their rows (what `post` made of them).
        `offset`: where the items start in their request, for errors that name one (`field[offset + i]`).

        `disconnected`, if given, is awaited alongside once the request has waited
        `watch_after_s`; when it returns first the request is dropped (its rows never reach
        the model) and `ClientGone` is raised.
        """
        if self._closed or self._loop is None:
            raise ShuttingDown(f"{self.name} batcher is not running")
        n = len(items)
        if n == 0:
            return np.zeros((0, 0), np.float32)
        if self.overload_wait > 0 and (self.pending_rows + n > self.max_queue or self._room_waiters):
            # Wait a little for room first: clients that retry at once on 429 would otherwise
            # spin the event loop (and the GIL) on rejections, starving the batches they wait for.
            await self._wait_for_room(n)
        if self.pending_rows + n > self.max_queue:
            raise Overloaded(
                f"{self.name} queue is full ({self.pending_rows} of {self.max_queue} items waiting)",
                retry_after=1.0,
            )
        loop = asyncio.get_running_loop()
        guard = _Guard(self.name, loop, timeout, disconnected, self.watch_after)
        job = _Job(items, field, post, n, loop.create_future(), offset)
        prepare = self.stages.prepare
        self._reserved_rows += n
        try:
            try:
                if prepare is not None and not self.stages.prepare_in_batch(items):
                    job.prepared = await self._prepare(prepare, items, field, guard, offset)
            finally:
                self._reserved_rows -= n
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

    async def _prepare(self, prepare: Callable[[Sequence[Any], str, int], Any], items: Sequence[Any], field: str,
                       guard: _Guard, offset: int = 0) -> Any:
        """A request's items through the prepare pool, `prepare_window` at a time, one item
        each: requests take turns in the pool (one with many large images cannot hold it for
        the others), and a request that ends (client gone, deadline) stops after the items
        under way."""
        loop = asyncio.get_running_loop()
        parts: list[Any] = []
        for start in range(0, len(items), self.prepare_window):
            calls = [loop.run_in_executor(self._prepare_executor, prepare, items[i : i + 1], field, offset + i)
                     for i in range(start, min(start + self.prepare_window, len(items)))]
            done = await guard.wait(asyncio.gather(*calls, return_exceptions=True), cancel_on_exit=False)
            for part in done:
                if isinstance(part, BaseException):
                    raise part  # the first bad item, in order
                parts.append(part)
        return concat_rows(parts)

    async def _wait_for_room(self, n: int) -> None:
        """In line (first come, first admitted) until `n` rows fit under `max_queue`, or
        `overload_wait` has passed. Only the requests that fit are woken."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bool] = loop.create_future()
        entry = (n, fut)
        self._room_waiters.append(entry)
        timer = loop.call_later(self.overload_wait, _resolve, fut, False)
        try:
            self._wake_waiters()
            await fut
        finally:
            timer.cancel()
            with contextlib.suppress(ValueError):
                self._room_waiters.remove(entry)

    def _wake_waiters(self) -> None:
        """On the loop: admit waiting requests in order while they fit."""
        free = self.max_queue - self.pending_rows
        for n, fut in self._room_waiters:
            if fut.done():
                free -= n if not fut.cancelled() and fut.result() else 0  # woken, about to take its rows
                continue
            if n > free:
                break
            fut.set_result(True)
            free -= n

    def _signal_room(self) -> None:
        """From the stager: rows left the queue; admit requests waiting for room (on the loop)."""
        if self._room_waiters:
            self._post(self._wake_waiters)

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
        self._signal_room()
        return key, batch

    def _await_model_or_full_batch(self, running: Future[Any], generation: int) -> None:
        """While the model runs a batch, leave requests queued, so that the next batch takes
        everything that arrives meanwhile (greedy), unless a full batch is already waiting:
        that one is taken and collated now, overlapping the model. Taking the next batch at
        once instead makes batches ever smaller under load."""
        with self._cond:
            while (not running.done() and self._generation == generation
                   and self._queued_rows < self.max_batch_size):
                self._cond.wait()

    def _rows(self, chunk: _Chunk) -> Any:
        """A chunk's rows: prepared in the pool (sliced), here and now, or its items as they are."""
        job = chunk.job
        whole = chunk.lo == 0 and chunk.hi == job.n
        if job.prepared is not None:
            return job.prepared if whole else job.prepared[chunk.lo : chunk.hi]
        items = job.items if whole else job.items[chunk.lo : chunk.hi]
        prepare = self.stages.prepare
        return items if prepare is None else prepare(items, job.field, job.offset + chunk.lo)

    def _stage(self, batch: list[_Chunk]) -> tuple[Any, dict[int, Exception]]:
        """Prepare (where still to do) and collate a batch; requests that fail alone are
        left out of the collate and reported by position."""
        failed: dict[int, Exception] = {}
        rows: list[Any] = []
        for i, chunk in enumerate(batch):
            try:
                rows.append(self._rows(chunk))
            except ClipsearchError as exc:
                failed[i] = exc
        collated = self.stages.collate(rows) if rows else None
        present = [i for i in range(len(batch)) if i not in failed]
        if isinstance(collated, Collated):
            failed.update({present[j]: exc for j, exc in collated.failed.items()})
            collated = collated.payload
        if len(present) < len(batch):  # rows of requests that failed in prepare were never collated
            collated = _Aligned(collated, present)
        return collated, failed

    def _stager(self, generation: int) -> None:
        """Take a batch, stage it while the model runs the previous one, hand it to the model."""
        running: Future[Any] | None = None
        while True:
            if running is not None:
                self._await_model_or_full_batch(running, generation)
            taken = self._next_batch(generation)
            if taken is None:
                return
            key, batch = taken
            if not batch:
                continue
            try:
                payload, failed = self._stage(batch)
            except Exception as exc:
                with self._cond:
                    self._staged_rows = 0
                self._signal_room()
                self._settle(key, batch, exc)
                continue
            if running is not None:
                wait([running])  # the previous batch; this one is ready behind it
            with self._cond:
                self._staged_rows = 0
                if self._generation != generation:
                    return
            self._signal_room()
            if failed:
                self._post(_fail_some, [(batch[i].job, exc) for i, exc in failed.items()])
            live, payload = _drop_gone(batch, payload, failed.keys())
            if not live:
                self._settle(key, batch, None)
                continue
            size = sum(c.rows for c in live)
            self.stats.batches += 1
            self.stats.rows += size
            self.stats.largest_batch = max(self.stats.largest_batch, size)
            self._on_batch(size)
            chunks = [(c.job.post, c.rows) for c in live]
            try:
                running = self._model_executor.submit(self._run_model, payload, chunks)
            except RuntimeError:  # the executor was shut down: the service is stopping
                self._settle(key, live, ShuttingDown(f"{self.name} batcher is shutting down"))
                return
            running.add_done_callback(functools.partial(self._settle, key, live))

    def _run_model(self, payload: Any, chunks: list[tuple[Any, int]]) -> list[Any]:
        results = self.stages.post(self.stages.forward(payload), chunks)
        if len(results) != len(chunks):
            raise InferenceError(f"{self.name}: {len(results)} results for {len(chunks)} requests")
        return results

    def _settle(self, key: int, batch: list[_Chunk], outcome: Future[list[Any]] | Exception | None) -> None:
        """From any thread: the batch leaves `_inflight`; its results (or error) reach its
        requests on the event loop."""
        with self._cond:
            self._inflight.pop(key, None)
            self._cond.notify_all()  # a stager waiting for the model to finish
        if outcome is not None:
            self._post(self._finish, batch, outcome)

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
            loop.call_soon_threadsafe(fn, *args)

    # -- back on the event loop ---------------------------------------------------
    def _finish(self, batch: list[_Chunk], outcome: Future[list[Any]] | Exception) -> None:
        if isinstance(outcome, Exception):
            self._fail_batch(batch, outcome)
            return
        if outcome.cancelled():
            _fail_all(batch, ShuttingDown(f"{self.name} batcher is shutting down"))
            return
        exc = outcome.exception()
        if isinstance(exc, Exception):
            self._fail_batch(batch, exc)
            return
        for chunk, result in zip(batch, outcome.result(), strict=True):
            if isinstance(result, Future):  # post handed the chunk's work on (a CPU search)
                result.add_done_callback(functools.partial(self._post, self._finish_later, chunk))
                # A request that ends first (client gone, timed out) withdraws that work if not yet begun.
                chunk.job.future.add_done_callback(functools.partial(_withdraw, result))
            else:
                self._deliver(chunk, result)

    def _finish_later(self, chunk: _Chunk, result: Future[Any]) -> None:
        if result.cancelled():  # withdrawn: its request has ended already
            return
        exc = result.exception()
        if exc is not None:
            self._fail_batch([chunk], exc if isinstance(exc, Exception) else InferenceError(str(exc)))
        else:
            self._deliver(chunk, result.result())

    def _fail_batch(self, batch: list[_Chunk], exc: Exception) -> None:
        if not isinstance(exc, ShuttingDown):
            log.error("%s batch of %d rows failed", self.name, sum(c.rows for c in batch), exc_info=exc)
        _fail_all(batch, exc if isinstance(exc, ClipsearchError) else InferenceError(f"{self.name} model call failed"))

    def _deliver(self, chunk: _Chunk, rows: Any) -> None:
        job = chunk.job
        if job.future.done():
            return
        if not isinstance(rows, np.ndarray) or len(rows) != chunk.rows:
            self._fail_batch([chunk], InferenceError(
                f"{self.name}: the model returned {getattr(rows, 'shape', None)} rows for {chunk.rows}"))
            return
        if chunk.rows == job.n:  # the usual case: the whole request in one batch
            job.future.set_result(rows)
            return
        if job.out is None:
            job.out = np.empty((job.n, *rows.shape[1:]), dtype=rows.dtype)
        job.out[chunk.lo : chunk.hi] = rows
        job.done_rows += chunk.rows
        if job.done_rows == job.n:
            job.future.set_result(job.out)


@dataclass(frozen=True)
class _Aligned:
    """A collated payload missing the rows of chunks that failed in prepare: `present` are
    the batch positions whose rows it holds, in order (what `_drop_gone` needs)."""

    payload: Any
    present: list[int]


def _drop_gone(batch: list[_Chunk], payload: Any, failed: AbstractSet[int]) -> tuple[list[_Chunk], Any]:
    """Leave out requests that ended (client gone, timed out) while their batch was staged,
    and those at positions `failed`. The collated payload is indexed by a list of rows
    (a tensor, an array or a list)."""
    present = list(range(len(batch)))
    if isinstance(payload, _Aligned):
        present, payload = payload.present, payload.payload
    keep = {i for i in present if i not in failed and not batch[i].job.future.done()}
    if len(keep) == len(present) and not failed:
        return batch, payload
    live = [batch[i] for i in present if i in keep]
    if not live:
        return [], payload
    rows: list[int] = []
    offset = 0
    for i in present:
        if i in keep:
            rows.extend(range(offset, offset + batch[i].rows))
        offset += batch[i].rows
    if offset == len(rows):
        return live, payload
    if isinstance(payload, list):
        return live, [payload[r] for r in rows]
    return live, payload[rows]


def _resolve(fut: asyncio.Future[bool], value: bool) -> None:
    if not fut.done():
        fut.set_result(value)


def _withdraw(work: Future[Any], _: object) -> None:
    work.cancel()


def _fail_all(batch: Sequence[_Chunk], exc: BaseException) -> None:
    for chunk in batch:
        _fail(chunk.job, exc)


def _fail_some(failures: list[tuple[_Job, Exception]]) -> None:
    for job, exc in failures:
        _fail(job, exc)


def _fail(job: _Job, exc: BaseException) -> None:
    if not job.future.done():
        job.future.set_exception(exc)
