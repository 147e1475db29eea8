"""Overload on a real server: refusals at once, deadlines kept, goodput near capacity.

The load comes from `loadgen.py` in a process of its own (its own GIL), over several real
gRPC channels; the server runs in this process (`server_factory`), so its memory and its
batchers can be read directly. Rates are never assumed: each test measures what the server
sustains on this machine (closed loop) just before overloading it (open loop at 10x).
"""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from recship.protos.v1 import recommender_pb2, recommender_pb2_grpc
from recship.runtime.client import Query, model_spec, query_proto

pytestmark = pytest.mark.integration

LOADGEN = Path(__file__).with_name("loadgen.py")
RANK = "/recship.v1.Recommender/Rank"


def rank_request(make_user: Any, rows: int, queries: int = 1) -> recommender_pb2.RankRequest:
    """`queries` Rank queries of `rows` candidates each (the catalogue's raw item ids)."""
    return recommender_pb2.RankRequest(
        model=model_spec("movies"),
        queries=[
            recommender_pb2.RankQuery(
                query=query_proto(Query(make_user(q % 300, 0.0))),
                candidate_item_ids=[str(i % 200 + 1) for i in range(rows)],
            )
            for q in range(queries)
        ],
    )


def resident_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096 / 2**20


class PeakMemory:
    """Samples this process's resident memory on a thread; `peak_mb` is the highest seen."""

    def __init__(self) -> None:
        self.baseline_mb = resident_mb()
        self.peak_mb = self.baseline_mb
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak_mb = max(self.peak_mb, resident_mb())

    def stop(self) -> float:
        """Stops sampling; returns the growth over the baseline, in MiB."""
        self._stop.set()
        self._thread.join()
        return self.peak_mb - self.baseline_mb


def run_load(target: str, body: bytes, timeout_s: float, phases: list[dict[str, Any]]) -> Any:
    spec = {
        "target": target, "method": RANK, "body_hex": body.hex(), "channels": 4,
        "timeout_s": timeout_s, "phases": phases,
    }  # fmt: skip
    done = subprocess.run(
        [sys.executable, str(LOADGEN), "/dev/stdin"],
        input=json.dumps(spec),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_full_queue_and_deadlines(bundle_repo, server_factory, make_user) -> None:
    # Batches of 8 rows that wait up to 1.5 s to fill, at most 8 rows queued per model.
    server = server_factory(bundle_repo, max_batch_size=8, max_queue_rows=8, max_delay_ms=1500)
    server.wait_ready()
    channel = grpc.insecure_channel(server.target)
    stub = recommender_pb2_grpc.RecommenderStub(channel)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        waiting = pool.submit(stub.Rank, rank_request(make_user, 5), timeout=30)
        # Wait until the first request occupies the queue (its 5 rows wait for the delay).
        deadline = time.monotonic() + 10
        while server.server.manager.queued_rows("movies") < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            stub.Rank(rank_request(make_user, 5), timeout=30)
        assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queues are full" in caught.value.details()
        assert time.monotonic() - started < 1.0
        assert len(waiting.result().results[0].scores) == 5

    # A request whose deadline passes while it waits for its batch is dropped, not computed,
    # and the server answers DEADLINE_EXCEEDED itself (as the proto documents), before the
    # transport would cancel the call.
    get = server.server.metrics.registry.get_sample_value
    before = get("recship_batch_rows_count", {"model": "movies/rank"})
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        stub.Rank(rank_request(make_user, 3), timeout=0.3)
    assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 1.0
    # Its queue entry goes away (withdrawn, or dropped at flush time) without a model batch.
    deadline = time.monotonic() + 10
    while server.server.manager.queued_rows("movies") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.server.manager.queued_rows("movies") == 0
    assert get("recship_batch_rows_count", {"model": "movies/rank"}) == before
    codes = {"method": RANK.lstrip("/"), "code": "DEADLINE_EXCEEDED"}
    assert get("recship_requests_total", codes) == 1
    assert get("recship_requests_total", {**codes, "code": "CANCELLED"}) is None
    channel.close()


class ProcessSampler:
    """Samples, every 10 ms on a thread: wall time, this process's CPU time, its resident
    memory and the rank model's busy seconds (the server runs in this process)."""

    def __init__(self, registry: Any) -> None:
        self._get = registry.get_sample_value
        self.samples: list[tuple[float, float, float, float]] = []
        self.baseline_mb = resident_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        busy = self._get("recship_batch_seconds_sum", {"model": "movies/rank"}) or 0.0
        self.samples.append((time.time(), time.process_time(), resident_mb(), busy))

    def _run(self) -> None:
        self._sample()
        while not self._stop.wait(0.01):
            self._sample()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def between(self, start: float, end: float) -> tuple[float, float]:
        """(CPU seconds, model busy seconds) of this process between two wall times."""
        array = np.array(self.samples)
        cpu = np.interp([start, end], array[:, 0], array[:, 1])
        busy = np.interp([start, end], array[:, 0], array[:, 3])
        return float(cpu[1] - cpu[0]), float(busy[1] - busy[0])

    @property
    def growth_mb(self) -> float:
        return max(sample[2] for sample in self.samples) - self.baseline_mb


def test_goodput_stays_near_capacity_at_ten_times_the_sustainable_rate(
    bundle_repo, server_factory, make_user
) -> None:
    """10x the capacity measured in this test, with 1 s deadlines.

    Requests are heavy enough (2048 candidates whose query features hold 410 ids each, ~4 M
    cost) that the model, not the event loop, bounds capacity: refusing one costs the loop
    ~0.5 ms (grpc.aio, decoding, validation), so at 10x a light request's rate the loop alone
    would take a core (see the module's report in the commit). Capacity is the OK rate of a
    closed loop of 8 callers without deadline pressure, in turns with the overload phases.

    The two cores are shared with other work whose share swings 2-3x within seconds, so the
    goodput is compared per second of CPU this process got (the server's cost of handling
    the overload is what shows there), with the replica busy throughout the overload; the
    wall-clock rates are reported beside. Likewise the refusal latency is asserted as the
    server measures it (call start to RESOURCE_EXHAUSTED), its median also at the client.
    """
    server = server_factory(
        bundle_repo, max_batch_size=4096, max_delay_ms=0, max_queue_cost=1 << 27
    )
    server.wait_ready()
    body = rank_request(make_user, 2048, bag=1024).SerializeToString()
    closed = {"mode": "closed", "concurrency": 8, "timeout_s": 30.0}
    # Each phase ends once its calls are answered (or expired): the next starts on an idle
    # server. Capacity and overload take turns, so both see the same machine.
    phases: list[dict[str, Any]] = [{**closed, "duration_s": 2.5, "warmup": True}]
    for _ in range(2):
        phases += [{**closed, "duration_s": 2.0}, {"mode": "open", "factor": 10, "duration_s": 2.5}]
    phases.append({**closed, "duration_s": 1.0})  # recovery
    registry = server.server.metrics.registry
    sampler = ProcessSampler(registry)
    result = run_load(server.target, body, 1.0, phases)
    sampler.stop()

    def rates(selected: list[int]) -> tuple[float, float, float]:
        """(OK answers per second, busy fraction of the replica, calls per second).

        Every OK answer to the phases' calls, over the time from each phase's start until
        the last of them arrived (what the server took to deliver them: the phase, then its
        queue draining before the next phase starts).
        """
        phase = [result[i] for i in selected]
        ok = sum(p["codes"].get("OK", 0) for p in phase)
        took = sum(max(p["seconds"], p["ok_until_s"]) for p in phase)
        wall = sum(p["seconds"] for p in phase)
        busy = sum(sampler.between(*p["wall"])[1] for p in phase)
        return ok / took, busy / wall, sum(p["calls"] for p in phase) / wall

    def cpu_share(selected: list[int]) -> float:
        """Cores this process got during the phases (CPU seconds per wall second)."""
        phase = [result[i] for i in selected]
        cpu = sum(sampler.between(*p["wall"])[0] for p in phase)
        return cpu / sum(p["seconds"] for p in phase)

    measuring = [i for i, p in enumerate(result[:-1]) if p["mode"] == "closed" and not p["warmup"]]
    overloads = [i for i, p in enumerate(result) if p["mode"] == "open"]
    capacity, busy_calibrating, _ = rates(measuring)
    accepted, busy, offered = rates(overloads)
    opened = [result[i] for i in overloads]
    refused = np.array([x for p in opened for x in p["latencies"].get("RESOURCE_EXHAUSTED", [])])
    refusal = {"method": RANK.lstrip("/")}
    fast = registry.get_sample_value(
        "recship_refusal_latency_seconds_bucket", {**refusal, "le": "0.01"}
    )
    refusals = registry.get_sample_value("recship_refusal_latency_seconds_count", refusal)
    codes = {code for p in opened for code in p["codes"]}
    recovery = result[-1]
    figures = {
        "capacity_per_s": round(capacity, 1),
        "offered_per_s": round(offered, 1),
        "accepted_per_s": round(accepted, 1),
        "replica_busy": round(busy, 2),
        "replica_busy_calibrating": round(busy_calibrating, 2),
        "cores_calibrating": round(cpu_share(measuring), 2),
        "cores_overloaded": round(cpu_share(overloads), 2),
        "resource_exhausted": int(refused.size),
        "client_resource_exhausted_p50_ms": round(float(np.percentile(refused, 50)) * 1000, 2),
        "client_resource_exhausted_p99_ms": round(float(np.percentile(refused, 99)) * 1000, 2),
        "server_refusals_within_10_ms": round(fast / refusals, 4),
        "memory_growth_mb": round(sampler.growth_mb, 1),
        "codes": sorted(codes),
        "recovery": recovery["codes"],
        "recovery_ok_p50_ms": round(recovery["latency"]["OK"]["p50"] * 1000, 1),
        "before_ok_p50_ms": round(result[measuring[0]]["latency"]["OK"]["p50"] * 1000, 1),
        "phases": [
            (p["mode"], p["codes"], round(sampler.between(*p["wall"])[1] / p["seconds"], 2))
            for p in result
        ],
    }
    print("overload figures:", json.dumps(figures))
    if cpu_share(measuring) < 0.5:
        pytest.skip(f"this machine is too contended to measure overload: {figures}")
    # Each overload phase offered 10x the capacity measured before it (the load generator
    # sets its rate so); over both, many times the capacity measured over the whole test.
    assert offered > 5 * capacity, figures
    assert accepted >= 0.8 * capacity, figures
    # The overload left the replica no idler than the sustainable load did.
    assert busy > min(0.85, busy_calibrating - 0.05), figures
    assert refusals >= refused.size and fast >= 0.99 * refusals, figures  # p99 < 10 ms
    assert np.percentile(refused, 50) < 0.010, figures
    assert codes <= {"OK", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"}, figures  # no CANCELLED
    assert sampler.growth_mb < 256, figures
    # Full recovery: everything answered, nothing left queued.
    assert set(recovery["codes"]) == {"OK"}, figures
    assert registry.get_sample_value("recship_queue_cost", {"model": "movies/rank"}) == 0
    assert server.server.manager.queued_rows("movies") == 0


def _rank(stub: Any, request: recommender_pb2.RankRequest, timeout: float = 30) -> float:
    started = time.perf_counter()
    stub.Rank(request, timeout=timeout)
    return time.perf_counter() - started


def test_a_big_bag_request_delays_a_small_one_by_at_most_its_slice(
    bundle_repo, server_factory, make_user
) -> None:
    # The request of the issue: 4096 candidates whose query features hold 4096 ids each,
    # ~84 M ids (it held a replica for 16.6 s and grew memory by 1.3 GB). Now it runs in
    # slices of one batch (262144 cost), and a small request waits for one slice at most.
    server = server_factory(
        bundle_repo, max_batch_size=4096, max_delay_ms=0, max_queue_cost=1 << 27
    )
    server.wait_ready()
    big = rank_request(make_user, 4096, bag=4096)
    small = rank_request(make_user, 10)
    get = server.server.metrics.registry.get_sample_value
    batches = {"model": "movies/rank"}
    with (
        grpc.insecure_channel(server.target) as big_channel,
        grpc.insecure_channel(server.target) as small_channel,
    ):
        big_stub = recommender_pb2_grpc.RecommenderStub(big_channel)
        small_stub = recommender_pb2_grpc.RecommenderStub(small_channel)
        idle = min(_rank(small_stub, small) for _ in range(5))
        memory = PeakMemory()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            count_before = get("recship_batch_seconds_count", batches)
            seconds_before = get("recship_batch_seconds_sum", batches)
            started = time.perf_counter()
            running = pool.submit(_rank, big_stub, big, 60)
            deadline = time.monotonic() + 30
            while get("recship_batch_seconds_count", batches) < count_before + 3:
                assert time.monotonic() < deadline and not running.done()
                time.sleep(0.001)
            delays = [_rank(small_stub, small) - idle for _ in range(10)]
            assert not running.done()  # the small ones were answered while it ran
            big_seconds = running.result()
        growth_mb = memory.stop()
        slices = get("recship_batch_seconds_count", batches) - count_before - 10
        mean_slice = (get("recship_batch_seconds_sum", batches) - seconds_before) / (slices + 10)
    figures = {
        "big_request_s": round(big_seconds, 2),
        "slices": slices,
        "mean_slice_ms": round(mean_slice * 1000, 2),
        "small_idle_ms": round(idle * 1000, 2),
        "small_delay_max_ms": round(max(delays) * 1000, 2),
        "memory_growth_mb": round(growth_mb, 1),
        "took": round(time.perf_counter() - started, 2),
    }
    print("big-bag figures:", json.dumps(figures))
    assert slices > 100, figures  # it was cut into slices of at most one batch
    # Each small request waited at most for the slice running when it arrived (plus the
    # noise of two shared cores), never for the big request.
    assert max(delays) < 2 * mean_slice + 0.015, figures
    assert max(delays) < big_seconds / 20, figures
    assert growth_mb < 256, figures


def test_the_server_stops_working_on_a_request_at_its_deadline(
    bundle_repo, server_factory, make_user
) -> None:
    server = server_factory(
        bundle_repo, max_batch_size=4096, max_delay_ms=0, max_queue_cost=1 << 27
    )
    server.wait_ready()
    big = rank_request(make_user, 4096, bag=4096)  # seconds of work, in slices
    get = server.server.metrics.registry.get_sample_value
    batches = {"model": "movies/rank"}
    with grpc.insecure_channel(server.target) as channel:
        stub = recommender_pb2_grpc.RecommenderStub(channel)
        stub.Rank(rank_request(make_user, 10), timeout=30)  # a measured rate
        started = time.perf_counter()
        with pytest.raises(grpc.RpcError) as caught:
            stub.Rank(big, timeout=0.5)
        answered = time.perf_counter() - started
    assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert answered < 0.6
    # No slice of it starts after the deadline: the batch count stops at once.
    stopped = get("recship_batch_seconds_count", batches)
    time.sleep(0.3)
    assert get("recship_batch_seconds_count", batches) == stopped
    assert server.server.manager.queued_rows("movies") == 0
    method = {"method": RANK.lstrip("/")}
    assert get("recship_requests_total", {**method, "code": "DEADLINE_EXCEEDED"}) == 1
    assert get("recship_requests_total", {**method, "code": "CANCELLED"}) is None
