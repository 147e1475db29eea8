"""Raw golden queries: query-side requests as a client sends them, made from a version's fitted
transforms, and the reference encoding of such requests.

The packager records `record_raw_queries(...)` in golden.pt (`golden.RawGolden`; layout in
bundle/FORMAT.md, golden.pt); `recship verify` checks a version's record with
`raw_golden_problems`; a host that encodes raw values itself (examples/cpp) encodes the recorded
queries with its own code from transforms.json and vocab/*.arrow and compares. Imports: base and
bundle only.

The values are made from the fitted transforms alone (the packager holds no raw training rows),
deterministically, so that each rule is exercised where an implementation can go wrong:

- categorical: values spread over the vocabulary, integers sent as integers where the text is
  one, and unknown values where `oov` is "bucket";
- hashed: texts and integers;
- bucketized: every boundary exactly, values between and beyond them, and a missing value where a
  derivation can make one and there is a missing bucket;
- dense: below, at, inside and above the clip range (or around the mean);
- multi-valued: empty, short and `max_length`-long lists, a single value, and the separator's
  text form;
- derivations: each text is one the feature's own `Derivation` cuts back to the intended value
  (a prefix followed by more text, a pattern's group inside more text), so no value depends on a
  derivation's corner cases;
- the user key: known keys; the last two queries are cold starts (an unknown key) that omit every
  feature with a default, so defaults are encoded too.

The encoding is the server's request rule (bundle/FORMAT.md, "Encoding a query") for one query
at a time: where each feature's value comes from (the query, its default, or nothing for an
unknown user key) is decided here; the checks and encoding of a sent value or a default are
`bundle.query_values`', the very functions the runtime's `FeatureCodec` applies to whole request
columns. A stored user's values (user_features.npz) are outside the record: a query that names
a known user sends every feature.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from recship.base.errors import InvalidInput, shown, untrusted
from recship.bundle.golden import GoldenSet, RawGolden
from recship.bundle.query_values import default_dense, sent_dense, sent_ids
from recship.bundle.transforms import Derivation, FeatureTransform, Transforms

RawValue = str | int | float | list[str] | list[int] | list[float]
# Whether a query sends the user key, and whether the bundle knows it.
KeyState = Literal["none", "known", "cold"]

RAW_QUERY_COUNT = 16
# The last queries of a record are cold starts that omit every feature with a default.
DEFAULTED_QUERIES = 2
# Text put around a value so that a derivation has something to cut away.
_CONTEXT = "golden"
# Candidate values tried per feature before giving up on finding one a derivation gives back.
_MAX_TRIES = 64
# Integers beyond this are sent as text or doubles: every JSON reader holds them exactly.
_SAFE_INTEGER = 2**53
_DECIMAL = re.compile(r"-?(0|[1-9][0-9]*)")


@dataclass(frozen=True)
class EncodedQueries:
    """Model inputs of B queries.

    Attributes:
        values: int64 [N], the sparse features' ids, feature-major (the entry points' layout).
        lengths: int32 [F * B], bag lengths: feature 0's B bags, then feature 1's, and so on.
        dense: float32 [B, Fd], the dense features.
    """

    values: np.ndarray
    lengths: np.ndarray
    dense: np.ndarray


# -- encoding ----------------------------------------------------------------------------------
def encode_queries(
    transforms: Transforms,
    queries: Sequence[Mapping[str, Any]],
    sparse_features: Sequence[str],
    dense_features: Sequence[str],
) -> EncodedQueries:
    """Encodes raw queries by the server's request rule (see the module docstring).

    Args:
        transforms: the version's transforms.
        queries: feature name -> raw value (str, int, float, or a list of one of these).
        sparse_features: the sparse features to encode, in the entry point's order.
        dense_features: the dense features to encode, in column order.

    Raises:
        InvalidInput: what the server refuses, naming the query and the feature: an unknown
            feature, a missing required one, a value of the wrong type, a list longer than
            `max_length`, an unknown value of a feature without an OOV bucket, a stored user's
            value (outside the record).
    """
    bags: list[list[np.ndarray]] = [[] for _ in sparse_features]
    dense = np.zeros((len(queries), len(dense_features)), dtype=np.float32)
    accepted = {*sparse_features, *dense_features}
    if transforms.user_key is not None:
        accepted.add(transforms.user_key)
    for position, query in enumerate(queries):
        where = f"raw query {position}"
        unknown = sorted(set(query) - accepted)
        if unknown:
            raise InvalidInput(f"{where}: unknown feature {untrusted(unknown[0])}")
        state = _key_state(transforms, query, where)
        for column, name in enumerate(sparse_features):
            transform = _transform(transforms, name)
            field = f"{where}: {shown(name)}"
            if name == transforms.user_key and state == "cold":
                bags[column].append(np.zeros(0, dtype=np.int64))  # a cold start: no id
            else:
                value = _value(transform, query, state, field)
                bags[column].append(sent_ids(transform, [value], [field])[0])
        for column, name in enumerate(dense_features):
            transform = _transform(transforms, name)
            field = f"{where}: {shown(name)}"
            if name in query:
                dense[position, column] = sent_dense(transform, [query[name]], [field])[0]
            else:
                _value(transform, query, state, field)  # refused unless a default applies
                dense[position, column] = default_dense(transform, field)
    per_feature = [bag for feature in bags for bag in feature]
    return EncodedQueries(
        values=np.concatenate([np.zeros(0, dtype=np.int64), *per_feature]).astype(np.int64),
        lengths=np.array([bag.size for bag in per_feature], dtype=np.int32),
        dense=dense,
    )


def _transform(transforms: Transforms, name: str) -> FeatureTransform:
    transform = transforms.features.get(name)
    if transform is None:
        raise InvalidInput(f"the transforms have no feature {untrusted(name)}")
    return transform


def _key_state(transforms: Transforms, query: Mapping[str, Any], where: str) -> KeyState:
    """ "none" (no user key sent), "known" (a stored user's key) or "cold" (an unknown key)."""
    key = transforms.user_key
    if key is None or key not in query:
        return "none"
    value = query[key]
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise InvalidInput(f"{where}: {shown(key)}: the user key is one text or integer value")
    vocabulary = _transform(transforms, key).vocabulary
    assert vocabulary is not None  # a user key is categorical (read_transforms checks kinds)
    found = vocabulary.lookup(pa.array([str(value)], pa.string()))[0]
    return "known" if found >= 0 else "cold"


def _value(
    transform: FeatureTransform, query: Mapping[str, Any], state: KeyState, field: str
) -> Any:
    """The raw value of one feature of a query: sent, else its default."""
    if transform.name in query:
        return query[transform.name]
    if state == "known":
        raise InvalidInput(
            f"{field}: missing; the record holds no stored user's values, so a query naming a "
            "known user sends every feature"
        )
    if transform.default is None:
        raise InvalidInput(f"{field}: missing, and the feature has no default")
    return transform.default


# -- generation --------------------------------------------------------------------------------
def make_queries(
    transforms: Transforms,
    sparse_features: Sequence[str],
    dense_features: Sequence[str],
    count: int = RAW_QUERY_COUNT,
) -> list[dict[str, RawValue]]:
    """`count` raw queries over the given features, made from the transforms alone.

    Deterministic: the same transforms give the same queries. The last `DEFAULTED_QUERIES`
    send an unknown user key (when the features include the user key) and omit every feature
    that has a default; the others send every feature.

    Raises:
        InvalidInput: a feature for which no value could be made (a pattern that gives back
            none of the tried texts, an empty vocabulary).
    """
    if count < 1:
        raise InvalidInput(f"raw golden queries: count must be >= 1, got {count}")
    features = [_transform(transforms, name) for name in dict.fromkeys(
        (*sparse_features, *dense_features))]  # fmt: skip
    queries = []
    for position in range(count):
        defaulted = position >= count - DEFAULTED_QUERIES
        query: dict[str, RawValue] = {}
        for transform in features:
            if transform.name == transforms.user_key:
                query[transform.name] = (
                    _cold_key(transform, position)
                    if defaulted
                    else _known_key(transform, position, count)
                )
            elif not (defaulted and transform.default is not None):
                query[transform.name] = _raw_value(transform, position, count)
        queries.append(query)
    return queries


def _known_key(transform: FeatureTransform, position: int, count: int) -> RawValue:
    values = _vocabulary_texts(transform)
    text = values[position * len(values) // count]
    return int(text) if position % 2 and _is_decimal(text) else text


def _cold_key(transform: FeatureTransform, position: int) -> str:
    return _unknown_text(transform, f"{_CONTEXT}-cold-start-{position}")


def _raw_value(transform: FeatureTransform, position: int, count: int) -> RawValue:
    if transform.multi_valued:
        return _raw_list(transform, position, count)
    if transform.kind == "categorical":
        values = _vocabulary_texts(transform)
        if transform.oov == "bucket" and position % 4 == 3:
            candidates: Iterable[str | None] = _unknown_texts(transform)
        else:
            start = position * len(values) // count
            candidates = (values[(start + k) % len(values)] for k in range(len(values)))
        return _sent(transform, candidates, position, numeric=False)
    if transform.kind == "hashed":
        first = f"{_CONTEXT}-{position}" if position % 2 == 0 else str(1009 * position)
        return _sent(transform, (first, chr(ord("a") + position % 26)), position, numeric=False)
    points: list[float | None] = list(
        _bucket_points(transform.boundaries)
        if transform.kind == "bucketized"
        else _dense_points(transform)
    )
    if transform.kind == "bucketized" and transform.missing_bucket and transform.derivation.active:
        points.insert(1, None)  # early, so that a record of few queries holds one
    start = position % len(points)
    ordered = [points[(start + k) % len(points)] for k in range(len(points))]
    if not transform.derivation.active:
        number = ordered[0]
        assert number is not None  # missing values exist only through a derivation
        return _wire_number(number, position)
    texts = (None if point is None else _number_text(point) for point in ordered)
    return _sent(transform, texts, position, numeric=True)


def _raw_list(transform: FeatureTransform, position: int, count: int) -> RawValue:
    """A multi-valued value: a list, a single value or the separator's text."""
    length = min((0, 1, 2, 3, transform.max_length)[position % 5], transform.max_length)
    elements: list[Any]
    if transform.kind == "categorical":
        values = _vocabulary_texts(transform)
        unknown = _unknown_texts(transform) if transform.oov == "bucket" else []
        elements = [
            unknown[0]
            if unknown and k == 1 and position % 2 == 0
            else values[(position * len(values) // count + 3 * k) % len(values)]
            for k in range(length)
        ]
    elif transform.kind == "hashed":
        elements = [f"{_CONTEXT}-{position}-{k}" for k in range(length)]
    else:
        points = list(
            _bucket_points(transform.boundaries)
            if transform.kind == "bucketized"
            else _dense_points(transform)
        )
        elements = [_wire_number(points[(position + k) % len(points)], k) for k in range(length)]
    derivation = transform.derivation
    separator = derivation.separator
    texts = [str(element) for element in elements]
    if separator and derivation.prefix is None and derivation.pattern is None and position % 2:
        text = separator.join(texts)
        if _derived(derivation, text, numeric=False) == texts:
            return text
    if length == 1 and position % 3 == 0:
        # A text of a feature with a separator is split (after its prefix and pattern).
        alone = not (separator and isinstance(elements[0], str))
        if alone or _derived(derivation, elements[0], numeric=False) == texts:
            return elements[0]
    if elements and position % 4 == 2 and all(_is_decimal(text) for text in texts):
        return [int(text) for text in texts]
    return elements


def _sent(
    transform: FeatureTransform,
    candidates: Iterable[str | None],
    position: int,
    *,
    numeric: bool,
) -> RawValue:
    """The raw form of the first candidate (a value after derivation; None: missing) that a
    text derives to, as the wire sends it (text, or an integer where no derivation applies).

    Raises:
        InvalidInput: none of the first `_MAX_TRIES` candidates has such a text.
    """
    derivation = transform.derivation
    for tries, wanted in enumerate(candidates):
        if tries >= _MAX_TRIES:
            break
        if not derivation.active:
            assert wanted is not None  # missing values exist only through a derivation
            return int(wanted) if position % 2 and _is_decimal(wanted) else wanted
        form = _deriving_text(derivation, wanted, numeric=numeric)
        if form is not None:
            return form
    raise InvalidInput(
        f"raw golden queries: no text tried derives to a value of {untrusted(transform.name)} "
        f"(derive {derivation.to_json()})"
    )


def _deriving_text(derivation: Derivation, wanted: str | None, *, numeric: bool) -> str | None:
    """A text that `derivation` cuts to `wanted` (None: to a missing value), preferring texts
    it has something to cut from; None when no form tried works."""
    if wanted is None:
        forms = [_CONTEXT, ""]
    else:
        forms = [f"{wanted}{_CONTEXT}"] if derivation.prefix == len(wanted) else []
        forms += [f"{_CONTEXT} {wanted}", f"{wanted} {_CONTEXT}", wanted]
    expected = float(wanted) if numeric and wanted is not None else wanted
    for form in forms:
        try:
            if _derived(derivation, form, numeric=numeric) == expected:
                return form
        except InvalidInput:  # text a numeric feature cannot read: try the next form
            continue
    return None


def _derived(derivation: Derivation, text: str, *, numeric: bool) -> Any:
    return derivation.apply(pa.array([text], pa.string()), numeric=numeric)[0].as_py()


def _vocabulary_texts(transform: FeatureTransform) -> list[str]:
    vocabulary = transform.vocabulary
    if vocabulary is None or len(vocabulary) == 0:
        raise InvalidInput(
            f"raw golden queries: {untrusted(transform.name)} has an empty vocabulary"
        )
    count = min(len(vocabulary), 4096)  # spread over the first rows of a huge vocabulary
    return vocabulary.values.slice(0, count).to_pylist()


def _unknown_texts(transform: FeatureTransform) -> list[str]:
    """Short and long texts the vocabulary does not hold (short ones survive a prefix)."""
    return [_unknown_text(transform, text) for text in ("~", f"~{_CONTEXT}~")]


def _unknown_text(transform: FeatureTransform, text: str) -> str:
    vocabulary = transform.vocabulary
    assert vocabulary is not None
    while vocabulary.lookup(pa.array([text], pa.string()))[0] >= 0:
        text += "~"
    return text


def _bucket_points(boundaries: Sequence[float]) -> list[float]:
    """One value per bucket first (below the first boundary, then every boundary exactly, which
    counts itself, then beyond the last), then the values between boundaries."""
    ordered = sorted(set(boundaries))
    if not ordered:
        return [0.0, 1.5]
    between = [(low + high) / 2 for low, high in itertools.pairwise(ordered)]
    return [ordered[0] - 1.0, *ordered, ordered[-1] + 1.0, *between]


def _dense_points(transform: FeatureTransform) -> list[float]:
    """Below, at, inside and above the clip range; else around the mean (raw scale)."""
    low, high = transform.clip_min, transform.clip_max
    if low is None and high is not None:
        low = high - 2.0
    if high is None and low is not None:
        high = low + 2.0
    if low is not None and high is not None:
        span = max(high - low, 1.0)
        points = [low - span / 2, low, (low + high) / 2, high, high + span / 2]
    elif transform.std > 0 and not transform.log1p:
        points = [transform.mean + k * transform.std for k in (-2.0, -1.0, 0.0, 0.5, 1.0, 3.0)]
    else:
        points = [0.0, 1.0, 2.5, 10.0, 1000.0]
    if transform.log1p:  # log1p is defined above -1 only (after clipping)
        points = [p for p in points if _clipped(transform, p) > -1.0] or [0.0]
    return points


def _clipped(transform: FeatureTransform, value: float) -> float:
    if transform.clip_min is not None:
        value = max(value, transform.clip_min)
    if transform.clip_max is not None:
        value = min(value, transform.clip_max)
    return value


def _wire_number(value: float, position: int) -> int | float:
    """An integral value as an integer on even positions (both forms reach the server)."""
    if value.is_integer() and abs(value) < _SAFE_INTEGER and position % 2 == 0:
        return int(value)
    return float(value)


def _number_text(value: float) -> str:
    return str(int(value)) if value.is_integer() and abs(value) < _SAFE_INTEGER else repr(value)


def _is_decimal(text: str) -> bool:
    return bool(_DECIMAL.fullmatch(text)) and abs(int(text)) < _SAFE_INTEGER


# -- the record --------------------------------------------------------------------------------
def record_raw_queries(
    transforms: Transforms,
    query_tower: Callable[..., Tensor],
    sparse_features: Sequence[str],
    dense_features: Sequence[str],
    count: int = RAW_QUERY_COUNT,
) -> RawGolden:
    """Makes raw queries, encodes them and records the query tower's output on them.

    Args:
        transforms: the fitted transforms the version serves with.
        query_tower: the packaged query tower (as reloaded from its file).
        sparse_features: the query tower's features in its input order.
        dense_features: the query-side dense features (the ranker's first dense columns).
        count: the number of queries.

    Raises:
        InvalidInput: see `make_queries` and `encode_queries`.
    """
    queries = make_queries(transforms, sparse_features, dense_features, count)
    encoded = encode_queries(transforms, queries, sparse_features, dense_features)
    values = torch.from_numpy(encoded.values)
    lengths = torch.from_numpy(encoded.lengths)
    with torch.no_grad():
        output = query_tower(values, lengths)
    return RawGolden(
        sparse_features=tuple(sparse_features),
        dense_features=tuple(dense_features),
        queries=tuple(queries),
        values=values,
        lengths=lengths,
        dense=torch.from_numpy(encoded.dense),
        output=output,
    )


def raw_golden_problems(golden: GoldenSet, transforms: Transforms, limit: int = 5) -> list[str]:
    """Whether the recorded raw queries encode, with `transforms`, to the recorded inputs.

    Ids and bag lengths must be equal; dense values within the golden tolerances. The tensors'
    shapes are `golden.check_golden_shapes`' to check first.

    Returns:
        Up to `limit` lines, each naming a query and a feature that differs; empty when all
        agree or the golden set records no raw queries.
    """
    raw = golden.raw
    if raw is None:
        return []
    try:
        encoded = encode_queries(transforms, raw.queries, raw.sparse_features, raw.dense_features)
    except InvalidInput as error:
        return [f"raw golden queries: {error}"]
    rows = len(raw.queries)
    if (
        raw.lengths.numel() != encoded.lengths.size
        or int(raw.lengths.sum()) != raw.values.numel()
        or tuple(raw.dense.shape) != encoded.dense.shape
    ):
        return ["raw golden queries: the recorded tensors do not fit the queries"]
    recorded = np.split(raw.values.numpy(), np.cumsum(raw.lengths.numpy())[:-1])
    ours = np.split(encoded.values, np.cumsum(encoded.lengths)[:-1])
    problems = []
    for bag, (mine, theirs) in enumerate(zip(ours, recorded, strict=True)):
        if not np.array_equal(mine, theirs):
            name = raw.sparse_features[bag // rows]
            problems.append(
                f"raw query {bag % rows}: {shown(name)} encodes to {mine.tolist()}, recorded "
                f"{theirs.tolist()}"
            )
    close = np.isclose(encoded.dense, raw.dense.numpy(), rtol=golden.rtol, atol=golden.atol)
    for row, column in zip(*np.nonzero(~close), strict=True):
        problems.append(
            f"raw query {row}: {shown(raw.dense_features[column])} encodes to "
            f"{encoded.dense[row, column]:.6g}, recorded {float(raw.dense[row, column]):.6g}"
        )
    return problems[:limit]
