"""The one place where exceptions from grpc.aio servicers become gRPC status codes.

An exception escaping a grpc.aio handler reaches the client as UNKNOWN with the exception's
text. Here instead:

- a `RecshipError` is answered with its class's code from `STATUS_CODES` (the one table of
  the error taxonomy's gRPC codes) and its message (messages are written for the client: they
  name the field, bundle or version);
- any other exception is a bug: it is logged once with the method, the peer and the traceback,
  and answered INTERNAL "internal error" (never UNKNOWN, never a stack trace on the wire);
- `asyncio.CancelledError` (the client went away, or the server is stopping) and
  `context.abort(...)` raised by the servicer itself pass through untouched; a call cancelled
  by the transport because its deadline passed is reported as DEADLINE_EXCEEDED, not
  CANCELLED (that is what its caller sees);
- every status message is cut to `MAX_STATUS_MESSAGE_CHARS`, so that no message can exceed a
  client's metadata limit (and turn a NOT_FOUND into the client's RESOURCE_EXHAUSTED);
  messages quote client strings through `recship.base.errors.untrusted` besides.

Undecodable request bodies: grpc.aio deserializes a request before any handler or
interceptor code runs, and an exception there is logged with a traceback and answered
UNKNOWN. `ErrorMappingInterceptor` therefore wraps every method's deserializer in
`decode_request`, which never raises: a body that is too large or does not parse becomes an
`UndecodableRequest` holding an `InvalidInput`, and the wrapped handler answers it
INVALID_ARGUMENT (counted like any call, no traceback) before the servicer sees it. Streaming
requests are checked message by message. `decode_request` is a plain function over bytes, so
fuzzing the decode path needs no server.

Install `ErrorMappingInterceptor` on the server so no handler can forget it; `map_errors`
is the same wrapping as a decorator, for a single handler. Both can report every call's
method, final status code and duration to an observer (e.g. `ServerMetrics.observe_request`).

Example::

    metrics = ServerMetrics()
    server = grpc.aio.server(interceptors=[ErrorMappingInterceptor(metrics.observe_request)])
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import grpc
import grpc.aio

from recship.base.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidInput,
    NotFound,
    Overloaded,
    PermissionDenied,
    RecshipError,
    Unauthenticated,
    Unavailable,
    clip,
)

logger = logging.getLogger(__name__)

INTERNAL_MESSAGE = "internal error"
#: Longest status message sent. A stock client refuses response metadata above 8 KiB (and
#: answers RESOURCE_EXHAUSTED in place of the real code), so a message must stay far below.
MAX_STATUS_MESSAGE_CHARS = 1024

# The error taxonomy at the transport edge (DESIGN.md): each class -> its status code. A class
# not listed (including subclasses' bases up to RecshipError) is INTERNAL: a bug.
STATUS_CODES: dict[type[RecshipError], grpc.StatusCode] = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
}


def status_code(error: RecshipError) -> grpc.StatusCode:
    """The gRPC code of `error`: that of its nearest class in `STATUS_CODES`, else INTERNAL."""
    for cls in type(error).__mro__:
        code = STATUS_CODES.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


def clip_status(message: str) -> str:
    """`message` as a status message: printable and at most `MAX_STATUS_MESSAGE_CHARS`."""
    if len(message) > MAX_STATUS_MESSAGE_CHARS or not message.isprintable():
        return clip(message, MAX_STATUS_MESSAGE_CHARS)
    return message


def error_answer(error: Exception, method: str, peer: str) -> tuple[grpc.StatusCode, str]:
    """The (code, message) a call failing with `error` is answered; logs bugs.

    A `RecshipError` is answered with its code and message; any other exception is a bug:
    logged with the method, the peer and the traceback, and answered INTERNAL.
    """
    if isinstance(error, RecshipError):
        code, message = status_code(error), str(error) or type(error).__name__
        if code is grpc.StatusCode.INTERNAL:
            logger.error("%s failed for %s: %s", method, peer, message, exc_info=error)
        return code, clip_status(message)
    logger.error(
        "unhandled %s in %s for %s: %s", type(error).__name__, method, peer, error, exc_info=error
    )
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE


class UndecodableRequest:
    """What `decode_request` returns for a body that cannot be a request: the error to answer."""

    __slots__ = ("error",)

    def __init__(self, error: InvalidInput) -> None:
        self.error = error

    def __repr__(self) -> str:
        return f"UndecodableRequest({self.error})"


def decode_request(
    deserializer: Callable[[bytes], Any], data: bytes, what: str, max_bytes: int | None = None
) -> Any:
    """Decodes one request body; never raises.

    Args:
        deserializer: the method's own deserializer (e.g. `RankRequest.FromString`).
        data: the body as received.
        what: the request type's name for the message, e.g. "recship.v1.RankRequest".
        max_bytes: larger bodies are refused without being parsed; None: no bound here.

    Returns:
        The decoded request, or an `UndecodableRequest` whose `InvalidInput` names the
        problem (too large, or not a valid message of that type).
    """
    if max_bytes is not None and len(data) > max_bytes:
        return UndecodableRequest(
            InvalidInput(
                f"request: {len(data)} bytes, at most {max_bytes}; send fewer queries per request"
            )
        )
    try:
        return deserializer(data)
    except Exception as error:  # DecodeError, RecursionError, anything a parser may raise
        reason = clip(str(error) or type(error).__name__, 160)
        return UndecodableRequest(InvalidInput(f"request: not a valid {what} ({reason})"))


def safe_deserializer(
    deserializer: Callable[[bytes], Any], what: str, max_bytes: int | None = None
) -> Callable[[bytes], Any]:
    """`deserializer` wrapped in `decode_request`: for a grpc method handler."""

    def decode(data: bytes) -> Any:
        return decode_request(deserializer, data, what, max_bytes)

    return decode


def _request_type(deserializer: Callable[[bytes], Any], method: str) -> str:
    # Generated handlers pass `Message.FromString`; its class names the type.
    owner = getattr(deserializer, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    full_name = getattr(descriptor, "full_name", None)
    return full_name if isinstance(full_name, str) else f"{method} request"


class RequestObserver(Protocol):
    """Receives one call per finished RPC; called on the event loop, so it must not block."""

    def __call__(self, method: str, code: grpc.StatusCode, seconds: float) -> None: ...


def _set_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode | None:
    code = context.code()
    return code if isinstance(code, grpc.StatusCode) else None


def _final_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    # The code a servicer set itself (set_code or abort), OK when it set none.
    code = context.code()
    return grpc.StatusCode.OK if code is None else code


class _Call:
    """Bookkeeping of one RPC: maps its exception and reports its outcome once."""

    def __init__(
        self, method: str, context: grpc.aio.ServicerContext, observe: RequestObserver | None
    ) -> None:
        self.method = method
        self.context = context
        self.observe = observe
        self.start = time.perf_counter()

    def report(self, code: grpc.StatusCode) -> None:
        if self.observe is not None:
            self.observe(self.method, code, time.perf_counter() - self.start)

    def report_cancelled(self) -> None:
        # A call whose deadline has passed was cancelled by the transport for that reason.
        remaining = self.context.time_remaining()
        expired = remaining is not None and remaining <= 0
        self.report(grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED)

    async def fail(self, error: Exception) -> None:
        """Answers `error` with the right status; always raises (AbortError)."""
        if isinstance(error, grpc.aio.AbortError):
            self.report(_final_code(self.context))
            raise error
        if not isinstance(error, RecshipError) and _set_code(self.context) not in (
            None,
            grpc.StatusCode.OK,
        ):
            # A servicer that set its code and then raised, as generated stubs do for
            # unimplemented methods (UNIMPLEMENTED): its own answer, not a bug.
            code = _set_code(self.context)
            message = clip_status(self.context.details() or code.name)  # type: ignore[union-attr]
        else:
            code, message = error_answer(error, self.method, self.context.peer())
        self.report(code)
        try:
            await self.context.abort(code, message)
        except grpc.aio.AbortError:
            raise
        except Exception:
            # The transport no longer takes a status (the deadline passed, or the client left
            # while the answer was being sent): end the call quietly, as a cancellation.
            raise asyncio.CancelledError from None


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """A streaming request iterator that raises the error of an undecodable message."""
    async for request in requests:
        if isinstance(request, UndecodableRequest):
            raise request.error
        yield request


def _checked_args(args: tuple[Any, ...], streaming: bool) -> tuple[Any, ...]:
    """The arguments with a streaming request iterator checked (see `_checked`).

    Raises:
        InvalidInput: a unary request that could not be decoded.
    """
    request = args[-2] if len(args) >= 2 else None
    if isinstance(request, UndecodableRequest):
        raise request.error
    if streaming and request is not None and hasattr(request, "__aiter__"):
        return (*args[:-2], _checked(request), args[-1])
    return args


def _wrap(
    behavior: Callable[..., Any],
    method: str,
    observe: RequestObserver | None,
    request_streaming: bool = False,
) -> Any:
    # The servicer context is the last positional argument of every grpc.aio behaviour,
    # whether the behaviour is a plain function or a bound or unbound method; the request
    # (or request iterator) is the one before it.
    if inspect.isasyncgenfunction(behavior):

        @functools.wraps(behavior)
        async def stream_wrapper(*args: Any) -> AsyncIterator[Any]:
            call = _Call(method, args[-1], observe)
            try:
                async for response in behavior(*_checked_args(args, request_streaming)):
                    yield response
            except asyncio.CancelledError:
                call.report_cancelled()
                raise
            except Exception as error:
                await call.fail(error)
            call.report(_final_code(call.context))

        return stream_wrapper

    if not inspect.iscoroutinefunction(behavior):
        raise TypeError(
            f"{method}: only async handlers can be wrapped (got {behavior!r}); "
            "grpc.aio servicers are coroutines or async generators"
        )

    @functools.wraps(behavior)
    async def wrapper(*args: Any) -> Any:
        call = _Call(method, args[-1], observe)
        try:
            response = await behavior(*_checked_args(args, request_streaming))
        except asyncio.CancelledError:
            call.report_cancelled()
            raise
        except Exception as error:
            await call.fail(error)
        call.report(_final_code(call.context))
        return response

    return wrapper


def map_errors(
    method: str, observe: RequestObserver | None = None
) -> Callable[[Callable[..., Awaitable[Any]]], Callable[..., Awaitable[Any]]]:
    """Decorates one async grpc.aio handler (coroutine or async generator) with error mapping.

    Args:
        method: the RPC's name for logs and metrics, e.g. "recship.v1.Recommender/Rank".
        observe: called once per call with (method, final status code, seconds), or None.

    Returns:
        A decorator; the wrapped handler keeps its signature.

    Raises:
        TypeError: at decoration time, if the handler is neither a coroutine function nor an
            async generator function.
    """

    def decorate(behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        return _wrap(behavior, method, observe)

    return decorate


_BEHAVIORS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")


def _as_async(behavior: Callable[..., Any], response_streaming: bool) -> Callable[..., Any]:
    """A synchronous unary-request behaviour as the coroutine (or async generator) grpc.aio
    would make of it: called inline on the event loop, as grpc.aio calls it without a thread
    pool. So that its request, too, is decoded safely and its errors mapped (e.g. the
    synchronous, unimplemented `List` of grpc's asyncio health servicer)."""
    if inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior):
        return behavior
    if response_streaming:

        @functools.wraps(behavior)
        async def stream(*args: Any) -> AsyncIterator[Any]:
            for response in behavior(*args):
                yield response

        return stream

    @functools.wraps(behavior)
    async def unary(*args: Any) -> Any:
        return behavior(*args)

    return unary


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """A server interceptor that applies `map_errors` to every async handler of the server,
    and decodes every request with `decode_request` (undecodable -> INVALID_ARGUMENT).

    The method label is the full method name without its leading slash
    ("recship.v1.Recommender/Rank"). Synchronous handlers of unary requests are run as
    coroutines (inline, as grpc.aio runs them); synchronous streaming-request handlers (none
    on recship's servers) are passed through unwrapped. The wrapped handler of each method is
    built once and reused while the server hands out the same handler; one instance may serve
    any number of concurrent calls (all on the server's event loop).
    """

    def __init__(
        self,
        observe: RequestObserver | None = None,
        *,
        max_request_bytes: int | None = None,
        unbounded: frozenset[str] = frozenset(),
    ) -> None:
        """Args:
        observe: called once per finished call with (method, code, seconds).
        max_request_bytes: request bodies larger than this are INVALID_ARGUMENT without being
            parsed; None leaves the bound to the transport.
        unbounded: methods exempt from `max_request_bytes` (the native front end's batches,
            whose calls are bounded one by one).
        """
        self._observe = observe
        self._max_request_bytes = max_request_bytes
        self._unbounded = unbounded
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method.lstrip("/")
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap_handler(handler, method)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap_handler(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        replaced: dict[str, Any] = {}
        for name in _BEHAVIORS:
            behavior = getattr(handler, name)
            if behavior is None:
                continue
            if not handler.request_streaming:
                behavior = _as_async(behavior, handler.response_streaming)
            if inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior):
                replaced[name] = _wrap(behavior, method, self._observe, handler.request_streaming)
        if not replaced:
            return handler
        deserializer = handler.request_deserializer
        if deserializer is not None:
            replaced["request_deserializer"] = safe_deserializer(
                deserializer,
                _request_type(deserializer, method),
                None if method in self._unbounded else self._max_request_bytes,
            )
        return handler._replace(**replaced)
