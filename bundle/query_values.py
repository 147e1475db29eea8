"""The request rule for the raw values a query sends (bundle/FORMAT.md, "Encoding a query",
steps 2 to 4): the checks of a sent value and its encoding by the feature's transform.

Both the server (`recship.runtime.features.FeatureCodec`, over a request's column of queries) and
the raw golden queries' reference encoding (`recship.bundle.raw_queries`, one query at a time)
call these functions, so what the server accepts and what golden.pt records cannot drift apart.
Where a value comes from (the query, a stored user, a default) is the caller's business. Imports:
base and bundle only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from recship.base.errors import InvalidInput, untrusted
from recship.bundle.transforms import FeatureTransform, unknown_rows


def sent_ids(
    transform: FeatureTransform, column: Sequence[Any], fields: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Ids of the values n queries send for one sparse feature.

    A multi-valued feature with a separator splits a text (after its prefix and pattern); any
    other single value of a multi-valued feature is a list of one; a list is not derived.
    Categorical and hashed features, and any feature with a derivation, take texts or integers
    (integers by their decimal text); other bucketized ones finite numbers.

    Args:
        transform: the feature's transform.
        column: n raw values: text, integers, numbers or lists of one of these.
        fields: n names of the values for messages (e.g. `queries[2].query.features["tags"]`).

    Returns:
        (ids int64 [sum of lengths], lengths int32 [n]).

    Raises:
        InvalidInput: naming the field of the first value refused: a list for a single-valued
            feature, more than `max_length` elements, an element of the wrong type, a value
            without an id (an unknown category under `oov` "error", a bucketized value without
            a bucket).
    """
    derivation = transform.derivation
    column = list(column)
    if transform.multi_valued and derivation.separator:
        texts = [i for i, value in enumerate(column) if isinstance(value, str)]
        if texts:  # split as the training rows were; a text it makes missing is refused below
            split = derivation.apply(
                pa.array([column[i] for i in texts], pa.string()), numeric=False
            )
            for i, values in zip(texts, split.to_pylist(), strict=True):
                column[i] = values
    for value, field in zip(column, fields, strict=True):
        if transform.multi_valued:
            if isinstance(value, list) and len(value) > transform.max_length:
                raise InvalidInput(f"{field}: {len(value)} values, at most {transform.max_length}")
        elif isinstance(value, list):
            raise InvalidInput(f"{field}: takes one value, not a list")
    if transform.multi_valued:
        column = [value if isinstance(value, list) else [value] for value in column]
    # Text is what derivations cut values out of (e.g. a year from a date).
    textual = transform.kind in ("categorical", "hashed") or derivation.active
    for value, field in zip(column, fields, strict=True):
        for element in value if isinstance(value, list) else (value,):
            if textual and (isinstance(element, bool) or not isinstance(element, str | int)):
                raise InvalidInput(f"{field}: takes text or an integer, got {untrusted(element)}")
            if not textual and not _finite_number(element):
                raise InvalidInput(f"{field}: takes a finite number, got {untrusted(element)}")
    # Integers are looked up by their decimal text; numbers are doubles (as the rule reads them).
    kind: Callable[[Any], Any] = str if textual else float
    column = [[kind(x) for x in v] if isinstance(v, list) else kind(v) for v in column]
    element_type = pa.string() if textual else pa.float64()
    array_type = pa.list_(element_type) if transform.multi_valued else element_type
    try:
        ids, lengths = transform.encode_ids(pa.array(column, array_type))
    except InvalidInput as error:  # text a numeric kind cannot read: find whose it is
        row = _first_refused(
            lambda i: transform.encode_ids(pa.array(column[i : i + 1], array_type)), len(column)
        )
        raise InvalidInput(f"{fields[row]}: {error}") from None
    bad = unknown_rows(transform, ids, lengths)
    if bad.size:
        row = int(bad[0])
        raise InvalidInput(f"{fields[row]}: value {untrusted(column[row])} {transform.unmapped}")
    return ids, lengths.astype(np.int32)


def sent_dense(
    transform: FeatureTransform, values: Sequence[Any], fields: Sequence[str]
) -> np.ndarray:
    """float32 [n] of the values n queries send for one dense feature.

    Each is one finite number (with a derivation, a text or number that derives to one), then the
    dense rule, which must give a finite number too (not `log1p` of a value <= -1, nor beyond
    float32).

    Args:
        transform: the feature's transform.
        values: n raw values.
        fields: n names of the values for messages.

    Raises:
        InvalidInput: naming the field of the first value refused.
    """
    derive = transform.derivation.active
    for value, field in zip(values, fields, strict=True):
        if not (_finite_number(value) or (derive and isinstance(value, str))):
            raise InvalidInput(f"{field}: needs one finite number, got {untrusted(value)}")
    if derive:
        column = pa.array([str(v) for v in values])
        try:
            derived = transform.derivation.apply(column, numeric=True)
        except InvalidInput as error:  # text that is no number: find whose it is
            row = _first_refused(
                lambda i: transform.derivation.apply(column.slice(i, 1), numeric=True),
                len(column),
            )
            raise InvalidInput(f"{fields[row]}: {error}") from None
        numbers = derived.to_numpy(zero_copy_only=False)
    else:  # numbers pass a derivation unchanged: no Arrow round trip for a request's few
        numbers = np.array([float(v) for v in values], dtype=np.float64)
    finite = np.isfinite(numbers)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        raise InvalidInput(f"{fields[row]}: needs one finite number, got {untrusted(values[row])}")
    encoded = transform.dense_rule(numbers)
    finite = np.isfinite(encoded)
    if not finite.all():  # e.g. log1p of a value <= -1, or an overflow to float32
        row = int(np.flatnonzero(~finite)[0])
        raise InvalidInput(
            f"{fields[row]}: {untrusted(values[row])} is outside the feature's domain (its "
            "transform gives no finite number)"
        )
    return encoded


def default_dense(transform: FeatureTransform, field: str) -> np.float32:
    """The encoded default of a dense feature: the number `default` through the dense rule, not
    derived (training fills a missing row's derived number with it, and so does the C++ host).

    Raises:
        InvalidInput: naming `field`: the default is not a finite number (`read_transforms`
            refuses such files; transforms made in memory are checked here).
    """
    default = transform.default
    if not _finite_number(default):
        raise InvalidInput(f"{field}: its default {untrusted(default)} is no number")
    return transform.dense_rule(np.array([float(default)]))[0]


def _finite_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer beyond any double (JSON has no bound)
        return False


def _first_refused(encode: Callable[[int], object], count: int) -> int:
    """The first of `count` rows that `encode` refuses alone (0 if none does): the slow path
    that names a value after a whole column was refused."""
    for row in range(count):
        try:
            encode(row)
        except InvalidInput:
            return row
    return 0


# Distinct values one feature's cache keeps before it is emptied and refilled: request values
# repeat heavily (genders, ages, occupations, a hot set of users), and 4096 small entries are a
# few hundred KiB even when a client sends every value once.
CACHED_VALUES = 4096
# Longest text a cache keeps: a value's memory is bounded with the entry count, so a client
# sending long values (a categorical feature with an OOV bucket accepts any) cannot grow it.
CACHED_TEXT_CHARS = 64


def remembered(
    memo: dict[Any, int],
    size: int,
    keys: Sequence[Any],
    compute: Callable[[list[int]], Sequence[int]],
) -> list[int]:
    """The value of each key, from `memo` or computed: `compute(positions)` gives the values
    of the keys missing from it, in their order, and they are kept in `memo`. A None key is
    never kept; a memo of `size` entries is emptied before the next one goes in, so it stays
    bounded whatever values clients send (the one rule of the codec's caches)."""
    found = [memo.get(key) if key is not None else None for key in keys]
    missing = [i for i, value in enumerate(found) if value is None]
    if missing:
        for i, value in zip(missing, compute(missing), strict=True):
            found[i] = value
            key = keys[i]
            if key is not None and size > 0:
                if len(memo) >= size:
                    memo.clear()
                memo[key] = value
    return found  # type: ignore[return-value]


class SentIdCache:
    """`sent_ids` of one single-valued sparse feature, remembering the id of each value it has
    accepted, so a repeated value costs one dict lookup instead of Arrow kernels and hashes.

    Results are `sent_ids`' exactly: an id depends on its value alone (each rule is applied
    element by element), only accepted values are kept, keyed by type and value (1, "1" and 1.0
    are refused or encoded differently), and the values not found go through `sent_ids` as one
    column in their order, so its first refusal is the one the whole column would raise (a kept
    value passes every check). Bounded: at most `size` entries of texts up to
    `CACHED_TEXT_CHARS` characters; a full cache is emptied.

    Thread-safety: every step is one dict operation under the GIL; threads may share one.
    """

    def __init__(self, transform: FeatureTransform, size: int = CACHED_VALUES) -> None:
        if transform.multi_valued:
            raise ValueError(f"{transform.name}: bags of a multi-valued feature are not cached")
        self.transform = transform
        self.size = size
        self._ids: dict[tuple[type, Any], int] = {}

    def ids(
        self, column: Sequence[Any], field: Callable[[int], str]
    ) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64 [n], lengths int32 [n] of ones) of n raw values, as `sent_ids`.

        Args:
            column: n raw values: text, integers, numbers or lists.
            field: the name of value i for messages, asked only for values not cached.

        Raises:
            InvalidInput: as `sent_ids`.
        """

        def encode(missing: list[int]) -> list[int]:
            values, fields = [column[i] for i in missing], [field(i) for i in missing]
            return sent_ids(self.transform, values, fields)[0].tolist()

        keys = [cache_key(value) for value in column]
        found = remembered(self._ids, self.size, keys, encode)
        return np.array(found, dtype=np.int64), np.ones(len(found), dtype=np.int32)


def cache_key(value: Any) -> tuple[type, Any] | None:
    """A raw value's key in a `SentIdCache`, None for one it does not keep (a list, long text)."""
    if isinstance(value, str):
        return (str, value) if len(value) <= CACHED_TEXT_CHARS else None
    if isinstance(value, int | float):
        return (type(value), value)
    return None
