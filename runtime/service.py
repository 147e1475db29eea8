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

Recommend calls can also be served many at once (`recommend_batch`, for the native front
end's batches): each is validated and admitted alone, and the valid ones of one version share
one retrieval per `retrieve_k` and one ranking, queued under their connection when they share
one (else the shared key "") and cancelled once all of them are.

Per-row work on the event loop (looking up candidate and excluded ids, building answers)
hands the loop back every `YIELD_ROWS` rows, so a request of a million rows does not hold
other calls (their admission, their answers) for the hundreds of milliseconds its decoding
takes.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import grpc
import numpy as np
from google.protobuf.message import Message

from recship.base.errors import InvalidInput, RecshipError
from recship.protos.v1 import recommender_pb2, recommender_pb2_grpc
from recship.runtime.features import FeatureCodec, JaggedBlock
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


def _caller(context: CallContext) -> tuple[str, Callable[[], bool]]:
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
        (answer,) = await self.recommend_batch([request], [context])
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def recommend_batch(
        self,
        requests: Sequence[recommender_pb2.RecommendRequest],
        contexts: Sequence[CallContext],
    ) -> list[recommender_pb2.RecommendResponse | RecshipError]:
        """Serves many Recommend calls together: each its own answer or its own error.

        Calls of one model spec share one lease, one retrieval per `retrieve_k` and one
        ranking, so a batch of calls costs the model work of one request (the native front
        end's batches, `recship.runtime.batch_plane`; a lone gRPC call is a batch of one).
        A call that fails validation or admission fails alone; one that fails in the shared
        model work fails with the calls it ran with.
        """
        answers: list[recommender_pb2.RecommendResponse | RecshipError | None]
        answers = [None] * len(requests)
        groups: dict[tuple[str, int | None, str | None], list[int]] = {}
        for i, request in enumerate(requests):
            try:
                self._check_request(request, len(request.queries))
                groups.setdefault(_model(request.model), []).append(i)
            except RecshipError as error:
                answers[i] = error

        async def serve_group(spec: tuple[str, int | None, str | None], members: list[int]):
            try:
                async with self.manager.acquire(*spec) as servable:
                    group = await self._recommend_group(
                        servable, [requests[i] for i in members], [contexts[i] for i in members]
                    )
            except RecshipError as error:
                group = [error] * len(members)
            for i, answer in zip(members, group, strict=True):
                answers[i] = answer

        await asyncio.gather(*(serve_group(spec, members) for spec, members in groups.items()))
        return answers  # type: ignore[return-value]

    async def _recommend_group(
        self,
        servable: Servable,
        requests: Sequence[recommender_pb2.RecommendRequest],
        contexts: Sequence[CallContext],
    ) -> list[recommender_pb2.RecommendResponse | RecshipError]:
        """Recommend calls of one leased version (`recommend_batch`)."""
        answers: list[recommender_pb2.RecommendResponse | RecshipError | None]
        answers = [None] * len(requests)
        codec = servable.codec
        admitted: list[tuple[int, int, float | None]] = []  # (call, retrieve_k, deadline)
        for j, (request, context) in enumerate(zip(requests, contexts, strict=True)):
            try:
                retrieve_k = request.retrieve_k or servable.default_retrieve_k
                field = "retrieve_k" if request.retrieve_k else "retrieve_k (the bundle's default)"
                _check_bound(field, retrieve_k, 1, self.limits.max_top_k)
                _check_bound("top_n", request.top_n, 1, retrieve_k)
                deadline = _deadline(context)
                client, _ = _caller(context)
                # (Its ranking rows are known after retrieval: they are admitted then.)
                servable.admit_retrieve(len(request.queries), deadline, client=client)
            except RecshipError as error:
                answers[j] = error
                continue
            admitted.append((j, retrieve_k, deadline))
        if not admitted:
            return answers  # type: ignore[return-value]
        steps = _Steps()
        encoded, outcomes = _encode_calls(codec, [requests[j] for j, _, _ in admitted])
        prepared = []
        for (j, retrieve_k, deadline), outcome in zip(admitted, outcomes, strict=True):
            if isinstance(outcome, RecshipError):
                answers[j] = outcome
                continue
            try:
                excluded = await self._exclusions(codec, requests[j].queries, "queries", steps)
            except RecshipError as error:
                answers[j] = error
                continue
            prepared.append(_PreparedQueries(j, retrieve_k, outcome, excluded, deadline))
        if not prepared:
            return answers  # type: ignore[return-value]
        assert encoded is not None
        tower, ranker, dense, cold = encoded
        client, cancelled = _shared_caller([contexts[p.call] for p in prepared])
        try:
            # One retrieval per retrieve_k (FAISS's answer for k is not a prefix of a larger k's).
            by_k: dict[int, list[_PreparedQueries]] = {}
            for part in prepared:
                by_k.setdefault(part.retrieve_k, []).append(part)
            for k, parts in by_k.items():
                rows = _rows_of(parts, tower.rows)
                scores, ids = await servable.retrieve(
                    tower if rows is None else tower.take(rows), k, _latest(parts),
                    [e for p in parts for e in p.excluded], client=client, cancelled=cancelled,
                    admitted=True,
                )  # fmt: skip
                start = 0
                for part in parts:
                    block = slice(start, start + part.rows.stop - part.rows.start)
                    keep = ids[block] >= 0
                    part.candidates = [r[m] for r, m in zip(ids[block], keep, strict=True)]
                    part.retrieval = [r[m] for r, m in zip(scores[block], keep, strict=True)]
                    start = block.stop
            candidates = [c for p in prepared for c in p.candidates]
            row_query, starts = _rows([c.size for c in candidates])
            if row_query.size:
                rows = _rows_of(prepared, ranker.rows)
                logits = await servable.rank(
                    ranker if rows is None else ranker.take(rows),
                    dense if rows is None else dense[rows], row_query, np.concatenate(candidates),
                    _latest(prepared), client=client, cancelled=cancelled,
                )  # fmt: skip
            else:
                logits = np.zeros(0, dtype=np.float32)
        except RecshipError as error:
            for part in prepared:
                answers[part.call] = error
            return answers  # type: ignore[return-value]
        probabilities = _sigmoid(logits)
        # Each query's best top_n, then every chosen item named in one vocabulary lookup.
        chosen, chosen_rank, chosen_retrieval, counts = [], [], [], []
        query = 0
        for part in prepared:
            top_n = requests[part.call].top_n
            for items, retrieved in zip(part.candidates, part.retrieval, strict=True):
                ranked = probabilities[starts[query] : starts[query + 1]]
                query += 1
                best = np.argsort(-ranked, kind="stable")[:top_n]
                chosen.append(items[best])
                chosen_rank.append(ranked[best])
                chosen_retrieval.append(retrieved[best])
                counts.append(best.size)
        names = codec.item_ids(np.concatenate(chosen)) if chosen else []
        rank_scores = np.concatenate(chosen_rank).tolist() if chosen else []
        retrieval_scores = np.concatenate(chosen_retrieval).tolist() if chosen else []
        served_by = _served_by(servable)
        position = query = 0
        for part in prepared:
            response = recommender_pb2.RecommendResponse(served_by=served_by)
            for is_cold in cold[part.rows].tolist():
                result = response.results.add(cold_start=is_cold)
                end = position + counts[query]
                query += 1
                for item_id, rank_score, retrieval_score in zip(
                    names[position:end], rank_scores[position:end],
                    retrieval_scores[position:end], strict=True,
                ):  # fmt: skip
                    result.items.add(
                        item_id=item_id, rank_score=rank_score, retrieval_score=retrieval_score
                    )
                await steps.advance(end - position)
                position = end
            answers[part.call] = response
        return answers  # type: ignore[return-value]


_Encoded = tuple[JaggedBlock, JaggedBlock, np.ndarray, np.ndarray]


def _encode_calls(
    codec: FeatureCodec, requests: Sequence[recommender_pb2.RecommendRequest]
) -> tuple[_Encoded | None, list[slice | RecshipError]]:
    """The calls' queries encoded together (`FeatureCodec.encode_queries`), and each call's
    rows in them, or its error (None: no call's queries are valid).

    All queries are encoded at once (the codec's work grows with the queries, not the calls);
    only when that fails is each call encoded alone, to tell whose query was bad.
    """
    try:
        encoded = codec.encode_queries(*_queries_and_paths(requests))
    except InvalidInput as error:
        if len(requests) == 1:
            return None, [error]
        alone = []
        for request in requests:
            try:
                alone.append(codec.encode_queries(*_queries_and_paths([request])))
            except RecshipError as failure:
                alone.append(failure)
        good = [part for part in alone if not isinstance(part, RecshipError)]
        encoded = (
            JaggedBlock.concat([part[0] for part in good]),
            JaggedBlock.concat([part[1] for part in good]),
            np.concatenate([part[2] for part in good]),
            np.concatenate([part[3] for part in good]),
        ) if good else None  # fmt: skip
        outcomes: list[slice | RecshipError] = []
        start = 0
        for part in alone:
            if isinstance(part, RecshipError):
                outcomes.append(part)
            else:
                outcomes.append(slice(start, start + part[3].size))
                start += part[3].size
        return encoded, outcomes
    spans = np.cumsum([0] + [len(request.queries) for request in requests]).tolist()
    return encoded, [slice(a, b) for a, b in itertools.pairwise(spans)]


def _queries_and_paths(
    requests: Sequence[recommender_pb2.RecommendRequest],
) -> tuple[list[recommender_pb2.Query], list[str]]:
    """The calls' queries, in order, and each one's field path in its own call."""
    queries = [query.query for request in requests for query in request.queries]
    paths = [f"queries[{i}].query" for request in requests for i in range(len(request.queries))]
    return queries, paths


def _rows_of(parts: Sequence[_PreparedQueries], total: int) -> np.ndarray | None:
    """The encoded rows of `parts` (in order), or None when they are all `total` rows."""
    if sum(p.rows.stop - p.rows.start for p in parts) == total:
        return None
    return np.concatenate([np.arange(p.rows.start, p.rows.stop) for p in parts])


class CallContext(Protocol):
    """What the servicer reads of a call: a `grpc.aio.ServicerContext`, or a batched call's
    stand-in (`recship.runtime.batch_plane`)."""

    def time_remaining(self) -> float | None: ...

    def peer(self) -> str: ...

    def cancelled(self) -> bool: ...


@dataclass
class _PreparedQueries:
    """One Recommend call's validated, encoded queries, then its retrieved candidates."""

    call: int
    retrieve_k: int
    rows: slice  # its queries' rows in the group's encoded blocks
    excluded: list[np.ndarray]
    deadline: float | None
    candidates: list[np.ndarray] = field(default_factory=list)
    retrieval: list[np.ndarray] = field(default_factory=list)


def _latest(parts: Sequence[_PreparedQueries]) -> float | None:
    """The deadline of shared model work: the latest of its calls' (None if one has none)."""
    deadlines = [p.deadline for p in parts]
    return None if None in deadlines else max(deadlines)  # type: ignore[type-var]


def _shared_caller(contexts: Sequence[CallContext]) -> tuple[str, Callable[[], bool]]:
    """(fairness key, cancellation signal) of calls served together: their connection when
    they share one, else the shared key ""; cancelled once every one of them is."""
    peers = {_caller(context)[0] for context in contexts}
    client = peers.pop() if len(peers) == 1 else ""
    if len(contexts) == 1:
        return client, contexts[0].cancelled
    return client, lambda: all(context.cancelled() for context in contexts)
