"""`FeatureCodec.encode_queries` against the request rule restated plainly.

The codec remembers encodings across requests (bounded caches), skips Arrow for a request's few
values and looks a known user key up once. None of that may change an answer: here seeded random
requests (known, unknown and cold users, values of every wire type, unknown values, lists, missing
and unknown features) go through one long-lived codec and through `reference_encode`, the rule as
the codec applied it before its fast path (one Arrow column per feature, nothing remembered), and
must give the same arrays, dtypes and refusals.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from recship.base.errors import InvalidInput, shown
from recship.base.jagged import NO_IDS, gather_bags
from recship.bundle.contents import read_contents
from recship.bundle.manifest import read_manifest
from recship.bundle.query_values import default_dense, sent_dense, sent_ids
from recship.protos.v1 import recommender_pb2
from recship.runtime.features import FeatureCodec

from ..conftest import BUNDLE


def _field(where: str, name: str) -> str:
    return f'{where}.features["{shown(name)}"]'


def _raw(value: recommender_pb2.Value, field: str) -> Any:
    kind = value.WhichOneof("kind")
    if kind is None:
        raise InvalidInput(f"{field}: no value set")
    if kind != "list_value":
        return getattr(value, kind)
    lists = [x for x in (value.list_value.strings, value.list_value.ints, value.list_value.doubles)]
    filled = [x for x in lists if len(x)]
    if len(filled) > 1:
        raise InvalidInput(f"{field}: a list holds one kind of value (strings, ints or doubles)")
    return list(filled[0]) if filled else []


def reference_encode(codec: FeatureCodec, queries: Sequence[Any], where: Sequence[str]) -> Any:
    """(tower values, tower lengths, ranker values, ranker lengths, dense, cold), plainly."""
    raw = []
    for position, query in enumerate(queries):
        values = {}
        for name, value in query.features.items():
            field = _field(where[position], name)
            if name not in codec.accepted:
                known = ", ".join(sorted(codec.accepted))
                raise InvalidInput(f"{field}: unknown feature (the bundle takes {known})")
            values[name] = _raw(value, field)
        raw.append(values)
    key = codec.user_key
    rows = np.full(len(raw), -1, dtype=np.int64)
    with_key = [i for i, values in enumerate(raw) if key in values]
    for i in with_key:
        if isinstance(raw[i][key], list | float):
            raise InvalidInput(
                f"{_field(where[i], key)}: the user key is one text or integer value"
            )
    if with_key:
        vocabulary = codec.transforms.features[key].vocabulary
        rows[with_key] = vocabulary.lookup(pa.array([str(raw[i][key]) for i in with_key]))
    cold = np.zeros(len(raw), dtype=bool)
    cold[with_key] = rows[with_key] < 0

    def sources(name: str, stored: bool) -> list[str]:
        out = []
        for i, values in enumerate(raw):
            if name in values:
                out.append("empty" if name == key and rows[i] < 0 else "request")
            elif stored and rows[i] >= 0:
                out.append("stored")
            elif codec.transforms.features[name].default is not None:
                out.append("default")
            else:
                hint = f" (or send {key} of a stored user)" if stored and name != key else ""
                raise InvalidInput(
                    f"{_field(where[i], name)}: missing, required by the bundle{hint}"
                )
        return out

    def sparse(name: str) -> tuple[np.ndarray, np.ndarray]:
        transform = codec.transforms.features[name]
        source = sources(name, name == key or name in codec.user_sparse)
        bags: list[tuple[np.ndarray, np.ndarray]] = [(NO_IDS, np.zeros(1, np.int32))] * len(raw)
        asked = [i for i, s in enumerate(source) if s == "request"]
        if asked:
            column = [raw[i][name] for i in asked]
            ids, lengths = sent_ids(transform, column, [_field(where[i], name) for i in asked])
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            for j, i in enumerate(asked):
                bags[i] = (ids[offsets[j] : offsets[j + 1]], lengths[j : j + 1])
        for i in [i for i, s in enumerate(source) if s == "stored"]:
            bags[i] = codec.users.sparse[name].gather(rows[i : i + 1])
        if "default" in source:
            ids, lengths = sent_ids(transform, [transform.default], [_field("(its default)", name)])
            for i in [i for i, s in enumerate(source) if s == "default"]:
                bags[i] = (ids, lengths)
        values = np.concatenate([NO_IDS, *(ids for ids, _ in bags)]).astype(np.int64)
        lengths = np.concatenate([lengths for _, lengths in bags]).astype(np.int32)
        return gather_bags(values, np.concatenate([[0], np.cumsum(lengths)]), np.arange(len(raw)))

    columns = {name: sparse(name) for name in codec.sparse_needed}
    dense = np.zeros((len(raw), len(codec.dense_needed)), dtype=np.float32)
    for column, name in enumerate(codec.dense_needed):
        transform = codec.transforms.features[name]
        source = sources(name, name in codec.user_dense)
        asked = [i for i, s in enumerate(source) if s == "request"]
        if asked:
            fields = [_field(where[i], name) for i in asked]
            dense[asked, column] = sent_dense(transform, [raw[i][name] for i in asked], fields)
        stored = [i for i, s in enumerate(source) if s == "stored"]
        dense[stored, column] = codec.users.dense[rows[stored], codec.user_dense.index(name)]
        if "default" in source:
            defaulted = [i for i, s in enumerate(source) if s == "default"]
            dense[defaulted, column] = default_dense(transform, f"{shown(name)} (its default)")
    out = []
    for features in (codec.query_tower_features, codec.ranker_query_features):
        out.append(np.concatenate([NO_IDS, *(columns[n][0] for n in features)]))
        out.append(np.concatenate([columns[n][1].astype(np.int32) for n in features]))
    return (*out, dense, cold)


# Each feature's raw values: its usual ones (as ML-100K-like users send them), unknown and
# odd ones, and values of the wrong wire type.
_AGES = [15, 21, 30, 40, 47, 52, 60, 0, -5, 2**62, 99]
_USUAL: dict[str, Any] = {
    "user_id": lambda rng: rng.choice([rng.randrange(-2, 320), str(rng.randrange(320)), "x"]),
    "user_age_bucket": lambda rng: rng.choice(_AGES),
    "user_gender": lambda rng: f"gender_{rng.randrange(3)}",
    "user_occupation": lambda rng: rng.choice(
        [f"occupation_{rng.randrange(24):03d}", rng.randrange(30)]
    ),
    "user_zip_prefix": lambda rng: rng.choice(
        ["55455", "X0X0X", "", "9", "é1", rng.randrange(10**5)]
    ),
    "user_log_activity": lambda rng: rng.choice(
        [round(rng.uniform(-1.5, 4), 2), rng.randrange(-3, 9)]
    ),
}
_ODD: list[Any] = ["", "x" * 100, "30", "abc", " 7", "3e1", 1.0, -0.0, 25.0, 1e300, float("nan")]
_ODD += [float("inf"), -3.0, 7, ["gender_0"], ["a", "b"], [1], [1.5], "mixed", "unset", "empty"]


def _set(value: recommender_pb2.Value, raw: Any) -> None:
    if raw == "unset":
        return
    if raw == "mixed":
        value.list_value.strings.append("a")
        value.list_value.ints.append(1)
    elif raw == "empty":
        value.list_value.SetInParent()
    elif isinstance(raw, list):
        kind = {str: "strings", int: "ints", float: "doubles"}[type(raw[0])]
        getattr(value.list_value, kind).extend(raw)
    else:
        kind = {str: "string_value", int: "int_value", float: "double_value"}[type(raw)]
        setattr(value, kind, raw)


def _query(rng: random.Random, odd: float) -> recommender_pb2.Query:
    query = recommender_pb2.Query()
    for name, usual in _USUAL.items():
        if rng.random() < (0.97 if name == "user_id" else 0.5):
            _set(query.features[name], rng.choice(_ODD) if rng.random() < odd else usual(rng))
    if rng.random() < odd / 10:
        query.features["bogus"].int_value = 1
    return query


def fast_encode(codec: FeatureCodec, queries: Sequence[Any], where: Sequence[str]) -> Any:
    """`reference_encode`'s arrays, from the codec."""
    tower, ranker, dense, cold = codec.encode_queries(queries, where)
    return (*tower.feature_major(), *ranker.feature_major(), dense, cold)


def _outcome(encode: Any, *args: Any) -> tuple[Any, ...]:
    try:
        arrays = encode(*args)
    except InvalidInput as error:
        return ("refused", str(error))
    return tuple((array.dtype.str, array.shape, array.tobytes()) for array in arrays)


@pytest.fixture(scope="module")
def codec(bundle_repo: Path) -> FeatureCodec:
    path = bundle_repo / BUNDLE / "1"
    manifest = read_manifest(path / "MANIFEST.json")
    return FeatureCodec(manifest, read_contents(manifest, path))


@pytest.mark.parametrize("seed", range(4))
def test_the_codec_encodes_and_refuses_as_the_plain_rule(codec: FeatureCodec, seed: int) -> None:
    rng = random.Random(seed)
    refused = 0
    for _ in range(300):
        odd = rng.choice([0.0, 0.01, 0.05, 0.2])
        queries = [_query(rng, odd) for _ in range(rng.choice([1, 1, 1, 2, 3, 8, 20]))]
        where = [f"queries[{i}].query" for i in range(len(queries))]

        expected = _outcome(reference_encode, codec, queries, where)
        assert _outcome(fast_encode, codec, queries, where) == expected
        refused += expected[0] == "refused"
    assert 30 < refused < 270  # both paths were exercised
