"""The dynamic batcher with real asyncio and real executor threads.

Synchronisation is by events and by yielding to the event loop (`until`), never by sleeping;
times appear only as upper bounds (`run`'s timeout), through a fake clock, or (for the
deadline timers, which run on the real clock only) as short real deadlines.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import threading
import time
import weakref
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recship.base.errors import (
    DeadlineExceeded,
    InvalidInput,
    Overloaded,
    Unavailable,
)
from recship.runtime.batcher import (
    Batcher,
    Lane,
    ReplicaPool,
    ServiceRate,
    cost_bounds,
    fair_share_ahead,
    split_rows,
)
from recship.runtime.metrics import ServerMetrics

LONG = 3600.0  # a max delay that never expires within a test


def run(coro: Coroutine[Any, Any, Any], timeout: float = 20.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def until(condition: Callable[[], bool]) -> None:
    """Yields to the event loop until `condition` holds (bounded by `run`'s timeout)."""
    while not condition():
        await asyncio.sleep(0)


class Model:
    """A synchronous `run_batch` that records its batches; can hold its first batch."""

    def __init__(
        self,
        fn: Callable[[Any], Any] = lambda x: x * 10,
        *,
        hold_first: bool = False,
        fail_if: Callable[[list[Any]], bool] = lambda items: False,
        clock: list[float] | None = None,
        seconds_per_item: Callable[[Any], float] = lambda item: 0.0,
    ) -> None:
        self.fn = fn
        self.fail_if = fail_if
        self.batches: list[list[Any]] = []
        self.threads: set[str] = set()
        self.release = threading.Event()
        if not hold_first:
            self.release.set()
        self._loop = asyncio.get_running_loop()
        self.started = asyncio.Event()
        self.clock = clock
        self.seconds_per_item = seconds_per_item

    def __call__(self, items: list[Any]) -> list[Any]:
        self.batches.append(list(items))
        self.threads.add(threading.current_thread().name)
        self._loop.call_soon_threadsafe(self.started.set)
        if len(self.batches) == 1 and not self.release.wait(timeout=15):
            raise TimeoutError("the test never released the first batch")
        if self.clock is not None:  # a fake clock: the batch "takes" this long
            self.clock[0] += sum(self.seconds_per_item(x) for x in items)
        if self.fail_if(items):
            raise ValueError(f"bad batch {items}")
        return [self.fn(x) for x in items]

    def seen(self) -> list[Any]:
        return [x for batch in self.batches for x in batch]


class RecordingObserver:
    def __init__(self) -> None:
        self.batches: list[tuple[int, int, int]] = []
        self.waits: list[float] = []
        self.queue_rows = 0
        self.queue_cost = 0
        self.refused: list[str] = []
        self.dropped: list[str] = []
        self.rates: list[float] = []

    def observe_batch(self, rows: int, items: int, cost: int, seconds: float) -> None:
        self.batches.append((rows, items, cost))

    def observe_queue_wait(self, seconds: float) -> None:
        self.waits.append(seconds)

    def add_queue(self, rows: int, cost: int) -> None:
        self.queue_rows += rows
        self.queue_cost += cost
        assert self.queue_rows >= 0 and self.queue_cost >= 0

    def observe_refused(self, reason: str) -> None:
        self.refused.append(reason)

    def observe_dropped(self, reason: str) -> None:
        self.dropped.append(reason)

    def observe_service_rate(self, cost_per_second: float) -> None:
        self.rates.append(cost_per_second)


def _parts(part: slice) -> tuple[int, ...]:
    return tuple(range(part.start, part.stop))


# -- pure helpers ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("total", "most", "expected"),
    [
        (1, 1, [(0, 1)]),
        (4, 4, [(0, 4)]),
        (10, 4, [(0, 4), (4, 8), (8, 10)]),
        (3, 100, [(0, 3)]),
        (6, 2, [(0, 2), (2, 4), (4, 6)]),
    ],
)
def test_split_rows(total: int, most: int, expected: list[tuple[int, int]]) -> None:
    assert [(s.start, s.stop) for s in split_rows(total, most)] == expected


@pytest.mark.parametrize(("total", "most"), [(0, 4), (4, 0), (-1, 3)])
def test_split_rows_rejects(total: int, most: int) -> None:
    with pytest.raises(ValueError, match="split_rows"):
        split_rows(total, most)


def test_cost_bounds_count_every_row_at_least_once() -> None:
    assert cost_bounds([3, 0, 5, -2]).tolist() == [0, 3, 4, 9, 10]
    assert cost_bounds(np.array([], dtype=np.int64)).tolist() == [0]


def test_service_rate_is_a_ratio_of_averages_that_forgets_outliers() -> None:
    rate = ServiceRate(smoothing=0.2)
    assert rate.cost_per_second is None
    rate.observe(1000, 1.0)
    assert rate.cost_per_second == pytest.approx(1000.0)
    rate.observe(1000, 0.01)  # faster batches count fully: (1000 + 1000) / (1.0 + 0.01)
    assert rate.cost_per_second == pytest.approx(2000 / 1.01)
    for _ in range(40):
        rate.observe(1000, 0.01)
    assert rate.cost_per_second == pytest.approx(100_000, rel=0.01)
    assert rate.trusted
    # One batch 100x slower counts as 4x slower, and is soon forgotten.
    rate.observe(1000, 1.0)
    assert rate.cost_per_second == pytest.approx(1000 / (0.8 * 0.01 + 0.2 * 0.04), rel=0.01)
    for _ in range(15):
        rate.observe(1000, 0.01)
    assert rate.cost_per_second == pytest.approx(100_000, rel=0.05)
    # Averages of cost and of time, not of per-batch ratios: a tiny batch barely moves it.
    rate.observe(1, 0.01)
    assert rate.cost_per_second > 40_000


@pytest.mark.parametrize(
    ("queued", "client", "lead", "cost", "expected"),
    [
        ({}, "a", 0, 10, 0),  # empty queue: nothing ahead
        ({"a": 50}, "a", 50, 10, 50),  # its own client's queue is ahead of it (FIFO)
        ({"b": 50}, "a", 0, 10, 10),  # a new client: the other one only gets its share
        ({"a": 30, "b": 50}, "a", 30, 10, 30 + 40),  # b is served up to a's lead + cost
        ({"b": 5, "c": 500}, "a", 0, 10, 5 + 10),
    ],
)
def test_fair_share_ahead(
    queued: dict[str, int], client: str, lead: float, cost: int, expected: float
) -> None:
    total = sum(queued.values())
    assert fair_share_ahead(queued, client, lead, cost, total) == expected


def test_fair_share_ahead_bounds_many_clients_by_the_total() -> None:
    queued = {f"c{i}": 100 for i in range(100)}
    assert fair_share_ahead(queued, "new", 0, 10, 10_000) == 100 * 10
    assert fair_share_ahead(queued, "new", 1000, 10, 10_000) == 10_000


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_batch_rows": 0, "max_delay_s": 0, "max_queue_rows": 8},
        {"max_batch_rows": 4, "max_delay_s": -1, "max_queue_rows": 8},
        {"max_batch_rows": 4, "max_delay_s": 0, "max_queue_rows": 3},
        {"max_batch_rows": 4, "max_delay_s": 0, "max_queue_rows": 8, "max_batch_items": 0},
        {"max_batch_rows": 4, "max_delay_s": 0, "max_queue_rows": 8, "max_batch_cost": 0},
        {
            "max_batch_rows": 4,
            "max_delay_s": 0,
            "max_queue_rows": 8,
            "max_batch_cost": 100,
            "max_queue_cost": 99,
        },
        {"max_batch_rows": 4, "max_delay_s": 0, "max_queue_rows": 8, "admission_headroom": 0.5},
    ],
)
def test_bad_configuration(kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidInput, match=r"max_|margin|headroom"):
        Batcher(lambda items: items, name="t", **kwargs)


# -- batching -------------------------------------------------------------------------------
def test_coalesces_64_concurrent_callers_with_unbatched_results() -> None:
    metrics = ServerMetrics()

    async def main() -> None:
        model = Model()
        batcher = Batcher(
            model, max_batch_rows=32, max_delay_s=0.05, max_queue_rows=1024,
            name="movies/rank", observer=metrics.batch_metrics("movies/rank"),
        )  # fmt: skip
        results = await asyncio.gather(*(batcher.submit(i, rows=1 + i % 3) for i in range(64)))
        await batcher.drain()
        assert list(results) == [model.fn(i) for i in range(64)]  # as if called one by one
        assert sorted(model.seen()) == list(range(64))
        assert max(len(b) for b in model.batches) > 1
        assert all(sum(1 + i % 3 for i in b) <= 32 for b in model.batches)
        assert len(model.threads) == 1  # one executor thread per replica
        assert threading.current_thread().name not in model.threads

    run(main())
    get = metrics.registry.get_sample_value
    labels = {"model": "movies/rank"}
    batches = get("recship_batch_requests_count", labels)
    assert get("recship_batch_requests_sum", labels) == 64
    assert batches is not None and 64 / batches > 1
    assert get("recship_batch_rows_sum", labels) == sum(1 + i % 3 for i in range(64))
    assert get("recship_batch_cost_sum", labels) == sum(1 + i % 3 for i in range(64))
    assert get("recship_batch_seconds_count", labels) == batches
    assert get("recship_queue_wait_seconds_count", labels) == 64
    assert get("recship_queue_rows", labels) == 0
    assert get("recship_queue_cost", labels) == 0
    assert get("recship_service_rate_cost_per_second", labels) > 0


def test_max_delay_flushes_a_batch_that_never_fills() -> None:
    async def main() -> None:
        model = Model()
        observer = RecordingObserver()
        batcher = Batcher(
            model, max_batch_rows=100, max_delay_s=0.02, max_queue_rows=100, observer=observer
        )
        started = time.monotonic()
        assert await asyncio.gather(batcher.submit(1, 1), batcher.submit(2, 1)) == [10, 20]
        assert time.monotonic() - started < 5
        assert model.batches == [[1, 2]]
        assert observer.batches == [(2, 2, 2)]
        assert len(observer.waits) == 2 and all(0 <= w < 5 for w in observer.waits)
        await batcher.drain()

    run(main())


def test_max_rows_flushes_at_once_and_leaves_the_rest_queued() -> None:
    async def main() -> None:
        model = Model()
        batcher = Batcher(model, max_batch_rows=10, max_delay_s=LONG, max_queue_rows=100)
        tasks = [asyncio.create_task(batcher.submit(x, rows=4)) for x in (1, 2, 3)]
        assert await asyncio.gather(tasks[0], tasks[1]) == [10, 20]  # 12 rows queued >= 10
        assert model.batches == [[1, 2]]  # 4 + 4 fit, the third would make 12
        assert not tasks[2].done()
        assert batcher.queued_rows == 4
        await batcher.drain()  # flushes the rest without waiting the hour
        assert tasks[2].result() == 30
        assert model.batches == [[1, 2], [3]]

    run(main())


def test_batches_are_bounded_by_cost_as_well_as_rows() -> None:
    async def main() -> None:
        model = Model(hold_first=True)
        observer = RecordingObserver()
        batcher = Batcher(
            model, max_batch_rows=100, max_batch_cost=10, max_delay_s=0, max_queue_rows=100,
            max_queue_cost=100, observer=observer,
        )  # fmt: skip
        first = asyncio.create_task(batcher.submit("a", rows=1, cost=10))
        await model.started.wait()
        rest = [asyncio.create_task(batcher.submit(x, rows=1, cost=4)) for x in "bcd"]
        await until(lambda: batcher.queued_cost == 12)
        assert batcher.queued_rows == 3 and batcher.load_cost == 22
        assert observer.queue_cost == 12
        model.release.set()
        await asyncio.gather(first, *rest)
        assert model.batches == [["a"], ["b", "c"], ["d"]]  # 4 + 4 fit in 10, not 12
        assert [cost for _, _, cost in observer.batches] == [10, 8, 4]
        assert observer.queue_cost == observer.queue_rows == 0
        await batcher.drain()

    run(main())


def test_max_batch_items_one_turns_batching_off() -> None:
    async def main() -> None:
        model = Model()
        batcher = Batcher(
            model, max_batch_rows=64, max_delay_s=LONG, max_queue_rows=64, max_batch_items=1
        )
        assert await asyncio.gather(*(batcher.submit(i, 1) for i in range(5))) == [
            0, 10, 20, 30, 40,
        ]  # fmt: skip
        assert model.batches == [[i] for i in range(5)]
        await batcher.drain()

    run(main())


def test_submit_split_runs_slices_and_returns_them_in_order() -> None:
    async def main() -> None:
        model = Model(fn=lambda rows: [r * 2 for r in rows])
        batcher = Batcher(model, max_batch_rows=4, max_delay_s=0, max_queue_rows=16)
        parts = await batcher.submit_split(10, _parts)
        assert [x for part in parts for x in part] == [r * 2 for r in range(10)]
        assert [len(p) for b in model.batches for p in b] == [4, 4, 2]
        with pytest.raises(InvalidInput, match="exceeds the queue bound"):
            await batcher.submit_split(17, _parts)
        await batcher.drain()

    run(main())


def test_slices_are_cut_by_cost_and_built_only_when_they_run() -> None:
    async def main() -> None:
        built: list[tuple[int, int]] = []

        def make_part(part: slice) -> tuple[int, ...]:
            built.append((part.start, part.stop))
            return _parts(part)

        model = Model(fn=len, hold_first=True)
        batcher = Batcher(
            model, max_batch_rows=100, max_batch_cost=10, max_delay_s=0, max_queue_rows=100,
            max_queue_cost=100,
        )  # fmt: skip
        costs = [4, 4, 4, 9, 1, 1, 1, 1]  # slices of at most 10: [0, 2) [2, 3) [3, 5) [5, 8)
        request = asyncio.create_task(batcher.submit_split(8, make_part, row_costs=costs))
        await model.started.wait()
        assert built == [(0, 2)]  # one slice materialised at a time
        assert batcher.queued_cost == 25 - 8 and batcher.queued_rows == 6
        model.release.set()
        assert await request == [2, 1, 2, 3]
        assert built == [(0, 2), (2, 3), (3, 5), (5, 8)]
        with pytest.raises(InvalidInput, match="row 1 of the request costs 11"):
            await batcher.submit_split(2, make_part, row_costs=[1, 11])
        with pytest.raises(InvalidInput, match="exceeds the queue bound"):
            await batcher.submit_split(20, make_part, row_costs=[6] * 20)
        await batcher.drain()

    run(main())


def test_a_big_request_delays_a_small_one_by_at_most_one_slice() -> None:
    async def main() -> None:
        model = Model(fn=len)
        batcher = Batcher(
            model, max_batch_rows=4, max_delay_s=0, max_queue_rows=100, max_queue_cost=100
        )
        model.release.clear()  # hold the first slice of the big request
        big = asyncio.create_task(batcher.submit_split(20, _parts))
        await model.started.wait()
        small = asyncio.create_task(batcher.submit(("small",), 1))
        await until(lambda: batcher.queued_rows == 16 + 1)
        model.release.set()
        assert await small == 1
        # The small request ran in the batch right after the running slice, alone.
        assert model.batches[:2] == [[(0, 1, 2, 3)], [("small",)]]
        assert await big == [4, 4, 4, 4, 4]

    run(main())


def test_a_lone_long_request_runs_its_slices_back_to_back_on_the_executor_thread() -> None:
    async def main() -> None:
        built_on: list[str] = []

        def make_part(part: slice) -> tuple[int, ...]:
            built_on.append(threading.current_thread().name)
            return _parts(part)

        model = Model(fn=len)
        observer = RecordingObserver()
        batcher = Batcher(
            model, max_batch_rows=2, max_delay_s=0, max_queue_rows=100, observer=observer,
            name="streak",
        )  # fmt: skip
        assert await batcher.submit_split(10, make_part) == [2] * 5
        # The first slice is cut on the loop, the others by the executor thread itself.
        assert built_on[0] == threading.current_thread().name
        assert all(name.startswith("batcher-streak") for name in built_on[1:])
        assert len(observer.batches) == 5 and observer.queue_rows == observer.queue_cost == 0
        assert batcher.rate.batches == 5
        await batcher.drain()

    run(main())


def test_a_streak_yields_to_the_other_batcher_of_its_lane() -> None:
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)

    async def main() -> None:
        lane = Lane()
        order: list[str] = []
        started = asyncio.Event()
        loop = asyncio.get_running_loop()
        gate = threading.Event()

        def long_model(items: list[Any]) -> list[Any]:
            order.append(f"long{items[0][0]}")
            loop.call_soon_threadsafe(started.set)
            gate.wait(10)  # the first slice waits until the other batcher has work
            return [len(x) for x in items]

        def other_model(items: list[Any]) -> list[Any]:
            order.append("other")
            return items

        common = {"max_batch_rows": 2, "max_delay_s": 0, "max_queue_rows": 100,
                  "executor": executor, "lane": lane}  # fmt: skip
        rank = Batcher(long_model, name="rank", **common)
        retrieve = Batcher(other_model, name="retrieve", **common)
        long_request = asyncio.create_task(rank.submit_split(6, _parts))
        await started.wait()
        other = asyncio.create_task(retrieve.submit("x", 1))
        await until(lambda: retrieve.running or retrieve.pending)
        gate.set()
        assert await other == "x"
        assert await long_request == [2, 2, 2]
        assert order.index("other") == 1  # right after the slice that was running
        await rank.drain()
        await retrieve.drain()

    try:
        run(main())
    finally:
        executor.shutdown()


def test_long_requests_run_one_after_the_other_and_short_ones_take_turns() -> None:
    async def main() -> None:
        model = Model(fn=lambda part: part[0], hold_first=True)
        batcher = Batcher(
            model, max_batch_rows=2, max_delay_s=0, max_queue_rows=100, max_queue_cost=100
        )
        first = asyncio.create_task(batcher.submit(("warm",), 1))
        await model.started.wait()
        a = asyncio.create_task(batcher.submit_split(6, lambda s: ("a", s.start)))
        b = asyncio.create_task(batcher.submit_split(6, lambda s: ("b", s.start)))
        shorts = [asyncio.create_task(batcher.submit((f"s{i}",), 2)) for i in range(3)]
        await until(lambda: batcher.queued_rows == 6 + 6 + 6)
        model.release.set()
        await asyncio.gather(first, a, b, *shorts)
        order = [batch[0] for batch in model.batches[1:]]
        # After a batch of short ones ("warm"), the long ones' turn: a starts; then shorts
        # and a's slices alternate, and b starts only when a is done.
        assert order == [
            ("a", 0), ("s0",), ("a", 2), ("s1",), ("a", 4), ("s2",),
            ("b", 0), ("b", 2), ("b", 4),
        ]  # fmt: skip
        await batcher.drain()

    run(main())


def test_fair_queueing_serves_a_quiet_client_before_a_flooding_ones_backlog() -> None:
    async def main() -> None:
        model = Model(fn=lambda x: x, hold_first=True)
        batcher = Batcher(model, max_batch_rows=1, max_delay_s=0, max_queue_rows=100)
        first = asyncio.create_task(batcher.submit("warm", 1, client="a"))
        await model.started.wait()
        flood = [asyncio.create_task(batcher.submit(f"a{i}", 1, client="a")) for i in range(5)]
        await until(lambda: batcher.queued_rows == 5)
        quiet = asyncio.create_task(batcher.submit("b0", 1, client="b"))
        await until(lambda: batcher.queued_rows == 6)
        model.release.set()
        await asyncio.gather(first, quiet, *flood)
        # a's clock already counts "warm": b's one request goes before a's whole backlog.
        assert model.seen() == ["warm", "b0", "a0", "a1", "a2", "a3", "a4"]
        await batcher.drain()

    run(main())


# -- admission ------------------------------------------------------------------------------
def test_overload_is_refused_at_once_while_compute_runs_off_loop() -> None:
    async def main() -> None:
        model = Model(hold_first=True)
        observer = RecordingObserver()
        batcher = Batcher(
            model, max_batch_rows=4, max_delay_s=0, max_queue_rows=8, observer=observer
        )
        first = asyncio.create_task(batcher.submit(1, rows=4))
        await model.started.wait()  # the first batch is running and held on its thread
        queued = [asyncio.create_task(batcher.submit(x, rows=4)) for x in (2, 3)]
        await until(lambda: batcher.queued_rows == 8)
        assert batcher.load_rows == 12
        started = time.monotonic()
        with pytest.raises(Overloaded, match="queue full"):
            await batcher.submit(4, rows=1)
        assert time.monotonic() - started < 1
        assert observer.refused == ["queue_full"]
        # The loop kept running all along although run_batch is blocked on its thread.
        model.release.set()
        assert await asyncio.gather(first, *queued) == [10, 20, 30]
        assert await batcher.submit(5, rows=1) == 50  # room again
        await batcher.drain()

    run(main())


@pytest.mark.parametrize(
    ("queued_cost", "cost", "deadline_s", "admitted"),
    [
        # Measured rate 1000 cost/s, the running batch (cost 100) started now: 0.1 s left.
        (0, 100, 0.25, True),  # 0.1 + 0.1 = 0.2 s (x1.1 headroom = 0.22) < 0.25 - margin
        (0, 100, 0.2, False),  # 0.22 s > 0.2 s: refused at once
        (300, 100, 0.6, True),  # 0.1 + 0.4 = 0.5 s, 0.55 with headroom
        (300, 100, 0.5, False),
        (600, 50, 0.9, True),  # 0.1 + 0.65 = 0.75 s, 0.825 with headroom
        (600, 50, 0.8, False),
    ],
)
def test_admission_refuses_what_could_not_finish_before_its_deadline(
    queued_cost: int, cost: int, deadline_s: float, admitted: bool
) -> None:
    now = [100.0]

    async def main() -> None:
        model = Model(hold_first=True)
        observer = RecordingObserver()
        batcher = Batcher(
            model, max_batch_rows=10_000, max_batch_cost=1000, max_delay_s=0,
            max_queue_rows=10_000, max_queue_cost=10_000, observer=observer,
            clock=lambda: now[0], deadline_margin_s=0.002, admission_headroom=1.1,
        )  # fmt: skip
        batcher.rate.observe(1000, 1.0)  # a measured rate of 1000 cost per second
        running = asyncio.create_task(batcher.submit("run", 1, cost=100))
        await model.started.wait()
        waiting = []
        if queued_cost:
            waiting.append(asyncio.create_task(batcher.submit("q", 1, cost=queued_cost)))
            await until(lambda: batcher.queued_cost == queued_cost)
        deadline = now[0] + deadline_s
        expected = 0.1 + (queued_cost + cost) / 1000
        assert batcher.expected_wait_s(cost) == pytest.approx(expected)
        if admitted:
            batcher.check_admission(1, cost, deadline=deadline)
            waiting.append(asyncio.create_task(batcher.submit("new", 1, deadline, cost=cost)))
        else:
            with pytest.raises(Overloaded, match="would finish in ~"):
                await batcher.submit("new", 1, deadline, cost=cost)
            assert observer.refused == ["deadline"]
        model.release.set()
        await asyncio.gather(running, *waiting)
        await batcher.drain()

    run(main())


def test_a_pool_refuses_on_a_lower_bound_and_queues_the_exact_cost_without_headroom() -> None:
    # The service checks a request's rows and the least it can cost before decoding it
    # (`ReplicaPool.check_admission`), then submits its exact cost with `admitted=True`: that
    # is refused only when its expected finish itself passes the deadline.
    now = [100.0]

    async def main() -> None:
        model = Model(hold_first=True)
        observer = RecordingObserver()
        batcher = Batcher(
            model, max_batch_rows=10_000, max_batch_cost=1000, max_delay_s=0,
            max_queue_rows=10_000, max_queue_cost=10_000, observer=observer,
            clock=lambda: now[0], deadline_margin_s=0.002, admission_headroom=1.5,
        )  # fmt: skip
        pool = ReplicaPool([batcher])
        batcher.rate.observe(1000, 1.0)  # 1000 cost per second
        running = asyncio.create_task(batcher.submit("run", 1, cost=100))  # 0.1 s ahead
        await model.started.wait()
        deadline = now[0] + 1.0
        pool.check_admission(1, 500, deadline=deadline)  # (0.1 + 0.5) x 1.5 = 0.9 s: passes
        with pytest.raises(Overloaded, match="would finish in ~"):
            pool.check_admission(1, 700, deadline=deadline)  # 1.2 s with the headroom
        assert observer.refused == ["deadline"]
        with pytest.raises(InvalidInput, match="exceeds the queue bound"):
            pool.check_admission(1, 10_001, deadline=deadline)
        with pytest.raises(Overloaded, match="would finish in ~"):
            await pool.submit_split(1, lambda rows: "no", deadline, row_costs=[700])
        # Pre-admitted: 0.8 s is within the deadline; 1.05 s is not, whatever the bound said.
        admitted = asyncio.create_task(
            pool.submit_split(1, lambda rows: "yes", deadline, row_costs=[700], admitted=True)
        )
        await until(lambda: batcher.queued_cost == 700)
        with pytest.raises(Overloaded, match="would finish in ~"):
            await pool.submit_split(1, lambda rows: "no", deadline, row_costs=[260], admitted=True)
        model.release.set()
        await asyncio.gather(running, admitted)
        await batcher.drain()

    run(main())


def test_without_a_measured_rate_only_the_bounds_refuse() -> None:
    async def main() -> None:
        batcher = Batcher(
            Model(), max_batch_rows=4, max_delay_s=0, max_queue_rows=8, clock=lambda: 0.0
        )
        assert batcher.expected_wait_s(4) is None
        batcher.check_admission(4, 4, deadline=0.01)  # would be refused with any rate
        await batcher.drain()

    run(main())


def test_an_idle_batcher_admits_what_fits_so_that_a_low_rate_is_measured_again() -> None:
    now = [0.0]

    async def main() -> None:
        model = Model(hold_first=True, clock=now, seconds_per_item=lambda item: 0.001)
        batcher = Batcher(
            model, max_batch_rows=4, max_delay_s=0, max_queue_rows=8, clock=lambda: now[0]
        )
        batcher.rate.observe(1, 100.0)  # a rate measured far too low (say, a warm-up)
        deadline = now[0] + 1.0
        first = asyncio.create_task(batcher.submit(1, 1, deadline))  # idle: admitted
        await model.started.wait()
        with pytest.raises(Overloaded, match="would finish in"):
            await batcher.submit(2, 1, deadline)  # not idle: the estimate refuses
        model.release.set()
        assert await first == 10
        assert batcher.rate.cost_per_second > 1 / 100  # measured again
        await batcher.drain()

    run(main())


def test_a_rate_of_small_batches_only_does_not_refuse_a_long_request() -> None:
    # After light traffic the rate reflects tiny batches, their fixed overhead per row or
    # two: it would refuse every big request while a small one runs. A long request is
    # admitted then (its own slices measure the rate); a short one still is refused on it.
    now = [0.0]

    async def main() -> None:
        model = Model(hold_first=True, clock=now, seconds_per_item=lambda item: 0.1)
        batcher = Batcher(
            model, max_batch_rows=4, max_batch_cost=4, max_delay_s=0, max_queue_rows=100,
            max_queue_cost=100, clock=lambda: now[0], admission_headroom=1.5,
        )  # fmt: skip
        batcher.rate.observe(1, 0.1)  # one-row batches: 10 cost per second
        running = asyncio.create_task(batcher.submit("small", 1))
        await model.started.wait()
        deadline = now[0] + 1.0
        assert batcher.expected_wait_s(12, rows=12) * 1.5 > 1.0  # the estimate would refuse
        long_ = asyncio.create_task(batcher.submit_split(12, _parts, deadline))
        await until(lambda: batcher.queued_rows == 12)
        with pytest.raises(Overloaded, match="would finish in"):
            await batcher.submit("short", 1, now[0] + 0.1)
        model.release.set()
        await running
        assert len(await long_) == 3  # three slices of one batch
        assert model.seen()[1:] == [(0, 1, 2, 3), (4, 5, 6, 7), (8, 9, 10, 11)]
        # Its full slices measured the rate: 4 cost per 0.1 s.
        assert batcher.rate.cost_per_second > 20
        await batcher.drain()

    run(main())


def test_a_client_may_not_hold_more_than_its_share_of_a_contended_queue() -> None:
    async def main() -> None:
        model = Model(hold_first=True)
        observer = RecordingObserver()
        batcher = Batcher(
            model, max_batch_rows=100, max_batch_cost=10, max_delay_s=0, max_queue_rows=100,
            max_queue_cost=40, observer=observer,
        )  # fmt: skip
        first = asyncio.create_task(batcher.submit("run", 1, cost=1, client="a"))
        await model.started.wait()
        mine = [asyncio.create_task(batcher.submit(i, 1, cost=10, client="a")) for i in range(2)]
        theirs = asyncio.create_task(batcher.submit("b", 1, cost=1, client="b"))
        await until(lambda: batcher.queued_cost == 21)
        # 31 of 40 would be queued (contended); a would hold 30 > 40 / 2 clients.
        with pytest.raises(Overloaded, match="this client would hold 30"):
            await batcher.submit("a3", 1, cost=10, client="a")
        assert observer.refused == ["client_share"]
        other = asyncio.create_task(batcher.submit("c", 1, cost=10, client="c"))  # 11 of 40/3
        await until(lambda: batcher.queued_cost == 31)
        model.release.set()
        await asyncio.gather(first, theirs, other, *mine)
        await batcher.drain()

    run(main())


def test_a_lane_does_not_keep_a_retired_batcher_alive() -> None:
    # A batcher and its lane must not form a reference cycle: after an unload the server's
    # heap is frozen, so a cycle (and the models its `run_batch` holds) would never be freed.
    async def main() -> None:
        lane = Lane()
        first = Batcher(Model(), max_batch_rows=4, max_delay_s=0, max_queue_rows=8, lane=lane)
        second = Batcher(Model(), max_batch_rows=4, max_delay_s=0, max_queue_rows=8, lane=lane)
        assert await first.submit(1, 1) == 10
        await first.drain()
        retired = weakref.ref(first)
        del first
        assert retired() is None  # freed by reference counting alone
        assert lane.batchers == [second]
        await second.drain()

    gc.disable()
    try:
        run(main())
    finally:
        gc.enable()


def test_a_lane_counts_the_other_batchers_work_on_the_shared_thread() -> None:
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)

    async def main() -> None:
        lane = Lane()
        now = [0.0]
        common = {
            "max_batch_rows": 100, "max_batch_cost": 100, "max_delay_s": 0,
            "max_queue_rows": 1000, "max_queue_cost": 1000, "executor": executor,
            "lane": lane, "clock": lambda: now[0],
        }  # fmt: skip
        model = Model(hold_first=True)
        retrieve = Batcher(model, name="retrieve", **common)
        rank = Batcher(Model(), name="rank", **common)
        retrieve.rate.observe(100, 1.0)  # 100 cost per second
        rank.rate.observe(1000, 1.0)
        held = asyncio.create_task(retrieve.submit("run", 1, cost=1))
        await model.started.wait()
        queued = asyncio.create_task(retrieve.submit("q", 1, cost=50))
        await until(lambda: retrieve.queued_cost == 50)
        # rank: its own 100 at 1000/s, plus retrieve's backlog: its running batch (cost 1 at
        # 100/s) and its queue of 50, 0.51 s (within the bound of the wait plus one of
        # retrieve's batches: 0.1 + 1.0 s).
        assert rank.expected_wait_s(100) == pytest.approx(0.1 + 0.51)
        assert retrieve.expected_wait_s(10) == pytest.approx(0.01 + 0.6)
        model.release.set()
        await asyncio.gather(held, queued)
        await retrieve.drain()
        await rank.drain()

    try:
        run(main())
    finally:
        executor.shutdown()


# -- deadlines and cancellation -------------------------------------------------------------
def test_items_past_their_deadline_are_dropped_before_compute() -> None:
    now = [100.0]

    async def main() -> None:
        model = Model(hold_first=True)
        observer = RecordingObserver()
        batcher = Batcher(
            model, max_batch_rows=1, max_delay_s=0, max_queue_rows=8,
            observer=observer, clock=lambda: now[0],
        )  # fmt: skip
        with pytest.raises(DeadlineExceeded, match="before the request queued"):
            await batcher.submit(0, 1, deadline=now[0])
        with pytest.raises(DeadlineExceeded, match="before the request queued"):
            await batcher.submit(0, 1, deadline=now[0] + 0.001)  # within the margin
        first = asyncio.create_task(batcher.submit(1, 1))
        await model.started.wait()
        late = asyncio.create_task(batcher.submit(2, 1, deadline=now[0] + 1))
        no_deadline = asyncio.create_task(batcher.submit(3, 1))
        in_time = asyncio.create_task(batcher.submit(4, 1, deadline=now[0] + 10))
        await until(lambda: batcher.queued_rows == 3)
        now[0] += 5
        model.release.set()
        assert await first == 10
        with pytest.raises(DeadlineExceeded, match="while queued"):
            await late
        assert await no_deadline == 30
        assert await in_time == 40
        assert model.seen() == [1, 3, 4]
        assert observer.dropped == ["deadline"]
        await batcher.drain()
        assert observer.queue_rows == observer.queue_cost == 0

    run(main())


@pytest.mark.parametrize(
    ("primed", "stopped_after"),
    [
        # A rate from one batch is not trusted: slices run until the deadline has passed.
        (1, "after 8 of 10 rows"),
        # A trusted rate of 4 rows a second, when slices take 1 s (2 rows a second): after
        # 2 slices it says 3.3 rows a second, and the 6 rows left would end after 3.5 s.
        (8, "after 4 of 10 rows"),
    ],
)
def test_a_request_that_cannot_make_its_deadline_stops_between_slices(
    primed: int, stopped_after: str
) -> None:
    now = [0.0]

    async def main() -> None:
        model = Model(fn=len, clock=now, seconds_per_item=lambda part: 1.0)  # 1 s a slice
        observer = RecordingObserver()
        batcher = Batcher(
            model, max_batch_rows=2, max_delay_s=0, max_queue_rows=100, observer=observer,
            clock=lambda: now[0],
        )  # fmt: skip
        for _ in range(primed):
            batcher.rate.observe(4, 1.0)
        with pytest.raises(DeadlineExceeded, match=stopped_after):
            await batcher.submit_split(10, _parts, deadline=3.5)
        assert observer.dropped == ["deadline"]
        assert batcher.queued_rows == 0 and observer.queue_cost == 0
        await batcher.drain()

    run(main())


def test_deadline_timers_end_a_waiting_request_before_its_deadline() -> None:
    async def main() -> None:
        model = Model(hold_first=True)
        batcher = Batcher(
            model, max_batch_rows=1, max_delay_s=0, max_queue_rows=8, deadline_margin_s=0.02
        )
        held = asyncio.create_task(batcher.submit(1, 1))
        await model.started.wait()
        deadline = time.monotonic() + 0.1
        with pytest.raises(DeadlineExceeded, match="while queued"):
            await batcher.submit(2, 1, deadline=deadline)  # no batch forms meanwhile
        assert time.monotonic() < deadline  # given up a margin before the deadline
        assert batcher.queued_rows == 0
        model.release.set()
        assert await held == 10
        assert model.seen() == [1]
        await batcher.drain()

    run(main())


def test_cancelled_callers_leave_the_queue() -> None:
    async def main() -> None:
        model = Model(hold_first=True)
        observer = RecordingObserver()
        batcher = Batcher(
            model, max_batch_rows=1, max_delay_s=0, max_queue_rows=8, observer=observer
        )
        running = asyncio.create_task(batcher.submit(1, 1))
        await model.started.wait()
        waiting = asyncio.create_task(batcher.submit(2, 1))
        kept = asyncio.create_task(batcher.submit(3, 1))
        await until(lambda: batcher.queued_rows == 2)
        waiting.cancel()
        running.cancel()  # already computing: it finishes, its result is discarded
        await until(lambda: batcher.queued_rows == 1)
        assert observer.queue_rows == 1
        model.release.set()
        assert await kept == 30
        assert waiting.cancelled() and running.cancelled()
        assert model.seen() == [1, 3]
        assert observer.dropped == ["cancelled"]
        assert await batcher.submit(4, 1) == 40
        await batcher.drain()

    run(main())


def test_a_cancelled_request_computes_no_further_slice() -> None:
    async def main() -> None:
        model = Model(fn=len, hold_first=True)
        signal = threading.Event()
        batcher = Batcher(model, max_batch_rows=2, max_delay_s=0, max_queue_rows=100)
        by_task = asyncio.create_task(batcher.submit_split(10, _parts))
        await model.started.wait()
        by_task.cancel()  # the caller went away while its first slice runs
        await until(lambda: batcher.queued_rows == 0)
        by_signal = asyncio.create_task(batcher.submit_split(10, _parts, cancelled=signal.is_set))
        await until(lambda: batcher.queued_rows == 10)
        signal.set()  # e.g. grpc's context.cancelled(): seen before the next slice
        model.release.set()
        with pytest.raises(asyncio.CancelledError):
            await by_signal
        assert model.batches == [[(0, 1)]]
        assert batcher.queued_rows == batcher.queued_cost == 0
        await batcher.drain()

    run(main())


# -- failures and lifecycle -----------------------------------------------------------------
def test_a_failing_batch_fails_only_its_own_items() -> None:
    async def main() -> None:
        model = Model(fail_if=lambda items: 13 in items)
        batcher = Batcher(model, max_batch_rows=2, max_delay_s=LONG, max_queue_rows=8)
        outcomes = await asyncio.gather(
            *(batcher.submit(x, 1) for x in (13, 1, 2, 3)), return_exceptions=True
        )
        assert model.batches == [[13, 1], [2, 3]]
        assert [type(o) for o in outcomes[:2]] == [ValueError, ValueError]
        assert outcomes[2:] == [20, 30]
        await batcher.drain()

    run(main())


def test_batcher_keeps_serving_after_a_failed_batch() -> None:
    async def main() -> None:
        model = Model(fail_if=lambda items: 13 in items)
        batcher = Batcher(model, max_batch_rows=2, max_delay_s=0, max_queue_rows=8)
        with pytest.raises(ValueError, match="bad batch"):
            await batcher.submit(13, 1)
        assert await batcher.submit(7, 1) == 70
        await batcher.drain()

    run(main())


def test_wrong_number_of_results_fails_the_batch() -> None:
    async def main() -> None:
        batcher = Batcher(
            lambda items: items[:-1], max_batch_rows=4, max_delay_s=LONG, max_queue_rows=8
        )
        outcomes = await asyncio.gather(
            *(batcher.submit(x, 1) for x in range(4)), return_exceptions=True
        )
        assert all(isinstance(o, RuntimeError) for o in outcomes)
        assert "returned 3 results for 4 items" in str(outcomes[0])
        await batcher.drain()

    run(main())


def test_a_failing_slice_fails_its_whole_request() -> None:
    async def main() -> None:
        model = Model(fn=len, fail_if=lambda items: (2, 3) in items)
        batcher = Batcher(model, max_batch_rows=2, max_delay_s=0, max_queue_rows=8)
        with pytest.raises(ValueError, match="bad batch"):
            await batcher.submit_split(6, _parts)
        assert [p for b in model.batches for p in b] == [(0, 1), (2, 3)]  # not (4, 5)
        assert batcher.queued_rows == 0
        assert await batcher.submit((9,), 1) == 1
        await batcher.drain()

    run(main())


def test_a_part_that_cannot_be_built_fails_its_request_only() -> None:
    def make_part(part: slice) -> tuple[int, ...]:
        if part.start >= 4:
            raise KeyError("part 2 cannot be built")
        return _parts(part)

    async def main() -> None:
        model = Model(fn=len)
        batcher = Batcher(model, max_batch_rows=4, max_delay_s=0, max_queue_rows=16)
        with pytest.raises(KeyError, match="part 2"):
            await batcher.submit_split(8, make_part)
        assert batcher.queued_rows == 0
        assert await batcher.submit((0,), 1) == 1
        await batcher.drain()
        assert model.batches == [[(0, 1, 2, 3)], [(0,)]]

    run(main())


def test_drain_finishes_queued_and_running_work_then_refuses_new_work() -> None:
    async def main() -> None:
        model = Model(hold_first=True)
        batcher = Batcher(model, max_batch_rows=2, max_delay_s=LONG, max_queue_rows=8)
        running = [asyncio.create_task(batcher.submit(x, 1)) for x in (1, 2)]
        await model.started.wait()
        queued = [asyncio.create_task(batcher.submit(x, 1)) for x in (3,)]
        await until(lambda: batcher.queued_rows == 1)
        drained = asyncio.create_task(batcher.drain())
        await until(lambda: batcher.closed)
        with pytest.raises(Unavailable, match="shutting down"):
            await batcher.submit(9, 1)
        assert not drained.done()
        model.release.set()
        await drained
        assert [t.result() for t in running + queued] == [10, 20, 30]
        assert model.batches == [[1, 2], [3]]  # the lone item did not wait the long delay
        with pytest.raises(Unavailable):
            await batcher.submit(9, 1)

    run(main())


def test_drain_keeps_a_given_executor_open() -> None:
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)

    async def main() -> None:
        batcher = Batcher(
            Model(), max_batch_rows=2, max_delay_s=0, max_queue_rows=2, executor=executor
        )
        assert await batcher.submit(1, 1) == 10
        await batcher.drain()

    try:
        run(main())
        assert executor.submit(lambda: 5).result(timeout=5) == 5
    finally:
        executor.shutdown()


def test_rows_or_cost_out_of_range_are_a_caller_bug() -> None:
    async def main() -> None:
        batcher = Batcher(
            Model(), max_batch_rows=4, max_batch_cost=8, max_delay_s=0, max_queue_rows=8
        )
        for rows, cost in ((0, None), (5, None), (1, 9), (1, 0)):
            with pytest.raises(ValueError, match="submit_split"):
                await batcher.submit(1, rows, cost=cost)
        with pytest.raises(ValueError, match="3 row costs for 2 rows"):
            await batcher.submit_split(2, _parts, row_costs=[1, 1, 1])
        await batcher.drain()

    run(main())


def test_callers_are_failed_not_stranded_if_the_consumer_task_dies() -> None:
    async def main() -> None:
        model = Model(hold_first=True)
        batcher = Batcher(model, max_batch_rows=1, max_delay_s=0, max_queue_rows=8, name="t")
        running = asyncio.create_task(batcher.submit(1, 1))
        await model.started.wait()
        queued = asyncio.create_task(batcher.submit(2, 1))
        await until(lambda: batcher.queued_rows == 1)
        [consumer] = [t for t in asyncio.all_tasks() if t.get_name() == "batcher-t"]
        consumer.cancel()  # what event-loop shutdown does to a batcher never drained
        for task in (running, queued):
            with pytest.raises(Unavailable, match="t stopped"):
                await task
        with pytest.raises(Unavailable):
            await batcher.submit(3, 1)
        model.release.set()
        await batcher.drain()

    run(main())


# -- replica pools --------------------------------------------------------------------------
def test_replica_pool_sends_work_to_the_least_loaded_replica() -> None:
    async def main() -> None:
        models = [Model(hold_first=True), Model(hold_first=True)]
        pool = ReplicaPool(
            [
                Batcher(m, max_batch_rows=4, max_delay_s=0, max_queue_rows=4, name=f"r{i}")
                for i, m in enumerate(models)
            ]
        )
        r0, r1 = pool.replicas
        a = asyncio.create_task(pool.submit(1, rows=1))
        await until(lambda: r0.load_rows == 1 or r1.load_rows == 1)
        busy, idle = (r0, r1) if r0.load_rows else (r1, r0)
        b = asyncio.create_task(pool.submit(2, rows=4))
        await until(lambda: idle.load_rows == 4)
        c = asyncio.create_task(pool.submit(3, rows=1))  # load 1 vs 4: goes to `busy`
        await until(lambda: busy.queued_rows == 1)
        assert idle.queued_rows == 0 and idle.load_rows == 4
        d = asyncio.create_task(pool.submit(4, rows=3))  # loads 1 + 1 vs 4: `busy` again
        await until(lambda: busy.queued_rows == 4)
        e = asyncio.create_task(pool.submit(5, rows=4))  # only `idle` has room
        await until(lambda: idle.queued_rows == 4)
        with pytest.raises(Overloaded, match="all 2 replica queues are full"):
            await pool.submit(6, rows=1)
        for m in models:
            m.release.set()
        assert await asyncio.gather(a, b, c, d, e) == [10, 20, 30, 40, 50]
        assert sorted(x for m in models for x in m.seen()) == [1, 2, 3, 4, 5]
        assert models[0].threads.isdisjoint(models[1].threads)  # a thread per replica
        await pool.drain()
        with pytest.raises(Unavailable, match="every replica"):
            await pool.submit(6, rows=1)

    run(main())


def test_replica_pool_spreads_requests_and_refuses_what_no_replica_could_hold() -> None:
    async def main() -> None:
        models = [Model(fn=lambda rows: [-r for r in rows]) for _ in range(3)]
        pool = ReplicaPool(
            [Batcher(m, max_batch_rows=4, max_delay_s=LONG, max_queue_rows=4) for m in models]
        )
        results = await asyncio.gather(*(pool.submit_split(4, _parts) for _ in range(3)))
        assert all([x for part in parts for x in part] == [0, -1, -2, -3] for parts in results)
        assert all(len(m.batches) == 1 for m in models)  # one request on each replica
        with pytest.raises(InvalidInput, match="exceeds the queue bound of 4 rows"):
            await pool.submit_split(5, _parts)
        await pool.drain()

    run(main())


def test_replica_pool_needs_matching_replicas() -> None:
    with pytest.raises(ValueError, match="at least one"):
        ReplicaPool([])
    with pytest.raises(ValueError, match="share max_batch_rows"):
        ReplicaPool(
            [
                Batcher(list, max_batch_rows=2, max_delay_s=0, max_queue_rows=4),
                Batcher(list, max_batch_rows=3, max_delay_s=0, max_queue_rows=4),
            ]
        )


@settings(max_examples=40, deadline=None)
@given(
    data=st.data(),
    max_batch_rows=st.integers(1, 8),
    max_batch_cost=st.integers(3, 24),
    max_delay_s=st.sampled_from([0.0, 0.001]),
    max_batch_items=st.sampled_from([None, 1, 3]),
    replicas=st.integers(1, 3),
)
def test_every_caller_gets_exactly_its_own_result(
    data: st.DataObject,
    max_batch_rows: int,
    max_batch_cost: int,
    max_delay_s: float,
    max_batch_items: int | None,
    replicas: int,
) -> None:
    callers = data.draw(
        st.lists(
            st.tuples(
                st.lists(st.integers(1, 3), min_size=1, max_size=3 * max_batch_rows),
                st.integers(0, 3),
                st.sampled_from(["a", "b", "c"]),
            ),
            min_size=1,
            max_size=30,
        ),
        label="(row costs, yields before submitting, client) per caller",
    )

    def run_batch(items: list[tuple[int, int, int, int]]) -> Sequence[tuple[int, int]]:
        # item = (caller, first row, rows, cost); result = (caller, sum of its rows' values)
        assert sum(rows for _, _, rows, _ in items) <= max_batch_rows
        assert sum(cost for *_, cost in items) <= max_batch_cost
        assert max_batch_items is None or len(items) <= max_batch_items
        return [(c, sum(range(lo, lo + n))) for c, lo, n, _ in items]

    async def caller(
        pool: ReplicaPool[Any, Any], i: int, costs: list[int], yields: int, client: str
    ) -> int:
        for _ in range(yields):
            await asyncio.sleep(0)
        bounds = np.concatenate([[0], np.cumsum(costs)])
        parts = await pool.submit_split(
            len(costs),
            lambda s: (i, s.start, s.stop - s.start, int(bounds[s.stop] - bounds[s.start])),
            row_costs=costs,
            client=client,
        )
        assert all(who == i for who, _ in parts)
        return sum(total for _, total in parts)

    # Queues large enough that no client is refused its fair share (the queue bound over the
    # clients queuing): this property is about whose results come back, not about admission.
    clients = len({client for *_, client in callers})
    rows = sum(len(costs) for costs, _, _ in callers)
    cost = sum(sum(costs) for costs, _, _ in callers)

    async def main() -> list[int]:
        pool = ReplicaPool(
            [
                Batcher(
                    run_batch,
                    max_batch_rows=max_batch_rows,
                    max_batch_cost=max_batch_cost,
                    max_delay_s=max_delay_s,
                    max_queue_rows=max(100 * max_batch_rows, clients * rows),
                    max_queue_cost=max(100 * max_batch_cost, clients * cost),
                    max_batch_items=max_batch_items,
                )
                for _ in range(replicas)
            ]
        )
        results = await asyncio.gather(*(caller(pool, i, *spec) for i, spec in enumerate(callers)))
        for replica in pool.replicas:
            assert replica.queued_rows == replica.queued_cost == 0
        await pool.drain()
        return list(results)

    assert run(main()) == [sum(range(len(costs))) for costs, _, _ in callers]
