"""Hostile requests on a real server: undecodable bodies and unbounded client strings.

Every method of both listeners (Recommender, BundleAdmin, health, reflection) answers an
undecodable body INVALID_ARGUMENT, counts it, logs no traceback and keeps serving; a status
message never echoes more than ~100 characters of a client's string, so a stock client (8 KiB
of metadata at most) sees the real code. The wire fuzz test of the new wire builds on
`recship.runtime.grpc_errors.decode_request` and these helpers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from recship.protos.v1 import admin_pb2, admin_pb2_grpc, recommender_pb2, recommender_pb2_grpc
from recship.runtime.client import Query, model_spec, query_proto

pytestmark = pytest.mark.integration

GARBAGE = b"\xff\xff\xff\xff"  # a field tag that no message can hold
HUGE = "x" * 20_000  # a client string far over a stock client's metadata limit

SERVICES: list[ServiceDescriptor] = [
    recommender_pb2.DESCRIPTOR.services_by_name["Recommender"],
    health_pb2.DESCRIPTOR.services_by_name["Health"],
    reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"],
]
ADMIN_SERVICES: list[ServiceDescriptor] = [
    admin_pb2.DESCRIPTOR.services_by_name["BundleAdmin"],
    health_pb2.DESCRIPTOR.services_by_name["Health"],
]


def send_raw(channel: grpc.Channel, method: Any, body: bytes, **kwargs: Any) -> grpc.RpcError:
    """Calls `method` (a MethodDescriptor) with `body` as its raw request; returns the error."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    try:
        if method.client_streaming and method.server_streaming:
            list(channel.stream_stream(path)(iter([body]), timeout=30, **kwargs))
        elif method.client_streaming:
            channel.stream_unary(path)(iter([body]), timeout=30, **kwargs)
        elif method.server_streaming:
            list(channel.unary_stream(path)(body, timeout=30, **kwargs))
        else:
            channel.unary_unary(path)(body, timeout=30, **kwargs)
    except grpc.RpcError as error:
        return error
    raise AssertionError(f"{path} answered an undecodable body")


def methods(services: list[ServiceDescriptor]) -> Iterator[Any]:
    for service in services:
        yield from service.methods


@pytest.fixture
def no_tracebacks(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    with caplog.at_level(logging.INFO):
        yield
    noisy = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not noisy, [r.getMessage() for r in noisy]


def test_undecodable_bodies_are_invalid_argument_on_every_method(
    live_server: Any, client: Any, make_user: Any, no_tracebacks: None
) -> None:
    get = live_server.server.metrics.registry.get_sample_value
    with grpc.insecure_channel(live_server.target) as channel:
        for method in methods(SERVICES):
            name = f"{method.containing_service.full_name}/{method.name}"
            labels = {"method": name, "code": "INVALID_ARGUMENT"}
            before = get("recship_requests_total", labels) or 0
            error = send_raw(channel, method, GARBAGE)
            assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, name
            assert error.details().startswith("request: not a valid "), error.details()
            assert get("recship_requests_total", labels) == before + 1, name
    token = [("authorization", f"Bearer {live_server.admin_token}")]
    with grpc.insecure_channel(live_server.admin_target) as channel:
        for method in methods(ADMIN_SERVICES):
            error = send_raw(channel, method, GARBAGE, metadata=token)
            assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, method.full_name
    # Still serving, and an admin call without the token is refused before decoding.
    assert client.retrieve("movies", [Query(make_user(3))], 3).results
    with grpc.insecure_channel(live_server.admin_target) as channel:
        method = admin_pb2.DESCRIPTOR.services_by_name["BundleAdmin"].methods_by_name["SetLabel"]
        assert send_raw(channel, method, GARBAGE).code() is grpc.StatusCode.UNAUTHENTICATED


def test_a_body_over_the_request_limit_is_refused_unparsed(
    bundle_repo: Any, server_factory: Any, make_user: Any
) -> None:
    from recship.runtime.limits import ServiceLimits

    server = server_factory(bundle_repo, limits=ServiceLimits(max_request_bytes=2000))
    server.wait_ready()
    request = recommender_pb2.RankRequest(
        model=model_spec("movies"),
        queries=[
            recommender_pb2.RankQuery(
                query=query_proto(Query(make_user(1))),
                candidate_item_ids=[str(i % 200 + 1) for i in range(2000)],
            )
        ],
    )
    with grpc.insecure_channel(server.target) as channel:
        stub = recommender_pb2_grpc.RecommenderStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Rank(request, timeout=30)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert f"request: {request.ByteSize()} bytes, at most 2000" in caught.value.details()


def test_client_strings_are_quoted_short_in_status_messages(
    live_server: Any, make_user: Any
) -> None:
    query = recommender_pb2.RankQuery(
        query=query_proto(Query(make_user(1))), candidate_item_ids=["1", "2"]
    )
    with grpc.insecure_channel(live_server.target) as channel:
        stub = recommender_pb2_grpc.RecommenderStub(channel)
        for spec, code in (
            (recommender_pb2.ModelSpec(bundle=HUGE), grpc.StatusCode.NOT_FOUND),
            (recommender_pb2.ModelSpec(bundle="movies", label=HUGE), grpc.StatusCode.NOT_FOUND),
        ):
            with pytest.raises(grpc.RpcError) as caught:
                stub.Rank(recommender_pb2.RankRequest(model=spec, queries=[query]), timeout=30)
            assert caught.value.code() is code  # not RESOURCE_EXHAUSTED from the client
            assert len(caught.value.details()) < 300, caught.value.details()
            assert "characters cut" in caught.value.details()
    token = [("authorization", f"Bearer {live_server.admin_token}")]
    with grpc.insecure_channel(live_server.admin_target) as channel:
        admin = admin_pb2_grpc.BundleAdminStub(channel)
        for call, request, code in (
            (admin.SetLabel, admin_pb2.SetLabelRequest(bundle="movies", label=HUGE, version=1),
             grpc.StatusCode.INVALID_ARGUMENT),
            (admin.SetLabel, admin_pb2.SetLabelRequest(bundle="movies", label="gone", version=0),
             grpc.StatusCode.NOT_FOUND),
            (admin.LoadVersion, admin_pb2.LoadVersionRequest(bundle=HUGE, version=1),
             grpc.StatusCode.NOT_FOUND),
            (admin.ListBundles, admin_pb2.ListBundlesRequest(bundle=HUGE),
             grpc.StatusCode.NOT_FOUND),
        ):  # fmt: skip
            with pytest.raises(grpc.RpcError) as caught:
                call(request, timeout=30, metadata=token)
            assert caught.value.code() is code, caught.value.details()
            assert len(caught.value.details()) < 300, caught.value.details()
