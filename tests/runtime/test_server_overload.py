"""A full queue answers RESOURCE_EXHAUSTED at once; a request past its deadline never runs."""

from __future__ import annotations

import concurrent.futures
import time

import grpc
import pytest

from recship.protos.v1 import recommender_pb2, recommender_pb2_grpc
from recship.runtime.client import Query, model_spec, query_proto

pytestmark = pytest.mark.integration


def rank_request(make_user, rows: int) -> recommender_pb2.RankRequest:
    return recommender_pb2.RankRequest(
        model=model_spec("movies"),
        queries=[
            recommender_pb2.RankQuery(
                query=query_proto(Query(make_user(1, 0.0))),
                candidate_item_ids=[str(i + 1) for i in range(rows)],
            )
        ],
    )


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

    # A request whose deadline passes while it waits for its batch is dropped, not computed.
    batches = server.server.metrics.registry.get_sample_value
    before = batches("recship_batch_rows_count", {"model": "movies/rank"})
    with pytest.raises(grpc.RpcError) as caught:
        stub.Rank(rank_request(make_user, 3), timeout=0.3)
    assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    # Its queue entry goes away (withdrawn, or dropped at flush time) without a model batch.
    deadline = time.monotonic() + 10
    while server.server.manager.queued_rows("movies") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.server.manager.queued_rows("movies") == 0
    assert batches("recship_batch_rows_count", {"model": "movies/rank"}) == before
    channel.close()
