"""The gRPC inference surface: the `recship.v1.Recommender` servicer (grpc.aio).

(`recship.v1.BundleAdmin`, the operator API, is served on its own authenticated listener:
`recship.runtime.admin`.)

This module only translates: protos -> validated numpy blocks (through the version's
`FeatureCodec`), the `Servable`'s coroutines, numpy -> protos. Errors are raised as
`RecshipError`s and turned into status codes in one place (`ErrorMappingInterceptor`).

Every request is served end to end by one version: the servicer holds one lease from the
`VersionManager` for the whole call (Recommend's retrieval and ranking included) and names
that version in the response's `served_by`. Requests are validated completely before any row
is queued, so a bad request never reaches a model batch and never affects other requests.

Admission comes first, though: from the message's field lengths alone (queries, candidates)
the servable refuses a request that its queues would refuse whatever its features hold
(`Servable.admit_rank`, `admit_retrieve`), so an overloaded server answers RESOURCE_EXHAUSTED
for the price of a few comparisons instead of decoding the request first; the exact cost
(rows x ids per feature) is counted from the decoded request when it is queued. Each call
queues under its connection (`context.peer()`) as fairness key, with its cancellation signal.

Per-row work on the event loop (looking up candidate and excluded ids, building answers)
hands the loop back every `YIELD_ROWS` rows, so a request of a million rows does not hold
other calls (their admission, their answers) for the hundreds of milliseconds its decoding
takes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import grpc
import numpy as np
from google.protobuf.message import Message

from recship.base.errors import InvalidInput
from recship.protos.v1 import recommender_pb2, recommender_pb2_grpc
from recship.runtime.limits import ServiceLimits
from recship.runtime.manager import VersionManager
from recship.runtime.servable import Servable

#: Rows of per-row work (id lookups, answer building) after which a request hands the event
#: loop back to other calls: ~1-2 ms of work on the test machine.
YIELD_ROWS = 4096


class _Steps:
    """Counts one call's per-row work on the event loop; yields it every `YIELD_ROWS` rows."""

    def __init__(self) -> None:
        self._rows = 0

    async def advance(self, rows: int) -> None:
        self._rows += rows
        if self._rows >= YIELD_ROWS:
            self._rows = 0
            await asyncio.sleep(0)


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline on the `time.monotonic()` clock, or None without one."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _caller(context: grpc.aio.ServicerContext) -> tuple[str, object]:
    """(fairness key, cancellation signal) of a call: its connection, `context.cancelled`."""
    return context.peer() or "", context.cancelled


def _model(spec: recommender_pb2.ModelSpec) -> tuple[str, int | None, str | None]:
    if not spec.bundle:
        raise InvalidInput("model.bundle: required")
    choice = spec.WhichOneof("version_choice")
    return (
        spec.bundle,
        spec.version if choice == "version" else None,
        spec.label if choice == "label" else None,
    )


def _check_bound(field: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise InvalidInput(f"{field}: {value} is out of bounds [{low}, {high}]")


def _served_by(servable: Servable) -> recommender_pb2.ServedBy:
    return recommender_pb2.ServedBy(
        bundle=servable.name, version=servable.version, release_id=servable.release_id
    )


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-logits.astype(np.float64)))).astype(np.float32)


def _rows(counts: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(row -> query index, start offset of each query) for per-query row counts."""
    array = np.asarray(counts, dtype=np.int64)
    return np.repeat(np.arange(array.size), array), np.concatenate([[0], np.cumsum(array)])


class RecommenderService(recommender_pb2_grpc.RecommenderServicer):
    """Retrieve, Rank and Recommend over the versions a `VersionManager` serves."""

    def __init__(self, manager: VersionManager, limits: ServiceLimits) -> None:
        self.manager = manager
        self.limits = limits

    def _check_request(self, request: Message, queries: int) -> None:
        size = request.ByteSize()
        if size > self.limits.max_request_bytes:
            raise InvalidInput(
                f"request: {size} bytes, at most {self.limits.max_request_bytes}; "
                "send fewer queries per request"
            )
        if queries == 0:
            raise InvalidInput("queries: empty; send at least one query")
        if queries > self.limits.max_queries:
            raise InvalidInput(f"queries: {queries} queries, at most {self.limits.max_queries}")

    async def _exclusions(
        self, codec, queries: Sequence[Message], where: str, steps: _Steps
    ) -> list[np.ndarray]:
        """Each query's validated `exclude_item_ids` (bounded by `limits.max_exclusions`)."""
        for i, query in enumerate(queries):
            field = f"{where}[{i}].exclude_item_ids"
            _check_bound(
                f"{field} (count)", len(query.exclude_item_ids), 0, self.limits.max_exclusions
            )
        excluded = []
        for i, query in enumerate(queries):
            # Ids the catalogue does not hold cannot be returned anyway: nothing to exclude.
            field = f"{where}[{i}].exclude_item_ids"
            excluded.append(codec.item_indices(query.exclude_item_ids, field, unknown="drop"))
            await steps.advance(len(query.exclude_item_ids))
        return excluded

    async def Retrieve(
        self, request: recommender_pb2.RetrieveRequest, context: grpc.aio.ServicerContext
    ) -> recommender_pb2.RetrieveResponse:
        self._check_request(request, len(request.queries))
        _check_bound("top_k", request.top_k, 1, self.limits.max_top_k)
        bundle, version, label = _model(request.model)
        deadline = _deadline(context)
        client, cancelled = _caller(context)
        async with self.manager.acquire(bundle, version, label) as servable:
            servable.admit_retrieve(len(request.queries), deadline, client=client)
            paths = [f"queries[{i}].query" for i in range(len(request.queries))]
            codec = servable.codec
            block, _, _, cold = codec.encode_queries([q.query for q in request.queries], paths)
            steps = _Steps()
            excluded = await self._exclusions(codec, request.queries, "queries", steps)
            scores, ids = await servable.retrieve(
                block, request.top_k, deadline, excluded, client=client, cancelled=cancelled,
                admitted=True,
            )  # fmt: skip
            response = recommender_pb2.RetrieveResponse(served_by=_served_by(servable))
        for row_scores, row_ids, is_cold in zip(scores, ids, cold.tolist(), strict=True):
            result = response.results.add(cold_start=is_cold)
            found = row_ids >= 0
            for item_id, score in zip(
                codec.item_ids(row_ids[found]), row_scores[found].tolist(), strict=True
            ):
                result.items.add(item_id=item_id, score=score)
            await steps.advance(row_ids.size)
        return response

    async def Rank(
        self, request: recommender_pb2.RankRequest, context: grpc.aio.ServicerContext
    ) -> recommender_pb2.RankResponse:
        self._check_request(request, len(request.queries))
        rows = 0
        for i, query in enumerate(request.queries):
            count = len(query.candidate_item_ids)
            _check_bound(
                f"queries[{i}].candidate_item_ids (count)", count, 1, self.limits.max_candidates
            )
            rows += count
        bundle, version, label = _model(request.model)
        deadline = _deadline(context)
        client, cancelled = _caller(context)
        async with self.manager.acquire(bundle, version, label) as servable:
            servable.admit_rank(rows, deadline, client=client)
            codec = servable.codec
            paths = [f"queries[{i}].query" for i in range(len(request.queries))]
            _, ranker_block, dense, cold = codec.encode_queries(
                [q.query for q in request.queries], paths
            )
            steps = _Steps()
            candidates = []
            for i, query in enumerate(request.queries):
                field = f"queries[{i}].candidate_item_ids"
                candidates.append(codec.item_indices(query.candidate_item_ids, field))
                await steps.advance(len(query.candidate_item_ids))
            row_query, starts = _rows([c.size for c in candidates])
            item_ids = np.concatenate(candidates)
            del candidates
            logits = await servable.rank(
                ranker_block, dense, row_query, item_ids, deadline,
                client=client, cancelled=cancelled, admitted=True,
            )  # fmt: skip
            response = recommender_pb2.RankResponse(served_by=_served_by(servable))
        scores = _sigmoid(logits)
        for i, is_cold in enumerate(cold.tolist()):
            response.results.add(
                scores=scores[starts[i] : starts[i + 1]].tolist(), cold_start=is_cold
            )
            await steps.advance(int(starts[i + 1] - starts[i]))
        return response

    async def Recommend(
        self, request: recommender_pb2.RecommendRequest, context: grpc.aio.ServicerContext
    ) -> recommender_pb2.RecommendResponse:
        self._check_request(request, len(request.queries))
        bundle, version, label = _model(request.model)
        deadline = _deadline(context)
        client, cancelled = _caller(context)
        async with self.manager.acquire(bundle, version, label) as servable:
            retrieve_k = request.retrieve_k or servable.default_retrieve_k
            field = "retrieve_k" if request.retrieve_k else "retrieve_k (the bundle's default)"
            _check_bound(field, retrieve_k, 1, self.limits.max_top_k)
            _check_bound("top_n", request.top_n, 1, retrieve_k)
            # (Its ranking rows are known after retrieval: they are admitted then.)
            servable.admit_retrieve(len(request.queries), deadline, client=client)
            codec = servable.codec
            paths = [f"queries[{i}].query" for i in range(len(request.queries))]
            tower_block, ranker_block, dense, cold = codec.encode_queries(
                [q.query for q in request.queries], paths
            )
            steps = _Steps()
            excluded = await self._exclusions(codec, request.queries, "queries", steps)
            scores, ids = await servable.retrieve(
                tower_block, retrieve_k, deadline, excluded, client=client, cancelled=cancelled,
                admitted=True,
            )  # fmt: skip
            keep = ids >= 0
            candidates = [row_ids[mask] for row_ids, mask in zip(ids, keep, strict=True)]
            retrieval = [row[mask] for row, mask in zip(scores, keep, strict=True)]
            row_query, starts = _rows([c.size for c in candidates])
            if row_query.size:
                logits = await servable.rank(
                    ranker_block, dense, row_query, np.concatenate(candidates), deadline,
                    client=client, cancelled=cancelled,
                )  # fmt: skip
            else:
                logits = np.zeros(0, dtype=np.float32)
            response = recommender_pb2.RecommendResponse(served_by=_served_by(servable))
        probabilities = _sigmoid(logits)
        for i, (items, retrieved) in enumerate(zip(candidates, retrieval, strict=True)):
            ranked = probabilities[starts[i] : starts[i + 1]]
            best = np.argsort(-ranked, kind="stable")[: request.top_n]
            result = response.results.add(cold_start=bool(cold[i]))
            for item_id, rank_score, retrieval_score in zip(
                codec.item_ids(items[best]), ranked[best].tolist(), retrieved[best].tolist(),
                strict=True,
            ):  # fmt: skip
                result.items.add(
                    item_id=item_id, rank_score=rank_score, retrieval_score=retrieval_score
                )
            await steps.advance(best.size)
        return response
