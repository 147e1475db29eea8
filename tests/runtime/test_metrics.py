"""Server metrics, scraped over a real loopback HTTP request."""

from __future__ import annotations

import socket
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from recship.runtime.metrics import MetricsHTTPServer, ServerMetrics, start_metrics_http
from recship.runtime.policy import VersionState

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
def served() -> Iterator[tuple[ServerMetrics, MetricsHTTPServer]]:
    metrics = ServerMetrics()
    http, port = start_metrics_http(metrics.registry, "127.0.0.1", 0)
    assert port == http.port > 0
    try:
        yield metrics, http
    finally:
        http.stop()


def scrape(port: int) -> Samples:
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
    metrics, http = served
    metrics.set_version_state("movies", 1, VersionState.LOADING)
    metrics.set_version_state("movies", 1, VersionState.READY)
    metrics.set_default_version("movies", 1)
    metrics.set_version_state("movies", 2, VersionState.READY)
    metrics.set_version_state("movies", 3, VersionState.FAILED)
    metrics.set_default_version("movies", 2)
    metrics.set_version_state("movies", 1, VersionState.DRAINING)
    got = scrape(http.port)
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
    got = scrape(http.port)
    assert (
        sample(got, "recship_version_state", bundle="movies", version="1", state="DRAINING") is None
    )
    assert sample(got, "recship_default_version", bundle="movies") == 0
    assert sample(got, "recship_version_switches_total", bundle="movies") == 1


def test_two_servers_in_one_process_do_not_share_metrics() -> None:
    first, second = ServerMetrics(), ServerMetrics()
    first.observe_request("m", grpc.StatusCode.OK, 0.01)
    http1, port1 = start_metrics_http(first.registry)
    http2, port2 = start_metrics_http(second.registry)
    try:
        assert port1 != port2
        assert sample(scrape(port1), "recship_requests_total", method="m", code="OK") == 1
        assert sample(scrape(port2), "recship_requests_total", method="m", code="OK") is None
    finally:
        http1.stop()
        http2.stop()


def test_stop_frees_the_port() -> None:
    http, port = start_metrics_http(ServerMetrics().registry)
    http.stop()
    http.stop()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
