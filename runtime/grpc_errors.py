"""The one place where exceptions from grpc.aio servicers become gRPC status codes.

An exception escaping a grpc.aio handler reaches the client as UNKNOWN with the exception's
text. Here instead:

- a `RecshipError` is answered with its class's code from `STATUS_CODES` (the one table of
  the error taxonomy's gRPC codes) and its message (messages are written for the client: they
  name the field, bundle or version);
- any other exception is a bug: it is logged once with the method, the peer and the traceback,
  and answered INTERNAL "internal error" (never UNKNOWN, never a stack trace on the wire);
- `asyncio.CancelledError` (the client went away, or the server is stopping) and
  `context.abort(...)` raised by the servicer itself pass through untouched.

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
)

logger = logging.getLogger(__name__)

INTERNAL_MESSAGE = "internal error"

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


class RequestObserver(Protocol):
    """Receives one call per finished RPC; called on the event loop, so it must not block."""

    def __call__(self, method: str, code: grpc.StatusCode, seconds: float) -> None: ...


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

    async def fail(self, error: Exception) -> None:
        """Answers `error` with the right status; always raises (AbortError)."""
        if isinstance(error, grpc.aio.AbortError):
            self.report(_final_code(self.context))
            raise error
        if isinstance(error, RecshipError):
            code, message = status_code(error), str(error) or type(error).__name__
            if code is grpc.StatusCode.INTERNAL:
                logger.error(
                    "%s failed for %s: %s",
                    self.method,
                    self.context.peer(),
                    message,
                    exc_info=error,
                )
        else:
            code, message = grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE
            logger.error(
                "unhandled %s in %s for %s: %s",
                type(error).__name__,
                self.method,
                self.context.peer(),
                error,
                exc_info=error,
            )
        self.report(code)
        await self.context.abort(code, message)


def _wrap(behavior: Callable[..., Any], method: str, observe: RequestObserver | None) -> Any:
    # The servicer context is the last positional argument of every grpc.aio behaviour,
    # whether the behaviour is a plain function or a bound or unbound method.
    if inspect.isasyncgenfunction(behavior):

        @functools.wraps(behavior)
        async def stream_wrapper(*args: Any) -> AsyncIterator[Any]:
            call = _Call(method, args[-1], observe)
            try:
                async for response in behavior(*args):
                    yield response
            except asyncio.CancelledError:
                call.report(grpc.StatusCode.CANCELLED)
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
            response = await behavior(*args)
        except asyncio.CancelledError:
            call.report(grpc.StatusCode.CANCELLED)
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


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """A server interceptor that applies `map_errors` to every async handler of the server.

    The method label is the full method name without its leading slash
    ("recship.v1.Recommender/Rank"). Handlers that are not coroutines or async generators
    (none in recship) are passed through unwrapped. The wrapped handler of each method is
    built once and reused while the server hands out the same handler; one instance may serve
    any number of concurrent calls (all on the server's event loop).
    """

    def __init__(self, observe: RequestObserver | None = None) -> None:
        """Args: observe: called once per finished call with (method, code, seconds)."""
        self._observe = observe
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
        replaced = {
            name: _wrap(behavior, method, self._observe)
            for name in _BEHAVIORS
            if (behavior := getattr(handler, name)) is not None
            and (inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior))
        }
        return handler._replace(**replaced) if replaced else handler
