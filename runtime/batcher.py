"""Dynamic batching by cost: coalesce requests into model batches, per servable replica.

A `Batcher` owns one queue and one consumer task on the event loop, in front of one model
replica. Callers `await submit_split(rows, make_part, deadline, row_costs=...)` (or `submit`
for an item that cannot be cut); the consumer forms a batch when the replica is free (or the
oldest request has waited `max_delay_s`), calls the synchronous `run_batch(items)` on its
executor thread, checks that it returned one result per item and hands each caller its own.
In the manner of Ray Serve's `@serve.batch`, plus what it lacks:

- **Cost, not requests.** Each row of a request has a cost, what the model computes for it:
  the ids it looks up (a ranking row: its query's ids plus its item's ids over every
  feature; a retrieval row: its query's ids) plus a weight per row, at least 1. A batch holds
  at most `max_batch_rows` rows and `max_batch_cost` cost; the queue at most
  `max_queue_rows` and `max_queue_cost`.
- **Bounded slices.** A *long* request (more than one batch) runs as slices of at most one
  batch, one at a time, each built (`make_part`) only when it runs: no request holds the
  replica for more than one batch while another waits, and only one slice of it is in
  memory. Long requests run one after the other; *short* ones (one batch at most) take
  turns with the long one's slices, so a short request waits for at most the slice running
  when it arrives. While nothing else waits, a long request's slices run back to back on the
  executor thread (a *streak*), without a trip through the event loop between them.
- **Fair order.** Within each kind, requests are served in start-time fair queueing order
  (SFQ) by client key (a connection, or a declared client id): a client's tag advances by
  the cost it queues, so one client flooding the queue does not push other clients' requests
  behind its backlog; within a client the order is FIFO.
- **Admission at enqueue time.** A request is refused at once (`Overloaded`, i.e.
  RESOURCE_EXHAUSTED) when the queue bounds would be exceeded, when one client would hold
  more than its share of a contended queue, or when it would not finish before its deadline:
  the work ahead of it (in the order above) plus its own, divided by the replica's measured
  service rate (`ServiceRate`, cost per second), times `admission_headroom`. Accepted
  requests therefore still meet their deadlines, and the replica's time goes to them, not to
  work nobody will wait for. An idle replica admits whatever fits (that measures the rate),
  and so does one that has measured small batches only, for a long request: the rate of
  tiny batches (their fixed overhead included) says little about full ones; the long
  request's first slices measure it, and it stops between slices if it cannot finish.
- **Deadlines and cancellation.** A request whose deadline passes (a margin before it, so the
  server answers DEADLINE_EXCEEDED itself instead of the transport cancelling the call), or
  whose caller cancels (the awaiting task is cancelled, or its `cancelled()` signal turns
  true), leaves the queue at once; a slice already running finishes and is discarded, and
  no further slice of it is computed. Between slices a long request also stops when, at the
  measured rate, its remainder could not be done before its deadline.
- **Failure isolation.** An exception from `run_batch` (or a wrong number of results) fails the
  requests of that batch and nothing else; the batcher keeps serving.
- **Draining.** `close()` refuses new work (`Unavailable`); `drain()` also runs what is queued
  without waiting for the delay and returns once the last batch has finished.

`ReplicaPool` spreads work over N replicas of one servable (one `Batcher` each, with its own
executor thread and model copy), sending each request to the replica that should finish it
first. `Lane` groups the batchers that share one executor thread (a replica's retrieval and
ranking batchers), so that each one's wait estimate counts the other's queued work and a
streak yields to the other's waiting work.

Threading: every method must be called on the event loop thread that first submitted (the
batcher binds to it). `run_batch` runs on the executor, one batch at a time per batcher, so
a model object used by only one batcher needs no lock. `make_part` is called on the event
loop, or on the executor thread during a streak: it must only read the request's arrays
(slicing them is the intended use). The observer is called on the event loop.

Example::

    batcher = Batcher(model.rank_many, max_batch_rows=4096, max_batch_cost=262144,
                      max_delay_s=0.0, max_queue_rows=32768, max_queue_cost=1 << 24,
                      name="movies/rank")
    deadline = time.monotonic() + context.time_remaining()
    parts = await batcher.submit_split(len(rows), lambda s: rows[s], deadline,
                                       row_costs=ids_per_row + 32, client=peer)
    await batcher.drain()
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import heapq
import itertools
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

import numpy as np

from recship.base.errors import DeadlineExceeded, InvalidInput, Overloaded, Unavailable

Item = TypeVar("Item")
Result = TypeVar("Result")

#: Default model rows per batch: ~40 Recommend requests of 100 candidates each. 256 held two,
#: which capped throughput at concurrency 64 on the ranking queue (see benchmarks/README.md).
DEFAULT_MAX_BATCH_ROWS = 4096
#: Default rows waiting per replica and model: eight full batches.
DEFAULT_MAX_QUEUE_ROWS = 8 * DEFAULT_MAX_BATCH_ROWS
#: Default cost per batch, which is also the longest slice one request may hold a replica
#: for. Cost units are ids looked up plus a per-row weight (`servable.DEFAULT_ROW_COST`):
#: the test bundle computes ~80-200 M units per second on one CPU thread (a full batch takes
#: 1-3 ms); a 26-table int8 DLRM of 64-dim tables (~12 ms for 512 rows) ~2.5 M (~100 ms).
DEFAULT_MAX_BATCH_COST = 262144
#: Default cost waiting per replica and model: 64 full batches. Requests with deadlines are
#: refused long before this by the expected wait; the bound holds those without one.
DEFAULT_MAX_QUEUE_COST = 64 * DEFAULT_MAX_BATCH_COST
#: Default longest wait of the oldest queued item for its batch to fill: none. A batch runs as
#: soon as the replica is free and still forms from what queues while it is busy; measured on
#: ML-100K with 2 CPU cores, 2 ms made concurrency-1 throughput 3.6x worse than unbatched.
DEFAULT_MAX_DELAY_S = 0.0
#: A request is given up this long before its deadline, so that the server's own
#: DEADLINE_EXCEEDED reaches the caller before the transport cancels the call at the deadline.
DEFAULT_DEADLINE_MARGIN_S = 0.002
#: Admission counts the expected wait this much longer than estimated: the rate varies from
#: batch to batch (other processes, the event loop's share of the CPU), and an admitted
#: request that misses its deadline wastes the work done for it. A queue still holds most of
#: a deadline's worth of work, so the replica stays busy.
DEFAULT_ADMISSION_HEADROOM = 1.5
#: Weight of the newest batch in the service-rate EWMA.
RATE_SMOOTHING = 0.2
#: Above this many backlogged clients the fair-order estimate uses a bound, not a sum.
_EXACT_CLIENTS = 32

# Request states: in a fair queue; a slice running; between slices (the current long one); done.
_QUEUED, _RUNNING, _HELD, _DONE = 0, 1, 2, 3


class BatchObserver(Protocol):
    """Receives a batcher's measurements (see `recship.runtime.metrics.ModelBatchMetrics`).

    Called on the event loop thread; implementations must be cheap and must not block.
    """

    def observe_batch(self, rows: int, items: int, cost: int, seconds: float) -> None:
        """A batch of `rows` rows and `cost` cost from `items` items ran in `seconds`."""

    def observe_queue_wait(self, seconds: float) -> None:
        """One item waited `seconds` between submission and the start of its first batch."""

    def add_queue(self, rows: int, cost: int) -> None:
        """The rows and cost waiting in the queue changed by these deltas (negative: left)."""

    def observe_refused(self, reason: str) -> None:
        """A request was refused at admission: "queue_full", "client_share" or "deadline"."""

    def observe_dropped(self, reason: str) -> None:
        """Queued work left without being computed: "deadline" or "cancelled"."""

    def observe_service_rate(self, cost_per_second: float) -> None:
        """The replica's measured service rate (EWMA), after each batch."""


def split_rows(total_rows: int, max_rows: int) -> list[slice]:
    """Cuts `total_rows` rows into consecutive slices of at most `max_rows` rows.

    Every slice but the last has exactly `max_rows` rows.

    Example::

        split_rows(10, 4)  # [slice(0, 4), slice(4, 8), slice(8, 10)]

    Raises:
        ValueError: `total_rows` or `max_rows` is < 1.
    """
    if total_rows < 1 or max_rows < 1:
        raise ValueError(f"split_rows needs total_rows >= 1 and max_rows >= 1, got "
                         f"{total_rows} and {max_rows}")  # fmt: skip
    return [slice(lo, min(lo + max_rows, total_rows)) for lo in range(0, total_rows, max_rows)]


def cost_bounds(row_costs: Sequence[int] | np.ndarray) -> np.ndarray:
    """Cumulative costs: int64 [rows + 1], `bounds[j]` is the cost of rows 0..j-1.

    Each row counts at least 1, so that a row without ids still takes room in a batch.
    """
    costs = np.maximum(np.asarray(row_costs, dtype=np.int64).reshape(-1), 1)
    bounds = np.zeros(costs.size + 1, dtype=np.int64)
    np.cumsum(costs, out=bounds[1:])
    return bounds


class ServiceRate:
    """A replica's measured service rate: cost computed per second of model time.

    An exponentially weighted moving average of batch cost and of batch seconds, and their
    ratio: a ratio of averages, so that a run of tiny batches with a fixed overhead does not
    swing the estimate the way averaging each batch's own ratio would. The first batches are
    weighted equally (1/n, until that falls below `smoothing`), and a batch more than
    `MAX_STEP` times slower than the estimate counts as that much slower only, so that one
    outlier (a model's first call with a new shape can take 100x longer, the process may be
    descheduled) shifts the estimate by a bounded factor and is forgotten within a few
    batches. Faster batches count fully: a replica cannot be faster than it is.
    """

    #: Largest factor by which one batch may count as slower than the estimate.
    MAX_STEP = 4.0
    #: Batches after which the estimate is trusted to give up work early (see `trusted`).
    TRUSTED_AFTER = 8

    def __init__(self, smoothing: float = RATE_SMOOTHING) -> None:
        if not 0.0 < smoothing <= 1.0:
            raise ValueError(f"smoothing must be in (0, 1], got {smoothing}")
        self._smoothing = smoothing
        self._cost = 0.0
        self._seconds = 0.0
        self.batches = 0
        self._lock = threading.Lock()  # observed on the executor thread during streaks

    def observe(self, cost: int, seconds: float) -> None:
        """Adds one batch of `cost` that ran for `seconds` (any thread)."""
        if seconds <= 0 or cost <= 0:
            return
        with self._lock:
            rate = self._estimate()
            if rate is not None:  # a slow outlier counts as MAX_STEP times slower at most
                seconds = min(seconds, cost * self.MAX_STEP / rate)
            self.batches += 1
            weight = max(self._smoothing, 1.0 / self.batches)
            self._cost += weight * (cost - self._cost)
            self._seconds += weight * (seconds - self._seconds)

    def _estimate(self) -> float | None:
        if self.batches == 0 or self._seconds <= 0.0:
            return None
        return self._cost / self._seconds

    @property
    def cost_per_second(self) -> float | None:
        """The estimate, or None before the first batch with a measurable duration."""
        with self._lock:
            return self._estimate()

    @property
    def trusted(self) -> bool:
        """Whether enough batches were measured to stop a request on the estimate alone."""
        return self.batches >= self.TRUSTED_AFTER


def fair_share_ahead(
    queued_by_client: dict[str, int], client: str, lead: float, cost: int, total: int
) -> float:
    """Cost the replica computes before a new request finishes, in start-time fair order.

    A backlogged client c' is served before the new request only for the part of its queue
    whose tags are below the new request's finish tag: at most `lead + cost`, where `lead` is
    how far the new request's client is already ahead of the queue's virtual time. The new
    request's own client is served entirely before it (FIFO within a client).

    Args:
        queued_by_client: queued cost per backlogged client.
        client: the new request's client key.
        lead: that client's finish tag minus the queue's virtual time (>= 0).
        cost: the new request's cost.
        total: the sum of `queued_by_client` (the bound used for many clients).

    Returns:
        The cost ahead of the new request, not counting its own.
    """
    window = lead + cost
    if len(queued_by_client) > _EXACT_CLIENTS:
        own = queued_by_client.get(client, 0)
        return float(
            min(total, own + (len(queued_by_client) - (client in queued_by_client)) * window)
        )
    return float(sum(q if c == client else min(q, window) for c, q in queued_by_client.items()))


@dataclass(eq=False, slots=True)
class _Request(Generic[Item, Result]):
    """One admitted request: its rows, how far it has been cut, and its caller's future."""

    make_part: Callable[[slice], Item] | None
    bounds: np.ndarray | None  # cumulative row costs; None: a whole item that cannot be cut
    rows: int
    cost: int
    long: bool  # more than one batch: runs slice by slice
    client: str
    deadline: float | None
    cancelled: Callable[[], bool] | None
    enqueued_at: float
    future: asyncio.Future[list[Result]]
    results: list[Result] = field(default_factory=list)
    next_row: int = 0
    state: int = _QUEUED
    timer: asyncio.TimerHandle | None = None
    # While its slices run back to back on the executor thread (`Batcher._run_streak`), that
    # thread owns `next_row` and `results`; the loop only raises `stop` (and settles it when
    # the streak returns).
    streak: bool = False
    stop: bool = False
    # Rows taken off the queue's accounting so far (event loop), and whether the rest was.
    accounted: int = 0
    released: bool = False

    def cost_from(self, row: int) -> int:
        """Cost of rows `row`.. to the end."""
        if self.bounds is None:
            return self.cost if row == 0 else 0
        return self.cost - int(self.bounds[row])


@dataclass(eq=False, slots=True)
class _Piece(Generic[Item, Result]):
    """One slice of a request inside a running batch."""

    request: _Request[Item, Result]
    item: Item
    rows: int
    cost: int


class _FairQueue(Generic[Item, Result]):
    """One class of queued requests in start-time fair queueing (SFQ) order by client.

    A request's tag is max(virtual time, its client's finish tag); the client's finish tag
    then advances by the request's cost, and the virtual time is the tag of the request
    served last. Within a client the order is FIFO; a client that queued much is served
    after clients that queued little. Withdrawn requests stay in the heap until they surface.
    Also keeps the class's queued cost per client (for admission).
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, _Request[Item, Result]]] = []
        self._sequence = itertools.count()
        self._stale = 0
        self.live = 0
        self.vtime = 0.0
        self._finish: dict[str, float] = {}
        self.client_cost: dict[str, int] = {}
        self.cost = 0

    def lead(self, client: str) -> float:
        """How far `client` is ahead of the virtual time (what it already queued)."""
        return max(0.0, self._finish.get(client, self.vtime) - self.vtime)

    def push(self, request: _Request[Item, Result]) -> None:
        start = max(self.vtime, self._finish.get(request.client, self.vtime))
        self._finish[request.client] = start + request.cost
        heapq.heappush(self._heap, (start, next(self._sequence), request))
        self.live += 1

    def head(self) -> tuple[float, _Request[Item, Result]] | None:
        """The first request still queued (dropping withdrawn ones), without popping it."""
        while self._heap:
            tag, _, request = self._heap[0]
            if request.state == _QUEUED:
                return tag, request
            heapq.heappop(self._heap)
            self._stale -= 1
        return None

    def pop(self) -> _Request[Item, Result]:
        """Pops the head returned by `head()` (which must have been called just before)."""
        tag, _, request = heapq.heappop(self._heap)
        self.vtime = max(self.vtime, tag)
        self.live -= 1
        return request

    def withdrawn(self) -> None:
        """A queued request was withdrawn in place: it is stale until it surfaces."""
        self.live -= 1
        self._stale += 1
        if self._stale > 256 and 2 * self._stale > len(self._heap):
            self._heap = [entry for entry in self._heap if entry[2].state == _QUEUED]
            heapq.heapify(self._heap)
            self._stale = 0

    def add(self, client: str, cost: int) -> None:
        self.cost += cost
        self.client_cost[client] = self.client_cost.get(client, 0) + cost

    def remove(self, client: str, cost: int) -> None:
        self.cost -= cost
        left = self.client_cost.get(client, 0) - cost
        if left > 0:
            self.client_cost[client] = left
            return
        self.client_cost.pop(client, None)
        if len(self._finish) > 64 + 4 * len(self.client_cost):
            self._finish = {c: f for c, f in self._finish.items() if c in self.client_cost}

    def queued(self) -> list[_Request[Item, Result]]:
        return [request for _, _, request in self._heap if request.state == _QUEUED]


class Lane:
    """The batchers that share one executor thread (a replica's retrieval and ranking).

    Only one batch of the lane computes at a time, so a request waits for the other batchers'
    work too; `Batcher.expected_wait_s` adds it, bounded by how long the request itself waits
    (the consumers take turns on the thread).

    The lane holds its batchers weakly (each batcher holds its lane): a strong reference both
    ways is a cycle that keeps a retired replica's batchers, and through their `run_batch`
    its models, alive until a full garbage collection, which the servers' frozen heap
    (`recship.runtime.heap`) does not run.
    """

    def __init__(self) -> None:
        # Replaced, never mutated: the executor thread reads it while the loop may add.
        self._members: tuple[weakref.ref[Batcher[object, object]], ...] = ()

    def join(self, batcher: Batcher[object, object]) -> None:
        """Adds a batcher (its constructor does)."""
        self._members = (*self._members, weakref.ref(batcher))

    @property
    def batchers(self) -> list[Batcher[object, object]]:
        """The lane's batchers that still exist."""
        return [b for b in (member() for member in self._members) if b is not None]

    def others_s(self, batcher: object, horizon_s: float, now: float) -> float:
        """Seconds the lane's other batchers keep the thread within a wait of `horizon_s`."""
        total = 0.0
        for other in self.batchers:
            if other is batcher:
                continue
            backlog = other.backlog_s(now)
            slice_s = other.slice_s()
            if backlog is None or slice_s is None:
                continue
            total += min(backlog, horizon_s + slice_s)
        return total

    def busy(self, batcher: object) -> bool:
        """Whether another batcher of the lane has a batch on the shared thread now."""
        return any(other is not batcher and other.running for other in self.batchers)


class Batcher(Generic[Item, Result]):
    """A bounded, cost-aware, deadline-aware dynamic batcher in front of one model replica.

    Queue discipline. A *short* request fits one batch; a *long* one does not and runs slice
    by slice. Short requests wait in one fair queue, long ones in another; at most one long
    request is in progress at a time. When both kinds wait, batches alternate: a batch led
    by a slice of the long request in progress (or of the next long one, which starts then),
    its room left filled with short requests, then a batch of short requests only, and so
    on. A long request also starts in the room a batch leaves when no other will be in
    progress after it. So:

    - a short request waits at most for the running batch plus the short ones ahead of it:
      a long request never delays it by more than one slice;
    - long requests run one after the other (FIFO by fair tag), not interleaved, so admitting
      one never pushes the long requests admitted before it past their deadlines;
    - a long request gets at least every other batch, however many short ones arrive.

    A batch that is a long request's slice alone becomes a streak: the executor thread runs
    its next slices itself until a short request (or the lane's other batcher) waits, the
    request is stopped, or it is done, so the event loop's load does not idle the replica.
    """

    def __init__(
        self,
        run_batch: Callable[[list[Item]], Sequence[Result]],
        *,
        max_batch_rows: int,
        max_delay_s: float,
        max_queue_rows: int,
        max_batch_cost: int | None = None,
        max_queue_cost: int | None = None,
        max_batch_items: int | None = None,
        executor: concurrent.futures.Executor | None = None,
        name: str = "batcher",
        observer: BatchObserver | None = None,
        lane: Lane | None = None,
        deadline_margin_s: float = DEFAULT_DEADLINE_MARGIN_S,
        admission_headroom: float = DEFAULT_ADMISSION_HEADROOM,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Creates an idle batcher; its consumer task starts with the first submission.

        Args:
            run_batch: computes one result per item, in order; runs on `executor`. May
                raise: the exception goes to every caller of that batch.
            max_batch_rows: most rows in one batch.
            max_delay_s: longest time the oldest queued request waits for a batch to fill;
                0 forms a batch from whatever is queued as soon as the replica is free.
            max_queue_rows: most rows waiting (not counting the running batch); at least
                `max_batch_rows`.
            max_batch_cost: most cost in one batch, which is also the longest slice of one
                request; None: `max_batch_rows` (every row costs 1 by default).
            max_queue_cost: most cost waiting; at least `max_batch_cost`. None: 64 batches.
            max_batch_items: most items in one batch, or None for no limit besides rows and
                cost; 1 turns batching off (for comparisons).
            executor: where `run_batch` runs. None creates a one-thread executor that the
                batcher owns and shuts down in `drain()`; a given one stays the caller's.
            name: names the batcher in errors, logs and thread names (e.g. "movies/v3/rank/0").
            observer: receives batch sizes, waits, queue depth, refusals and the rate, or None.
            lane: the batchers sharing `executor` with this one (it joins the lane).
            deadline_margin_s: a request is given up this long before its deadline.
            admission_headroom: the expected wait is counted this many times over at
                admission (>= 1).
            clock: monotonic seconds; deadlines are on this clock. With the default clock,
                deadlines are also enforced by timers while a request waits; with another
                (a test's fake clock) only when batches form.

        Raises:
            InvalidInput: a size or delay is out of range; the message names the parameter.
        """
        max_batch_cost = max_batch_rows if max_batch_cost is None else max_batch_cost
        max_queue_cost = 64 * max_batch_cost if max_queue_cost is None else max_queue_cost
        if max_batch_rows < 1:
            raise InvalidInput(f"{name}: max_batch_rows must be >= 1, got {max_batch_rows}")
        if max_batch_cost < 1:
            raise InvalidInput(f"{name}: max_batch_cost must be >= 1, got {max_batch_cost}")
        if max_delay_s < 0:
            raise InvalidInput(f"{name}: max_delay_s must be >= 0, got {max_delay_s}")
        if max_queue_rows < max_batch_rows:
            raise InvalidInput(
                f"{name}: max_queue_rows ({max_queue_rows}) must be >= max_batch_rows "
                f"({max_batch_rows}), or a full-size request could never be queued"
            )
        if max_queue_cost < max_batch_cost:
            raise InvalidInput(
                f"{name}: max_queue_cost ({max_queue_cost}) must be >= max_batch_cost "
                f"({max_batch_cost}), or a full-size request could never be queued"
            )
        if max_batch_items is not None and max_batch_items < 1:
            raise InvalidInput(f"{name}: max_batch_items must be >= 1, got {max_batch_items}")
        if deadline_margin_s < 0 or admission_headroom < 1:
            raise InvalidInput(
                f"{name}: deadline_margin_s must be >= 0 and admission_headroom >= 1, got "
                f"{deadline_margin_s} and {admission_headroom}"
            )
        self.name = name
        self.max_batch_rows = max_batch_rows
        self.max_batch_cost = max_batch_cost
        self.max_queue_rows = max_queue_rows
        self.max_queue_cost = max_queue_cost
        self._run_batch = run_batch
        self._max_delay_s = max_delay_s
        self._max_batch_items = max_batch_items
        self._margin = deadline_margin_s
        self._headroom = admission_headroom
        self._owns_executor = executor is None
        self._executor = executor or concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"batcher-{name}"
        )
        self._observer = observer
        self._clock = clock
        self._timers = clock is time.monotonic
        self._lane = lane
        if lane is not None:
            lane.join(self)  # type: ignore[arg-type]
        self.rate = ServiceRate()
        # Whether a batch of at least half the batch bounds was measured (see `_observe_rate`).
        self._full_measured = False
        self._short: _FairQueue[Item, Result] = _FairQueue()
        self._long: _FairQueue[Item, Result] = _FairQueue()
        # The long request in progress (between slices, or with a slice running), if any,
        # and whether long requests lead the next batch (they and short ones take turns).
        self._current: _Request[Item, Result] | None = None
        self._long_next = False
        self._arrivals: collections.deque[_Request[Item, Result]] = collections.deque()
        # Work admitted and not yet running (whole requests, or what is left of them).
        self._queued_rows = 0
        self._running: list[_Piece[Item, Result]] = []
        self._running_rows = 0
        self._running_cost = 0
        self._running_until = 0.0
        self._closed = False
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # -- what callers and the pool read -----------------------------------------------------
    @property
    def queued_rows(self) -> int:
        """Rows admitted and not yet running (what `max_queue_rows` bounds)."""
        return self._queued_rows

    @property
    def queued_cost(self) -> int:
        """Cost admitted and not yet running (what `max_queue_cost` bounds)."""
        return self._short.cost + self._long.cost

    @property
    def load_rows(self) -> int:
        """Rows waiting plus rows in the running batch."""
        return self._queued_rows + self._running_rows

    @property
    def load_cost(self) -> int:
        """Cost waiting plus cost in the running batch: how busy this replica is."""
        return self.queued_cost + self._running_cost

    @property
    def running(self) -> bool:
        """Whether a batch of this batcher is computing now."""
        return bool(self._running)

    @property
    def closed(self) -> bool:
        """True once `close()` or `drain()` was called; new work is refused."""
        return self._closed

    def has_room(self, rows: int, cost: int | None = None) -> bool:
        """Whether `rows` more rows (and `cost` more cost, default `rows`) fit in the queue."""
        cost = rows if cost is None else cost
        return (
            self._queued_rows + rows <= self.max_queue_rows
            and self.queued_cost + cost <= self.max_queue_cost
        )

    def is_long(self, rows: int, cost: int) -> bool:
        """Whether a request of `rows` rows and `cost` cost needs more than one batch."""
        return rows > self.max_batch_rows or cost > self.max_batch_cost

    def slice_s(self) -> float | None:
        """Seconds one full batch takes at the measured rate (None before any batch)."""
        rate = self.rate.cost_per_second
        return None if rate is None else self.max_batch_cost / rate

    def backlog_s(self, now: float | None = None) -> float | None:
        """Seconds of work admitted here and not finished, at the measured rate."""
        rate = self.rate.cost_per_second
        if rate is None:
            return None
        now = self._clock() if now is None else now
        return self._running_s(now) + self.queued_cost / rate

    def _running_s(self, now: float) -> float:
        return max(0.0, self._running_until - now) if self._running else 0.0

    def expected_wait_s(
        self, cost: int, client: str = "", now: float | None = None, rows: int = 1
    ) -> float | None:
        """Seconds until a request of `cost` (and `rows`) from `client`, admitted now, would
        be finished, at the measured rate; None while no rate has been measured (admission
        then applies the bounds only).

        A short request waits for the running batch, the short requests ahead of it in fair
        order (`fair_share_ahead`) and, every other batch, a slice of the long request in
        progress. A long one waits for the running batch, the long requests ahead of it in
        fair order and every short request queued now (they alternate with its slices). The
        lane's other batchers' work is added in both cases.
        """
        rate = self.rate.cost_per_second
        if rate is None:
            return None
        now = self._clock() if now is None else now
        short, long_ = self._short, self._long
        if not self.is_long(rows, cost):
            ahead = fair_share_ahead(
                short.client_cost, client, short.lead(client), cost, short.cost
            )
            if long_.cost:
                turns = -(-int(ahead + cost) // self.max_batch_cost)  # batches of short ones
                ahead += min(long_.cost, turns * self.max_batch_cost)
        else:
            ahead = short.cost + fair_share_ahead(
                long_.client_cost, client, long_.lead(client), cost, long_.cost
            )
        wait = self._running_s(now) + (ahead + cost) / rate
        if self._lane is not None:
            wait += self._lane.others_s(self, wait, now)
        return wait

    # -- submitting -------------------------------------------------------------------------
    async def submit(
        self,
        item: Item,
        rows: int,
        deadline: float | None = None,
        *,
        cost: int | None = None,
        client: str = "",
        cancelled: Callable[[], bool] | None = None,
    ) -> Result:
        """Queues one item that cannot be cut and waits for its result.

        Args:
            item: the work; passed to `run_batch` in a list with other callers' items.
            rows: model rows it counts for, 1 ..= `max_batch_rows`.
            deadline: absolute time on the batcher's clock after which the result is useless,
                or None.
            cost: its cost, 1 ..= `max_batch_cost`; None: `rows`.
            client: the fairness key of its caller.
            cancelled: polled before the item runs; True withdraws it.

        Returns:
            The item's own result from `run_batch`.

        Raises:
            Overloaded: no room, or it could not finish before its deadline (before waiting).
            DeadlineExceeded: the deadline passed before the item ran.
            Unavailable: the batcher is closed or stopped.
            ValueError: `rows` or `cost` out of range (a bug in the caller: cut bigger items
                with `submit_split`).
            Exception: whatever `run_batch` raised for this item's batch.
        """
        cost = rows if cost is None else cost
        if not 1 <= rows <= self.max_batch_rows or not 1 <= cost <= self.max_batch_cost:
            raise ValueError(
                f"{self.name}: an item must count 1 to {self.max_batch_rows} rows and 1 to "
                f"{self.max_batch_cost} cost, got {rows} and {cost}; cut bigger ones with "
                "submit_split"
            )
        results = await self._admit(
            lambda rows_: item, None, rows, cost, client, deadline, cancelled
        )
        return results[0]

    async def submit_split(
        self,
        total_rows: int,
        make_part: Callable[[slice], Item],
        deadline: float | None = None,
        *,
        row_costs: Sequence[int] | np.ndarray | None = None,
        client: str = "",
        cancelled: Callable[[], bool] | None = None,
        admitted: bool = False,
    ) -> list[Result]:
        """Submits a request of any size; it runs as slices of at most one batch.

        Args:
            total_rows: rows of the request.
            make_part: builds the item of one row slice when it is about to run (never for
                slices that do not run); on the event loop, or the executor thread during a
                streak, so it must only read the request's arrays.
            deadline: as in `submit`.
            row_costs: the cost of each row (>= 1 counted each); None: 1 per row.
            client: the fairness key of its caller (a connection, a declared client id).
            cancelled: polled between slices; True withdraws the rest of the request.
            admitted: the request already passed `ReplicaPool.check_admission` on a lower
                bound of its cost; its exact cost is then refused for its deadline only when
                the expected finish passes it, without `admission_headroom` (so that what
                the estimate admitted is not refused after the caller decoded it, unless
                it is far costlier than the bound).

        Returns:
            The slices' results, in row order (concatenate them to get the whole result).

        Raises:
            InvalidInput: the request can never be queued (more rows or cost than the queue
                holds), or one row costs more than a batch holds.
            Overloaded, DeadlineExceeded, Unavailable, Exception: as in `submit`.
        """
        bounds = self.check_fits(total_rows, row_costs)
        return await self.submit_checked(
            total_rows, make_part, bounds, deadline, client, cancelled, admitted
        )

    def submit_checked(
        self,
        total_rows: int,
        make_part: Callable[[slice], Item],
        bounds: np.ndarray,
        deadline: float | None,
        client: str = "",
        cancelled: Callable[[], bool] | None = None,
        admitted: bool = False,
    ) -> asyncio.Future[list[Result]]:
        """`submit_split` for a request whose cumulative row costs `bounds` came from
        `check_fits` (a pool checks once, then picks a replica). Admission happens before it
        returns; await the future for the results."""
        return self._admit(
            make_part, bounds, total_rows, int(bounds[-1]), client, deadline, cancelled,
            admitted,
        )  # fmt: skip

    def close(self) -> None:
        """Refuses new work from now on; queued work still runs, without waiting the delay."""
        self._closed = True
        self._wake.set()

    async def drain(self) -> None:
        """Closes, waits until every queued and running request is finished, then stops.

        An owned executor is shut down afterwards. Cancelling the caller of `drain` does not
        cancel the queued work.
        """
        self.close()
        if self._task is not None:
            await asyncio.wait([self._task])  # waits without cancelling it or raising its end
        if self._owns_executor:
            self._executor.shutdown(wait=False)

    # -- admission --------------------------------------------------------------------------
    def check_fits(
        self, rows: int, row_costs: Sequence[int] | np.ndarray | None = None
    ) -> np.ndarray:
        """The cumulative row costs (`cost_bounds`) of a request this batcher can ever admit.

        Raises:
            InvalidInput: more rows or cost than the queue holds, or one row costs more than
                a batch holds: no state of the queue could admit it.
            ValueError: no rows, or not as many costs as rows (a bug in the caller).
        """
        if rows < 1:
            raise ValueError(f"{self.name}: a request needs >= 1 row, got {rows}")
        bounds = cost_bounds(np.ones(rows, np.int64) if row_costs is None else row_costs)
        if bounds.size != rows + 1:
            raise ValueError(f"{self.name}: {bounds.size - 1} row costs for {rows} rows")
        cost = int(bounds[-1])
        self.check_queue_bound(rows, cost)
        if cost > rows:  # some row costs more than 1: check the largest
            costs = np.diff(bounds)
            row = int(np.argmax(costs))
            if costs[row] > self.max_batch_cost:
                raise InvalidInput(
                    f"{self.name}: row {row} of the request costs {int(costs[row])}, more "
                    f"than one batch holds ({self.max_batch_cost}); send smaller bags"
                )
        return bounds

    def check_queue_bound(self, rows: int, cost: int) -> None:
        """Raises InvalidInput when a request of `rows` rows and `cost` could never queue.

        Raises:
            InvalidInput: more rows or cost than the queue holds, naming both bounds.
        """
        if rows > self.max_queue_rows or cost > self.max_queue_cost:
            raise InvalidInput(
                f"{self.name}: a request of {rows} rows costing {cost} exceeds the queue "
                f"bound of {self.max_queue_rows} rows and {self.max_queue_cost} cost; send "
                "fewer rows or smaller bags per request"
            )

    def check_admission(
        self,
        rows: int,
        cost: int,
        client: str = "",
        deadline: float | None = None,
        *,
        headroom: float | None = None,
    ) -> None:
        """Raises what `submit` would raise at admission for such a request, or nothing.

        `headroom` replaces `admission_headroom` for this check (1.0: the expected finish
        itself against the deadline).

        Raises:
            Unavailable: closed.
            DeadlineExceeded: the deadline (less the margin) has passed.
            Overloaded: the queue bounds, the client's share or the deadline refuse it.
        """
        if self._closed:
            raise Unavailable(f"{self.name} is shutting down and takes no new requests")
        now = self._clock()
        if deadline is not None and deadline - self._margin <= now:
            raise DeadlineExceeded(f"{self.name}: the deadline passed before the request queued")
        queued = self.queued_cost
        if not self.has_room(rows, cost):
            self.count_refusal("queue_full")
            raise Overloaded(
                f"{self.name}: queue full ({self._queued_rows} of {self.max_queue_rows} rows, "
                f"{queued} of {self.max_queue_cost} cost waiting; this request needs {rows} "
                f"rows, {cost} cost); retry later"
            )
        if 2 * (queued + cost) > self.max_queue_cost:
            # A contended queue: no client may hold more than its share of it.
            holders = set(self._short.client_cost) | set(self._long.client_cost) | {client}
            held = cost + self._short.client_cost.get(client, 0)
            held += self._long.client_cost.get(client, 0)
            if len(holders) > 1 and held * len(holders) > self.max_queue_cost:
                self.count_refusal("client_share")
                raise Overloaded(
                    f"{self.name}: this client would hold {held} of the {self.max_queue_cost} "
                    f"queue cost shared by {len(holders)} clients; retry later"
                )
        extrapolated = not self._full_measured and self.is_long(rows, cost)
        if deadline is not None and (queued or self._running) and not extrapolated:
            # (An idle batcher admits whatever fits: that request measures the rate anew, so
            # a rate once measured too low cannot refuse every request from then on. Nor is
            # a long request refused on a rate measured on small batches only: after a while
            # of light traffic that rate, a tiny batch's fixed overhead per few rows, would
            # refuse every big request while any small one runs.)
            wait = self.expected_wait_s(cost, client, now, rows)
            factor = self._headroom if headroom is None else headroom
            if wait is not None and now + wait * factor > deadline - self._margin:
                self.count_refusal("deadline")
                raise Overloaded(
                    f"{self.name}: overloaded: the request would finish in ~"
                    f"{wait * 1000:.0f} ms, its deadline is in {(deadline - now) * 1000:.0f} "
                    "ms; retry later or with a longer deadline"
                )

    def count_refusal(self, reason: str) -> None:
        """Counts a refusal (for this batcher or, from a pool, on its behalf) in the metrics."""
        if self._observer is not None:
            self._observer.observe_refused(reason)

    def _admit(
        self,
        make_part: Callable[[slice], Item],
        bounds: np.ndarray | None,
        rows: int,
        cost: int,
        client: str,
        deadline: float | None,
        cancelled: Callable[[], bool] | None,
        admitted: bool = False,
    ) -> asyncio.Future[list[Result]]:
        """Admits one request synchronously (no await) and returns the future of its results."""
        self.check_admission(rows, cost, client, deadline, headroom=1.0 if admitted else None)
        loop = asyncio.get_running_loop()
        if self._task is None:
            self._task = loop.create_task(self._consume(), name=f"batcher-{self.name}")
        elif self._task.get_loop() is not loop:
            raise RuntimeError(f"{self.name} is bound to another event loop")
        now = self._clock()
        future: asyncio.Future[list[Result]] = loop.create_future()
        request: _Request[Item, Result] = _Request(
            make_part,
            bounds,
            rows,
            cost,
            self.is_long(rows, cost),
            client,
            deadline,
            cancelled,
            now,
            future,
        )
        future.add_done_callback(lambda _: self._settle(request))
        queue = self._long if request.long else self._short
        self._queued_rows += rows
        queue.add(client, cost)
        if self._observer is not None:
            self._observer.add_queue(rows, cost)
        queue.push(request)
        while self._arrivals and self._arrivals[0].state != _QUEUED:
            self._arrivals.popleft()  # (only the oldest waiting request matters)
        self._arrivals.append(request)
        if deadline is not None and self._timers:
            request.timer = loop.call_later(
                max(0.0, deadline - self._margin - now), self._expire, request
            )
        self._wake.set()
        return future

    # -- ending requests --------------------------------------------------------------------
    def _expire(self, request: _Request[Item, Result]) -> None:
        """Deadline timer: gives the request up (its running slice, if any, is discarded)."""
        if not request.future.done():
            self._drop(request, "deadline")

    def _drop(self, request: _Request[Item, Result], reason: str) -> None:
        """Ends a request that must not run further: past its deadline, or cancelled."""
        if reason == "deadline":
            if self._observer is not None:
                self._observer.observe_dropped("deadline")
            done = (
                f"after {request.next_row} of {request.rows} rows"
                if request.next_row
                else "while queued"
            )
            request.future.set_exception(
                DeadlineExceeded(f"{self.name}: the deadline passed {done}")
            )
        else:
            request.future.cancel()
        self._settle(request)

    def _finish_with(self, request: _Request[Item, Result], error: BaseException) -> None:
        if not request.future.done():
            request.future.set_exception(error)
        self._settle(request)

    def _settle(self, request: _Request[Item, Result]) -> None:
        """Releases what a finished request still holds (idempotent).

        Called at once wherever the batcher ends a request, and as the done callback of its
        future (which asyncio runs later), for requests whose caller cancelled.
        """
        if request.state == _DONE:
            return
        if not request.released:  # what is left of it leaves the queue's accounting now
            rows = request.rows - request.accounted
            self._release(request, rows, request.cost_from(request.accounted))
            request.released = True
            if request.future.cancelled() and rows and self._observer is not None:
                self._observer.observe_dropped("cancelled")
        if request.streak:
            request.stop = True  # the executor thread stops after its slice; settled then
            return
        if request.timer is not None:
            request.timer.cancel()
        if request.state == _QUEUED:
            (self._long if request.long else self._short).withdrawn()
        request.state = _DONE
        request.make_part = None  # frees the caller's arrays as soon as possible
        request.bounds = None
        if request is self._current:
            self._current = None

    def _release(self, request: _Request[Item, Result], rows: int, cost: int) -> None:
        """Takes `rows` and `cost` of `request` off the queue's accounting."""
        if not rows and not cost:
            return
        self._queued_rows -= rows
        (self._long if request.long else self._short).remove(request.client, cost)
        if self._observer is not None:
            self._observer.add_queue(-rows, -cost)

    # -- the consumer -----------------------------------------------------------------------
    def _pending(self) -> bool:
        """Whether anything waits to be computed."""
        current = self._current
        return bool(
            self._short.live or self._long.live or (current is not None and current.state == _HELD)
        )

    def _oldest_arrival(self) -> float | None:
        while self._arrivals and (self._arrivals[0].state != _QUEUED or self._arrivals[0].next_row):
            self._arrivals.popleft()
        return self._arrivals[0].enqueued_at if self._arrivals else None

    def _flush_due(self) -> bool:
        if (
            self._closed
            or self._current is not None
            or self._queued_rows >= self.max_batch_rows
            or self.queued_cost >= self.max_batch_cost
            or (
                self._max_batch_items is not None
                and self._short.live + self._long.live >= self._max_batch_items
            )
        ):
            return True
        oldest = self._oldest_arrival()
        return oldest is None or self._clock() - oldest >= self._max_delay_s

    async def _consume(self) -> None:
        try:
            while True:
                if not self._pending():
                    if self._closed:
                        return
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                if not self._flush_due():
                    # Sleep until the oldest request's delay is up, unless something arrives.
                    self._wake.clear()
                    oldest = self._oldest_arrival()
                    timeout = 0.0 if oldest is None else oldest + self._max_delay_s - self._clock()
                    try:
                        await asyncio.wait_for(self._wake.wait(), timeout)
                        continue
                    except TimeoutError:
                        pass
                started = self._clock()
                batch = self._take_batch()
                if batch:
                    await self._execute(batch, started)
        finally:
            # Only reached early if the task is cancelled (event loop shutdown) or on a bug:
            # never leave a caller waiting forever.
            self._closed = True
            stopped = Unavailable(f"{self.name} stopped")
            waiting = [piece.request for piece in self._running]
            waiting += self._short.queued() + self._long.queued()
            if self._current is not None:
                waiting.append(self._current)
            for request in waiting:
                self._finish_with(request, stopped)

    def _cut(
        self, request: _Request[Item, Result], room_rows: int, room_cost: int
    ) -> tuple[slice, int, int] | None:
        """The next slice of `request` that fits the room left in a batch, or None.

        A short request is taken whole or not at all; a long one is cut to the room.
        """
        start = request.next_row
        if not request.long:
            cost = request.cost_from(start)
            if request.rows - start <= room_rows and cost <= room_cost:
                return slice(start, request.rows), request.rows - start, cost
            return None
        bounds = request.bounds
        if bounds is None:  # cannot be: whole items are never long
            raise RuntimeError(f"{self.name}: a long request without row costs")
        stop = min(request.rows, start + room_rows)
        if int(bounds[stop]) - int(bounds[start]) > room_cost:
            stop = int(np.searchsorted(bounds, bounds[start] + room_cost, side="right")) - 1
        if stop <= start:
            return None
        return slice(start, stop), stop - start, int(bounds[stop]) - int(bounds[start])

    def _gone(self, request: _Request[Item, Result], now: float) -> bool:
        """Ends `request` if it must not run further; says whether it did.

        That is: it is done (its caller cancelled), its deadline has passed (less the
        margin), or it is partly computed and, at the measured rate (once trusted), what is
        left of it could not be finished before its deadline; or its `cancelled()` signal
        says so.
        """
        if request.future.done():  # its caller cancelled; the callback has not run yet
            self._settle(request)
        elif request.deadline is not None and self._hopeless(request, now):
            self._drop(request, "deadline")
        elif request.cancelled is not None and request.cancelled():
            self._drop(request, "cancelled")
        else:
            return False
        return True

    def _hopeless(self, request: _Request[Item, Result], now: float) -> bool:
        """Whether `request` (which has a deadline) must not run further: its deadline has
        passed (less the margin), or it is partly computed and, at the measured rate once
        trusted, what is left of it could not be finished before its deadline."""
        deadline = request.deadline
        if deadline is None:
            return False
        if deadline - self._margin <= now:
            return True
        return bool(
            request.next_row  # a continuation: its last slice just measured the rate
            and self.rate.trusted
            and now + request.cost_from(request.next_row) / self._rate_or_inf() > deadline
        )

    def _rate_or_inf(self) -> float:
        rate = self.rate.cost_per_second
        return float("inf") if rate is None else rate

    def _head(self, queue: _FairQueue[Item, Result], now: float) -> _Request[Item, Result] | None:
        """The first request of `queue` that may still run (ending those that may not)."""
        while (head := queue.head()) is not None:
            if not self._gone(head[1], now):
                return head[1]
        return None

    def _take_batch(self) -> list[_Piece[Item, Result]]:
        """Pops the next batch (see the class docstring for the order), dropping requests
        cancelled or past their deadline; builds each slice's item with `make_part`."""
        now = self._clock()
        batch: list[_Piece[Item, Result]] = []
        room = [self.max_batch_rows, self.max_batch_cost]
        current = self._current
        if current is not None and self._gone(current, now):
            current = None
        shorts_waiting = self._head(self._short, now) is not None
        if (self._long_next or not shorts_waiting) and current is None:
            # The long requests' turn and none in progress: start the next one.
            current = self._head(self._long, now)
            if current is not None:
                self._long.pop()
                self._current = current
        long_ran = current is not None and (self._long_next or not shorts_waiting)
        if long_ran:
            self._add(batch, room, current, now)  # type: ignore[arg-type]
        while (
            (self._max_batch_items is None or len(batch) < self._max_batch_items)
            and (request := self._head(self._short, now)) is not None
            and self._cut(request, *room) is not None
        ):
            self._short.pop()
            self._add(batch, room, request, now)
        finishing = self._current is None or self._current.next_row == self._current.rows
        if (
            finishing
            and (self._max_batch_items is None or len(batch) < self._max_batch_items)
            and (request := self._head(self._long, now)) is not None
            and self._cut(request, *room) is not None
        ):
            # No long request in progress after this batch: the next one starts in the room
            # left (the one finishing now is not `_current` any more; it completes as usual).
            self._long.pop()
            self._current = request
            self._add(batch, room, request, now)
            long_ran = True
        self._long_next = not long_ran
        return batch

    def _add(
        self,
        batch: list[_Piece[Item, Result]],
        room: list[int],
        request: _Request[Item, Result],
        now: float,
    ) -> None:
        """Cuts the next slice of `request` (popped, or the current long one) into `batch`."""
        cut = self._cut(request, room[0], room[1])
        if cut is None:  # the current long request always fits an empty batch
            raise RuntimeError(f"{self.name}: a slice does not fit an empty batch")
        part, rows, cost = cut
        request.state = _RUNNING
        try:
            item = request.make_part(part)  # type: ignore[misc]
        except Exception as error:
            self._finish_with(request, error)
            return
        if request.next_row == 0 and self._observer is not None:
            self._observer.observe_queue_wait(now - request.enqueued_at)
        request.next_row = request.accounted = part.stop
        self._release(request, rows, cost)
        batch.append(_Piece(request, item, rows, cost))
        room[0] -= rows
        room[1] -= cost

    async def _execute(self, batch: list[_Piece[Item, Result]], started: float) -> None:
        """Runs one batch and hands out its results.

        The service rate is measured in wall time on the loop, from forming the batch to
        handing its results out: what a queued request really waits per unit of cost, with
        the event loop's and the thread hand-over's share. Time spent waiting for the shared
        thread while another batcher of the lane used it is left out (it is that one's work).

        A batch that is one slice of a long request and nothing else becomes a *streak*: the
        executor thread runs that request's next slices back to back (`_run_streak`) until
        it is done, or another request (or the lane's other batcher) waits, or it is stopped,
        so that a long request does not wait for the event loop between its slices.
        """
        rows = sum(piece.rows for piece in batch)
        cost = sum(piece.cost for piece in batch)
        self._running, self._running_rows, self._running_cost = batch, rows, cost
        rate = self.rate.cost_per_second
        self._running_until = self._clock() + (0.0 if rate is None else cost / rate)
        loop = asyncio.get_running_loop()
        streak = len(batch) == 1 and batch[0].request.long and self._max_batch_items is None
        if streak:
            await self._execute_streak(batch[0], loop)
            self._running, self._running_rows, self._running_cost = [], 0, 0
            return
        try:
            submitted = self._clock()
            shared = self._lane is not None and self._lane.busy(self)
            results, picked_up = await loop.run_in_executor(
                self._executor, self._timed, [piece.item for piece in batch]
            )
            seconds = self._clock() - started - (picked_up - submitted if shared else 0.0)
            if len(results) != len(batch):
                raise RuntimeError(
                    f"{self.name}: run_batch returned {len(results)} results for {len(batch)} items"
                )
        except Exception as error:
            for piece in batch:
                self._finish_with(piece.request, error)
        else:
            self._measured(rows, len(batch), cost, seconds)
            for piece, result in zip(batch, results, strict=True):
                request = piece.request
                if request.future.done():
                    self._settle(request)  # gone while it ran (cancelled, deadline): discarded
                    continue
                request.results.append(result)
                if request.next_row == request.rows:
                    request.future.set_result(request.results)
                    self._settle(request)
                else:
                    request.state = _HELD  # the current long request, until its next slice
        # Not in a `finally`: if the consumer is cancelled mid-batch, `_consume` must still
        # see the running pieces to fail them.
        self._running, self._running_rows, self._running_cost = [], 0, 0

    def _observe_rate(self, rows: int, cost: int, seconds: float) -> None:
        """Adds one batch to the service rate (any thread)."""
        self.rate.observe(cost, seconds)
        if 2 * rows >= self.max_batch_rows or 2 * cost >= self.max_batch_cost:
            self._full_measured = True

    def _measured(self, rows: int, items: int, cost: int, seconds: float) -> None:
        """Records one batch's measurements (event loop)."""
        self._observe_rate(rows, cost, seconds)
        if self._observer is not None:
            self._observer.observe_batch(rows, items, cost, seconds)
            measured = self.rate.cost_per_second
            if measured is not None:
                self._observer.observe_service_rate(measured)

    async def _execute_streak(
        self, piece: _Piece[Item, Result], loop: asyncio.AbstractEventLoop
    ) -> None:
        request = piece.request
        request.streak = True
        try:
            await loop.run_in_executor(self._executor, self._run_streak, piece, loop)
        except Exception as error:
            request.streak = False
            self._finish_with(request, error)
            return
        request.streak = False
        if request.future.done() or request.stop:
            self._settle(request)  # stopped (cancelled, deadline): what it computed is discarded
        elif request.next_row == request.rows:
            request.future.set_result(request.results)
            self._settle(request)
        else:
            request.state = _HELD  # yielded: the next batch decides what runs

    def _run_streak(self, piece: _Piece[Item, Result], loop: asyncio.AbstractEventLoop) -> None:
        """Runs the slices of one long request back to back (on the executor thread).

        After each slice it stops if the request is done, stopped by the loop (cancelled,
        past its deadline), past its deadline by the clock, or if a short request or the
        lane's other batcher waits (they get the next batch). Each slice's measurements and
        the next slice's accounting go to the loop with `call_soon_threadsafe`.
        """
        request = piece.request
        item, rows, cost = piece.item, piece.rows, piece.cost
        while True:
            started = self._clock()
            results = self._run_batch([item])
            seconds = self._clock() - started
            if len(results) != 1:
                raise RuntimeError(f"{self.name}: run_batch returned {len(results)} results for 1")
            request.results.append(results[0])
            self._observe_rate(rows, cost, seconds)  # at once: the checks below use it
            loop.call_soon_threadsafe(self._observed, rows, cost, seconds)
            if request.next_row >= request.rows or request.stop or self._yield_wanted():
                return
            if request.deadline is not None and self._hopeless(request, self._clock()):
                return  # the loop gives it up at the next batch
            cut = self._cut(request, self.max_batch_rows, self.max_batch_cost)
            if cut is None:  # cannot be: a long request's next slice fits an empty batch
                return
            part, rows, cost = cut
            item = request.make_part(part)  # type: ignore[misc]
            request.next_row = part.stop
            loop.call_soon_threadsafe(self._slice_started, request, part.stop, rows, cost)

    def _observed(self, rows: int, cost: int, seconds: float) -> None:
        """A streak's slice ran (event loop): its metrics (the rate is updated already)."""
        if self._observer is not None:
            self._observer.observe_batch(rows, 1, cost, seconds)
            measured = self.rate.cost_per_second
            if measured is not None:
                self._observer.observe_service_rate(measured)

    def _slice_started(
        self, request: _Request[Item, Result], stop: int, rows: int, cost: int
    ) -> None:
        """A streak cut its next slice (event loop): it leaves the queue's accounting."""
        if not request.released:  # (unless all of it left already: cancelled meanwhile)
            self._release(request, rows, cost)
            request.accounted = stop
        self._running_rows, self._running_cost = rows, cost
        rate = self.rate.cost_per_second
        self._running_until = self._clock() + (0.0 if rate is None else cost / rate)

    def _yield_wanted(self) -> bool:
        """Whether other work waits for this replica (read from the executor thread)."""
        if self._short.live:
            return True
        lane = self._lane
        return lane is not None and any(
            other is not self and (other.running or other.pending)
            for other in lane.batchers  # type: ignore[attr-defined]
        )

    @property
    def pending(self) -> bool:
        """Whether requests wait here to be computed."""
        return self._pending()

    def _timed(self, items: list[Item]) -> tuple[Sequence[Result], float]:
        # On the executor thread: also returns when the thread took the batch up.
        started = self._clock()
        return self._run_batch(items), started


class ReplicaPool(Generic[Item, Result]):
    """N replicas of one servable, each a `Batcher`; a request goes to the one that should
    finish it first.

    "First" is `Batcher.expected_wait_s` where the replicas have measured rates, else the
    least load (`load_cost`); ties rotate, so idle replicas take turns. Each replica should
    have its own one-thread executor and its own model copy (on its own device), so replicas
    compute in parallel. A request runs on one replica, slice after slice. Same threading
    rules as `Batcher`.
    """

    def __init__(self, replicas: Sequence[Batcher[Item, Result]]) -> None:
        """Args: replicas: one batcher per replica, all with the same batch limits.

        Raises:
            ValueError: no replicas, or different batch limits (a bug in the caller).
        """
        if not replicas:
            raise ValueError("ReplicaPool needs at least one replica")
        sizes = {(r.max_batch_rows, r.max_batch_cost) for r in replicas}
        if len(sizes) != 1:
            raise ValueError(f"replicas must share max_batch_rows and max_batch_cost, got "
                             f"{sorted(sizes)}")  # fmt: skip
        self.replicas: tuple[Batcher[Item, Result], ...] = tuple(replicas)
        self.max_batch_rows, self.max_batch_cost = sizes.pop()
        self._turn = itertools.cycle(range(len(self.replicas)))

    @property
    def queued_rows(self) -> int:
        """Rows waiting over all replicas."""
        return sum(r.queued_rows for r in self.replicas)

    @property
    def queued_cost(self) -> int:
        """Cost waiting over all replicas."""
        return sum(r.queued_cost for r in self.replicas)

    def pick(self, rows: int, cost: int | None = None, client: str = "") -> Batcher[Item, Result]:
        """The open replica with room for the request that should finish it first.

        Raises:
            Overloaded: every replica's queue is full.
            Unavailable: every replica is closed.
        """
        cost = rows if cost is None else cost
        start = next(self._turn)
        order = self.replicas[start:] + self.replicas[:start]
        open_ = [r for r in order if not r.closed]
        if not open_:
            raise Unavailable(f"{self.replicas[0].name}: every replica is shutting down")
        fitting = [r for r in open_ if r.has_room(rows, cost)]
        if not fitting:
            open_[0].count_refusal("queue_full")
            raise Overloaded(
                f"{self.replicas[0].name}: all {len(open_)} replica queues are full "
                f"({self.queued_rows} rows, {self.queued_cost} cost waiting; this request "
                f"needs {rows} rows, {cost} cost); retry later"
            )
        if len(fitting) == 1:
            return fitting[0]

        def finish(replica: Batcher[Item, Result]) -> tuple[float, int]:
            wait = replica.expected_wait_s(cost, client, rows=rows)
            return (0.0 if wait is None else wait, replica.load_cost)

        return min(fitting, key=finish)

    def check_admission(
        self, rows: int, min_cost: int, client: str = "", deadline: float | None = None
    ) -> None:
        """Refuses at once a request that admission would refuse whatever its exact cost.

        For callers that know a request's rows and a lower bound of its cost before the
        costly part of decoding it (the service, from the message's field lengths): an
        overloaded server then refuses it for the price of a few comparisons. A request that
        passes is admitted, or not, by `submit_split(..., admitted=True)` on its exact cost.

        Args:
            rows: the request's rows.
            min_cost: at most its cost.
            client, deadline: as in `submit_split`.

        Raises:
            InvalidInput: more rows or cost than a queue ever holds.
            Overloaded, DeadlineExceeded, Unavailable: as `Batcher.check_admission` of the
                replica `pick` chooses (counted in its metrics).
        """
        self.replicas[0].check_queue_bound(rows, min_cost)
        self.pick(rows, min_cost, client).check_admission(rows, min_cost, client, deadline)

    async def submit(
        self,
        item: Item,
        rows: int,
        deadline: float | None = None,
        *,
        cost: int | None = None,
        client: str = "",
        cancelled: Callable[[], bool] | None = None,
    ) -> Result:
        """`Batcher.submit` on the replica that should finish it first."""
        replica = self.pick(rows, cost, client)
        return await replica.submit(
            item, rows, deadline, cost=cost, client=client, cancelled=cancelled
        )

    async def submit_split(
        self,
        total_rows: int,
        make_part: Callable[[slice], Item],
        deadline: float | None = None,
        *,
        row_costs: Sequence[int] | np.ndarray | None = None,
        client: str = "",
        cancelled: Callable[[], bool] | None = None,
        admitted: bool = False,
    ) -> list[Result]:
        """`Batcher.submit_split` on the replica that should finish it first.

        A request that no replica's queue could ever hold is InvalidInput (as in a batcher),
        not Overloaded: retrying would not help.
        """
        bounds = self.replicas[0].check_fits(total_rows, row_costs)
        cost = int(bounds[-1])
        replica = self.pick(total_rows, cost, client)
        return await replica.submit_checked(
            total_rows, make_part, bounds, deadline, client, cancelled, admitted
        )

    def add(self, replica: Batcher[Item, Result]) -> None:
        """Adds a replica; it takes work from the next `pick` on (event loop only).

        Raises:
            ValueError: its batch limits differ from the pool's (a bug in the caller).
        """
        if (replica.max_batch_rows, replica.max_batch_cost) != (
            self.max_batch_rows,
            self.max_batch_cost,
        ):
            raise ValueError(
                f"replicas must share max_batch_rows and max_batch_cost, got "
                f"{replica.max_batch_rows}/{replica.max_batch_cost} for a pool of "
                f"{self.max_batch_rows}/{self.max_batch_cost}"
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
