"""Error mapping on a real grpc.aio server (127.0.0.1, port 0) with a test-only servicer.

The servicer is built from grpc's generic handlers with raw bytes messages, so these tests
depend on nothing but grpc and the error taxonomy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
import pytest

from recship.base.errors import (
    DeadlineExceeded,
    EnvironmentBroken,
    InvalidInput,
    NotFound,
    Overloaded,
    RecshipError,
    Unavailable,
)
from recship.runtime.grpc_errors import (
    INTERNAL_MESSAGE,
    MAX_STATUS_MESSAGE_CHARS,
    ErrorMappingInterceptor,
    UndecodableRequest,
    decode_request,
    map_errors,
    status_code,
)

SERVICE = "recship.test.Errors"
ERRORS: dict[bytes, Exception] = {
    b"invalid": InvalidInput("query 3: unknown sparse feature 'colour'"),
    b"not_found": NotFound("bundle 'films' does not exist"),
    b"overloaded": Overloaded("queue full"),
    b"deadline": DeadlineExceeded("deadline passed before compute"),
    b"unavailable": Unavailable("no version ready yet"),
    b"environment": EnvironmentBroken("fbgemm_gpu does not load"),
    b"bug": ValueError("secret detail /srv/model.pt"),
    b"key_bug": KeyError("user_id"),
}


@dataclass
class Harness:
    channel: grpc.aio.Channel
    observed: list[tuple[str, grpc.StatusCode, float]]
    started: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    reported: asyncio.Event = field(default_factory=asyncio.Event)

    async def unary(self, name: str, request: bytes) -> bytes:
        return await self.channel.unary_unary(f"/{SERVICE}/{name}")(request)

    async def stream(self, name: str, request: bytes) -> list[bytes]:
        return [r async for r in self.channel.unary_stream(f"/{SERVICE}/{name}")(request)]


def _behaviours(h: Harness) -> dict[str, Callable[..., Any]]:
    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        if request in ERRORS:
            raise ERRORS[request]
        return b"echo:" + request

    async def abort(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "not yours")
        return b""

    async def set_code(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        context.set_code(grpc.StatusCode.ALREADY_EXISTS)
        context.set_details("already there")
        return b""

    async def hang(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        h.started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            h.cancelled.set()
            raise
        return b""

    async def count(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        for i in range(2):
            yield str(i).encode()
        if request in ERRORS:
            raise ERRORS[request]

    return {"Echo": echo, "Abort": abort, "SetCode": set_code, "Hang": hang, "Count": count}


@contextlib.asynccontextmanager
async def serving(mode: str) -> AsyncIterator[Harness]:
    """A server whose handlers are mapped by the interceptor, by the decorator, or not at all."""
    observed: list[tuple[str, grpc.StatusCode, float]] = []
    harness = Harness(channel=None, observed=observed)  # type: ignore[arg-type]

    def observe(method: str, code: grpc.StatusCode, seconds: float) -> None:
        observed.append((method, code, seconds))
        harness.reported.set()

    behaviours = _behaviours(harness)
    if mode == "decorator":
        behaviours = {
            name: map_errors(f"{SERVICE}/{name}", observe)(fn) for name, fn in behaviours.items()
        }
    handlers = {
        name: (grpc.unary_stream_rpc_method_handler if name == "Count" else
               grpc.unary_unary_rpc_method_handler)(fn)
        for name, fn in behaviours.items()
    }  # fmt: skip
    interceptors = [ErrorMappingInterceptor(observe)] if mode == "interceptor" else []
    server = grpc.aio.server(interceptors=interceptors)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            harness.channel = channel
            yield harness
    finally:
        await server.stop(grace=None)


MODES = ["interceptor", "decorator"]


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout=20))


@pytest.mark.parametrize("mode", MODES)
def test_ok_passes_and_is_observed(mode: str) -> None:
    async def main() -> None:
        async with serving(mode) as h:
            assert await h.unary("Echo", b"hi") == b"echo:hi"
            await h.reported.wait()
            [(method, code, seconds)] = h.observed
            assert (method, code) == (f"{SERVICE}/Echo", grpc.StatusCode.OK)
            assert 0 <= seconds < 5

    run(main())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "name", [n.decode() for n, e in ERRORS.items() if isinstance(e, RecshipError)]
)
def test_recship_errors_get_their_code_and_message(mode: str, name: str) -> None:
    error = ERRORS[name.encode()]

    async def main() -> None:
        async with serving(mode) as h:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await h.unary("Echo", name.encode())
            assert caught.value.code() == status_code(error)
            assert caught.value.details() == str(error)
            await h.reported.wait()
            assert h.observed[0][1] == status_code(error)

    run(main())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["bug", "key_bug"])
def test_other_exceptions_are_internal_and_logged(
    mode: str, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with serving(mode) as h:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await h.unary("Echo", name.encode())
            assert caught.value.code() == grpc.StatusCode.INTERNAL
            assert caught.value.details() == INTERNAL_MESSAGE
            await h.reported.wait()
            assert h.observed[0][1] == grpc.StatusCode.INTERNAL

    with caplog.at_level(logging.ERROR, logger="recship.runtime.grpc_errors"):
        run(main())
    [record] = [r for r in caplog.records if r.name == "recship.runtime.grpc_errors"]
    assert f"{SERVICE}/Echo" in record.getMessage()
    assert type(ERRORS[name.encode()]).__name__ in record.getMessage()
    assert record.exc_info is not None and record.exc_info[1] is ERRORS[name.encode()]


@pytest.mark.parametrize("mode", MODES)
def test_abort_and_set_code_pass_through(mode: str) -> None:
    async def main() -> None:
        async with serving(mode) as h:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await h.unary("Abort", b"")
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert caught.value.details() == "not yours"
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await h.unary("SetCode", b"")
            assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
            assert [code for _, code, _ in h.observed] == [
                grpc.StatusCode.PERMISSION_DENIED,
                grpc.StatusCode.ALREADY_EXISTS,
            ]

    run(main())


@pytest.mark.parametrize("mode", MODES)
def test_streams_are_mapped_after_partial_output(mode: str) -> None:
    async def main() -> None:
        async with serving(mode) as h:
            assert await h.stream("Count", b"") == [b"0", b"1"]
            call = h.channel.unary_stream(f"/{SERVICE}/Count")(b"invalid")
            got = []
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for response in call:
                    got.append(response)
            assert got == [b"0", b"1"]
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            call = h.channel.unary_stream(f"/{SERVICE}/Count")(b"bug")
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in call:
                    pass
            assert caught.value.code() == grpc.StatusCode.INTERNAL
            assert caught.value.details() == INTERNAL_MESSAGE
            assert [code for _, code, _ in h.observed] == [
                grpc.StatusCode.OK,
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.INTERNAL,
            ]

    run(main())


@pytest.mark.parametrize("mode", MODES)
def test_client_cancellation_passes_through(mode: str) -> None:
    async def main() -> None:
        async with serving(mode) as h:
            call = h.channel.unary_unary(f"/{SERVICE}/Hang")(b"")
            await h.started.wait()
            call.cancel()
            await h.cancelled.wait()
            await h.reported.wait()
            assert [code for _, code, _ in h.observed] == [grpc.StatusCode.CANCELLED]
            with pytest.raises(asyncio.CancelledError):
                await call

    run(main())


def test_without_mapping_a_bug_would_leak_as_unknown() -> None:
    # The reason this module exists: grpc.aio's own answer to an escaping exception.
    async def main() -> None:
        async with serving("none") as h:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await h.unary("Echo", b"bug")
            assert caught.value.code() == grpc.StatusCode.UNKNOWN

    run(main())


def test_sync_handlers_are_refused() -> None:
    def sync_handler(request: bytes, context: object) -> bytes:
        return request

    with pytest.raises(TypeError, match="only async handlers"):
        map_errors("x/Y")(sync_handler)  # type: ignore[arg-type]


# -- undecodable requests, bounded messages, deadlines ----------------------------------------
def test_decode_request_never_raises() -> None:
    from grpc_health.v1 import health_pb2

    parse = health_pb2.HealthCheckRequest.FromString
    valid = health_pb2.HealthCheckRequest(service="x").SerializeToString()
    assert decode_request(parse, valid, "grpc.health.v1.HealthCheckRequest").service == "x"
    for garbage in (b"\xff\xff\xff\xff", b"\x0a\x05ab", b"\x0a" + b"\xff" * 11):
        bad = decode_request(parse, garbage, "grpc.health.v1.HealthCheckRequest")
        assert isinstance(bad, UndecodableRequest)
        assert isinstance(bad.error, InvalidInput)
        assert str(bad.error).startswith("request: not a valid grpc.health.v1.HealthCheckRequest")
    large = decode_request(parse, valid * 10, "t", max_bytes=len(valid))
    assert isinstance(large, UndecodableRequest)
    assert f"{10 * len(valid)} bytes, at most {len(valid)}" in str(large.error)

    def explodes(data: bytes) -> object:
        raise RecursionError("maximum recursion depth exceeded")

    assert isinstance(decode_request(explodes, b"", "t"), UndecodableRequest)


@contextlib.asynccontextmanager
async def decoding_server(
    observed: list[tuple[str, grpc.StatusCode, float]],
) -> AsyncIterator[grpc.aio.Channel]:
    """A server whose handlers have real deserializers (health's request message)."""
    from grpc_health.v1 import health_pb2

    parse = health_pb2.HealthCheckRequest.FromString

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> bytes:
        return request.service.encode()

    async def stream_in(requests: Any, context: grpc.aio.ServicerContext) -> bytes:
        return b",".join([r.service.encode() async for r in requests])

    async def stream_out(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        yield request.service.encode()

    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary, request_deserializer=parse),
        "StreamIn": grpc.stream_unary_rpc_method_handler(stream_in, request_deserializer=parse),
        "StreamOut": grpc.unary_stream_rpc_method_handler(stream_out, request_deserializer=parse),
    }
    interceptor = ErrorMappingInterceptor(
        lambda *call: observed.append(call), max_request_bytes=100
    )
    server = grpc.aio.server(interceptors=[interceptor])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        await server.stop(grace=None)


def test_undecodable_bodies_are_invalid_argument_counted_and_not_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from grpc_health.v1 import health_pb2

    good = health_pb2.HealthCheckRequest(service="ok").SerializeToString()
    observed: list[tuple[str, grpc.StatusCode, float]] = []

    async def main() -> None:
        async with decoding_server(observed) as channel:
            unary = channel.unary_unary(f"/{SERVICE}/Unary")
            stream_in = channel.stream_unary(f"/{SERVICE}/StreamIn")
            stream_out = channel.unary_stream(f"/{SERVICE}/StreamOut")
            assert await unary(good) == b"ok"
            for body in (b"\xff\xff\xff", b"x" * 101):
                for call in (
                    lambda b=body: unary(b),
                    lambda b=body: stream_in(iter([good, b])),
                    lambda b=body: _drain(stream_out(b)),
                ):
                    with pytest.raises(grpc.aio.AioRpcError) as caught:
                        await call()
                    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                    assert caught.value.details().startswith("request: ")
            assert await stream_in(iter([good, good])) == b"ok,ok"

    with caplog.at_level(logging.DEBUG):
        run(main())
    codes = [code for _, code, _ in observed]
    assert codes.count(grpc.StatusCode.INVALID_ARGUMENT) == 6
    assert codes.count(grpc.StatusCode.OK) == 2
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]


async def _drain(call: Any) -> list[Any]:
    return [response async for response in call]


def test_long_messages_are_cut_for_the_status() -> None:
    async def main() -> None:
        async def long_error(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            raise NotFound("x" * 20_000 + "\x1b[31m")

        server = grpc.aio.server(interceptors=[ErrorMappingInterceptor()])
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    SERVICE, {"Long": grpc.unary_unary_rpc_method_handler(long_error)}
                ),
            )
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await channel.unary_unary(f"/{SERVICE}/Long")(b"")
                assert caught.value.code() == grpc.StatusCode.NOT_FOUND  # not the client's
                assert len(caught.value.details()) <= MAX_STATUS_MESSAGE_CHARS
        finally:
            await server.stop(grace=None)

    run(main())


@pytest.mark.parametrize("mode", MODES)
def test_a_call_cancelled_by_its_deadline_is_reported_as_deadline_exceeded(mode: str) -> None:
    async def main() -> None:
        async with serving(mode) as h:
            call = h.channel.unary_unary(f"/{SERVICE}/Hang")(b"", timeout=0.2)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await h.cancelled.wait()
            await h.reported.wait()
            assert [code for _, code, _ in h.observed] == [grpc.StatusCode.DEADLINE_EXCEEDED]

    run(main())
