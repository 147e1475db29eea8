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
        # Refused from the request's row count, before its ids are looked up: an unknown
        # candidate id (INVALID_ARGUMENT on an idle server) is not even read.
        unread = rank_request(make_user, 5)
        unread.queries[0].candidate_item_ids[4] = "no-such-item"
        with pytest.raises(grpc.RpcError) as caught:
            stub.Rank(unread, timeout=30)
        assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
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
    memory and the rank model's busy seconds and rows computed (the server runs in this
    process)."""

    def __init__(self, registry: Any) -> None:
        self._get = registry.get_sample_value
        self.samples: list[tuple[float, float, float, float, float]] = []
        self.baseline_mb = resident_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        rank = {"model": "movies/rank"}
        busy = self._get("recship_batch_seconds_sum", rank) or 0.0
        rows = self._get("recship_batch_rows_sum", rank) or 0.0
        self.samples.append((time.time(), time.process_time(), resident_mb(), busy, rows))

    def _run(self) -> None:
        self._sample()
        while not self._stop.wait(0.01):
            self._sample()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def between(self, start: float, end: float) -> tuple[float, float, float]:
        """(CPU seconds, model busy seconds, rows computed) of this process between two wall
        times."""
        array = np.array(self.samples)
        cpu, busy, rows = (np.interp([start, end], array[:, 0], array[:, k]) for k in (1, 3, 4))
        return float(cpu[1] - cpu[0]), float(busy[1] - busy[0]), float(rows[1] - rows[0])

    @property
    def growth_mb(self) -> float:
        return max(sample[2] for sample in self.samples) - self.baseline_mb


def test_goodput_stays_near_capacity_at_ten_times_the_sustainable_rate(
    bundle_repo, server_factory, make_user, own_process
) -> None:
    """10x the capacity measured in this test, with 1 s deadlines.

    Requests are heavy enough (8 queries of 4096 candidates: 32768 rows, ~1.3 M cost, tens
    of milliseconds of model time) that the model, not the event loop, bounds capacity: a
    refusal costs the loop parsing the body and one admission check, so at 10x a light
    request's rate the loop alone would take a core. Capacity is the OK rate of a closed loop
    of 8 callers without deadline pressure, in turns with the overload phases.

    The two cores are shared with other work whose share swings 2-3x within seconds, so the
    phases alternate (both see the same machine), the replica must stay as busy during the
    overload as while calibrating, and the cores this process got are reported beside. The
    refusal latency is asserted as the server measures it (call start to RESOURCE_EXHAUSTED),
    its median and p99 also at the client.

    The server under measurement owns its process, as `recship serve` does (not the suite's,
    with earlier tests' threads and heap): the suite runs this test in a fresh interpreter, on
    the session's bundle. Each overload phase is bracketed by its own capacity phases.

    Admission is judged apart from the machine: of the rows the model computed during an
    overload (its queue's drain included), at least 90 % belong to OK answers, so the replica's
    time goes to work that is delivered. The goodput ratio itself also includes a cost that is
    not admission's: the refusals are parsed and answered by the same process, whose GIL the
    model's own Python needs, and the model computes fewer rows per busy second during the
    overload (measured here: 12 % fewer, goodput 0.87-0.93 of capacity with 3-4 s phases;
    0.77 once on CI with 2-2.5 s phases). With the deadline check at admission removed, both
    bounds fail (measured: 62 % of the rows delivered, goodput 0.51 of capacity).
    """
    if not own_process.inside:
        print(own_process.run())
        return
    server = server_factory(
        bundle_repo, max_batch_size=4096, max_delay_ms=0, max_queue_rows=1 << 20,
        max_queue_cost=1 << 27,
    )  # fmt: skip
    server.wait_ready()
    request = rank_request(make_user, 4096, queries=8)
    rows_per_call = sum(len(query.candidate_item_ids) for query in request.queries)
    body = request.SerializeToString()
    closed = {"mode": "closed", "concurrency": 8, "timeout_s": 30.0}
    # Each phase ends once its calls are answered (or expired): the next starts on an idle
    # server. Capacity and overload take turns, so both see the same machine: every overload
    # phase sits between two capacity phases, the last of which is also the recovery check.
    phases: list[dict[str, Any]] = [{**closed, "duration_s": 2.5, "warmup": True}]
    for _ in range(2):
        phases += [{**closed, "duration_s": 3.0}, {"mode": "open", "factor": 10, "duration_s": 4.0}]
    phases.append({**closed, "duration_s": 3.0})
    registry = server.server.metrics.registry
    sampler = ProcessSampler(registry)
    result = run_load(server.target, body, 1.0, phases)
    sampler.stop()

    def delivered(selected: list[int]) -> tuple[float, float]:
        """(Share of the rows computed that went to OK answers, rows computed per busy second),
        over each phase from its start until its last OK answer (its queue drained)."""
        phase = [result[i] for i in selected]
        work = [
            sampler.between(p["wall"][0], p["wall"][0] + max(p["seconds"], p["ok_until_s"]))
            for p in phase
        ]
        rows = sum(w[2] for w in work)
        ok_rows = sum(p["codes"].get("OK", 0) for p in phase) * rows_per_call
        return ok_rows / rows, rows / sum(w[1] for w in work)

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

    measuring = [i for i, p in enumerate(result) if p["mode"] == "closed" and not p["warmup"]]
    overloads = [i for i, p in enumerate(result) if p["mode"] == "open"]
    # The machine's speed drifts by tens of percent over seconds (shared cores, measured
    # here: 40-68 ms of model time per request between phases of one run), so each overload
    # phase is compared with the capacity phases on either side of it: a linear drift cancels.
    capacity = float(np.mean([(rates([i - 1])[0] + rates([i + 1])[0]) / 2 for i in overloads]))
    _, busy_calibrating, _ = rates(measuring)
    accepted, busy, offered = rates(overloads)
    delivered_share, overload_rows_per_s = delivered(overloads)
    _, calibrating_rows_per_s = delivered(measuring)
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
        "accepted_over_capacity": round(accepted / capacity, 2),
        "replica_busy": round(busy, 2),
        "rows_delivered_share": round(delivered_share, 3),
        "model_speed_overloaded_over_calibrating": round(
            overload_rows_per_s / calibrating_rows_per_s, 2
        ),
        "replica_busy_calibrating": round(busy_calibrating, 2),
        "cores_calibrating": round(cpu_share(measuring), 2),
        "cores_overloaded": round(cpu_share(overloads), 2),
        "load_generator_cores_overloaded": round(
            sum(result[i]["cpu_s"] for i in overloads)
            / sum(max(result[i]["seconds"], result[i]["ok_until_s"]) for i in overloads),
            2,
        ),
        "resource_exhausted": int(refused.size),
        "client_resource_exhausted_p50_ms": round(float(np.percentile(refused, 50)) * 1000, 2),
        "client_resource_exhausted_p99_ms": round(float(np.percentile(refused, 99)) * 1000, 2),
        "server_refusals_within_10_ms": round(fast / refusals, 4),
        "server_refusals": int(refusals),
        "memory_growth_mb": round(sampler.growth_mb, 1),
        "codes": sorted(codes),
        "recovery": recovery["codes"],
        "recovery_ok_p50_ms": round(recovery["latency"]["OK"]["p50"] * 1000, 1),
        "before_ok_p50_ms": round(result[measuring[0]]["latency"]["OK"]["p50"] * 1000, 1),
        # Per phase: mode, codes, replica busy fraction, OK answers per second.
        "phases": [
            (p["mode"], p["codes"], round(rates([i])[1], 2), round(rates([i])[0], 1))
            for i, p in enumerate(result)
        ],
    }
    # A string, so that a failure prints every figure (pytest shortens a dict).
    report = json.dumps(figures)
    print("overload figures:", report)
    if cpu_share(measuring) < 0.5:
        pytest.skip(f"this machine is too contended to measure overload: {report}")
    # Each overload phase offered 10x the capacity measured before it (the load generator
    # sets its rate so); over both, many times the capacity measured over the whole test.
    assert offered > 5 * capacity, report
    assert delivered_share >= 0.9, report
    assert accepted >= 0.7 * capacity, report
    # The overload left the replica no idler than the sustainable load did.
    assert busy > min(0.85, busy_calibrating - 0.05), report
    assert refusals >= refused.size and fast >= 0.99 * refusals, report  # p99 < 10 ms
    assert np.percentile(refused, 50) < 0.010, report
    assert codes <= {"OK", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"}, report  # no CANCELLED
    assert sampler.growth_mb < 256, report
    # Full recovery: everything answered, nothing left queued.
    assert set(recovery["codes"]) == {"OK"}, report
    assert registry.get_sample_value("recship_queue_cost", {"model": "movies/rank"}) == 0
    assert server.server.manager.queued_rows("movies") == 0


def _rank(stub: Any, request: recommender_pb2.RankRequest, timeout: float = 30) -> float:
    started = time.perf_counter()
    stub.Rank(request, timeout=timeout)
    return time.perf_counter() - started


#: A big Rank request within the bounds: 128 queries of 4096 candidates (524288 rows, ~21 M
#: cost, 2.3 MB of the 4 MiB request bound), about a second of model time, in 128 slices.
BIG_QUERIES = 128


def test_a_big_request_delays_a_small_one_by_at_most_its_slice(
    bundle_repo, server_factory, make_user
) -> None:
    # The request (4096 candidates whose single-valued query features held 4096 ids
    # each, ~84 M ids, held a replica for 16.6 s) is now refused: a single-valued feature
    # takes one value. A big request the bounds admit runs in slices of one batch (4096 rows
    # here), its ids are looked up a batch's worth at a time on the event loop, and small
    # requests sent one after the other from the moment it is sent wait for one slice at
    # most (plus the noise of two shared cores), never for the big request.
    server = server_factory(
        bundle_repo, max_batch_size=4096, max_delay_ms=0, max_queue_rows=1 << 20,
        max_queue_cost=1 << 27,
    )  # fmt: skip
    server.wait_ready()
    big = rank_request(make_user, 4096, queries=BIG_QUERIES)
    small = rank_request(make_user, 10)
    bag = rank_request(make_user, 4096)
    bag.queries[0].query.features["user_gender"].list_value.strings.extend(["gender_0"] * 4096)
    get = server.server.metrics.registry.get_sample_value
    batches = {"model": "movies/rank"}
    with (
        grpc.insecure_channel(server.target) as big_channel,
        grpc.insecure_channel(server.target) as small_channel,
    ):
        big_stub = recommender_pb2_grpc.RecommenderStub(big_channel)
        small_stub = recommender_pb2_grpc.RecommenderStub(small_channel)
        with pytest.raises(grpc.RpcError) as caught:
            small_stub.Rank(bag, timeout=30)
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert 'user_gender"]: takes one value' in caught.value.details()
        _rank(small_stub, small)  # (a model's first call with a new shape is slow)
        idle_count = get("recship_batch_seconds_count", batches)
        idle_seconds = get("recship_batch_seconds_sum", batches)
        idle = min(_rank(small_stub, small) for _ in range(5))
        # What a small request's own batch takes, to tell the big one's slices apart.
        small_batch = (get("recship_batch_seconds_sum", batches) - idle_seconds) / (
            get("recship_batch_seconds_count", batches) - idle_count
        )
        memory = PeakMemory()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            count_before = get("recship_batch_seconds_count", batches)
            seconds_before = get("recship_batch_seconds_sum", batches)
            started = time.perf_counter()
            running = pool.submit(_rank, big_stub, big, 60)
            delays = []
            while not running.done() and len(delays) < 1000:
                delays.append(_rank(small_stub, small) - idle)
            big_seconds = running.result()
        growth_mb = memory.stop()
        smalls = len(delays)
        slices = get("recship_batch_seconds_count", batches) - count_before - smalls
        busy = get("recship_batch_seconds_sum", batches) - seconds_before
        mean_slice = (busy - smalls * small_batch) / slices
    figures = {
        "big_request_s": round(big_seconds, 2),
        "slices": slices,
        "small_requests_meanwhile": smalls,
        "small_delay_p50_ms": round(float(np.percentile(delays, 50)) * 1000, 2),
        "small_delay_p90_ms": round(float(np.percentile(delays, 90)) * 1000, 2),
        "mean_slice_ms": round(mean_slice * 1000, 2),
        "small_idle_ms": round(idle * 1000, 2),
        "small_delay_max_ms": round(max(delays) * 1000, 2),
        "memory_growth_mb": round(growth_mb, 1),
        "took": round(time.perf_counter() - started, 2),
    }
    print("big-bag figures:", json.dumps(figures))
    assert slices >= BIG_QUERIES, figures  # it was cut into slices of at most one batch
    assert smalls >= 20, figures  # the small ones were answered while it ran
    # A small request waits for the slice running when it arrives (plus the noise of two
    # shared cores), never for the big request. Over ~140 small requests, the slowest tenth
    # is the noise of the machine (other processes' time slices, tens of milliseconds under
    # load): the bound holds for 90 % of them (what the slowest of 10 samples measured), and
    # none waits for a twentieth of the big request.
    assert np.percentile(delays, 90) < 2 * mean_slice + 0.015, figures
    assert max(delays) < big_seconds / 20, figures
    assert growth_mb < 256, figures


def test_the_server_stops_working_on_a_request_at_its_deadline(
    bundle_repo, server_factory, make_user
) -> None:
    server = server_factory(
        bundle_repo, max_batch_size=4096, max_delay_ms=0, max_queue_rows=1 << 20,
        max_queue_cost=1 << 27,
    )  # fmt: skip
    server.wait_ready()
    big = rank_request(make_user, 4096, queries=BIG_QUERIES)  # seconds of work, in slices
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
