"""`bundle.transforms` against the rules `bundle/FORMAT.md` states for `transforms.json` and
`vocab/<feature>.arrow`, so that a client in another language that follows the page gets the
ids the server computes.

Every expected value is computed here from the page's wording (a plain-Python FNV-1a 64, "the
number of boundaries <= the value", "clip, then log1p, then (x - mean) / std"), never by calling
the code under test; then the vocabulary index, the file round trip, derivations, and the
reader's refusal of malformed files, each naming the file. No model, no server.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recship.base.errors import InvalidInput
from recship.bundle.transforms import (
    VOCAB_HASH_SEED,
    Derivation,
    FeatureTransform,
    Transforms,
    Vocabulary,
    check_transforms,
    fnv1a_64,
    fnv1a_64_text,
    read_transforms,
    unknown_rows,
    write_transforms,
)
from recship.protos.v1 import manifest_pb2

# -- the reference hash, written from FORMAT.md --------------------------------------------------
OFFSET_BASIS = 0xCBF29CE484222325
PRIME = 0x100000001B3


def fnv1a_64_bytes(data: bytes, state: int = OFFSET_BASIS) -> int:
    """Plain FNV-1a 64 over `data`: h = (h XOR byte) * prime mod 2^64, byte by byte."""
    for byte in data:
        state = ((state ^ byte) * PRIME) % 2**64
    return state


def reference_hash(seed: int, text: str) -> int:
    """FORMAT.md's `fnv1a_64(seed, text)`: the seed's 8 little-endian bytes, then the UTF-8."""
    return fnv1a_64_bytes((seed % 2**64).to_bytes(8, "little") + text.encode("utf-8"))


def test_the_reference_hash_is_fnv1a_64() -> None:
    # Published FNV-1a 64 test vectors (Landon Curt Noll's FNV page): the reference is the real
    # FNV-1a, so agreeing with it means agreeing with any other implementation.
    assert fnv1a_64_bytes(b"") == 0xCBF29CE484222325
    assert fnv1a_64_bytes(b"a") == 0xAF63DC4C8601EC8C
    assert fnv1a_64_bytes(b"foobar") == 0x85944171F73967E8


TEXTS = ["", "a", "user_42", "SKU-0001", "é", "日本語", "🙂 emoji", "a\x00b", "x" * 300]
SEEDS = [0, 1, 7, 2**32 + 5, 2**63, 2**64 - 1]


@pytest.mark.parametrize("seed", SEEDS)
def test_fnv1a_64_follows_the_format(seed: int) -> None:
    hashes = fnv1a_64(pa.array(TEXTS), seed)
    assert hashes.dtype == np.uint64
    assert hashes.tolist() == [reference_hash(seed, text) for text in TEXTS]


def test_fnv1a_64_of_the_empty_string_is_the_seeded_basis() -> None:
    assert int(fnv1a_64(pa.array([""]), 0)[0]) == fnv1a_64_bytes(bytes(8))
    assert int(fnv1a_64(pa.array([""]), 3)[0]) == fnv1a_64_bytes(b"\x03" + bytes(7))


def test_a_negative_seed_is_its_uint64_bit_pattern() -> None:
    # A TOML spec may give any integer; both sides read it as a little-endian uint64.
    assert fnv1a_64(pa.array(["k"]), -1).tolist() == [reference_hash(2**64 - 1, "k")]


def test_fnv1a_64_reads_large_strings_chunks_slices_and_nulls() -> None:
    expected = [reference_hash(5, t) for t in ("b", "", "d")]
    sliced = pa.array(["a", "b", None, "d"]).slice(1)  # offset 1 into shared buffers
    assert fnv1a_64(sliced, 5).tolist() == expected  # nulls hash as the empty string
    assert fnv1a_64(sliced.cast(pa.large_string()), 5).tolist() == expected
    chunked = pa.chunked_array([pa.array(["b"]), pa.array([None, "d"])])
    assert fnv1a_64(chunked, 5).tolist() == expected
    assert fnv1a_64(pa.array([], pa.string()), 5).size == 0


@settings(max_examples=60, deadline=None)
@given(
    texts=st.lists(st.text(), max_size=20), seed=st.integers(0, 2**64 - 1), start=st.integers(0, 3)
)
def test_fnv1a_64_agrees_with_the_reference_on_any_text(
    texts: list[str], seed: int, start: int
) -> None:
    array = pa.array(texts, pa.string()).slice(min(start, len(texts)))
    assert fnv1a_64(array, seed).tolist() == [
        reference_hash(seed, t) for t in texts[min(start, len(texts)) :]
    ]


@settings(max_examples=60, deadline=None)
@given(texts=st.lists(st.text(), max_size=10), seed=st.integers(-(2**63), 2**64 - 1))
def test_the_one_value_hash_is_the_column_hash(texts: list[str], seed: int) -> None:
    expected = fnv1a_64(pa.array(texts, pa.string()), seed).tolist()
    assert [fnv1a_64_text(text, seed) for text in texts] == expected


# -- vocabularies --------------------------------------------------------------------------------
def test_fit_sorts_integers_numerically_and_text_by_text() -> None:
    assert Vocabulary.fit(pa.array([10, 9, 100, 9, None])).values.to_pylist() == ["9", "10", "100"]
    assert Vocabulary.fit(pa.array([10, 9, 100]), numeric_order=False).values.to_pylist() == [
        "10",
        "100",
        "9",
    ]
    assert Vocabulary.fit(pa.array(["b", "a", "B", "a"])).values.to_pylist() == ["B", "a", "b"]


def test_fit_keeps_values_seen_at_least_min_count_times() -> None:
    values = pa.array(["rare", "common", "common", "twice", "twice", None, None, None])
    assert Vocabulary.fit(values, min_count=2).values.to_pylist() == ["common", "twice"]
    assert Vocabulary.fit(values, min_count=3).values.to_pylist() == []


def test_lookup_finds_known_values_and_marks_unknown_and_missing() -> None:
    vocabulary = Vocabulary(pa.array(["DE", "FR", "日本"]))
    found = vocabulary.lookup(pa.array(["FR", "XX", None, "日本", "DE", "de"]))
    assert found.tolist() == [1, -1, -1, 2, 0, -1]
    assert found.dtype == np.int64


def test_lookup_reads_integers_by_decimal_text_in_any_arrow_layout() -> None:
    vocabulary = Vocabulary.fit(pa.array([3, 1, 2]))
    assert vocabulary.lookup(pa.array([2, 3, 4], pa.int32())).tolist() == [1, 2, -1]
    assert vocabulary.lookup(pa.array(["2", "03"], pa.large_string())).tolist() == [1, -1]
    assert vocabulary.lookup(pa.chunked_array([[1], [3]])).tolist() == [0, 2]
    assert Vocabulary(pa.array([], pa.string())).lookup(pa.array(["1"])).tolist() == [-1]
    with pytest.raises(InvalidInput, match="strings or integers"):
        vocabulary.lookup(pa.array([1.5]))


def test_a_vocabulary_may_not_hold_missing_values() -> None:
    with pytest.raises(InvalidInput, match="missing"):
        Vocabulary(pa.array(["a", None]))


def test_the_index_is_every_values_hash_sorted_with_its_id() -> None:
    values = ["u1", "u2", "u10", "ü", ""]
    table = Vocabulary(pa.array(values)).table()
    assert table.column_names == ["value", "hash", "id"]
    assert [table.schema.field(n).type for n in table.column_names] == [
        pa.string(),
        pa.uint64(),
        pa.int64(),
    ]
    assert table.column("value").to_pylist() == values
    hashes, ids = table.column("hash").to_pylist(), table.column("id").to_pylist()
    assert hashes == sorted(hashes)
    assert sorted(ids) == list(range(len(values)))
    assert [reference_hash(VOCAB_HASH_SEED, values[i]) for i in ids] == hashes


@settings(max_examples=40, deadline=None)
@given(
    values=st.lists(st.text(), unique=True, max_size=30), others=st.lists(st.text(), max_size=10)
)
def test_every_value_is_found_at_its_position(values: list[str], others: list[str]) -> None:
    vocabulary = Vocabulary(pa.array(values, pa.string()))
    assert vocabulary.lookup(pa.array(values, pa.string())).tolist() == list(range(len(values)))
    unknown = [o for o in others if o not in values]
    assert vocabulary.lookup(pa.array(unknown, pa.string())).tolist() == [-1] * len(unknown)


def _forged(values: list[str], hashes: list[int], ids: list[int]) -> Vocabulary:
    """A vocabulary file whose index says what we choose (hashes sorted, ids in range)."""
    table = pa.table(
        {
            "value": pa.array(values, pa.string()),
            "hash": pa.array(hashes, pa.uint64()),
            "id": pa.array(ids, pa.int64()),
        }
    )
    return Vocabulary.from_table(table, "forged.arrow")


def test_equal_hashes_are_scanned_and_the_value_compared() -> None:
    # A 64-bit collision cannot be found in a test's time, so the index is forged: three
    # values share one hash (that of "q"). The lookup must scan the equal-hash run and return
    # the entry whose value is "q", not the first entry of the run.
    h = reference_hash(VOCAB_HASH_SEED, "q")
    vocabulary = _forged(["p", "q", "r"], [h, h, h], [0, 1, 2])
    assert vocabulary.lookup(pa.array(["q", "q"])).tolist() == [1, 1]
    # Reversed run order: "q" is the last entry of the run.
    vocabulary = _forged(["q", "p", "r"], [h, h, h], [2, 1, 0])
    assert vocabulary.lookup(pa.array(["q"])).tolist() == [0]

    texts = ["q", "p", "r", "x"]  # the one-value lookup scans the run alike
    assert [vocabulary.id_of(t) for t in texts] == vocabulary.lookup(pa.array(texts)).tolist()
    assert vocabulary.id_of("q") == 0


def test_a_matching_hash_with_another_value_is_not_a_match() -> None:
    # "zzz"'s hash is in the index but names the value "p": a hash match alone never gives an id.
    h = reference_hash(VOCAB_HASH_SEED, "zzz")
    vocabulary = _forged(["p", "zzz"], [h, h], [0, 1])
    assert vocabulary.lookup(pa.array(["zzz", "p"])).tolist() == [1, -1]
    vocabulary = _forged(["p"], [h], [0])
    assert vocabulary.lookup(pa.array(["zzz"])).tolist() == [-1]
    assert vocabulary.id_of("zzz") == -1


@settings(max_examples=40, deadline=None)
@given(
    stored=st.lists(st.text(max_size=6), max_size=30, unique=True),
    asked=st.lists(st.text(max_size=6), max_size=30),
)
def test_the_one_value_lookup_is_the_column_lookup(stored: list[str], asked: list[str]) -> None:
    vocabulary = Vocabulary(pa.array(stored, pa.string()))
    texts = asked + stored[:10]
    expected = vocabulary.lookup(pa.array(texts, pa.string())).tolist()
    assert [vocabulary.id_of(text) for text in texts] == expected


# -- each kind's rule (FORMAT.md's table) ---------------------------------------------------------
def _categorical(
    values: list[str], oov: str = "error", name: str = "country", **options: Any
) -> FeatureTransform:
    """A user-side categorical feature over a fixed vocabulary."""
    vocabulary = Vocabulary(pa.array(values, pa.string()))
    size = len(values) + (oov == "bucket")
    return FeatureTransform(
        name, "user", "categorical", cardinality=size, vocabulary=vocabulary, oov=oov, **options
    )


def test_categorical_ids_are_positions_and_unknown_values_are_refused_or_bucketed() -> None:
    raw = pa.array(["FR", "SE", "DE", None])
    ids, lengths = _categorical(["DE", "FR"]).encode_ids(raw)
    assert ids.tolist() == [1, -1, 0, -1] and lengths.tolist() == [1, 1, 1, 1]
    assert unknown_rows(_categorical(["DE", "FR"]), ids, lengths).tolist() == [1, 3]
    ids, _ = _categorical(["DE", "FR"], oov="bucket").encode_ids(raw)
    assert ids.tolist() == [1, 2, 0, 2]  # unknown and missing: id len(vocabulary)


def test_categorical_integers_are_looked_up_by_decimal_text() -> None:
    transform = _categorical(["7", "42"])
    assert transform.encode_ids(pa.array([42, 7, 8]))[0].tolist() == [1, 0, -1]
    with pytest.raises(InvalidInput, match="strings or integers"):
        transform.encode_ids(pa.array([42.0]))


@pytest.mark.parametrize(("seed", "buckets"), [(0, 1), (7, 64), (2**63 + 1, 1000), (3, 2**40)])
def test_hashed_ids_are_the_seeded_hash_mod_buckets(seed: int, buckets: int) -> None:
    transform = FeatureTransform(
        "tag", "item", "hashed", cardinality=buckets, seed=seed, buckets=buckets
    )
    texts = ["red", "", "wölle", "12"]
    ids, _ = transform.encode_ids(pa.array(texts))
    assert ids.tolist() == [reference_hash(seed, t) % buckets for t in texts]
    assert transform.encode_ids(pa.array([12]))[0].tolist() == [ids[3]]  # integer: its text


def test_the_seed_changes_the_hashed_ids() -> None:
    texts = pa.array([f"v{i}" for i in range(50)])
    a = FeatureTransform("t", "item", "hashed", seed=1, buckets=1 << 20).encode_ids(texts)[0]
    b = FeatureTransform("t", "item", "hashed", seed=2, buckets=1 << 20).encode_ids(texts)[0]
    assert (a != b).sum() >= 45


BOUNDARIES = (1.0, 2.5, 10.0)
# At, just below and just above every boundary, and far outside the range.
AROUND = [-math.inf, -1e300, 0.999, 1.0, 1.001, 2.4999, 2.5, 2.5001, 9.99, 10.0, 10.01, 1e300]


def _bucket(value: float, boundaries: tuple[float, ...] = BOUNDARIES) -> int:
    """FORMAT.md: "the number of boundaries <= the value"."""
    return sum(boundary <= value for boundary in boundaries)


def test_bucketized_ids_count_the_boundaries_at_or_below_the_value() -> None:
    transform = FeatureTransform("age", "user", "bucketized", cardinality=4, boundaries=BOUNDARIES)
    ids, _ = transform.encode_ids(pa.array(AROUND))
    assert ids.tolist() == [_bucket(v) for v in AROUND]
    assert ids.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    ints = pa.array([0, 1, 2, 3, 10, 2**63 - 1, -(2**63)], pa.int64())
    assert transform.encode_ids(ints)[0].tolist() == [0, 1, 1, 2, 3, 3, 0]


def test_with_a_missing_bucket_missing_is_zero_and_every_other_id_one_higher() -> None:
    transform = FeatureTransform(
        "age", "user", "bucketized", cardinality=5, boundaries=BOUNDARIES, missing_bucket=True
    )
    ids, _ = transform.encode_ids(pa.array([None, *AROUND], pa.float64()))
    assert ids.tolist() == [0, *(_bucket(v) + 1 for v in AROUND)]


def test_without_a_missing_bucket_a_missing_value_has_no_id() -> None:
    transform = FeatureTransform("age", "user", "bucketized", cardinality=4, boundaries=BOUNDARIES)
    ids, lengths = transform.encode_ids(pa.array([5.0, None, 20.0], pa.float64()))
    assert ids.tolist() == [2, -1, 3]
    assert unknown_rows(transform, ids, lengths).tolist() == [1]
    assert "no missing bucket" in transform.unmapped  # what callers word the refusal with
    year = FeatureTransform(
        "year",
        "item",
        "bucketized",
        boundaries=(2000.0,),
        derivation=Derivation(pattern=r"(\d{4})"),
    )
    assert year.encode_ids(pa.array(["May 1999", "unknown"]))[0].tolist() == [0, -1]


def test_bucketized_values_must_be_numbers() -> None:
    transform = FeatureTransform("age", "user", "bucketized", boundaries=BOUNDARIES)
    with pytest.raises(InvalidInput, match="needs numbers"):
        transform.encode_ids(pa.array(["thirty"]))
    assert transform.encode_ids(pa.array(["2.5", "10"]))[0].tolist() == [2, 3]  # text: parsed


def _reference_dense(
    value: float,
    clip_min: float | None = None,
    clip_max: float | None = None,
    log1p: bool = False,
    mean: float = 0.0,
    std: float = 0.0,
) -> np.float32:
    """FORMAT.md: clip, then log1p when set, then (x - mean) / std when std > 0; float32."""
    if clip_min is not None:
        value = max(value, clip_min)
    if clip_max is not None:
        value = min(value, clip_max)
    if log1p:
        value = math.log1p(value)
    if std > 0:
        value = (value - mean) / std
    return np.float32(value)


DENSE_VALUES = [-0.5, 0.0, 0.3, 1.0, 7.0, 120.0, 1e6]


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"clip_min": 0.0},
        {"clip_max": 100.0},
        {"clip_min": 0.5, "clip_max": 100.0},
        {"log1p": True},
        {"mean": 3.0, "std": 2.0},
        {"mean": 3.0, "std": 0.0},  # std 0: no standardisation
        {"clip_min": 0.0, "clip_max": 1000.0, "log1p": True, "mean": 1.5, "std": 0.75},
    ],
    ids=lambda options: ",".join(options) or "plain",
)
def test_dense_clips_then_log1p_then_standardises_in_float32(options: dict[str, Any]) -> None:
    transform = FeatureTransform("price", "item", "dense", **options)
    encoded = transform.encode_dense(pa.array(DENSE_VALUES))
    assert encoded.dtype == np.float32
    assert encoded.tolist() == [_reference_dense(v, **options) for v in DENSE_VALUES]
    numbers = np.array(DENSE_VALUES, dtype=np.float64)  # the rule alone, on numbers read
    assert transform.dense_rule(numbers).tobytes() == encoded.tobytes()


def test_dense_missing_values_are_nan_for_the_caller_to_fill() -> None:
    encoded = FeatureTransform("price", "item", "dense").encode_dense(pa.array([1, None]))
    assert encoded[0] == 1.0 and math.isnan(encoded[1])
    with pytest.raises(InvalidInput, match="needs numbers"):
        FeatureTransform("price", "item", "dense").encode_dense(pa.array(["cheap"]))


def test_multi_valued_features_apply_the_rule_to_every_element() -> None:
    transform = _categorical(["a", "b", "c"], oov="bucket", multi_valued=True)
    lists = pa.array([["c", "a"], [], None, ["zz", "b", "b"]], pa.list_(pa.string()))
    ids, lengths = transform.encode_ids(lists)
    assert ids.tolist() == [2, 0, 3, 1, 1]
    assert lengths.dtype == np.int32 and lengths.tolist() == [2, 0, 0, 3]
    hashed = FeatureTransform("t", "item", "hashed", multi_valued=True, seed=9, buckets=10)
    ids, lengths = hashed.encode_ids(pa.array([["x", "y"], ["z"]]))
    assert ids.tolist() == [reference_hash(9, t) % 10 for t in "xyz"] and lengths.tolist() == [2, 1]
    with pytest.raises(InvalidInput, match="lists"):
        transform.encode_ids(pa.array(["a"]))  # no separator: a multi-valued feature takes lists


def test_unknown_rows_names_the_rows_of_unknown_elements() -> None:
    transform = _categorical(["a", "b"], multi_valued=True)
    lists = pa.array([["a"], ["b", "x"], [], ["y"], ["a", "b"]])
    ids, lengths = transform.encode_ids(lists)
    assert unknown_rows(transform, ids, lengths).tolist() == [1, 3]


def test_a_default_is_a_raw_value_encoded_by_the_same_rule() -> None:
    # FORMAT.md: `default` is a raw value, encoded like a sent one (derivation included).
    zip_prefix = _categorical(
        [str(d) for d in range(10)], default="90210", derivation=Derivation(prefix=1)
    )
    assert zip_prefix.encode_ids(pa.array([zip_prefix.default]))[0].tolist() == [9]
    age = FeatureTransform("age", "user", "bucketized", boundaries=BOUNDARIES, default=2.5)
    assert age.encode_ids(pa.array([age.default]))[0].tolist() == [2]


# -- derivations ---------------------------------------------------------------------------------
def test_prefix_keeps_the_first_characters_of_the_text() -> None:
    derived = Derivation(prefix=2).apply(pa.array(["héllo", "a", "", None]), numeric=False)
    assert derived.to_pylist() == ["hé", "a", "", None]  # characters, not UTF-8 bytes
    assert Derivation(prefix=3).apply(pa.array([90210, None]), numeric=False).to_pylist() == [
        "902",
        None,
    ]


@pytest.mark.parametrize(
    ("pattern", "text", "expected"),
    [
        (r"(\d{4})$", "01-Jan-1995", "1995"),
        (r"(\d{4})$", "unknown", None),  # no match: missing
        (r"^(?P<year>\d{4})-", "2001-05", "2001"),  # a named group
        (r"(?:id|ID)=(\w+)", "ID=x7", "x7"),  # a non-capturing group first
        (r"\((\d+)\)", "size (42)", "42"),  # escaped parentheses
    ],
)
def test_pattern_takes_the_first_group_of_the_match(
    pattern: str, text: str, expected: str | None
) -> None:
    derived = Derivation(pattern=pattern).apply(pa.array([text, None]), numeric=False)
    assert derived.to_pylist() == [expected, None]


def test_numeric_kinds_parse_the_derived_text() -> None:
    years = Derivation(pattern=r"(\d{4})$").apply(
        pa.array(["01-Jan-1995", "unknown", "1-2-2003"]), numeric=True
    )
    assert years.type == pa.float64() and years.to_pylist() == [1995.0, None, 2003.0]
    blank = Derivation().apply(pa.array(["3.5", " ", ""]), numeric=True)
    assert blank.to_pylist() == [3.5, None, None]
    with pytest.raises(InvalidInput, match="needs numbers"):
        Derivation(prefix=2).apply(pa.array(["ab"]), numeric=True)


@pytest.mark.parametrize(
    ("pattern", "problem"),
    [
        ("no group", "exactly one"),
        ("(a)(b)", "exactly one"),
        ("(?P<x>a)(b)", "exactly one"),
        ("(a", "pattern '\\(a'"),
        ("[", "pattern '\\['"),
    ],
)
def test_patterns_without_exactly_one_group_are_refused(pattern: str, problem: str) -> None:
    with pytest.raises(InvalidInput, match=problem):
        Derivation(pattern=pattern).apply(pa.array(["ab"]), numeric=False)


@pytest.mark.parametrize(
    ("pattern", "text", "expected"),
    [
        (r"\\(\d+)", "a\\12", "12"),
        (r"[(](\d+)", "(12", "12"),
        (r"[\](](\w+)", "]ab", "ab"),
        (r"[)](\w+)", ")ab", "ab"),
        (r"[]()](\w+)", "(ab", "ab"),  # a first "]" is literal: the class holds "](", ")"
        (r"[^]](\d)", "x1", "1"),
    ],
)
def test_the_group_is_found_past_escapes_and_character_classes(
    pattern: str, text: str, expected: str
) -> None:
    assert Derivation(pattern=pattern).apply(pa.array([text]), numeric=False).to_pylist() == [
        expected
    ]


@pytest.mark.parametrize("pattern", [r"(?<=x)(\d)", r"(a)\1"])
def test_patterns_arrow_cannot_run_are_refused_naming_them(pattern: str) -> None:
    with pytest.raises(InvalidInput, match="pattern"):
        Derivation(pattern=pattern).apply(pa.array(["x1"]), numeric=False)


def test_separator_splits_text_into_the_non_empty_values() -> None:
    lists = Derivation(separator="|").apply(pa.array(["a|b||c", "", None, "d|"]), numeric=False)
    assert lists.to_pylist() == [["a", "b", "c"], [], [], ["d"]]
    literal = Derivation(separator=".").apply(pa.array(["a.b", "ab"]), numeric=False)
    assert literal.to_pylist() == [["a", "b"], ["ab"]]  # the separator is text, not a regex
    sent = pa.array([["x|y"]], pa.list_(pa.string()))
    assert Derivation(separator="|").apply(sent, numeric=False).to_pylist() == [["x|y"]]


def test_derivations_apply_in_order_prefix_pattern_separator() -> None:
    derivation = Derivation(prefix=10, pattern=r"tags: (.*)", separator=",")
    derived = derivation.apply(pa.array(["tags: a,b,c,d,e"]), numeric=False)
    assert derived.to_pylist() == [["a", "b"]]  # "tags: a,b," -> "a,b," -> ["a", "b"]
    encoded = FeatureTransform(
        "t", "user", "hashed", multi_valued=True, buckets=8, derivation=derivation
    ).encode_ids(pa.array(["tags: a,b,c,d,e"]))
    assert encoded[1].tolist() == [2]


def test_values_already_derived_are_not_derived_again() -> None:
    transform = _categorical(["1", "9"], derivation=Derivation(prefix=1))
    assert transform.encode_ids(pa.array(["1"]), derived=True)[0].tolist() == [0]
    assert transform.encode_ids(pa.array(["19"]), derived=True)[0].tolist() == [-1]
    assert transform.encode_ids(pa.array(["19"]))[0].tolist() == [0]


# -- the files -----------------------------------------------------------------------------------
def _sample_transforms() -> Transforms:
    """One feature of every kind, with every option set somewhere."""
    features = [
        _categorical(["u1", "u2", "u10"], name="user_key"),
        FeatureTransform(
            "genres",
            "item",
            "categorical",
            multi_valued=True,
            cardinality=4,
            vocabulary=Vocabulary(pa.array(["Drama", "Comédie", "Action"])),
            oov="bucket",
            max_length=8,
            derivation=Derivation(separator="|"),
            default="Drama",
        ),
        FeatureTransform(
            "zip",
            "user",
            "hashed",
            cardinality=16,
            seed=2**63 + 7,
            buckets=16,
            derivation=Derivation(prefix=3),
            default="000",
        ),
        FeatureTransform(
            "year",
            "item",
            "bucketized",
            cardinality=4,
            boundaries=(1990.0, 2000.5),
            missing_bucket=True,
            derivation=Derivation(pattern=r"(\d{4})$"),
        ),
        FeatureTransform(
            "price",
            "item",
            "dense",
            clip_min=0.0,
            clip_max=1e4,
            log1p=True,
            mean=3.25,
            std=0.5,
            default=12.5,
        ),
        FeatureTransform("clicks", "context", "dense", clip_max=5.0),
        FeatureTransform(
            "sku",
            "item",
            "categorical",
            cardinality=2,
            vocabulary=Vocabulary(pa.array(["SKU-2", "SKU-1"])),
        ),
    ]
    return Transforms({f.name: f for f in features}, user_key="user_key", item_key="sku")


SAMPLES = {
    "user_key": pa.array(["u10", "u3"]),
    "genres": pa.array(["Action|Drama", "Western"]),
    "zip": pa.array(["90210", "1"]),
    "year": pa.array(["12 May 1999", "?"]),
}


def test_write_then_read_gives_equal_transforms(tmp_path: Path) -> None:
    written = _sample_transforms()
    paths = write_transforms(tmp_path, written)
    assert sorted(paths) == [
        "transforms.json",
        "vocab/genres.arrow",
        "vocab/sku.arrow",
        "vocab/user_key.arrow",
    ]
    read = read_transforms(tmp_path)
    assert read == written  # every field but the vocabulary (compared below)
    assert list(read.features) == list(written.features)  # the spec's order
    for name, feature in written.features.items():
        if feature.vocabulary is None:
            assert read.features[name].vocabulary is None
            continue
        assert read.features[name].vocabulary.table().equals(feature.vocabulary.table())
    for name, raw in SAMPLES.items():
        before, after = written.features[name].encode_ids(raw), read.features[name].encode_ids(raw)
        assert [a.tolist() for a in before] == [b.tolist() for b in after]
    price = pa.array([0.0, 99.0])
    assert read.features["price"].encode_dense(price).tolist() == (
        written.features["price"].encode_dense(price).tolist()
    )
    assert read.item_ids().to_pylist() == ["SKU-2", "SKU-1"]


def test_the_files_are_what_format_md_describes(tmp_path: Path) -> None:
    write_transforms(tmp_path, _sample_transforms())
    document = json.loads((tmp_path / "transforms.json").read_text(encoding="utf-8"))
    assert document["format_version"] == 1
    assert (document["user_key"], document["item_key"]) == ("user_key", "sku")
    common = {"name", "side", "kind", "multi_valued", "cardinality", "default", "max_length"}
    specific = {
        "categorical": {"oov", "vocabulary"},
        "hashed": {"hash", "seed", "buckets"},
        "bucketized": {"boundaries", "missing_bucket"},
        "dense": {"clip_min", "clip_max", "log1p", "mean", "std"},
    }
    for entry in document["features"]:
        derive = {"derive"} if entry["name"] in {"genres", "zip", "year"} else set()
        assert set(entry) == common | specific[entry["kind"]] | derive, entry["name"]
    by_name = {entry["name"]: entry for entry in document["features"]}
    assert by_name["genres"]["vocabulary"] == "vocab/genres.arrow"
    assert by_name["genres"]["derive"] == {"prefix": None, "pattern": None, "separator": "|"}
    assert by_name["zip"]["hash"] == "fnv1a_64" and by_name["zip"]["seed"] == 2**63 + 7
    # Any Arrow library reads the vocabulary: plain pyarrow, no recship code.
    with pa.memory_map(str(tmp_path / "vocab" / "genres.arrow")) as source:
        table = pa.ipc.open_file(source).read_all()
    assert table.column("value").to_pylist() == ["Drama", "Comédie", "Action"]
    ids = table.column("id").to_pylist()
    assert table.column("hash").to_pylist() == sorted(
        reference_hash(0, table.column("value")[i].as_py()) for i in ids
    )


# -- the reader's refusals -----------------------------------------------------------------------
def _problem_id(value: Any) -> str:
    """Test ids of (change, problem) cases: the problem's text."""
    return value if isinstance(value, str) else "doc"


def _write_document(folder: Path, document: Any) -> Path:
    path = folder / "transforms.json"
    path.write_text(json.dumps(document), encoding="utf-8")
    return path


def _valid_document(folder: Path) -> dict[str, Any]:
    write_transforms(folder, _sample_transforms())
    return json.loads((folder / "transforms.json").read_text(encoding="utf-8"))


def _refused(folder: Path, document: Any, *problem: str) -> str:
    """read_transforms refuses `document` with InvalidInput naming transforms.json."""
    path = _write_document(folder, document)
    with pytest.raises(InvalidInput) as error:
        read_transforms(folder)
    message = str(error.value)
    assert str(path) in message
    for part in problem:
        assert part in message
    return message


def test_unreadable_transforms_files_are_refused_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "transforms.json"
    with pytest.raises(InvalidInput, match="not a readable transforms file") as missing:
        read_transforms(tmp_path)
    assert str(path) in str(missing.value)
    for content in (b"{not json", b"\xff\xfe{}", b""):
        path.write_bytes(content)
        with pytest.raises(InvalidInput, match="not a readable transforms file") as error:
            read_transforms(tmp_path)
        assert str(path) in str(error.value)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda d: [d], "format_version is not 1"),
        (lambda d: {**d, "format_version": 2}, "format_version is not 1"),
        (lambda d: {k: v for k, v in d.items() if k != "format_version"}, "format_version"),
        (lambda d: {**d, "features": [17]}, "features[0]: expected an object"),
        (lambda d: _entry(d, 0, kind="embedding"), "features[0]: unknown kind 'embedding'"),
        (lambda d: _entry(d, 0, side="server"), "features[0]: unknown kind 'categorical' or side"),
        (lambda d: _without(d, 2, "kind"), "features[2]: malformed"),
        (lambda d: _without(d, 2, "seed"), "features[2]: malformed"),
        (lambda d: _entry(d, 2, hash="murmur3"), "features[2]: unknown hash 'murmur3'"),
        (lambda d: _entry(d, 2, buckets="many"), "features[2]: buckets must be an integer"),
        (lambda d: _entry(d, 3, boundaries=None), "features[3]: malformed"),
        (lambda d: _entry(d, 3, boundaries=["x"]), "features[3]: boundaries must be a finite"),
        (lambda d: _entry(d, 1, derive={"split": ","}), "features[1]: derive holds keys"),
        (lambda d: _entry(d, 1, derive=[","]), "features[1]: derive holds keys"),
        (lambda d: _without(d, 0, "vocabulary"), "features[0]: malformed"),
    ],
    ids=_problem_id,
)
def test_malformed_documents_are_refused_naming_the_file_and_entry(
    tmp_path: Path, change: Any, problem: str
) -> None:
    _refused(tmp_path, change(_valid_document(tmp_path)), problem)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda d: _entry(d, 0, oov="maybe"), "features[0]: oov"),
        (lambda d: _entry(d, 2, buckets=0), "features[2]: buckets"),
        (lambda d: _entry(d, 2, buckets=-4), "features[2]: buckets"),
        (lambda d: _entry(d, 2, buckets=1.5), "features[2]: buckets"),
        (lambda d: _entry(d, 2, max_length=0), "features[2]: max_length"),
        (lambda d: _entry(d, 2, cardinality=-1), "features[2]: cardinality"),
        (lambda d: _entry(d, 3, boundaries=[2000, 1990]), "features[3]: boundaries"),
        (lambda d: _entry(d, 3, boundaries=[1, 1]), "features[3]: boundaries"),
        (lambda d: _entry(d, 4, clip_min="low"), "features[4]: clip_min"),
        (lambda d: _entry(d, 4, std=-1.0), "features[4]: std"),
        (lambda d: _entry(d, 4, mean=[1]), "features[4]: mean"),
        (lambda d: _entry(d, 4, default="cheap"), "features[4]: default"),
        # A dense default is the number itself (never derived): text is refused even with one.
        (
            lambda d: _entry(d, 4, derive={"pattern": r"(\d+)"}, default="12"),
            "features[4]: default",
        ),
        (lambda d: _entry(d, 0, default={"u": 1}), "features[0]: default"),
        (lambda d: _entry(d, 0, vocabulary="../outside.arrow"), "features[0]: vocabulary"),
        (lambda d: _entry(d, 0, vocabulary="/etc/x.arrow"), "features[0]: vocabulary"),
        (lambda d: _entry(d, 2, derive={"pattern": "(a"}), "features[2]: pattern"),
        (lambda d: _entry(d, 2, derive={"prefix": -1}), "features[2]: prefix"),
        (lambda d: _entry(d, 2, derive={"separator": 5}), "features[2]: separator"),
        (lambda d: {**d, "features": d["features"] + d["features"][:1]}, "declared twice"),
        (lambda d: {**d, "features": {"user_key": d["features"][0]}}, "features must be a list"),
        (lambda d: {**d, "user_key": "nope"}, "user_key"),
        (lambda d: {**d, "item_key": "zip"}, "item_key"),  # a hashed feature
        (lambda d: {**d, "item_key": "genres"}, "item_key"),  # multi-valued
        (lambda d: {**d, "user_key": "sku"}, "user_key"),  # an item feature
        (lambda d: _entry(d, 3, missing_bucket=1), "features[3]: missing_bucket"),
    ],
    ids=_problem_id,
)
def test_documents_whose_values_make_no_sense_are_refused(
    tmp_path: Path, change: Any, problem: str
) -> None:
    # Each would load, then fail per request or silently mis-encode, if only types were checked.
    _refused(tmp_path, change(_valid_document(tmp_path)), problem)


def _json_values() -> st.SearchStrategy[Any]:
    """Any JSON value, nested a little."""
    scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
        max_leaves=6,
    )


SAMPLE_VALUES = {
    "categorical": pa.array(["u1", "x"]),
    "hashed": pa.array(["a", "b"]),
    "bucketized": pa.array([1.0, 2500.0]),
}


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_any_changed_field_is_refused_or_reads_into_transforms_that_encode(
    tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
) -> None:
    """A fuzz of one field: read_transforms either refuses with InvalidInput naming a file of
    the folder, or returns transforms whose every feature encodes sample values without any
    other error."""
    folder = tmp_path_factory.mktemp("fuzz")
    document = _valid_document(folder)
    position = data.draw(st.integers(0, len(document["features"]) - 1))
    key = data.draw(st.sampled_from(sorted(document["features"][position])))
    document = _entry(document, position, **{key: data.draw(_json_values())})
    _write_document(folder, document)
    try:
        transforms = read_transforms(folder)
    except InvalidInput as error:
        assert str(folder) in str(error)  # transforms.json or the vocabulary it names
        return
    for feature in transforms.features.values():
        try:
            if feature.kind == "dense":
                feature.encode_dense(pa.array([1.0, 30.0]))
            else:
                values = SAMPLE_VALUES[feature.kind]
                if feature.multi_valued:
                    values = pa.array([values.to_pylist()])
                feature.encode_ids(values)
        except InvalidInput:
            pass


def _entry(document: dict[str, Any], position: int, **changes: Any) -> dict[str, Any]:
    """The document with features[position] changed."""
    features = [dict(entry) for entry in document["features"]]
    features[position].update(changes)
    return {**document, "features": features}


def _without(document: dict[str, Any], position: int, key: str) -> dict[str, Any]:
    features = [dict(entry) for entry in document["features"]]
    del features[position][key]
    return {**document, "features": features}


def _vocabulary_file(folder: Path, table: pa.Table) -> Path:
    path = folder / "vocab" / "user_key.arrow"
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return path


def _vocab_refused(folder: Path, table: pa.Table | bytes, problem: str) -> None:
    """With the user key's vocabulary replaced, read_transforms refuses naming that file."""
    _valid_document(folder)
    if isinstance(table, bytes):
        path = folder / "vocab" / "user_key.arrow"
        path.write_bytes(table)
    else:
        path = _vocabulary_file(folder, table)
    with pytest.raises(InvalidInput) as error:
        read_transforms(folder)
    assert str(path) in str(error.value) and problem in str(error.value)


def _vocab_table(**columns: pa.Array) -> pa.Table:
    """The sample user-key vocabulary's table with some columns replaced."""
    table = Vocabulary(pa.array(["u1", "u2", "u10"])).table()
    for name, column in columns.items():
        table = table.set_column(table.column_names.index(name), name, column)
    return table


@pytest.mark.parametrize(
    ("table", "problem"),
    [
        (b"", "not a readable Arrow IPC file"),
        (b"ARROW1" + bytes(100), "not a readable Arrow IPC file"),
        (pa.table({"value": ["u1"], "hash": pa.array([1], pa.uint64())}), "needs columns"),
        (_vocab_table(hash=pa.array([1, 2, 3], pa.int64())), "hash must be uint64"),
        (_vocab_table(id=pa.array([0, 1, 2], pa.int32())), "id int64"),
        (_vocab_table(id=pa.array([0, 1, 3], pa.int64())), "not consistent"),
        (_vocab_table(id=pa.array([0, -1, 2], pa.int64())), "not consistent"),
        (_vocab_table(hash=pa.array([3, 2, 1], pa.uint64())), "not consistent"),
    ],
    ids=[
        "empty",
        "truncated",
        "no id column",
        "int64 hash",
        "int32 id",
        "id too big",
        "negative id",
        "unsorted hashes",
    ],
)
def test_malformed_vocabularies_are_refused_naming_the_file(
    tmp_path: Path, table: pa.Table | bytes, problem: str
) -> None:
    _vocab_refused(tmp_path, table, problem)


def _invalid_utf8() -> pa.Array:
    """A utf8 column whose bytes are not UTF-8 (Arrow builds it; the IPC reader keeps it)."""
    offsets = pa.py_buffer(np.array([0, 2, 3, 6], np.int32).tobytes())
    return pa.Array.from_buffers(pa.string(), 3, [None, offsets, pa.py_buffer(b"u1\xffu10")])


@pytest.mark.parametrize(
    ("table", "problem"),
    [
        (_vocab_table(value=pa.array(["u1", None, "u10"])), "may not hold missing values"),
        (_vocab_table(value=pa.array([b"u1", b"\xff", b"u10"])), "value must be utf8 text"),
        (_vocab_table(value=pa.array([["u1"], ["u2"], ["u10"]])), "value must be utf8 text"),
        (_vocab_table(value=pa.array([1, 2, 10])), "value must be utf8 text"),
        (_vocab_table(value=_invalid_utf8()), "value is not valid text"),
        (_vocab_table(hash=pa.array([1, None, 3], pa.uint64())), "may not hold missing values"),
        (_vocab_table(id=pa.array([0, None, 2], pa.int64())), "may not hold missing values"),
    ],
    ids=["null value", "binary", "lists", "integers", "invalid utf8", "null hash", "null id"],
)
def test_vocabularies_pyarrow_cannot_read_as_such_are_refused_naming_the_file(
    tmp_path: Path, table: pa.Table, problem: str
) -> None:
    _vocab_refused(tmp_path, table, problem)


def test_an_index_that_skips_an_id_is_refused(tmp_path: Path) -> None:
    # Ids in range and hashes sorted, but id 1 is never indexed: "u2" could not be found.
    h = Vocabulary(pa.array(["u1", "u2", "u10"])).table().column("hash")
    _vocab_refused(tmp_path, _vocab_table(hash=h, id=pa.array([0, 0, 2], pa.int64())), "index")


def test_a_missing_vocabulary_file_is_refused_naming_it(tmp_path: Path) -> None:
    _valid_document(tmp_path)
    (tmp_path / "vocab" / "genres.arrow").unlink()
    with pytest.raises(InvalidInput, match="not a readable Arrow IPC file") as error:
        read_transforms(tmp_path)
    assert str(tmp_path / "vocab" / "genres.arrow") in str(error.value)


# -- against the manifest ------------------------------------------------------------------------
def _manifest(transforms: Transforms) -> manifest_pb2.BundleManifest:
    """A manifest declaring the transforms' features, keys and sparse cardinalities."""
    manifest = manifest_pb2.BundleManifest()
    manifest.transforms.features[:] = list(transforms.features)
    manifest.schema.user_id_feature = transforms.user_key or ""
    manifest.schema.item_id_feature = transforms.item_key or ""
    for feature in transforms.features.values():
        if feature.is_sparse:
            manifest.schema.sparse_features.add(name=feature.name, cardinality=feature.cardinality)
    return manifest


def test_check_transforms_accepts_agreeing_cardinalities_and_names_a_disagreement() -> None:
    transforms = _sample_transforms()
    check_transforms(transforms, _manifest(transforms))
    manifest = _manifest(transforms)
    manifest.schema.sparse_features[2].cardinality = 17  # zip hashes into 16 buckets
    with pytest.raises(InvalidInput, match="'zip' gives 16 ids, its table holds 17"):
        check_transforms(transforms, manifest)
    manifest = _manifest(transforms)
    manifest.transforms.features[:] = ["user_key"]
    with pytest.raises(InvalidInput, match="features differ"):
        check_transforms(transforms, manifest)
    manifest = _manifest(transforms)
    manifest.schema.item_id_feature = "zip"
    with pytest.raises(InvalidInput, match="keys differ"):
        check_transforms(transforms, manifest)
