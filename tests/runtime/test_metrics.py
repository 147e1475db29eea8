"""Server metrics, scraped over real loopback HTTP; the endpoint's connection handling."""

from __future__ import annotations

import asyncio
import http.client
import logging
import socket
import threading
import time
import urllib.request
from collections.abc import Coroutine, Iterator
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from recship.runtime.metrics import MetricsHTTPServer, ServerMetrics, start_metrics_http
from recship.runtime.policy import VersionState

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class LoopThread:
    """An event loop on a thread of its own, as the server runs the endpoint."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(30)

    def serve(self, metrics: ServerMetrics, **options: Any) -> MetricsHTTPServer:
        return self.call(start_metrics_http(metrics.registry, "127.0.0.1", 0, **options))

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def loop() -> Iterator[LoopThread]:
    thread = LoopThread()
    yield thread
    thread.close()


@pytest.fixture
def served(loop: LoopThread) -> Iterator[tuple[ServerMetrics, MetricsHTTPServer]]:
    metrics = ServerMetrics()
    http_server = loop.serve(metrics)
    assert http_server.port is not None and http_server.port > 0
    try:
        yield metrics, http_server
    finally:
        loop.call(http_server.stop())


def scrape(port: int | None) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def test_requests_and_latency(served: tuple[ServerMetrics, MetricsHTTPServer]) -> None:
    metrics, http_server = served
    method = "recship.v1.Recommender/Rank"
    metrics.observe_request(method, grpc.StatusCode.OK, 0.003)
    metrics.observe_request(method, grpc.StatusCode.OK, 0.2)
    metrics.observe_request(method, grpc.StatusCode.INVALID_ARGUMENT, 0.0001)
    metrics.observe_request(method, grpc.StatusCode.RESOURCE_EXHAUSTED, 0.0003)
    got = scrape(http_server.port)
    refusals = "recship_refusal_latency_seconds_bucket"
    assert sample(got, refusals, method=method, le="0.0005") == 1
    assert sample(got, refusals, method=method, le="0.0002") == 0
    assert sample(got, "recship_requests_total", method=method, code="OK") == 2
    assert sample(got, "recship_requests_total", method=method, code="INVALID_ARGUMENT") == 1
    assert sample(got, "recship_request_latency_seconds_count", method=method) == 4
    assert sample(got, "recship_request_latency_seconds_sum", method=method) == pytest.approx(
        0.2034
    )
    assert sample(got, "recship_request_latency_seconds_bucket", method=method, le="0.005") == 3


def test_batches_queue_depth_admission_and_rate(
    served: tuple[ServerMetrics, MetricsHTTPServer],
) -> None:
    metrics, http_server = served
    replica0 = metrics.batch_metrics("movies/rank")
    replica1 = metrics.batch_metrics("movies/rank")
    replica0.observe_batch(rows=500, items=1, cost=20_000, seconds=0.004)
    replica1.observe_batch(rows=64, items=32, cost=600, seconds=0.001)
    replica0.observe_queue_wait(0.004)
    replica0.add_queue(100, 4000)
    replica1.add_queue(30, 300)
    replica0.add_queue(-40, -1000)
    replica0.observe_refused("deadline")
    replica1.observe_refused("deadline")
    replica1.observe_refused("queue_full")
    replica0.observe_dropped("cancelled")
    replica1.observe_service_rate(5e6)
    got = scrape(http_server.port)
    model = {"model": "movies/rank"}
    assert sample(got, "recship_batch_rows_count", **model) == 2
    assert sample(got, "recship_batch_rows_sum", **model) == 564
    assert sample(got, "recship_batch_rows_bucket", **model, le="64.0") == 1
    assert sample(got, "recship_batch_cost_sum", **model) == 20_600
    assert sample(got, "recship_batch_seconds_sum", **model) == pytest.approx(0.005)
    assert sample(got, "recship_batch_requests_sum", **model) == 33
    assert sample(got, "recship_queue_wait_seconds_count", **model) == 1
    assert sample(got, "recship_queue_rows", **model) == 90
    assert sample(got, "recship_queue_cost", **model) == 3300
    refusals = "recship_admission_refusals_total"
    assert sample(got, refusals, **model, reason="deadline") == 2
    assert sample(got, refusals, **model, reason="queue_full") == 1
    assert sample(got, "recship_dropped_total", **model, reason="cancelled") == 1
    assert sample(got, "recship_service_rate_cost_per_second", **model) == 5e6


def test_version_states_and_switches(served: tuple[ServerMetrics, MetricsHTTPServer]) -> None:
    metrics, http_server = served
    metrics.set_version_state("movies", 1, VersionState.LOADING)
    metrics.set_version_state("movies", 1, VersionState.READY)
    metrics.set_default_version("movies", 1)
    metrics.set_version_state("movies", 2, VersionState.READY)
    metrics.set_version_state("movies", 3, VersionState.FAILED)
    metrics.set_default_version("movies", 2)
    metrics.set_version_state("movies", 1, VersionState.DRAINING)
    got = scrape(http_server.port)
    states = {
        (dict(labels)["version"], dict(labels)["state"]): value
        for (name, labels), value in got.items()
        if name == "recship_version_state"
    }
    assert states == {("1", "DRAINING"): 1, ("2", "READY"): 1, ("3", "FAILED"): 1}
    assert sample(got, "recship_default_version", bundle="movies") == 2
    assert sample(got, "recship_version_switches_total", bundle="movies") == 1

    metrics.forget_version("movies", 1)
    metrics.forget_version("movies", 99)
    metrics.set_default_version("movies", None)
    got = scrape(http_server.port)
    assert (
        sample(got, "recship_version_state", bundle="movies", version="1", state="DRAINING") is None
    )
    assert sample(got, "recship_default_version", bundle="movies") == 0
    assert sample(got, "recship_version_switches_total", bundle="movies") == 1


def test_two_servers_in_one_process_do_not_share_metrics(loop: LoopThread) -> None:
    first, second = ServerMetrics(), ServerMetrics()
    first.observe_request("m", grpc.StatusCode.OK, 0.01)
    http1, http2 = loop.serve(first), loop.serve(second)
    try:
        assert http1.port != http2.port
        assert sample(scrape(http1.port), "recship_requests_total", method="m", code="OK") == 1
        assert sample(scrape(http2.port), "recship_requests_total", method="m", code="OK") is None
    finally:
        loop.call(http1.stop())
        loop.call(http2.stop())


def test_stop_frees_the_port(loop: LoopThread) -> None:
    http_server = loop.serve(ServerMetrics())
    loop.call(http_server.stop())
    loop.call(http_server.stop())
    with socket.socket() as s:
        s.bind(("127.0.0.1", http_server.port))


def test_http_keep_alive_head_and_refusals(
    served: tuple[ServerMetrics, MetricsHTTPServer],
) -> None:
    _, http_server = served
    connection = http.client.HTTPConnection("127.0.0.1", http_server.port, timeout=10)
    try:
        for _ in range(3):  # one connection, several scrapes
            connection.request("GET", "/metrics")
            response = connection.getresponse()
            assert response.status == 200 and b"recship_requests_total" in response.read()
        connection.request("HEAD", "/")
        response = connection.getresponse()
        assert response.status == 200 and int(response.headers["Content-Length"]) > 0
        assert response.read() == b""
        connection.request("DELETE", "/")
        response = connection.getresponse()
        assert response.status == 405
        response.read()
        connection.request("POST", "/", body=b"x")
        response = connection.getresponse()
        assert response.status == 400  # a body is not read: the connection is closed
        response.read()
    finally:
        connection.close()
    for raw in (b"NONSENSE\r\n\r\n", b"GET /" + b"x" * 10_000 + b" HTTP/1.1\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", http_server.port), timeout=10) as s:
            s.sendall(raw)
            answer = s.recv(100)
            assert answer.startswith((b"HTTP/1.1 400", b"HTTP/1.1 431")), answer
    assert scrape(http_server.port)  # still serving


def _closed(sock: socket.socket, timeout: float) -> bool:
    """Whether the server closed `sock` within `timeout` seconds."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionError:
        return True


def test_idle_connections_take_no_thread_and_are_closed_after_the_timeout(
    loop: LoopThread, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = ServerMetrics()
    http_server = loop.serve(metrics, idle_timeout_s=1.0, max_connections=64)
    # Threads the endpoint starts are started from its event loop's thread; counting the
    # process's threads would also count those that earlier tests' leftovers start meanwhile.
    started_by_endpoint: list[str] = []
    start = threading.Thread.start

    def recording_start(thread: threading.Thread) -> None:
        if threading.current_thread() is loop.thread:
            started_by_endpoint.append(thread.name)
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", recording_start)
    sockets = [socket.create_connection(("127.0.0.1", http_server.port)) for _ in range(300)]
    try:
        deadline = time.monotonic() + 10
        while http_server.open_connections < 64 and time.monotonic() < deadline:
            time.sleep(0.01)
        # A scrape still gets through: it evicts the longest idle connection.
        assert sample(scrape(http_server.port), "process_open_fds") is not None
        kept = http_server.open_connections
        print(f"metrics: 300 idle sockets, threads started {started_by_endpoint}, {kept} open")
        # 300 idle sockets: no thread for any of them (at most the one render thread).
        assert len(started_by_endpoint) <= 1, started_by_endpoint
        assert all(name.startswith("metrics-render") for name in started_by_endpoint)
        assert http_server.open_connections <= 64
        # The first ones were evicted for newer ones; all are closed after the idle timeout.
        assert _closed(sockets[0], 5)
        started = time.monotonic()
        assert all(_closed(s, 5) for s in sockets[-64:])
        assert time.monotonic() - started < 5
        assert http_server.open_connections == 0
    finally:
        for s in sockets:
            s.close()
        loop.call(http_server.stop())
    # An eviction per socket beyond 64 and one for the scrape, the rest timed out: all closed
    # quietly, nothing logged as an error.
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
