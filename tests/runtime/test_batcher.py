"""The dynamic batcher with real asyncio and real executor threads.

Synchronisation is by events and by yielding to the event loop (`until`), never by sleeping;
times appear only as upper bounds (`run`'s timeout) or through a fake clock.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recship.base.errors import (
    DeadlineExceeded,
    InvalidInput,
    Overloaded,
    Unavailable,
)
from recship.runtime.batcher import Batcher, ReplicaPool, split_rows
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

    def __call__(self, items: list[Any]) -> list[Any]:
        self.batches.append(list(items))
        self.threads.add(threading.current_thread().name)
        self._loop.call_soon_threadsafe(self.started.set)
        if len(self.batches) == 1 and not self.release.wait(timeout=15):
            raise TimeoutError("the test never released the first batch")
        if self.fail_if(items):
            raise ValueError(f"bad batch {items}")
        return [self.fn(x) for x in items]

    def seen(self) -> list[Any]:
        return [x for batch in self.batches for x in batch]


class RecordingObserver:
    def __init__(self) -> None:
        self.batches: list[tuple[int, int]] = []
        self.waits: list[float] = []
        self.queue_rows = 0

    def observe_batch(self, rows: int, items: int) -> None:
        self.batches.append((rows, items))

    def observe_queue_wait(self, seconds: float) -> None:
        self.waits.append(seconds)

    def add_queue_rows(self, delta: int) -> None:
        self.queue_rows += delta
        assert self.queue_rows >= 0


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


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_batch_rows": 0, "max_delay_s": 0, "max_queue_rows": 8},
        {"max_batch_rows": 4, "max_delay_s": -1, "max_queue_rows": 8},
        {"max_batch_rows": 4, "max_delay_s": 0, "max_queue_rows": 3},
        {"max_batch_rows": 4, "max_delay_s": 0, "max_queue_rows": 8, "max_batch_items": 0},
    ],
)
def test_bad_configuration(kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidInput, match="max_"):
        Batcher(lambda items: items, name="t", **kwargs)


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
    assert get("recship_queue_wait_seconds_count", labels) == 64
    assert get("recship_queue_rows", labels) == 0


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
        assert observer.batches == [(2, 2)]
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


def test_overload_is_refused_at_once_while_compute_runs_off_loop() -> None:
    async def main() -> None:
        model = Model(hold_first=True)
        batcher = Batcher(model, max_batch_rows=4, max_delay_s=0, max_queue_rows=8)
        first = asyncio.create_task(batcher.submit(1, rows=4))
        await model.started.wait()  # the first batch is running and held on its thread
        queued = [asyncio.create_task(batcher.submit(x, rows=4)) for x in (2, 3)]
        await until(lambda: batcher.queued_rows == 8)
        assert batcher.load_rows == 12
        started = time.monotonic()
        with pytest.raises(Overloaded, match="queue full"):
            await batcher.submit(4, rows=1)
        assert time.monotonic() - started < 1
        # The loop kept running all along although run_batch is blocked on its thread.
        model.release.set()
        assert await asyncio.gather(first, *queued) == [10, 20, 30]
        assert await batcher.submit(5, rows=1) == 50  # room again
        await batcher.drain()

    run(main())


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
        await batcher.drain()
        assert observer.queue_rows == 0

    run(main())


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
        assert await batcher.submit(4, 1) == 40
        await batcher.drain()

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


def test_rows_out_of_range_are_a_caller_bug() -> None:
    async def main() -> None:
        batcher = Batcher(Model(), max_batch_rows=4, max_delay_s=0, max_queue_rows=8)
        for rows in (0, 5):
            with pytest.raises(ValueError, match="submit_split"):
                await batcher.submit(1, rows)
        await batcher.drain()

    run(main())


def _parts(part: slice) -> tuple[int, ...]:
    return tuple(range(part.start, part.stop))


def test_submit_split_runs_parts_and_returns_them_in_order() -> None:
    async def main() -> None:
        model = Model(fn=lambda rows: [r * 2 for r in rows])
        batcher = Batcher(model, max_batch_rows=4, max_delay_s=0, max_queue_rows=16)
        parts = await batcher.submit_split(10, _parts)
        assert [x for part in parts for x in part] == [r * 2 for r in range(10)]
        assert sorted(len(p) for b in model.batches for p in b) == [2, 4, 4]
        with pytest.raises(InvalidInput, match="exceeds the queue bound"):
            await batcher.submit_split(17, _parts)
        await batcher.drain()

    run(main())


def test_submit_split_is_admitted_all_or_nothing() -> None:
    async def main() -> None:
        model = Model(fn=len, hold_first=True)
        batcher = Batcher(model, max_batch_rows=4, max_delay_s=0, max_queue_rows=8)
        first = asyncio.create_task(batcher.submit((0,), 1))
        await model.started.wait()
        blocker = asyncio.create_task(batcher.submit((1, 2, 3), 3))
        await until(lambda: batcher.queued_rows == 3)
        with pytest.raises(Overloaded):
            await batcher.submit_split(6, _parts)  # 3 + 6 > 8: no part may be queued
        assert batcher.queued_rows == 3
        model.release.set()
        assert await asyncio.gather(first, blocker) == [1, 3]
        assert await batcher.submit_split(8, _parts) == [4, 4]
        await batcher.drain()

    run(main())


def test_submit_split_failure_withdraws_the_other_parts() -> None:
    async def main() -> None:
        model = Model(fn=len, hold_first=True, fail_if=lambda items: (0, 1) in items)
        batcher = Batcher(model, max_batch_rows=2, max_delay_s=0, max_queue_rows=8)
        split = asyncio.create_task(batcher.submit_split(6, _parts))
        await model.started.wait()
        await until(lambda: batcher.queued_rows == 4)
        model.release.set()
        with pytest.raises(ValueError, match="bad batch"):
            await split
        await until(lambda: batcher.queued_rows == 0)
        assert await batcher.submit((9,), 1) == 1
        await batcher.drain()

    run(main())


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


def test_replica_pool_spreads_a_split_request_over_replicas() -> None:
    async def main() -> None:
        models = [Model(fn=lambda rows: [-r for r in rows]) for _ in range(3)]
        pool = ReplicaPool(
            [Batcher(m, max_batch_rows=4, max_delay_s=LONG, max_queue_rows=4) for m in models]
        )
        parts = await pool.submit_split(12, _parts)
        assert [x for part in parts for x in part] == [-r for r in range(12)]
        assert all(len(m.batches) == 1 for m in models)
        with pytest.raises(InvalidInput, match="exceeds the queue bound of 12 rows"):
            await pool.submit_split(13, _parts)
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
    max_delay_s=st.sampled_from([0.0, 0.001]),
    max_batch_items=st.sampled_from([None, 1, 3]),
    replicas=st.integers(1, 3),
)
def test_every_caller_gets_exactly_its_own_result(
    data: st.DataObject,
    max_batch_rows: int,
    max_delay_s: float,
    max_batch_items: int | None,
    replicas: int,
) -> None:
    callers = data.draw(
        st.lists(
            st.tuples(st.integers(1, 3 * max_batch_rows), st.integers(0, 3)),
            min_size=1,
            max_size=30,
        ),
        label="(rows, yields before submitting) per caller",
    )

    def run_batch(items: list[tuple[int, int, int]]) -> Sequence[tuple[int, int]]:
        # item = (caller, first row, rows); result = (caller, sum of its rows' values)
        assert sum(rows for _, _, rows in items) <= max_batch_rows
        assert max_batch_items is None or len(items) <= max_batch_items
        return [(c, sum(range(lo, lo + n))) for c, lo, n in items]

    async def caller(pool: ReplicaPool[Any, Any], i: int, rows: int, yields: int) -> int:
        for _ in range(yields):
            await asyncio.sleep(0)
        if rows <= max_batch_rows:
            [(who, total)] = [await pool.submit((i, 0, rows), rows)]
            assert who == i
            return total
        parts = await pool.submit_split(rows, lambda s: (i, s.start, s.stop - s.start))
        assert all(who == i for who, _ in parts)
        return sum(total for _, total in parts)

    async def main() -> list[int]:
        pool = ReplicaPool(
            [
                Batcher(
                    run_batch,
                    max_batch_rows=max_batch_rows,
                    max_delay_s=max_delay_s,
                    max_queue_rows=100 * max_batch_rows,
                    max_batch_items=max_batch_items,
                )
                for _ in range(replicas)
            ]
        )
        results = await asyncio.gather(
            *(caller(pool, i, rows, yields) for i, (rows, yields) in enumerate(callers))
        )
        await pool.drain()
        return list(results)

    assert run(main()) == [sum(range(rows)) for rows, _ in callers]


def test_submit_split_withdraws_queued_parts_when_building_a_part_fails() -> None:
    def make_part(part: slice) -> tuple[int, ...]:
        if part.start >= 4:
            raise KeyError("part 2 cannot be built")
        return _parts(part)

    async def main() -> None:
        model = Model(fn=len, hold_first=True)
        batcher = Batcher(model, max_batch_rows=4, max_delay_s=0, max_queue_rows=16)
        first = asyncio.create_task(batcher.submit((0,), 1))
        await model.started.wait()
        with pytest.raises(KeyError, match="part 2"):
            await batcher.submit_split(8, make_part)
        await until(lambda: batcher.queued_rows == 0)
        model.release.set()
        assert await first == 1
        await batcher.drain()
        assert model.batches == [[(0,)]]

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
