"""Metrics over HTTP, server reflection, and dynamic batching seen in the metrics."""

from __future__ import annotations

import concurrent.futures
import urllib.request

import grpc
import pytest
from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from prometheus_client.parser import text_string_to_metric_families

from recship.runtime.client import Query

pytestmark = pytest.mark.integration

DENSE = [0.25]


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_requests_errors_batches_and_versions(live_server, client, make_user):
    before = scrape(live_server.metrics_port)
    client.recommend("movies", [Query(make_user(1))], retrieve_k=10, top_n=3)
    with pytest.raises(Exception, match="NOT_FOUND"):
        client.retrieve("books", [Query(make_user(1))], 3)
    after = scrape(live_server.metrics_port)
    method = "recship.v1.Recommender/Recommend"
    ok = value(after, "recship_requests_total", method=method, code="OK")
    assert ok == value(before, "recship_requests_total", method=method, code="OK") + 1
    missing = value(
        after, "recship_requests_total", method="recship.v1.Recommender/Retrieve", code="NOT_FOUND"
    )
    assert missing >= 1
    assert value(after, "recship_request_latency_seconds_count", method=method) >= 1
    for model in ("movies/retrieve", "movies/rank"):
        assert value(after, "recship_batch_rows_count", model=model) > value(
            before, "recship_batch_rows_count", model=model
        )
    assert value(after, "recship_version_state", bundle="movies", version="1", state="READY") == 1
    assert value(after, "recship_default_version", bundle="movies") == 1
    assert ("recship_queue_rows", (("model", "movies/rank"),)) in after


def test_reflection_lists_and_describes_the_services(live_server) -> None:
    channel = grpc.insecure_channel(live_server.target)
    database = ProtoReflectionDescriptorDatabase(channel)
    services = set(database.get_services())
    assert services == {
        "recship.v1.Recommender",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    pool = descriptor_pool.DescriptorPool(database)
    recommend = pool.FindServiceByName("recship.v1.Recommender").FindMethodByName("Recommend")
    assert recommend.input_type.full_name == "recship.v1.RecommendRequest"
    fields = {f.name for f in recommend.input_type.fields}
    assert {"model", "queries", "retrieve_k", "top_n"} <= fields
    channel.close()


def test_64_concurrent_callers_are_batched_and_get_unbatched_answers(
    live_server, client, make_user
) -> None:
    users = list(range(64))
    queries = {u: [Query(make_user(u))] for u in users}
    sequential = {u: client.recommend("movies", queries[u], 20, 5) for u in users}
    before = scrape(live_server.metrics_port)

    def call(u: int):
        return client.recommend("movies", queries[u], 20, 5)

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        concurrent_results = dict(zip(users, pool.map(call, users), strict=True))
    after = scrape(live_server.metrics_port)
    for model in ("movies/retrieve", "movies/rank"):
        batches = value(after, "recship_batch_requests_count", model=model) - value(
            before, "recship_batch_requests_count", model=model
        )
        requests = value(after, "recship_batch_requests_sum", model=model) - value(
            before, "recship_batch_requests_sum", model=model
        )
        assert requests == 64
        assert batches < 64, f"{model}: 64 requests ran in {batches} batches (no batching)"
    for u in users:
        got, want = concurrent_results[u].results[0], sequential[u].results[0]
        assert [i.item_id for i in got] == [i.item_id for i in want]
        for a, b in zip(got, want, strict=True):
            assert a.rank_score == pytest.approx(b.rank_score, abs=1e-5)
            assert a.retrieval_score == pytest.approx(b.retrieval_score, abs=1e-5)
