"""`bundle.query_values`: the request rule the server and the raw golden queries share.

Whole-request behaviour (sources, cold starts, messages on the wire) is tested through the
server in tests/runtime/test_service_validation.py and through `raw_queries` in
tests/bundle/test_raw_queries.py; here, what those cannot show cheaply: which of several values
a refusal names, and that a dense default is the number itself.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from recship.base.errors import InvalidInput
from recship.bundle.query_values import SentIdCache, default_dense, sent_dense, sent_ids
from recship.bundle.transforms import Derivation, FeatureTransform, Vocabulary

FIELDS = ["q0", "q1", "q2"]


def test_a_refusal_names_the_value_refused_not_the_first() -> None:
    # The column is refused as a whole (text that is no number); the message still names q2.
    year = FeatureTransform(
        "year", "item", "bucketized", boundaries=(2000.0,), derivation=Derivation(prefix=4)
    )
    assert sent_ids(year, ["1999-05", 2001, "2000"], FIELDS)[0].tolist() == [0, 1, 1]
    with pytest.raises(InvalidInput, match=r"^q2: needs numbers"):
        sent_ids(year, ["1999-05", 2001, "then"], FIELDS)
    price = FeatureTransform("price", "item", "dense", derivation=Derivation(prefix=3))
    with pytest.raises(InvalidInput, match=r"^q1: needs numbers"):
        sent_dense(price, ["123x", "ab", "3"], FIELDS)


def test_values_are_refused_by_type_and_domain_naming_their_field() -> None:
    age = FeatureTransform("age", "user", "bucketized", boundaries=(18.0, 30.0))
    with pytest.raises(InvalidInput, match=r"^q1: takes a finite number, got 'True'"):
        sent_ids(age, [20, True, 40], FIELDS)
    with pytest.raises(InvalidInput, match=r"^q0: takes one value, not a list"):
        sent_ids(age, [[20]], FIELDS[:1])
    spend = FeatureTransform("spend", "user", "dense", log1p=True)
    assert sent_dense(spend, [0, 1.5], FIELDS[:2]).tolist() == pytest.approx([0.0, math.log1p(1.5)])
    with pytest.raises(InvalidInput, match=r"^q1: '-2' is outside the feature's domain"):
        sent_dense(spend, [0, -2], FIELDS[:2])
    with pytest.raises(InvalidInput, match=r"^q0: needs one finite number, got 'nan'"):
        sent_dense(spend, [float("nan")], FIELDS[:1])


def test_a_dense_default_is_the_number_itself_never_derived() -> None:
    # Training fills a missing row's derived number with the default: 1234.5 stays 1234.5,
    # though a sent 1234.5 is cut to "123".
    year = FeatureTransform(
        "year", "item", "dense", derivation=Derivation(prefix=3), default=1234.5
    )
    assert default_dense(year, "d") == np.float32(1234.5)
    assert sent_dense(year, [1234.5], ["q0"]).tolist() == [123.0]
    texty = FeatureTransform("year", "item", "dense", default="1234")
    with pytest.raises(InvalidInput, match=r"^d: its default '1234' is no number"):
        default_dense(texty, "d")


# -- SentIdCache: sent_ids of single values, remembered -------------------------------------------
_VOCABULARY = Vocabulary(pa.array(["a", "b", "7", "x1", "é", ""], pa.string()))
CACHED_FEATURES = [
    FeatureTransform("cat", "user", "categorical", vocabulary=_VOCABULARY, oov="error"),
    FeatureTransform("oov", "user", "categorical", vocabulary=_VOCABULARY, oov="bucket"),
    FeatureTransform(
        "cut", "user", "categorical", vocabulary=_VOCABULARY, derivation=Derivation(prefix=1)
    ),
    FeatureTransform("hash", "user", "hashed", seed=3, buckets=5),
    FeatureTransform("age", "user", "bucketized", boundaries=(1.0, 7.0, 30.0)),
    FeatureTransform("gap", "user", "bucketized", boundaries=(0.0,), missing_bucket=True),
    FeatureTransform(
        "year", "user", "bucketized", boundaries=(2000.0,), derivation=Derivation(prefix=4)
    ),
    FeatureTransform(
        "num", "user", "bucketized", boundaries=(5.0,), derivation=Derivation(pattern=r"(\d+)$")
    ),
]
# Raw values of every type, equal ones of different types (7, 7.0, "7"), refused ones, and
# one too long to cache.
RAW_VALUES: list[Any] = [
    *["a", "b", "7", "x1", "é", "", "zz", "1999-1", "2001", "then", "q12", " 3", "x" * 100],
    *[0, 1, 7, 30, -4, 2001, 2**62, True, False],
    *[0.0, -0.0, 1.0, 7.0, 29.5, 1e300, math.nan, math.inf],
    *[[], ["a"], [1, 2]],
]


def _outcome(encode: Callable[[], tuple[np.ndarray, np.ndarray]]) -> tuple[Any, ...]:
    try:
        ids, lengths = encode()
    except InvalidInput as error:
        return ("refused", str(error))
    return (ids.dtype.str, ids.tolist(), lengths.dtype.str, lengths.tolist())


@pytest.mark.parametrize("transform", CACHED_FEATURES, ids=lambda t: t.name)
def test_a_cache_encodes_and_refuses_exactly_as_sent_ids(transform: FeatureTransform) -> None:
    rng = random.Random(transform.name)
    cache = SentIdCache(transform, size=8)  # small: it fills and empties many times
    for _ in range(400):
        column = [rng.choice(RAW_VALUES) for _ in range(rng.choice([1, 1, 2, 5, 12]))]
        fields = [f"q{i}" for i in range(len(column))]
        expected = _outcome(functools.partial(sent_ids, transform, column, fields))
        cached = _outcome(functools.partial(cache.ids, column, fields.__getitem__))
        assert cached == expected, column
        assert len(cache._ids) <= 8


def test_a_cache_keeps_accepted_short_values_only() -> None:
    cache = SentIdCache(CACHED_FEATURES[1])
    cache.ids(["a", "zz", "x" * 100, 7], str)
    assert set(cache._ids) == {(str, "a"), (str, "zz"), (int, 7)}
    with pytest.raises(InvalidInput, match=r"^1: takes text or an integer, got '1.5'"):
        cache.ids(["a", 1.5], str)
    assert (float, 1.5) not in cache._ids
    with pytest.raises(ValueError, match="multi-valued"):
        SentIdCache(FeatureTransform("tags", "user", "categorical", multi_valued=True))


def test_sent_numbers_are_encoded_as_the_dense_rule_reads_an_arrow_column() -> None:
    # Numbers skip the Arrow round trip; the float32s are the column encoding's, bit for bit.
    rng = random.Random(5)
    spend = FeatureTransform("spend", "user", "dense", clip_max=50.0, log1p=True, mean=1.0, std=3.0)
    values = [rng.choice([rng.uniform(-0.9, 80.0), rng.randrange(100)]) for _ in range(50)]
    expected = spend.encode_dense(pa.array([float(v) for v in values]))
    assert sent_dense(spend, values, [f"q{i}" for i in range(50)]).tobytes() == expected.tobytes()
