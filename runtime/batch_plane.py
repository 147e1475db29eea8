"""The serving process's side of the native front end: whole batches of calls at once.

`recship serve --front-end native` puts `recship-frontend` (`recship.runtime.front_end`) on
the inference port; it sends each worker batches of client calls (`recship.v1.BatchPlane/Run`
over the worker's Unix socket). `BatchPlaneService` answers a batch with one outcome per call,
exactly what the call would have been answered by `RecommenderService` through grpc.aio:

- each body is decoded as the interceptor decodes one (`decode_request`: too large or not a
  valid message -> INVALID_ARGUMENT), and every error is mapped by `error_answer`;
- Recommend calls go through `RecommenderService.recommend_batch` together (one lease, one
  retrieval, one ranking); Retrieve and Rank calls run concurrently through the servicer's own
  methods, so their rows meet in the version's batchers;
- each call keeps its deadline (`Call.timeout_s`) and its client's address as fairness key,
  and is counted in the request metrics under its own method, as if it came through grpc.aio.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc

from recship.protos.v1 import batch_plane_pb2, batch_plane_pb2_grpc, recommender_pb2
from recship.runtime.grpc_errors import (
    RequestObserver,
    UndecodableRequest,
    decode_request,
    error_answer,
)
from recship.runtime.limits import ServiceLimits
from recship.runtime.service import RecommenderService

_RECOMMENDER = recommender_pb2.DESCRIPTOR.services_by_name["Recommender"]
_SERVICE = f"/{_RECOMMENDER.full_name}/"
# Method name -> its request message class.
_REQUESTS = {
    method.name: getattr(recommender_pb2, method.input_type.name) for method in _RECOMMENDER.methods
}


class BatchedCall:
    """A batched call's stand-in for the `grpc.aio.ServicerContext` the servicer reads."""

    __slots__ = ("_deadline", "_peer")

    def __init__(self, call: batch_plane_pb2.Call, received: float) -> None:
        self._deadline = received + call.timeout_s if call.timeout_s > 0 else None
        self._peer = call.peer

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else self._deadline - time.monotonic()

    def peer(self) -> str:
        return self._peer

    def cancelled(self) -> bool:
        # The front end drops calls cancelled while queued, but does not forward later ones;
        # a late answer is dropped there.
        return False


class BatchPlaneService(batch_plane_pb2_grpc.BatchPlaneServicer):
    """Answers the native front end's batches with `RecommenderService`'s own logic."""

    def __init__(
        self,
        service: RecommenderService,
        limits: ServiceLimits,
        observe: RequestObserver | None = None,
    ) -> None:
        self.service = service
        self.limits = limits
        self.observe = observe

    async def Run(
        self, request: batch_plane_pb2.CallBatch, context: grpc.aio.ServicerContext
    ) -> batch_plane_pb2.OutcomeBatch:
        received = time.monotonic()
        started = time.perf_counter()
        name = request.method.removeprefix(_SERVICE)
        message_type = _REQUESTS.get(name) if request.method.startswith(_SERVICE) else None
        method = request.method.lstrip("/")
        calls = [BatchedCall(call, received) for call in request.calls]
        if message_type is None:
            unknown = f"method {request.method} is not served"
            answers: list[Any] = [(grpc.StatusCode.UNIMPLEMENTED, unknown)] * len(calls)
        else:
            what = message_type.DESCRIPTOR.full_name
            decoded = [
                decode_request(message_type.FromString, call.request, what,
                               self.limits.max_request_bytes)
                for call in request.calls
            ]  # fmt: skip
            answers = await self._answers(name, method, decoded, calls)
        reply = batch_plane_pb2.OutcomeBatch()
        seconds = time.perf_counter() - started
        for answer in answers:
            if isinstance(answer, tuple):
                code, message = answer
                reply.outcomes.add(code=code.value[0], message=message)
            else:
                code = grpc.StatusCode.OK
                reply.outcomes.add(response=answer.SerializeToString())
            if self.observe is not None:
                self.observe(method, code, seconds)
        return reply

    async def _answers(
        self,
        name: str,
        method: str,
        decoded: Sequence[Any],
        calls: Sequence[BatchedCall],
    ) -> list[Any]:
        """Each call's response, or its (code, message)."""
        answers: list[Any] = [None] * len(decoded)
        valid = []
        for i, request in enumerate(decoded):
            if isinstance(request, UndecodableRequest):
                answers[i] = error_answer(request.error, method, calls[i].peer())
            else:
                valid.append(i)
        requests = [decoded[i] for i in valid]
        contexts = [calls[i] for i in valid]
        try:
            if name == "Recommend":
                results: list[Any] = await self.service.recommend_batch(requests, contexts)
            else:
                serve_one: Callable[[Any, Any], Awaitable[Any]] = getattr(self.service, name)
                results = await asyncio.gather(
                    *(serve_one(r, c) for r, c in zip(requests, contexts, strict=True)),
                    return_exceptions=True,
                )
        except Exception as error:  # a bug in the shared path: every call of it is answered
            results = [error] * len(requests)
        for i, result in zip(valid, results, strict=True):
            if isinstance(result, asyncio.CancelledError):
                raise result
            answers[i] = (
                error_answer(result, method, calls[i].peer())
                if isinstance(result, BaseException)
                else result
            )
        return answers
