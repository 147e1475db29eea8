"""`bundle.query_values`: the request rule the server and the raw golden queries share.

Whole-request behaviour (sources, cold starts, messages on the wire) is tested through the
server in tests/runtime/test_service_validation.py and through `raw_queries` in
tests/bundle/test_raw_queries.py; here, what those cannot show cheaply: which of several values
a refusal names, and that a dense default is the number itself.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from recship.base.errors import InvalidInput
from recship.bundle.query_values import default_dense, sent_dense, sent_ids
from recship.bundle.transforms import Derivation, FeatureTransform

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
