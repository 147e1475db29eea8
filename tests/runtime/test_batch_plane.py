"""The native front end's batches, served in process: each call of a batch is answered exactly
as the same call through the grpc.aio server (same code and message, same items and scores),
whatever else its batch holds. No C++ build needed: the batches are made here."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from recship.protos.v1 import batch_plane_pb2, recommender_pb2
from recship.runtime.batch_plane import BatchPlaneService
from recship.runtime.client import Query, model_spec, query_proto
from recship.runtime.limits import ServiceLimits
from recship.runtime.service import RecommenderService

pytestmark = pytest.mark.integration

SERVICE = "/recship.v1.Recommender/"


def _query(features: dict[str, Any], exclude: tuple[str, ...] = ()) -> Any:
    return {"query": query_proto(Query(features)), "exclude_item_ids": list(exclude)}


def recommend(features: list[dict[str, Any]], **fields: Any) -> bytes:
    fields.setdefault("model", model_spec("movies"))
    exclude = fields.pop("exclude", ())
    return recommender_pb2.RecommendRequest(
        queries=[recommender_pb2.RecommendQuery(**_query(f, exclude)) for f in features],
        **fields,
    ).SerializeToString()


def retrieve(features: list[dict[str, Any]], **fields: Any) -> bytes:
    fields.setdefault("model", model_spec("movies"))
    return recommender_pb2.RetrieveRequest(
        queries=[recommender_pb2.RetrieveQuery(**_query(f)) for f in features], **fields
    ).SerializeToString()


def rank(features: dict[str, Any], candidates: list[str], **fields: Any) -> bytes:
    fields.setdefault("model", model_spec("movies"))
    query = recommender_pb2.RankQuery(
        query=query_proto(Query(features)), candidate_item_ids=candidates
    )
    return recommender_pb2.RankRequest(queries=[query], **fields).SerializeToString()


def direct(channel: grpc.Channel, method: str, body: bytes) -> tuple[int, str, bytes]:
    """(code, message, response bytes) of one call through the grpc.aio server."""
    call = channel.unary_unary(SERVICE + method)  # bytes in, bytes out
    try:
        return 0, "", call(body, timeout=30)
    except grpc.RpcError as error:
        return error.code().value[0], error.details() or "", b""


def comparable(method: str, code: int, message: str, body: bytes) -> Any:
    """An answer with scores rounded (a batch's rows may be scored in a larger matrix)."""
    if code:
        return code, message
    response = getattr(recommender_pb2, f"{method}Response").FromString(body)
    if method == "Rank":
        return [[round(s, 5) for s in r.scores] for r in response.results]
    if method == "Recommend":
        return [
            [(i.item_id, round(i.rank_score, 5), round(i.retrieval_score, 5)) for i in r.items]
            for r in response.results
        ]
    return [[(i.item_id, round(i.score, 5)) for i in r.items] for r in response.results]


@pytest.fixture(scope="module")
def plane(live_server) -> tuple[BatchPlaneService, list[tuple[str, grpc.StatusCode]]]:  # type: ignore[no-untyped-def]
    observed: list[tuple[str, grpc.StatusCode]] = []
    limits = ServiceLimits()
    service = RecommenderService(live_server.server.manager, limits)
    return BatchPlaneService(service, limits, lambda m, c, s: observed.append((m, c))), observed


def run_batch(live_server, plane, method: str, bodies: list[bytes], **call: Any) -> list[Any]:  # type: ignore[no-untyped-def]
    batch = batch_plane_pb2.CallBatch(
        method=SERVICE + method,
        calls=[batch_plane_pb2.Call(request=b, peer="ipv4:127.0.0.1:1", **call) for b in bodies],
    )
    reply = live_server.call(plane.Run(batch, None))
    return [(o.code, o.message, o.response) for o in reply.outcomes]


def test_each_recommend_call_of_a_batch_is_answered_as_it_would_be_alone(
    live_server, plane, make_user
) -> None:
    service, observed = plane
    bodies = [
        recommend([make_user(1)], retrieve_k=20, top_n=5),
        recommend([make_user(2), make_user(3, 0.9)], retrieve_k=30, top_n=7, exclude=("1", "7")),
        recommend([{**make_user(4), "no_such_feature": 1}], retrieve_k=20, top_n=5),
        recommend([make_user(5)], model=model_spec("no-such-bundle"), top_n=5),
        b"\xff\xff\xff not a message",
        recommend([make_user(6)], retrieve_k=5, top_n=9),
        recommend([], retrieve_k=20, top_n=5),
        recommend([make_user(7)], model=model_spec("movies", label="nope"), top_n=3),
        recommend([make_user(1)], retrieve_k=20, top_n=5),
        recommend([make_user(8)], top_n=4),  # the bundle's default retrieve_k
    ]
    observed.clear()
    batched = run_batch(live_server, service, "Recommend", bodies, timeout_s=30.0)
    with grpc.insecure_channel(live_server.target) as channel:
        alone = [direct(channel, "Recommend", body) for body in bodies]
    assert [comparable("Recommend", *a) for a in batched] == [
        comparable("Recommend", *a) for a in alone
    ]
    codes = [code for code, _, _ in batched]
    assert codes == [0, 0, 3, 5, 3, 3, 3, 5, 0, 0]  # OK, INVALID_ARGUMENT, NOT_FOUND
    assert observed == [
        ("recship.v1.Recommender/Recommend", grpc.StatusCode.OK),
        ("recship.v1.Recommender/Recommend", grpc.StatusCode.OK),
        ("recship.v1.Recommender/Recommend", grpc.StatusCode.INVALID_ARGUMENT),
        ("recship.v1.Recommender/Recommend", grpc.StatusCode.NOT_FOUND),
        ("recship.v1.Recommender/Recommend", grpc.StatusCode.INVALID_ARGUMENT),
        ("recship.v1.Recommender/Recommend", grpc.StatusCode.INVALID_ARGUMENT),
        ("recship.v1.Recommender/Recommend", grpc.StatusCode.INVALID_ARGUMENT),
        ("recship.v1.Recommender/Recommend", grpc.StatusCode.NOT_FOUND),
        ("recship.v1.Recommender/Recommend", grpc.StatusCode.OK),
        ("recship.v1.Recommender/Recommend", grpc.StatusCode.OK),
    ]


def test_retrieve_and_rank_calls_of_a_batch_are_answered_as_alone(
    live_server, plane, make_user
) -> None:
    service, _ = plane
    with grpc.insecure_channel(live_server.target) as channel:
        for method, bodies in (
            (
                "Retrieve",
                [
                    retrieve([make_user(1), make_user(2)], top_k=10),
                    retrieve([make_user(3)], top_k=0),
                    retrieve([{**make_user(4), "user_gender": ["a", "b"]}], top_k=10),
                    retrieve([make_user(5)], top_k=3),
                ],
            ),
            (
                "Rank",
                [
                    rank(make_user(1), ["1", "2", "3", "50"]),
                    rank(make_user(2), ["1", "no-such-item"]),
                    rank(make_user(3), []),
                    rank(make_user(4), ["9", "8"]),
                ],
            ),
        ):
            batched = run_batch(live_server, service, method, bodies)
            alone = [direct(channel, method, body) for body in bodies]
            assert [comparable(method, *a) for a in batched] == [
                comparable(method, *a) for a in alone
            ]
            assert [code for code, _, _ in batched] == [0, 3, 3, 0]


def test_a_call_past_its_deadline_and_an_unknown_method_are_answered_alone(
    live_server, plane, make_user
) -> None:
    service, _ = plane
    body = recommend([make_user(1)], retrieve_k=20, top_n=5)
    expired = run_batch(live_server, service, "Recommend", [body], timeout_s=1e-9)
    assert [code for code, _, _ in expired] == [grpc.StatusCode.DEADLINE_EXCEEDED.value[0]]
    unknown = run_batch(live_server, service, "Forget", [body, body])
    assert [code for code, _, _ in unknown] == [grpc.StatusCode.UNIMPLEMENTED.value[0]] * 2
