"""Dynamic batching: coalesce concurrent requests into model batches, per servable replica.

A `Batcher` owns one bounded FIFO queue and one consumer task on the event loop. Callers
`await submit(item, rows, deadline)`; the consumer flushes a batch when the queued rows reach
`max_batch_rows` or the oldest item has waited `max_delay_s`, calls the synchronous
`run_batch(items)` on its executor thread (one worker per replica, so the event loop never
blocks and the model never runs two batches at once), checks that it returned one result
per item, and resolves each caller's future with its own result. In the manner of Ray
Serve's `@serve.batch`, plus what it lacks:

- **Rows, not requests.** Each item declares how many model rows it is (a Rank query with
  500 candidates is 500 rows); batches and the queue bound count rows.
- **Bounded queue.** When `max_queue_rows` would be exceeded, `submit` raises `Overloaded`
  at once (RESOURCE_EXHAUSTED) instead of queueing without bound.
- **Deadlines.** An item whose deadline passed before its batch starts is dropped and its
  caller gets `DeadlineExceeded`; the model never sees it.
- **Failure isolation.** An exception from `run_batch` (or a wrong number of results)
  fails every item of that batch and nothing else; the batcher keeps serving.
- **Cancellation.** A caller cancelled while waiting (the client went away) takes its item
  out of the queue if its batch has not started; a started batch runs to the end and that
  result is discarded.
- **Draining.** `close()` refuses new work (`Unavailable`); `drain()` also flushes what is
  queued without waiting for the delay and returns once the last batch has finished.

Items larger than `max_batch_rows` are split by the caller, not by the batcher, because
only the caller knows how to cut its item and glue the results back (a Rank request is cut
along its candidate list, a Retrieve request along its queries): `split_rows` gives the row
slices and `submit_split` queues all parts at once, all-or-nothing, and returns the
parts' results in order for the caller to concatenate. Parts of one request may share a
batch with other requests and, through a `ReplicaPool`, run on several replicas at once.

`ReplicaPool` spreads work over N replicas of one servable (one `Batcher` each, each with
its own executor thread and model copy), sending every submission to the replica with the
fewest queued plus running rows.

Threading: every method must be called on the event loop thread that first submitted (the
batcher binds to it). `run_batch` runs on the executor, one batch at a time per batcher,
so a model object used by only one batcher needs no lock. The observer is called on the
event loop.

Example::

    batcher = Batcher(model.rank_many, max_batch_rows=512, max_delay_s=0.002,
                      max_queue_rows=8192, name="movies/rank")
    deadline = time.monotonic() + context.time_remaining()
    scores = await batcher.submit(query, rows=len(query.candidates), deadline=deadline)
    await batcher.drain()
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from recship.base.errors import DeadlineExceeded, InvalidInput, Overloaded, Unavailable

Item = TypeVar("Item")
Result = TypeVar("Result")

#: Default model rows per batch: ~40 Recommend requests of 100 candidates each. 256 held two,
#: which capped throughput at concurrency 64 on the ranking queue (see benchmarks/README.md).
DEFAULT_MAX_BATCH_ROWS = 4096
#: Default rows waiting per replica and model: eight full batches.
DEFAULT_MAX_QUEUE_ROWS = 8 * DEFAULT_MAX_BATCH_ROWS
#: Default longest wait of the oldest queued item for its batch to fill: none. A batch runs as
#: soon as the replica is free and still forms from what queues while it is busy; measured on
#: ML-100K with 2 CPU cores, 2 ms made concurrency-1 throughput 3.6x worse than unbatched.
DEFAULT_MAX_DELAY_S = 0.0


class BatchObserver(Protocol):
    """Receives a batcher's measurements (see `recship.runtime.metrics.ModelBatchMetrics`).

    Called on the event loop thread; implementations must be cheap and must not block.
    """

    def observe_batch(self, rows: int, items: int) -> None:
        """A batch of `rows` rows from `items` items is about to run."""

    def observe_queue_wait(self, seconds: float) -> None:
        """One item waited `seconds` between submission and the start of its batch."""

    def add_queue_rows(self, delta: int) -> None:
        """The rows waiting in the queue changed by `delta` (negative when rows leave)."""


def split_rows(total_rows: int, max_rows: int) -> list[slice]:
    """Cuts `total_rows` rows into consecutive slices of at most `max_rows` rows.

    Use it to submit an item bigger than a batcher's `max_batch_rows` as several parts
    (see `Batcher.submit_split`); every slice but the last has exactly `max_rows` rows.

    Example::

        split_rows(10, 4)  # [slice(0, 4), slice(4, 8), slice(8, 10)]

    Raises:
        ValueError: `total_rows` or `max_rows` is < 1.
    """
    if total_rows < 1 or max_rows < 1:
        raise ValueError(f"split_rows needs total_rows >= 1 and max_rows >= 1, got "
                         f"{total_rows} and {max_rows}")  # fmt: skip
    return [slice(lo, min(lo + max_rows, total_rows)) for lo in range(0, total_rows, max_rows)]


@dataclass(eq=False, slots=True)
class _Pending(Generic[Item, Result]):
    """One queued item and the future its caller awaits."""

    item: Item
    rows: int
    deadline: float | None
    enqueued_at: float
    future: asyncio.Future[Result]
    queued: bool = True


def _enqueue_parts(
    pick: Callable[[int], Batcher[Item, Result]],
    max_batch_rows: int,
    total_rows: int,
    make_part: Callable[[slice], Item],
    deadline: float | None,
) -> list[asyncio.Future[Result]]:
    """Queues every part (synchronously, no await) on the batcher `pick(rows)` chooses.

    If a part cannot be queued (no room, deadline passed, `make_part` raised), the parts
    already queued are withdrawn and the error is raised: all or nothing.
    """
    futures: list[asyncio.Future[Result]] = []
    try:
        for part in split_rows(total_rows, max_batch_rows):
            rows = part.stop - part.start
            futures.append(pick(rows)._enqueue(make_part(part), rows, deadline))
    except BaseException:
        for future in futures:
            future.cancel()
        raise
    return futures


async def _gather_parts(futures: list[asyncio.Future[Result]]) -> list[Result]:
    # If one part fails or the caller is cancelled, withdraw the parts still queued.
    if len(futures) == 1:
        # Most requests are one part: awaiting its future directly spares a gather future
        # (cancelling the caller cancels the future, which withdraws it, as below).
        return [await futures[0]]
    try:
        return list(await asyncio.gather(*futures))
    except BaseException:
        for future in futures:
            future.cancel()
        raise


class Batcher(Generic[Item, Result]):
    """A bounded, deadline-aware dynamic batcher in front of one synchronous model replica."""

    def __init__(
        self,
        run_batch: Callable[[list[Item]], Sequence[Result]],
        *,
        max_batch_rows: int,
        max_delay_s: float,
        max_queue_rows: int,
        max_batch_items: int | None = None,
        executor: concurrent.futures.Executor | None = None,
        name: str = "batcher",
        observer: BatchObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Creates an idle batcher; its consumer task starts with the first `submit`.

        Args:
            run_batch: computes one result per item, in order; runs on `executor`. May
                raise: the exception goes to every caller of that batch.
            max_batch_rows: most rows in one batch; also the largest item accepted.
            max_delay_s: longest time the oldest queued item waits for a batch to fill;
                0 flushes whatever is queued as soon as the replica is free.
            max_queue_rows: most rows waiting (not counting the running batch); must be at
                least `max_batch_rows`.
            max_batch_items: most items in one batch, or None for no limit besides rows;
                1 turns batching off (for comparisons).
            executor: where `run_batch` runs. None creates a one-thread executor that the
                batcher owns and shuts down in `drain()`; a given one stays the caller's.
            name: names the batcher in errors, logs and thread names (e.g. "movies/v3/rank/0").
            observer: receives batch sizes, queue waits and queue depth changes, or None.
            clock: monotonic seconds; deadlines are on this clock (tests may pass a fake).

        Raises:
            InvalidInput: a size or delay is out of range; the message names the parameter.
        """
        if max_batch_rows < 1:
            raise InvalidInput(f"{name}: max_batch_rows must be >= 1, got {max_batch_rows}")
        if max_delay_s < 0:
            raise InvalidInput(f"{name}: max_delay_s must be >= 0, got {max_delay_s}")
        if max_queue_rows < max_batch_rows:
            raise InvalidInput(
                f"{name}: max_queue_rows ({max_queue_rows}) must be >= max_batch_rows "
                f"({max_batch_rows}), or a full-size request could never be queued"
            )
        if max_batch_items is not None and max_batch_items < 1:
            raise InvalidInput(f"{name}: max_batch_items must be >= 1, got {max_batch_items}")
        self.name = name
        self.max_batch_rows = max_batch_rows
        self.max_queue_rows = max_queue_rows
        self._run_batch = run_batch
        self._max_delay_s = max_delay_s
        self._max_batch_items = max_batch_items
        self._owns_executor = executor is None
        self._executor = executor or concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"batcher-{name}"
        )
        self._observer = observer
        self._clock = clock
        self._queue: collections.deque[_Pending[Item, Result]] = collections.deque()
        self._queued_rows = 0
        self._running: list[_Pending[Item, Result]] = []
        self._running_rows = 0
        self._closed = False
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def queued_rows(self) -> int:
        """Rows waiting for a batch (the number the queue bound applies to)."""
        return self._queued_rows

    @property
    def load_rows(self) -> int:
        """Rows waiting plus rows in the running batch: how busy this replica is."""
        return self._queued_rows + self._running_rows

    @property
    def closed(self) -> bool:
        """True once `close()` or `drain()` was called; new work is refused."""
        return self._closed

    def has_room(self, rows: int) -> bool:
        """Whether `rows` more rows fit in the queue now."""
        return self._queued_rows + rows <= self.max_queue_rows

    async def submit(self, item: Item, rows: int, deadline: float | None = None) -> Result:
        """Queues one item and waits for its result.

        Args:
            item: the work; passed to `run_batch` in a list with other callers' items.
            rows: model rows the item counts for, 1 ..= `max_batch_rows` (split bigger ones
                with `submit_split`).
            deadline: absolute time on the batcher's clock (`time.monotonic()` by default)
                after which the result is useless, or None.

        Returns:
            The item's own result from `run_batch`.

        Raises:
            Overloaded: the queue has no room for `rows` more rows (raised before waiting).
            DeadlineExceeded: the deadline passed before the item's batch started.
            Unavailable: the batcher is closed or stopped.
            ValueError: `rows` is out of range (a bug in the caller).
            Exception: whatever `run_batch` raised for this item's batch.
        """
        return await self._enqueue(item, rows, deadline)

    async def submit_split(
        self,
        total_rows: int,
        make_part: Callable[[slice], Item],
        deadline: float | None = None,
    ) -> list[Result]:
        """Submits an item of any size as parts of at most `max_batch_rows` rows.

        All parts are admitted together or not at all; if one part fails, the others are
        withdrawn and the failure is raised.

        Args:
            total_rows: rows of the whole item.
            make_part: builds the item for one row slice from `split_rows`.
            deadline: as in `submit`, shared by all parts.

        Returns:
            The parts' results, in row order (concatenate them to get the whole result).

        Raises:
            InvalidInput: `total_rows` is more than the whole queue can ever hold.
            Overloaded, DeadlineExceeded, Unavailable, Exception: as in `submit`.
        """
        if total_rows > self.max_queue_rows:
            raise InvalidInput(
                f"{self.name}: a request of {total_rows} rows exceeds the queue bound of "
                f"{self.max_queue_rows} rows; send it in smaller requests"
            )
        self._check_admission(total_rows)
        return await _gather_parts(
            _enqueue_parts(lambda rows: self, self.max_batch_rows, total_rows, make_part, deadline)
        )

    def close(self) -> None:
        """Refuses new work from now on; queued work still runs, without waiting the delay."""
        self._closed = True
        self._wake.set()

    async def drain(self) -> None:
        """Closes, waits until every queued and running item is finished, then stops.

        An owned executor is shut down afterwards. Cancelling the caller of `drain` does not
        cancel the queued work.
        """
        self.close()
        if self._task is not None:
            await asyncio.wait([self._task])  # waits without cancelling it or raising its end
        if self._owns_executor:
            self._executor.shutdown(wait=False)

    def _check_admission(self, rows: int) -> None:
        if self._closed:
            raise Unavailable(f"{self.name} is shutting down and takes no new requests")
        if not self.has_room(rows):
            raise Overloaded(
                f"{self.name}: queue full ({self._queued_rows} of {self.max_queue_rows} rows "
                f"waiting, this request needs {rows}); retry later"
            )

    def _enqueue(self, item: Item, rows: int, deadline: float | None) -> asyncio.Future[Result]:
        """Admits one item synchronously (no await) and returns the future of its result."""
        if not 1 <= rows <= self.max_batch_rows:
            raise ValueError(
                f"{self.name}: an item must count 1 to {self.max_batch_rows} rows, got {rows}; "
                "split bigger ones with submit_split"
            )
        self._check_admission(rows)
        now = self._clock()
        if deadline is not None and deadline <= now:
            raise DeadlineExceeded(f"{self.name}: the deadline passed before the request queued")
        loop = asyncio.get_running_loop()
        if self._task is None:
            self._task = loop.create_task(self._consume(), name=f"batcher-{self.name}")
        elif self._task.get_loop() is not loop:
            raise RuntimeError(f"{self.name} is bound to another event loop")
        future: asyncio.Future[Result] = loop.create_future()
        pending = _Pending(item, rows, deadline, now, future)
        future.add_done_callback(lambda _: self._withdraw(pending))
        self._queue.append(pending)
        self._queued_rows += rows
        if self._observer is not None:
            self._observer.add_queue_rows(rows)
        self._wake.set()
        return future

    def _withdraw(self, pending: _Pending[Item, Result]) -> None:
        # Done callback of every future: removes a still-queued item whose caller cancelled.
        if pending.queued:
            self._queue.remove(pending)
            self._dequeued(pending)

    def _dequeued(self, pending: _Pending[Item, Result]) -> None:
        pending.queued = False
        self._queued_rows -= pending.rows
        if self._observer is not None:
            self._observer.add_queue_rows(-pending.rows)

    def _flush_due(self) -> bool:
        return (
            self._closed
            or self._queued_rows >= self.max_batch_rows
            or (self._max_batch_items is not None and len(self._queue) >= self._max_batch_items)
            or self._clock() - self._queue[0].enqueued_at >= self._max_delay_s
        )

    async def _consume(self) -> None:
        try:
            while True:
                if not self._queue:
                    if self._closed:
                        return
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                if not self._flush_due():
                    # Sleep until the oldest item's delay is up, unless something arrives.
                    self._wake.clear()
                    timeout = self._queue[0].enqueued_at + self._max_delay_s - self._clock()
                    try:
                        await asyncio.wait_for(self._wake.wait(), timeout)
                        continue
                    except TimeoutError:
                        pass
                batch = self._take_batch()
                if batch:
                    await self._execute(batch)
        finally:
            # Only reached early if the task is cancelled (event loop shutdown) or on a bug:
            # never leave a caller waiting forever.
            self._closed = True
            stopped = Unavailable(f"{self.name} stopped")
            for pending in [*self._running, *self._queue]:
                if not pending.future.done():
                    pending.future.set_exception(stopped)

    def _take_batch(self) -> list[_Pending[Item, Result]]:
        """Pops the next batch in FIFO order, dropping items cancelled or past deadline."""
        now = self._clock()
        batch: list[_Pending[Item, Result]] = []
        rows = 0
        while self._queue:
            pending = self._queue[0]
            full = rows + pending.rows > self.max_batch_rows or (
                self._max_batch_items is not None and len(batch) >= self._max_batch_items
            )
            if batch and full and not pending.future.done():
                break
            self._queue.popleft()
            self._dequeued(pending)
            if pending.future.done():
                continue  # cancelled by its caller; its done callback has not run yet
            if pending.deadline is not None and pending.deadline <= now:
                pending.future.set_exception(
                    DeadlineExceeded(f"{self.name}: the deadline passed while queued")
                )
                continue
            batch.append(pending)
            rows += pending.rows
        return batch

    async def _execute(self, batch: list[_Pending[Item, Result]]) -> None:
        rows = sum(p.rows for p in batch)
        if self._observer is not None:
            self._observer.observe_batch(rows, len(batch))
            now = self._clock()
            for pending in batch:
                self._observer.observe_queue_wait(now - pending.enqueued_at)
        self._running, self._running_rows = batch, rows
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(
                self._executor, self._run_batch, [p.item for p in batch]
            )
            if len(results) != len(batch):
                raise RuntimeError(
                    f"{self.name}: run_batch returned {len(results)} results for {len(batch)} items"
                )
        except Exception as error:
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(error)
        else:
            for pending, result in zip(batch, results, strict=True):
                if not pending.future.done():
                    pending.future.set_result(result)
        # Not in a `finally`: if the consumer is cancelled mid-batch, `_consume` must still
        # see the running items to fail them.
        self._running, self._running_rows = [], 0


class ReplicaPool(Generic[Item, Result]):
    """N replicas of one servable, each a `Batcher`; work goes to the least loaded one.

    "Load" is `Batcher.load_rows` (queued plus running rows); ties rotate, so idle replicas
    take turns. Each replica should have its own one-thread executor and its own model copy
    (on its own device), so replicas compute in parallel. Same threading rules as `Batcher`.
    """

    def __init__(self, replicas: Sequence[Batcher[Item, Result]]) -> None:
        """Args: replicas: one batcher per replica, all with the same `max_batch_rows`.

        Raises:
            ValueError: no replicas, or different `max_batch_rows` (a bug in the caller).
        """
        if not replicas:
            raise ValueError("ReplicaPool needs at least one replica")
        sizes = {r.max_batch_rows for r in replicas}
        if len(sizes) != 1:
            raise ValueError(f"replicas must share max_batch_rows, got {sorted(sizes)}")
        self.replicas: tuple[Batcher[Item, Result], ...] = tuple(replicas)
        self.max_batch_rows = sizes.pop()
        self._turn = itertools.cycle(range(len(self.replicas)))

    @property
    def queued_rows(self) -> int:
        """Rows waiting over all replicas."""
        return sum(r.queued_rows for r in self.replicas)

    def pick(self, rows: int) -> Batcher[Item, Result]:
        """The open replica with room for `rows` rows and the least load.

        Raises:
            Overloaded: every replica's queue is full.
            Unavailable: every replica is closed.
        """
        start = next(self._turn)
        order = self.replicas[start:] + self.replicas[:start]
        open_ = [r for r in order if not r.closed]
        if not open_:
            raise Unavailable(f"{self.replicas[0].name}: every replica is shutting down")
        fitting = [r for r in open_ if r.has_room(rows)]
        if not fitting:
            raise Overloaded(
                f"{self.replicas[0].name}: all {len(open_)} replica queues are full "
                f"({self.queued_rows} rows waiting, this request needs {rows}); retry later"
            )
        return min(fitting, key=lambda r: r.load_rows)

    async def submit(self, item: Item, rows: int, deadline: float | None = None) -> Result:
        """`Batcher.submit` on the least loaded replica."""
        return await self.pick(rows).submit(item, rows, deadline)

    async def submit_split(
        self,
        total_rows: int,
        make_part: Callable[[slice], Item],
        deadline: float | None = None,
    ) -> list[Result]:
        """`Batcher.submit_split` with each part on the replica least loaded at that moment.

        Parts of one big request therefore run on several replicas in parallel. Admission is
        all-or-nothing: if a part finds no room, the parts already queued are withdrawn.
        """
        capacity = sum(r.max_queue_rows for r in self.replicas)
        if total_rows > capacity:
            raise InvalidInput(
                f"{self.replicas[0].name}: a request of {total_rows} rows exceeds the "
                f"queue bound of {capacity} rows; send it in smaller requests"
            )
        return await _gather_parts(
            _enqueue_parts(self.pick, self.max_batch_rows, total_rows, make_part, deadline)
        )

    def add(self, replica: Batcher[Item, Result]) -> None:
        """Adds a replica; it takes work from the next `pick` on (event loop only).

        Raises:
            ValueError: its `max_batch_rows` differs from the pool's (a bug in the caller).
        """
        if replica.max_batch_rows != self.max_batch_rows:
            raise ValueError(
                f"replicas must share max_batch_rows, got {replica.max_batch_rows} "
                f"for a pool of {self.max_batch_rows}"
            )
        self.replicas = (*self.replicas, replica)
        self._turn = itertools.cycle(range(len(self.replicas)))

    def remove(self, replica: Batcher[Item, Result]) -> None:
        """Takes a replica out of the pool; no new work goes to it (event loop only).

        Work already queued on it is the caller's to finish (`replica.drain()`): the callers
        of that work hold their futures, so nothing is lost.

        Raises:
            ValueError: the replica is not in the pool, or it is the last one.
        """
        if replica not in self.replicas:
            raise ValueError(f"{replica.name} is not in this pool")
        if len(self.replicas) == 1:
            raise ValueError(f"{replica.name} is the pool's last replica")
        self.replicas = tuple(r for r in self.replicas if r is not replica)
        self._turn = itertools.cycle(range(len(self.replicas)))

    def close(self) -> None:
        """Closes every replica."""
        for replica in self.replicas:
            replica.close()

    async def drain(self) -> None:
        """Drains every replica concurrently."""
        await asyncio.gather(*(r.drain() for r in self.replicas))
