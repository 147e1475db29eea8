"""Every malformed request is INVALID_ARGUMENT naming the query index and field; unknown
bundles and versions are NOT_FOUND; bad requests never change what good ones get."""

from __future__ import annotations

import concurrent.futures

import grpc
import numpy as np
import pytest

from recship.protos.v1 import recommender_pb2
from recship.runtime.client import Query, model_spec, query_proto

pytestmark = pytest.mark.integration


def good(make_user, user_id: int = 4) -> recommender_pb2.Query:
    return query_proto(Query(make_user(user_id)))


def call_error(client, method: str, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        getattr(client.recommender, method)(request, timeout=10)
    return caught.value


def retrieve(make_user, queries=None, top_k: int = 5, **spec) -> recommender_pb2.RetrieveRequest:
    spec = spec or {"bundle": "movies"}
    return recommender_pb2.RetrieveRequest(
        model=model_spec(**spec),
        queries=[
            recommender_pb2.RetrieveQuery(query=query)
            for query in ([good(make_user)] if queries is None else queries)
        ],
        top_k=top_k,
    )


def with_features(make_user, **changes) -> recommender_pb2.Query:
    features = dict(make_user(4))
    for name, value in changes.items():
        if value is None:
            features.pop(name)
        else:
            features[name] = value
    return query_proto(Query(features))


FEATURES = 'queries[1].query.features["{}"]'

# (case, changes to a valid user, the message's field, what it says). The synthetic spec's
# user features have no declared defaults but fitted ones (mode/median), except the key.
INVALID_QUERIES = [
    ("unknown feature", {"user_colour": 1}, "user_colour", "unknown feature"),
    ("unknown category", {"user_gender": "X"}, "user_gender", "value 'X' is not in"),
    ("wrong type: number for a category", {"user_gender": 1.5}, "user_gender", "takes text"),
    ("wrong type: text for a number", {"user_age_bucket": "old"}, "user_age_bucket", "number"),
    ("list for a single value", {"user_gender": ["F", "M"]}, "user_gender", "not a list"),
    ("non-finite dense", {"user_log_activity": float("inf")}, "user_log_activity", "finite"),
    ("non-finite bucketized", {"user_age_bucket": float("nan")}, "user_age_bucket", "finite"),
    # A count is >= 0: log1p of -3 is no number (the spec's transform, not the request, says so).
    ("outside the dense domain", {"user_log_activity": -3.0}, "user_log_activity", "domain"),
    ("the user key as a list", {"user_id": [1, 2]}, "user_id", "one text or integer"),
    ("no user key, no stored user", {"user_id": None}, "user_id", "missing"),
]


@pytest.mark.parametrize(("case", "changes", "field", "message"), INVALID_QUERIES)
def test_bad_query_features_name_the_query_and_field(
    client, make_user, case, changes, field, message
) -> None:
    bad = with_features(make_user, **changes)
    error = call_error(client, "Retrieve", retrieve(make_user, [good(make_user), bad]))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, case
    assert FEATURES.format(field) in error.details(), (case, error.details())
    assert message in error.details(), (case, error.details())


def test_a_feature_without_a_value_is_named(client, make_user) -> None:
    bad = good(make_user)
    bad.features["user_gender"].Clear()
    error = call_error(client, "Retrieve", retrieve(make_user, [bad]))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert 'queries[0].query.features["user_gender"]: no value set' in error.details()


@pytest.mark.parametrize(
    ("request_kind", "message"),
    [
        ("top_k zero", "top_k: 0 is out of bounds [1, 1000]"),
        ("top_k huge", "top_k: 5000 is out of bounds [1, 1000]"),
        ("empty batch", "queries: empty"),
        ("no bundle", "model.bundle: required"),
        ("bad version", "model.version must be > 0"),
    ],
)
def test_retrieve_bounds(client, make_user, request_kind, message) -> None:
    request = {
        "top_k zero": lambda: retrieve(make_user, top_k=0),
        "top_k huge": lambda: retrieve(make_user, top_k=5000),
        "empty batch": lambda: retrieve(make_user, queries=[]),
        "no bundle": lambda: retrieve(make_user, bundle=""),
        "bad version": lambda: retrieve(make_user, bundle="movies", version=-2),
    }[request_kind]()
    error = call_error(client, "Retrieve", request)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.details()


def test_recommend_bounds_and_exclusions(client, make_user) -> None:
    def recommend(k: int, n: int, exclude=()) -> recommender_pb2.RecommendRequest:
        return recommender_pb2.RecommendRequest(
            model=model_spec("movies"),
            queries=[
                recommender_pb2.RecommendQuery(query=good(make_user), exclude_item_ids=exclude)
            ],
            retrieve_k=k,
            top_n=n,
        )

    cases = [
        (recommend(10, 11), "top_n: 11 is out of bounds [1, 10]"),
        (recommend(10, 0), "top_n: 0 is out of bounds"),
        (recommend(5000, 5), "retrieve_k: 5000 is out of bounds [1, 1000]"),
        (
            recommend(10, 5, [str(i) for i in range(100)] * 11),
            "queries[0].exclude_item_ids (count): 1100 is out of bounds [0, 1024]",
        ),
    ]
    for request, message in cases:
        error = call_error(client, "Recommend", request)
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert message in error.details()


def test_rank_candidates_are_checked(client, make_user) -> None:
    def rank(*candidate_lists) -> recommender_pb2.RankRequest:
        return recommender_pb2.RankRequest(
            model=model_spec("movies"),
            queries=[
                recommender_pb2.RankQuery(query=good(make_user), candidate_item_ids=ids)
                for ids in candidate_lists
            ],
        )

    for request, message in [
        (rank(["1"], []), "queries[1].candidate_item_ids (count): 0 is out of bounds"),
        (rank(["1"], ["5", "-1"]), "queries[1].candidate_item_ids[1]: unknown item id '-1'"),
        (rank(["1", "2"], ["4"]).__class__(model=model_spec("movies")), "queries: empty"),
    ]:
        error = call_error(client, "Rank", request)
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert message in error.details()


def test_unknown_bundle_version_and_label_are_not_found(client, make_user) -> None:
    for spec, message in [
        ({"bundle": "books"}, "unknown bundle 'books'"),
        ({"bundle": "movies", "version": 7}, "version 7 of bundle 'movies' does not exist"),
        ({"bundle": "movies", "label": "canary"}, "has no label 'canary'"),
    ]:
        error = call_error(client, "Retrieve", retrieve(make_user, **spec))
        assert error.code() is grpc.StatusCode.NOT_FOUND
        assert message in error.details()


def test_an_oversized_request_is_invalid_argument(client, make_user) -> None:
    # Over the service's 4 MiB request limit but under the transport limit: the server answers
    # INVALID_ARGUMENT itself (past the transport limit gRPC would say RESOURCE_EXHAUSTED).
    heavy = good(make_user)
    heavy.features["user_occupation"].string_value = "x" * 4000
    request = retrieve(make_user, queries=[heavy] * 1100)
    assert request.ByteSize() > 4 * 1024 * 1024
    error = call_error(client, "Retrieve", request)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "request: " in error.details() and "bytes, at most 4194304" in error.details()


def test_unknown_exclusions_are_ignored(client, make_user) -> None:
    # A client's history may name items the catalogue no longer has: nothing to exclude.
    response = client.recommend("movies", [make_user(4)], 10, 5, exclude=[["no-such-item", "1"]])
    assert len(response.results[0]) == 5
    assert "1" not in {item.item_id for item in response.results[0]}


def test_bad_requests_do_not_change_good_ones_in_the_same_batches(
    client, reference, make_user
) -> None:
    users = list(range(40))
    expected = {u: reference.retrieve([make_user(u)], 5)[1][0].tolist() for u in users}
    bad = retrieve(make_user, [with_features(make_user, user_gender="no such gender")])

    def good_call(u: int) -> list[str]:
        request = retrieve(make_user, [query_proto(Query(make_user(u)))])
        response = client.recommender.Retrieve(request, timeout=30)
        return [item.item_id for item in response.results[0].items]

    def bad_call(_: int) -> grpc.StatusCode:
        try:
            client.recommender.Retrieve(bad, timeout=30)
        except grpc.RpcError as error:
            return error.code()
        return grpc.StatusCode.OK

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        goods = {u: pool.submit(good_call, u) for u in users}
        bads = [pool.submit(bad_call, u) for u in users]
        assert all(f.result() is grpc.StatusCode.INVALID_ARGUMENT for f in bads)
        for u, future in goods.items():
            assert future.result() == expected[u]
    assert np.isfinite(reference.embed([make_user(0)])).all()
