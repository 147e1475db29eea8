"""A seeded wire fuzz of the inference API against a live server: every bad request gets its code.

Requests go out as raw bytes through a generic channel, as a hostile client would send them:
random and truncated bodies, wrong wire types, invalid UTF-8, unknown and missing features,
values of the wrong type, id extremes, non-finite numbers, K / N out of range, empty and huge
batches, huge bags, long and odd names. Each case says which status codes the proto documents
for it (`recommender.proto`); the server must answer every one with one of them, never UNKNOWN
or INTERNAL, with a bounded message, without logging a traceback, and answer a known-good
request identically before and after.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf.message import DecodeError, Message

from recship.protos.v1 import recommender_pb2 as pb

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
TOO_BIG = grpc.StatusCode.RESOURCE_EXHAUSTED
# What a status message may hold at most: client text is quoted to ~100 characters.
MAX_DETAILS = 1000
MIN_CASES = 500
METHODS = {
    "Retrieve": (pb.RetrieveRequest, pb.RetrieveResponse),
    "Rank": (pb.RankRequest, pb.RankResponse),
    "Recommend": (pb.RecommendRequest, pb.RecommendResponse),
}
REQUEST_TYPES = {request: name for name, (request, _) in METHODS.items()}


@dataclass(frozen=True)
class Case:
    """One request as bytes, what it exercises and the codes the proto allows for it."""

    kind: str
    method: str
    body: bytes
    allowed: frozenset[grpc.StatusCode]
    # Text an INVALID_ARGUMENT message must contain (the field it names), if any.
    names: str | None = None


def _value(raw: Any) -> pb.Value:
    if isinstance(raw, bool):
        raise TypeError("no booleans on the wire")
    if isinstance(raw, str):
        return pb.Value(string_value=raw)
    if isinstance(raw, int):
        return pb.Value(int_value=raw)
    if isinstance(raw, float):
        return pb.Value(double_value=raw)
    if all(isinstance(x, str) for x in raw):
        return pb.Value(list_value=pb.ValueList(strings=raw))
    if all(isinstance(x, int) for x in raw):
        return pb.Value(list_value=pb.ValueList(ints=raw))
    return pb.Value(list_value=pb.ValueList(doubles=raw))


def _query(features: dict[str, Any]) -> pb.Query:
    return pb.Query(features={name: _value(raw) for name, raw in features.items()})


class Fuzzer:
    """Seeded malformed (and a few well-formed) requests for one bundle.

    Args:
        rng: the seed's generator.
        user: raw features of a valid user (every query feature).
        item_ids: a few of the catalogue's item ids.
        bundle: the served bundle's name.
    """

    def __init__(
        self, rng: random.Random, user: dict[str, Any], item_ids: list[str], bundle: str
    ) -> None:
        self.rng = rng
        self.user = user
        self.item_ids = item_ids
        self.bundle = bundle

    # -- well-formed requests, the material the mutations start from -----------------------
    def request(self, method: str, queries: list[dict[str, Any]] | None = None) -> Message:
        model = pb.ModelSpec(bundle=self.bundle)
        queries = queries if queries is not None else [self.user]
        if method == "Retrieve":
            return pb.RetrieveRequest(
                model=model,
                top_k=10,
                queries=[
                    pb.RetrieveQuery(query=_query(q), exclude_item_ids=self.item_ids[:2])
                    for q in queries
                ],
            )
        if method == "Rank":
            return pb.RankRequest(
                model=model,
                queries=[
                    pb.RankQuery(query=_query(q), candidate_item_ids=self.item_ids) for q in queries
                ],
            )
        return pb.RecommendRequest(
            model=model,
            retrieve_k=50,
            top_n=10,
            queries=[
                pb.RecommendQuery(query=_query(q), exclude_item_ids=self.item_ids[:2])
                for q in queries
            ],
        )

    def method(self) -> str:
        return self.rng.choice(sorted(METHODS))

    def _case(self, kind: str, request: Message, allowed: set, names: str | None = None) -> Case:
        return Case(kind, REQUEST_TYPES[type(request)], request.SerializeToString(),
                    frozenset(allowed), names)  # fmt: skip

    def _odd_text(self) -> str:
        choices = [
            "",
            "\x00",
            "é" * self.rng.randint(1, 300),
            "🙂" * self.rng.randint(1, 50),
            "x" * self.rng.randint(200, 30000),
            "%s%n%x",
            "../../etc/passwd",
            "\u202e" + "abc",
            " user_id",
        ]
        return self.rng.choice(choices)

    # -- the malformed kinds ---------------------------------------------------------------
    def random_body(self) -> Case:
        length = self.rng.randint(1, 400)
        body = bytes(self.rng.getrandbits(8) for _ in range(length))
        return self._decoded_or_invalid("random body", self.method(), body)

    def truncated_body(self) -> Case:
        method = self.method()
        body = self.request(method).SerializeToString()
        cut = body[: self.rng.randint(1, len(body) - 1)]
        return self._decoded_or_invalid("truncated body", method, cut)

    def flipped_bytes(self) -> Case:
        method = self.method()
        body = bytearray(self.request(method).SerializeToString())
        for _ in range(self.rng.randint(1, 4)):
            body[self.rng.randrange(len(body))] = self.rng.getrandbits(8)
        return self._decoded_or_invalid("flipped bytes", method, bytes(body))

    def wrong_wire_type(self) -> Case:
        """A top-level field re-sent with another wire type (varint, fixed64, fixed32, or a
        length-delimited blob for a varint)."""
        method = self.method()
        body = self.request(method).SerializeToString()
        field = self.rng.choice([1, 2, 3, 4, 5])
        wire = self.rng.choice([0, 1, 2, 5])
        payload = {
            0: bytes([0x96, 0x01]),
            1: bytes(8),
            2: bytes([3]) + b"abc",
            5: bytes(4),
        }[wire]
        return self._decoded_or_invalid(
            "wrong wire type", method, body + bytes([field << 3 | wire]) + payload
        )

    def invalid_utf8(self) -> Case:
        method = self.method()
        request = self.request(method)
        # Field 1 (model), field 1 inside it (bundle), with bytes that are not UTF-8.
        bundle = b"\xff\xfe\xc3("
        model = bytes([0x0A, len(bundle)]) + bundle
        body = bytes([0x0A, len(model)]) + model + request.SerializeToString()
        return self._decoded_or_invalid("invalid utf-8", method, body)

    def _decoded_or_invalid(self, kind: str, method: str, body: bytes) -> Case:
        """Undecodable bodies are INVALID_ARGUMENT; bodies that happen to decode may be any
        documented answer of a well-formed request."""
        request_type = METHODS[method][0]
        try:
            request_type.FromString(body)
        except DecodeError:
            return Case(kind, method, body, frozenset({INVALID}))
        return Case(kind, method, body, frozenset({OK, INVALID, NOT_FOUND}))

    def unknown_feature(self) -> Case:
        name = self.rng.choice(["colour", "user_idx", self._odd_text()[:500] or "_"])
        return self._case("unknown feature", self.request(self.method(), [self.user | {name: 1}]),
                          {INVALID}, "unknown feature")  # fmt: skip

    def missing_feature(self) -> Case:
        # Without the user key nothing says which stored user to read; some features have no
        # default (user_id itself: the query is then a cold-start one, which is valid).
        kept = {k: v for k, v in self.user.items() if self.rng.random() < 0.5}
        return self._case("missing features", self.request(self.method(), [kept]), {OK, INVALID})

    def wrong_type(self) -> Case:
        name = self.rng.choice(sorted(self.user))
        bad = self.rng.choice([[1, 2], ["a", "b"], [0.5, 1.5], "not-a-number", 1e300, []])
        features = self.user | {name: bad}
        # Text for a numeric feature and lists for a single-valued one are refused; some values
        # are merely unknown (a cold-start user, an OOV bucket) or valid for that feature.
        return self._case("wrong type", self.request(self.method(), [features]), {OK, INVALID})

    def mixed_list(self) -> Case:
        name = self.rng.choice(sorted(self.user))
        value = pb.Value(list_value=pb.ValueList(strings=["a"], ints=[1], doubles=[0.5]))
        request = self.request(self.method())
        request.queries[0].query.features[name].CopyFrom(value)
        return self._case("mixed list", request, {INVALID}, name)

    def unset_value(self) -> Case:
        name = self.rng.choice(sorted(self.user))
        request = self.request(self.method())
        request.queries[0].query.features[name].Clear()
        return self._case("value without kind", request, {INVALID}, name)

    def id_extreme(self) -> Case:
        name = self.rng.choice(sorted(self.user))
        extreme = self.rng.choice([2**63 - 1, -(2**63), -1, 0, 10**18])
        # An unknown user key is a cold start (OK); an unknown category is refused or bucketed
        # as its transform says; any integer is a number for bucketized and dense features.
        return self._case("id extreme", self.request(self.method(), [self.user | {name: extreme}]),
                          {OK, INVALID})  # fmt: skip

    def non_finite(self) -> Case:
        value = self.rng.choice([float("nan"), float("inf"), float("-inf")])
        name = self.rng.choice(["user_log_activity", "user_age_bucket"])
        request = self.request(self.method(), [self.user | {name: value}])
        return self._case("non-finite number", request, {INVALID}, name)

    def k_out_of_range(self) -> Case:
        if self.rng.random() < 0.5:
            request = self.request("Retrieve")
            request.top_k = self.rng.choice([0, 1001, 2**32 - 1])
            return self._case("top_k out of range", request, {INVALID}, "top_k")
        request = self.request("Recommend")
        request.retrieve_k, request.top_n = self.rng.choice(
            [(1001, 10), (2**32 - 1, 10), (50, 51), (50, 0), (1, 2)]
        )
        return self._case("retrieve_k / top_n out of range", request, {INVALID})

    def empty_batch(self) -> Case:
        return self._case("empty batch", self.request(self.method(), []), {INVALID}, "queries")

    def huge_batch(self) -> Case:
        count = self.rng.choice([1025, 5000])
        request = self.request(self.method(), [self.user] * count)
        # Over the query bound (INVALID_ARGUMENT), or, the largest, over the size bound too.
        return self._case("huge batch", request, {INVALID}, "queries" if count == 1025 else None)

    def huge_bag(self) -> Case:
        method = self.method()
        # Over the bound of the bag: 1024 exclusions, 4096 candidates (ServiceLimits).
        size = self.rng.choice([4097, 20000] if method == "Rank" else [1025, 4097, 20000])
        ids = [self.rng.choice(self.item_ids) for _ in range(size)]
        request = self.request(method)
        target = (
            request.queries[0].candidate_item_ids
            if method == "Rank"
            else request.queries[0].exclude_item_ids
        )
        target.extend(ids)
        if self.rng.random() < 0.3:
            request.queries[0].query.features["user_gender"].CopyFrom(_value(["gender_0"] * size))
        return self._case("huge bag", request, {INVALID}, "queries[0]")

    def unknown_candidates(self) -> Case:
        request = self.request("Rank")
        request.queries[0].candidate_item_ids.append(self._odd_text()[:2000] or "nope")
        return self._case("unknown candidate", request, {INVALID}, "candidate_item_ids")

    def odd_bundle(self) -> Case:
        request = self.request(self.method())
        choice = self.rng.random()
        if choice < 0.4:
            request.model.bundle = self._odd_text()
            allowed = {INVALID} if request.model.bundle == "" else {NOT_FOUND}
        elif choice < 0.7:
            request.model.version = self.rng.choice([-1, 0, 2**63 - 1, 99])
            allowed = {NOT_FOUND, INVALID}
        else:
            request.model.label = self._odd_text()
            allowed = {NOT_FOUND, INVALID}
        return self._case("odd bundle / version / label", request, allowed)

    def odd_value(self) -> Case:
        name = self.rng.choice(["user_gender", "user_occupation", "user_zip_prefix", "user_id"])
        # Unknown text: refused (user_gender, user_occupation), bucketed (user_zip_prefix) or a
        # cold start (user_id), whatever the text holds.
        request = self.request(self.method(), [self.user | {name: self._odd_text()}])
        return self._case("odd value", request, {OK, INVALID})

    def cases(self, count: int) -> Iterator[Case]:
        kinds: list[Callable[[], Case]] = [
            self.random_body, self.truncated_body, self.flipped_bytes, self.wrong_wire_type,
            self.invalid_utf8, self.unknown_feature, self.missing_feature, self.wrong_type,
            self.mixed_list, self.unset_value, self.id_extreme, self.non_finite,
            self.k_out_of_range, self.empty_batch, self.huge_batch, self.huge_bag,
            self.unknown_candidates, self.odd_bundle, self.odd_value,
        ]  # fmt: skip
        for i in range(count):
            yield kinds[i % len(kinds)]()


def _call(channel: grpc.Channel, case: Case) -> tuple[grpc.StatusCode, str, bytes]:
    """(code, details, response bytes) of one raw request."""
    call = channel.unary_unary(f"/recship.v1.Recommender/{case.method}")
    try:
        return OK, "", call(case.body, timeout=30)
    except grpc.RpcError as error:
        return error.code(), error.details() or "", b""


@pytest.fixture
def fuzz_target(server_factory: Callable[..., Any], bundle_repo: Path) -> Any:
    server = server_factory(bundle_repo)
    server.wait_ready()
    return server


def test_every_malformed_request_gets_its_documented_code(
    fuzz_target: Any,
    reference: Any,
    make_user: Callable[..., dict[str, Any]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    fuzzer = Fuzzer(
        random.Random(20261201),
        make_user(5),
        [str(i) for i in reference.item_ids(np.arange(8))],
        "movies",
    )
    known_good = Case("known good", "Recommend", fuzzer.request("Recommend").SerializeToString(),
                      frozenset({OK}))  # fmt: skip
    options = [("grpc.max_send_message_length", 64 * 1024 * 1024),
               ("grpc.max_receive_message_length", 64 * 1024 * 1024)]  # fmt: skip
    with grpc.insecure_channel(fuzz_target.target, options=options) as channel:
        code, details, before = _call(channel, known_good)
        assert code == OK, details
        caplog.set_level(logging.WARNING)
        wrong: list[str] = []
        seen: dict[str, dict[str, int]] = {}
        cases = list(fuzzer.cases(MIN_CASES + 70))
        for case in cases:
            code, details, _ = _call(channel, case)
            seen.setdefault(case.kind, {}).setdefault(code.name, 0)
            seen[case.kind][code.name] += 1
            problems = []
            if code not in case.allowed:
                problems.append(f"{code.name} not in {sorted(c.name for c in case.allowed)}")
            if len(details) > MAX_DETAILS:
                problems.append(f"a {len(details)}-character message")
            if code == INVALID and case.names is not None and case.names not in details:
                problems.append(f"the message does not name {case.names!r}")
            if problems:
                wrong.append(
                    f"{case.kind} ({case.method}): {'; '.join(problems)}: {details[:200]!r}"
                )
        code, details, after = _call(channel, known_good)
    assert code == OK, details
    assert after == before, "the known-good request answers differently after the fuzz"
    assert len(cases) >= MIN_CASES
    assert not wrong, f"{len(wrong)} of {len(cases)} answers wrong:\n" + "\n".join(wrong[:40])
    tracebacks = [r.getMessage() for r in caplog.records if r.exc_info is not None]
    assert not tracebacks, f"{len(tracebacks)} tracebacks logged, e.g. {tracebacks[0][:300]}"
    totals: dict[str, int] = {}
    for codes in seen.values():
        for name, count in codes.items():
            totals[name] = totals.get(name, 0) + count
    print(f"\nwire fuzz: {len(cases)} cases, {totals}")
    for kind, codes in seen.items():
        print(f"  {kind}: {codes}")
    # Every kind ran (19 generators; K / N out of range reports top_k and retrieve_k / top_n
    # apart), and the fuzz reached both decoding failures and semantic refusals.
    assert len(seen) == 20, sorted(seen)
    assert {"top_k out of range", "retrieve_k / top_n out of range"} <= set(seen)
    assert seen["random body"].get("INVALID_ARGUMENT", 0) > 0
    assert seen["huge bag"] == {"INVALID_ARGUMENT": sum(seen["huge bag"].values())}
