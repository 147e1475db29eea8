"""transforms.json + vocab/*.arrow: how raw feature values become model inputs, for any language.

The trainer fits one `FeatureTransform` per feature of the data's feature spec (vocabularies,
hash buckets, bucket boundaries, dense statistics) on training data only; the packager writes
them into the bundle; the runtime applies them to the raw values of every request, and so can
any client or host in another language: the file layouts, the hash function and the rules
below are documented in `bundle/FORMAT.md` (transforms.json, vocab/<feature>.arrow).

Every encoder here is vectorised over a whole column (numpy and pyarrow compute, no Python loop
per value), because the server encodes every query of every request and the trainer whole
tables; `fnv1a_64_text` and `Vocabulary.id_of` are their one-value forms, for a request's few
values, where the array machinery costs more than the work.

Rules, per kind:

- `categorical`: the value's text (integers in decimal) looked up in the vocabulary; id = its
  position. Unknown values map to the OOV bucket (id = vocabulary size) or are an error, as the
  spec says.
- `hashed`: `fnv1a_64(seed, text) mod buckets`.
- `bucketized`: the number of `boundaries` that are <= the value (0 .. len(boundaries)); with
  `missing_bucket`, a missing value is id 0 and every other id is one higher; without it, a
  missing value has no id (refused, like an unknown category under `oov` "error").
- `dense`: float32 of the value, clipped to [clip_min, clip_max] when set, then `log1p`,
  then standardised `(x - mean) / std` when `std > 0`.

Multi-valued features apply the rule to every element of a list.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recship.base.errors import InvalidInput, untrusted
from recship.base.files import atomic_output, write_bytes_atomic
from recship.bundle.checksums import is_safe_relative_path
from recship.bundle.layout import TRANSFORMS_FILE, VOCAB_DIR
from recship.protos.v1 import manifest_pb2

TRANSFORMS_FORMAT_VERSION = 1
# The seed of the hash that indexes vocabularies (their lookup column), fixed by the format.
VOCAB_HASH_SEED = 0

Kind = Literal["categorical", "hashed", "bucketized", "dense"]
KINDS: tuple[Kind, ...] = ("categorical", "hashed", "bucketized", "dense")
Side = Literal["user", "item", "context"]
SIDES: tuple[Side, ...] = ("user", "item", "context")
Oov = Literal["bucket", "error"]

_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3
_MASK64 = (1 << 64) - 1


# -- the hash ----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _seeded_basis(seed: int) -> int:
    """FNV-1a 64 state after the 8 little-endian bytes of `seed`."""
    state = _FNV_OFFSET
    for byte in int(seed & _MASK64).to_bytes(8, "little"):
        state = ((state ^ byte) * _FNV_PRIME) & _MASK64
    return state


def fnv1a_64(values: pa.Array, seed: int) -> np.ndarray:
    """FNV-1a 64 of each string's UTF-8 bytes after the 8 little-endian bytes of `seed`.

    Portable on purpose: five lines in any language, no library. Vectorised over the array
    (one numpy pass per byte position, not per value).

    Args:
        values: a string array (nulls hash as the empty string; callers handle missing first).
        seed: the feature's seed.

    Returns:
        uint64 [len(values)].
    """
    strings = pc.fill_null(values.cast(pa.large_string()), "")
    if isinstance(strings, pa.ChunkedArray):
        strings = strings.combine_chunks()
    count = len(strings)
    hashes = np.full(count, _seeded_basis(seed), dtype=np.uint64)
    if count == 0:
        return hashes
    _, offsets_buffer, data_buffer = strings.buffers()
    offsets = np.frombuffer(offsets_buffer, dtype=np.int64)[
        strings.offset : strings.offset + count + 1
    ]
    data = (
        np.frombuffer(data_buffer, dtype=np.uint8)
        if data_buffer is not None
        else np.zeros(0, np.uint8)
    )
    starts, lengths = offsets[:-1], np.diff(offsets)
    prime = np.uint64(_FNV_PRIME)
    with np.errstate(over="ignore"):
        for position in range(int(lengths.max(initial=0))):
            active = np.flatnonzero(lengths > position)
            byte = data[starts[active] + position].astype(np.uint64)
            hashes[active] = (hashes[active] ^ byte) * prime
    return hashes


def fnv1a_64_text(text: str, seed: int) -> int:
    """`fnv1a_64` of one string, in plain Python: for a request's few values, where building an
    Arrow array and a numpy pass per byte cost far more than the hash itself."""
    state = _seeded_basis(seed)
    for byte in text.encode("utf-8"):
        state = ((state ^ byte) * _FNV_PRIME) & _MASK64
    return state


def as_text(values: pa.Array) -> pa.Array:
    """The text form categorical and hashed features look values up by: integers in decimal.

    Raises:
        InvalidInput: the values are floats or another type with no canonical text.
    """
    kind = values.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return values
    if pa.types.is_integer(kind) or pa.types.is_boolean(kind):
        return pc.cast(
            values.cast(pa.int64()) if pa.types.is_boolean(kind) else values, pa.string()
        )
    if pa.types.is_null(kind):
        return pa.nulls(len(values), pa.string())
    raise InvalidInput(f"expected strings or integers, got {kind}")


# -- vocabularies ------------------------------------------------------------------------------
class Vocabulary:
    """Values in id order, with a sorted-hash index so lookups need no hash table in memory.

    The index (`hashes`, `ids`: the vocabulary's FNV-1a hashes with seed `VOCAB_HASH_SEED`,
    sorted, and the id of each) is stored in the file, so a server maps even a 10-million-entry
    vocabulary from disk and looks values up by binary search.

    Thread-safety: immutable; lookups may run from any thread.
    """

    def __init__(
        self, values: pa.Array, hashes: np.ndarray | None = None, ids: np.ndarray | None = None
    ) -> None:
        self.values = values.cast(pa.string()) if not pa.types.is_string(values.type) else values
        if self.values.null_count:
            raise InvalidInput("a vocabulary may not hold missing values")
        if hashes is None or ids is None:
            computed = fnv1a_64(self.values, VOCAB_HASH_SEED)
            ids = np.argsort(computed, kind="stable").astype(np.int64)
            hashes = computed[ids]
        self.hashes = hashes
        self.ids = ids

    def __len__(self) -> int:
        return len(self.values)

    @classmethod
    def fit(cls, values: pa.Array, *, min_count: int = 1, numeric_order: bool = True) -> Vocabulary:
        """The distinct values of `values` seen at least `min_count` times, sorted.

        Sorted numerically when every value is an integer and `numeric_order` holds (ids then
        follow the raw ids, as MovieLens users expect), else by text.
        """
        present = pc.drop_null(values)
        counts = pc.value_counts(present)
        distinct = counts.field("values")
        kept = distinct.filter(pc.greater_equal(counts.field("counts"), min_count))
        if pa.types.is_integer(kept.type) and numeric_order:
            return cls(as_text(kept.take(pc.sort_indices(kept))))
        text = as_text(kept)
        return cls(text.take(pc.sort_indices(text)))

    def lookup(self, values: pa.Array) -> np.ndarray:
        """int64 id of each value's text; -1 where unknown or missing."""
        text = as_text(values)
        if isinstance(text, pa.ChunkedArray):
            text = text.combine_chunks()
        count = len(text)
        found = np.full(count, -1, dtype=np.int64)
        if count == 0 or len(self) == 0:
            return found
        hashes = fnv1a_64(text, VOCAB_HASH_SEED)
        position = np.searchsorted(self.hashes, hashes)
        inside = position < len(self.hashes)
        position = np.minimum(position, len(self.hashes) - 1)
        candidates = np.flatnonzero(inside & (self.hashes[position] == hashes) & text.is_valid())
        if candidates.size == 0:
            return found
        ids = self.ids[position[candidates]]
        same = pc.equal(text.take(candidates), self.values.take(ids)).to_numpy(zero_copy_only=False)
        found[candidates[same]] = ids[same]
        for row in candidates[~same]:  # a 64-bit hash collision: scan the equal-hash run
            found[row] = self._scan(str(text[int(row)]), int(position[row]))
        return found

    def id_of(self, text: str) -> int:
        """The id of one text, -1 if unknown: `lookup` of a one-value array, without building
        one (a request's key costs microseconds instead of a pass of array kernels)."""
        if len(self) == 0:
            return -1
        digest = fnv1a_64_text(text, VOCAB_HASH_SEED)
        position = int(np.searchsorted(self.hashes, np.uint64(digest)))
        if position >= len(self.hashes) or int(self.hashes[position]) != digest:
            return -1
        return self._scan(text, position)

    def _scan(self, value: str, start: int) -> int:
        target = self.hashes[start]
        stop = start
        while stop < len(self.hashes) and self.hashes[stop] == target:
            if self.values[int(self.ids[stop])].as_py() == value:
                return int(self.ids[stop])
            stop += 1
        return -1

    def table(self) -> pa.Table:
        """The file form: `value` in id order; `hash` (sorted) and `id`, the lookup index."""
        return pa.table(
            {
                "value": self.values,
                "hash": pa.array(self.hashes, pa.uint64()),
                "id": pa.array(self.ids, pa.int64()),
            }
        )

    @classmethod
    def from_table(cls, table: pa.Table, source: str) -> Vocabulary:
        """Reads the file form, checking its columns and that the index is consistent.

        Raises:
            InvalidInput: naming `source` and the problem.
        """
        names = set(table.column_names)
        if not {"value", "hash", "id"} <= names:
            raise InvalidInput(f"{source}: a vocabulary needs columns value, hash, id")
        values = table.column("value").combine_chunks()
        if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
            raise InvalidInput(f"{source}: value must be utf8 text, not {values.type}")
        try:
            values.validate(full=True)  # the IPC reader does not check the UTF-8
        except pa.ArrowInvalid as error:
            raise InvalidInput(f"{source}: value is not valid text ({error})") from None
        hash_column = table.column("hash").combine_chunks()
        id_column = table.column("id").combine_chunks()
        if values.null_count or hash_column.null_count or id_column.null_count:
            raise InvalidInput(f"{source}: value, hash and id may not hold missing values")
        if hash_column.type != pa.uint64() or id_column.type != pa.int64():
            raise InvalidInput(f"{source}: hash must be uint64 and id int64")
        hashes, ids = hash_column.to_numpy(), id_column.to_numpy()
        # Compared, not differenced: a uint64 difference wraps around and is never negative.
        unsorted = bool(np.any(hashes[1:] < hashes[:-1]))
        out_of_range = len(ids) > 0 and (ids.min() < 0 or ids.max() >= len(values))
        # bincount only once every id is in range: each row must be named exactly once.
        if unsorted or out_of_range or np.any(np.bincount(ids, minlength=len(values)) != 1):
            raise InvalidInput(f"{source}: the vocabulary's lookup index is not consistent")
        return cls(values, hashes, ids)


# -- derivations -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Derivation:
    """What is cut out of a raw value before its kind's rule: the spec's `prefix`, `pattern`
    (the first group of a regular expression) and `separator` (text listing several values).

    Training derives every row's value this way (`recship.trainer.data.tables`) and the server
    every request's text value, so a client sends the value its data holds (a zip code, a
    date, "a|b|c") and both sides cut it alike. Values already typed as the feature takes them
    (a list for a multi-valued feature, a number for a numeric one) pass unchanged.
    """

    prefix: int | None = None
    pattern: str | None = None
    separator: str | None = None

    @property
    def active(self) -> bool:
        return self.prefix is not None or self.pattern is not None or bool(self.separator)

    def apply(self, values: pa.Array, *, numeric: bool) -> pa.Array:
        """The derived values; text is parsed as numbers for numeric kinds (blank: missing).

        Raises:
            InvalidInput: the pattern is not a regular expression with one group, or text
                that should be a number is not.
        """
        if isinstance(values, pa.ChunkedArray):
            values = values.combine_chunks()
        if self.active and not pa.types.is_list(values.type):
            values = values if pa.types.is_string(values.type) else pc.cast(values, pa.string())
            if self.prefix is not None:
                values = pc.utf8_slice_codeunits(values, 0, self.prefix)
            if self.pattern is not None:
                values = pc.struct_field(pc.extract_regex(values, self._named_pattern()), [0])
            if self.separator:
                values = _split(values, self.separator)
        if numeric and pa.types.is_string(values.type):
            blank = pc.equal(pc.utf8_trim_whitespace(values), "")
            try:
                values = pc.cast(pc.if_else(blank, None, values), pa.float64())
            except pa.ArrowInvalid as error:
                raise InvalidInput(f"needs numbers: {str(error).splitlines()[0]}") from None
        return values

    def _named_pattern(self) -> str:
        """The pattern with its one group named (Arrow's regex extraction needs names)."""
        return _arrow_pattern(self.pattern or "")

    def to_json(self) -> dict[str, Any]:
        return {"prefix": self.prefix, "pattern": self.pattern, "separator": self.separator}


@functools.lru_cache(maxsize=256)
def _arrow_pattern(pattern: str) -> str:
    """`pattern` with its one group named, as Arrow's regex extraction needs (cached: the
    server derives every request's values with it).

    Checked twice: by Python's `re` for the one group, and by Arrow's RE2, which runs it and
    lacks some of Python's constructs (lookbehind, backreferences).

    Raises:
        InvalidInput: naming the pattern.
    """
    try:
        compiled = re.compile(pattern)
    except re.error as error:
        raise InvalidInput(f"pattern {pattern!r}: {error}") from None
    if compiled.groups != 1:
        raise InvalidInput(f"pattern {pattern!r} needs exactly one (group)")
    named = pattern
    if not compiled.groupindex:
        opening = _group_opening(pattern)
        named = pattern[:opening] + "(?P<value>" + pattern[opening + 1 :]
    try:
        pc.extract_regex(pa.array([], pa.string()), named)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
        reason = str(error).splitlines()[0]
        raise InvalidInput(f"pattern {pattern!r} is not supported ({reason})") from None
    return named


def _group_opening(pattern: str) -> int:
    """Index of the "(" opening the first capturing group of a pattern that has one.

    Scans the pattern as a regex engine does: an escape takes the next character, and a
    character class ("[...]", where a first "]" is literal) holds no groups.
    """
    position, in_class = 0, False
    while position < len(pattern):
        char = pattern[position]
        if char == "\\":
            position += 2
            continue
        if in_class:
            in_class = char != "]"
        elif char == "[":
            in_class = True
            position += 1
            if pattern.startswith("^", position):
                position += 1
            if pattern.startswith("]", position):
                position += 1
            continue
        elif char == "(" and not pattern.startswith("(?", position):
            return position
        position += 1
    raise InvalidInput(f"pattern {pattern!r} needs exactly one (group)")


def _split(values: pa.Array, separator: str) -> pa.Array:
    """Text listing values -> lists of the non-empty values."""
    lists = pc.split_pattern(values, separator)
    flat = pc.list_flatten(lists)
    keep = pc.not_equal(flat, "").to_numpy(zero_copy_only=False)
    lengths = pc.fill_null(pc.list_value_length(lists), 0).to_numpy(zero_copy_only=False)
    owner = np.repeat(np.arange(len(lists)), lengths)
    counts = np.bincount(owner[keep], minlength=len(lists))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), flat.filter(pa.array(keep)))


# -- one feature -------------------------------------------------------------------------------
@dataclass(frozen=True)
class FeatureTransform:
    """How one feature's raw values become model inputs (see the module docstring).

    Attributes:
        name: feature name (request key, KJT key or dense column).
        side: "user" (query side; may be stored in the bundle's user table), "item" (stored
            per item) or "context" (sent with each query).
        kind: categorical, hashed, bucketized or dense.
        multi_valued: a value is a list (a bag of ids).
        cardinality: ids are in [0, cardinality) (sparse kinds; 0 for dense).
        vocabulary: categorical values in id order.
        oov: categorical: "bucket" (unknown -> id len(vocabulary)) or "error".
        seed / buckets: hashed.
        boundaries / missing_bucket: bucketized.
        clip_min / clip_max / log1p / mean / std: dense, applied in that order.
        default: the raw value used when a query does not send the feature and no stored
            value exists; None makes it required.
        max_length: most elements of a multi-valued value.
        derivation: what is cut out of a text value first (`Derivation`).
    """

    name: str
    side: Side
    kind: Kind
    multi_valued: bool = False
    cardinality: int = 0
    vocabulary: Vocabulary | None = field(default=None, compare=False)
    oov: Oov = "error"
    seed: int = 0
    buckets: int = 0
    boundaries: tuple[float, ...] = ()
    missing_bucket: bool = False
    clip_min: float | None = None
    clip_max: float | None = None
    log1p: bool = False
    mean: float = 0.0
    std: float = 0.0
    default: Any = None
    max_length: int = 64
    derivation: Derivation = field(default_factory=Derivation)

    @property
    def is_sparse(self) -> bool:
        return self.kind != "dense"

    @property
    def unmapped(self) -> str:
        """Why a value has id -1 (see `unknown_rows`), to follow the value in a message."""
        if self.kind == "bucketized":
            return "has no bucket: it is not a number and the feature has no missing bucket"
        return "is not in its vocabulary"

    def encode_ids(
        self, values: pa.Array, *, derived: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Ids of a sparse feature for n rows.

        Args:
            values: n raw values (lists for a multi-valued feature, or text its separator
                splits); nulls are missing values.
            derived: the values went through `derivation` already (training rows).

        Returns:
            (ids int64 [sum of lengths], lengths int32 [n]); a single-valued feature has
            length 1 per row. Unknown categorical values with `oov` "error", and missing
            bucketized values without `missing_bucket`, are id -1 (the caller words the error,
            see `unknown_rows`).

        Raises:
            InvalidInput: the values have a type the feature cannot read.
        """
        if not derived:
            values = self.derivation.apply(values, numeric=self.kind == "bucketized")
        if self.multi_valued:
            lists = values if not isinstance(values, pa.ChunkedArray) else values.combine_chunks()
            if not (pa.types.is_list(lists.type) or pa.types.is_large_list(lists.type)):
                raise InvalidInput(f"expected lists of values, got {lists.type}")
            lengths = pc.fill_null(pc.list_value_length(lists), 0).to_numpy().astype(np.int32)
            flat = pc.list_flatten(lists)
        else:
            flat = values
            lengths = np.ones(len(values), dtype=np.int32)
        return self._ids(flat), lengths

    def _ids(self, values: pa.Array) -> np.ndarray:
        if self.kind == "categorical":
            assert self.vocabulary is not None
            ids = self.vocabulary.lookup(values)
            if self.oov == "bucket":
                ids[ids < 0] = len(self.vocabulary)
            return ids
        if self.kind == "hashed":
            text = as_text(values)
            return (fnv1a_64(text, self.seed) % np.uint64(self.buckets)).astype(np.int64)
        numbers = _numbers(values)
        ids = np.searchsorted(np.asarray(self.boundaries), numbers, side="right").astype(np.int64)
        missing = np.isnan(numbers)  # searchsorted sorts NaN last: it would get the top bucket
        if self.missing_bucket:
            return np.where(missing, 0, ids + 1)
        ids[missing] = -1  # no id: the caller refuses it, as an unknown category
        return ids

    def encode_dense(self, values: pa.Array, *, derived: bool = False) -> np.ndarray:
        """float32 [n] of a dense feature (missing values are NaN; callers fill defaults first).

        `derived`: the values went through `derivation` already (training rows)."""
        if not derived:
            values = self.derivation.apply(values, numeric=True)
        return self.dense_rule(_numbers(values))

    def dense_rule(self, numbers: np.ndarray) -> np.ndarray:
        """float32 of float64 `numbers` through the dense rule (clip, `log1p`, standardise):
        `encode_dense` of numbers already read, for callers that hold them in numpy."""
        if self.clip_min is not None or self.clip_max is not None:
            numbers = np.clip(numbers, self.clip_min, self.clip_max)
        if self.log1p:
            with np.errstate(divide="ignore", invalid="ignore"):  # <= -1: -inf / NaN, refused
                numbers = np.log1p(numbers)  # by callers that check finiteness
        if self.std > 0:
            numbers = (numbers - self.mean) / self.std
        return numbers.astype(np.float32)

    def to_json(self) -> dict[str, Any]:
        """The transforms.json entry (the vocabulary goes to its own file)."""
        entry: dict[str, Any] = {
            "name": self.name,
            "side": self.side,
            "kind": self.kind,
            "multi_valued": self.multi_valued,
            "cardinality": self.cardinality,
            "default": self.default,
            "max_length": self.max_length,
            **({"derive": self.derivation.to_json()} if self.derivation.active else {}),
        }
        if self.kind == "categorical":
            entry.update(oov=self.oov, vocabulary=f"{VOCAB_DIR}/{self.name}.arrow")
        elif self.kind == "hashed":
            entry.update(hash="fnv1a_64", seed=self.seed, buckets=self.buckets)
        elif self.kind == "bucketized":
            entry.update(boundaries=list(self.boundaries), missing_bucket=self.missing_bucket)
        else:
            entry.update(
                clip_min=self.clip_min,
                clip_max=self.clip_max,
                log1p=self.log1p,
                mean=self.mean,
                std=self.std,
            )
        return entry


def _numbers(values: pa.Array) -> np.ndarray:
    """float64 of numeric values, NaN where missing.

    Raises:
        InvalidInput: the values are not numbers.
    """
    kind = values.type
    if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_null(kind)):
        raise InvalidInput(f"expected numbers, got {kind}")
    # Integers beyond 2^53 round to the nearest double: bucket boundaries and dense statistics
    # are doubles anyway, and refusing such an int64 would be surprising.
    as_float = values.cast(pa.float64(), safe=False)
    return pc.fill_null(as_float, float("nan")).to_numpy(zero_copy_only=False)


def unknown_rows(transform: FeatureTransform, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Rows holding an id the feature could not map (an unknown value under `oov` "error", a
    missing bucketized value without a missing bucket)."""
    bad = np.flatnonzero(ids < 0)
    if bad.size == 0:
        return bad
    ends = np.cumsum(lengths)
    return np.unique(np.searchsorted(ends, bad, side="right"))


# -- the file ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Transforms:
    """Every feature's transform and which features key the user and item tables.

    Attributes:
        features: by name, in the data spec's order.
        user_key: the user-side categorical feature whose vocabulary holds the user keys.
        item_key: the item-side categorical feature whose vocabulary holds the item ids the
            index and responses use (the catalogue's raw ids, row = item index).
    """

    features: Mapping[str, FeatureTransform]
    user_key: str | None
    item_key: str | None

    def of_side(self, side: Side) -> list[FeatureTransform]:
        return [f for f in self.features.values() if f.side == side]

    def item_ids(self) -> pa.Array:
        """The catalogue's raw item ids in item-index order."""
        if self.item_key is None:
            raise InvalidInput("these transforms have no item key")
        vocabulary = self.features[self.item_key].vocabulary
        assert vocabulary is not None
        return vocabulary.values


def write_transforms(folder: Path, transforms: Transforms) -> list[str]:
    """Writes transforms.json and one vocab/<feature>.arrow per categorical feature, atomically.

    Returns:
        The relative paths written.
    """
    written = []
    for feature in transforms.features.values():
        if feature.vocabulary is None:
            continue
        relative = f"{VOCAB_DIR}/{feature.name}.arrow"
        _write_arrow(folder / relative, feature.vocabulary.table())
        written.append(relative)
    document = {
        "format_version": TRANSFORMS_FORMAT_VERSION,
        "user_key": transforms.user_key,
        "item_key": transforms.item_key,
        "features": [feature.to_json() for feature in transforms.features.values()],
    }
    write_bytes_atomic(
        folder / TRANSFORMS_FILE, (json.dumps(document, indent=2) + "\n").encode("utf-8")
    )
    written.append(TRANSFORMS_FILE)
    return written


def _write_arrow(path: Path, table: pa.Table) -> None:
    """An uncompressed Arrow IPC file (memory-mappable, readable by every Arrow library)."""
    with (
        atomic_output(path, ".arrow") as temp,
        pa.OSFile(str(temp), "wb") as sink,
        pa.ipc.new_file(sink, table.schema) as writer,
    ):
        writer.write_table(table)


def read_arrow(path: Path) -> pa.Table:
    """Memory-maps an Arrow IPC file written by `_write_arrow`.

    Raises:
        InvalidInput: the file is not an Arrow IPC file.
    """
    try:
        return pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
    except (pa.ArrowInvalid, OSError) as error:
        raise InvalidInput(f"{path}: not a readable Arrow IPC file ({error})") from None


def read_transforms(folder: Path) -> Transforms:
    """Reads what `write_transforms` wrote, checking every value as well as its type: a
    transform that cannot encode (no buckets, unsorted boundaries, a pattern Arrow cannot run,
    a default of the wrong kind) is refused with the bundle, not on the request that needs it.

    Raises:
        InvalidInput: a malformed document or vocabulary, naming the file and the field.
    """
    path = folder / TRANSFORMS_FILE
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InvalidInput(f"{path}: not a readable transforms file ({error})") from None
    if (
        not isinstance(document, dict)
        or document.get("format_version") != TRANSFORMS_FORMAT_VERSION
    ):
        raise InvalidInput(f"{path}: format_version is not {TRANSFORMS_FORMAT_VERSION}")
    entries = document.get("features")
    if not isinstance(entries, list):
        raise InvalidInput(f"{path}: features must be a list")
    features: dict[str, FeatureTransform] = {}
    for position, entry in enumerate(entries):
        where = f"{path}: features[{position}]"
        feature = _feature_from_json(folder, entry, where)
        if feature.name in features:
            raise InvalidInput(f"{where}: feature {untrusted(feature.name)} is declared twice")
        features[feature.name] = feature
    keys = [_key_feature(document, key, side, features, path) for key, side in _KEYS]
    return Transforms(features, keys[0], keys[1])


_KEYS = (("user_key", "user"), ("item_key", "item"))


def _key_feature(
    document: dict[str, Any],
    key: str,
    side: Side,
    features: Mapping[str, FeatureTransform],
    path: Path,
) -> str | None:
    """The document's `user_key` / `item_key`: absent, or a single-valued categorical feature
    of its side (its vocabulary holds the users' keys / the catalogue)."""
    name = document.get(key)
    if name is None:
        return None
    feature = features.get(name) if isinstance(name, str) else None
    if (
        feature is None
        or feature.kind != "categorical"
        or feature.multi_valued
        or feature.side != side
    ):
        raise InvalidInput(
            f"{path}: {key} {untrusted(name)} is not a single-valued categorical {side} feature"
        )
    return name


def _feature_from_json(folder: Path, entry: Any, where: str) -> FeatureTransform:
    if not isinstance(entry, dict):
        raise InvalidInput(f"{where}: expected an object")
    try:
        kind = entry["kind"]
        if kind not in KINDS or entry["side"] not in SIDES:
            raise InvalidInput(f"{where}: unknown kind {kind!r} or side {entry['side']!r}")
        name = entry["name"]
        if not isinstance(name, str) or not name:
            raise InvalidInput(f"{where}: name must be non-empty text")
        common: dict[str, Any] = {
            "name": name,
            "side": entry["side"],
            "kind": kind,
            "multi_valued": _flag(entry, "multi_valued", where),
            "cardinality": _integer(entry, "cardinality", where, default=0, minimum=0),
            "default": entry.get("default"),
            "max_length": _integer(entry, "max_length", where, default=64, minimum=1),
            "derivation": _derivation(entry.get("derive") or {}, where),
        }
        if kind == "categorical":
            oov = entry["oov"]
            if oov not in ("bucket", "error"):
                raise InvalidInput(f"{where}: oov {untrusted(oov)} is not bucket or error")
            relative = entry["vocabulary"]
            if not (
                isinstance(relative, str)
                and is_safe_relative_path(relative)
                and relative.startswith(f"{VOCAB_DIR}/")
            ):
                raise InvalidInput(
                    f"{where}: vocabulary {untrusted(relative)} is not a file under {VOCAB_DIR}/"
                )
            vocabulary = Vocabulary.from_table(
                read_arrow(folder / relative), str(folder / relative)
            )
            feature = FeatureTransform(**common, vocabulary=vocabulary, oov=oov)
        elif kind == "hashed":
            if entry.get("hash") != "fnv1a_64":
                raise InvalidInput(f"{where}: unknown hash {entry.get('hash')!r}")
            feature = FeatureTransform(
                **common,
                seed=_integer(entry, "seed", where, minimum=-(2**63), maximum=2**64 - 1),
                buckets=_integer(entry, "buckets", where, minimum=1, maximum=2**63 - 1),
            )
        elif kind == "bucketized":
            boundaries = entry["boundaries"]
            numbers = [_finite(b, f"{where}: boundaries") for b in boundaries]
            if numbers != sorted(set(numbers)):
                raise InvalidInput(f"{where}: boundaries must be strictly increasing")
            feature = FeatureTransform(
                **common,
                boundaries=tuple(numbers),
                missing_bucket=_flag(entry, "missing_bucket", where),
            )
        else:
            feature = FeatureTransform(
                **common,
                clip_min=_optional_finite(entry, "clip_min", where),
                clip_max=_optional_finite(entry, "clip_max", where),
                log1p=_flag(entry, "log1p", where),
                mean=_finite(entry.get("mean", 0.0), f"{where}: mean"),
                std=_finite(entry.get("std", 0.0), f"{where}: std", minimum=0.0),
            )
    except (KeyError, TypeError, ValueError) as error:
        raise InvalidInput(f"{where}: malformed ({error})") from None
    _check_default(feature, where)
    return feature


def _flag(entry: dict[str, Any], key: str, where: str) -> bool:
    value = entry.get(key, False)
    if not isinstance(value, bool):
        raise InvalidInput(f"{where}: {key} must be true or false, not {untrusted(value)}")
    return value


def _integer(
    entry: dict[str, Any],
    key: str,
    where: str,
    *,
    minimum: int,
    maximum: int = 2**63 - 1,
    default: int | None = None,
) -> int:
    value = entry[key] if default is None else entry.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise InvalidInput(
            f"{where}: {key} must be an integer in [{minimum}, {maximum}], not {untrusted(value)}"
        )
    return value


def _finite(value: Any, what: str, minimum: float | None = None) -> float:
    """`value` as a float: a finite JSON number, at least `minimum` when given."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or (minimum is not None and value < minimum)
    ):
        bound = "" if minimum is None else f" >= {minimum}"
        raise InvalidInput(f"{what} must be a finite number{bound}, not {untrusted(value)}")
    return float(value)


def _optional_finite(entry: dict[str, Any], key: str, where: str) -> float | None:
    value = entry.get(key)
    return None if value is None else _finite(value, f"{where}: {key}")


def _derivation(raw: Any, where: str) -> Derivation:
    """The entry's `derive` object, its pattern checked as `Derivation.apply` will run it."""
    if not isinstance(raw, dict) or set(raw) - {"prefix", "pattern", "separator"}:
        raise InvalidInput(f"{where}: derive holds keys other than prefix, pattern, separator")
    prefix = None if raw.get("prefix") is None else _integer(raw, "prefix", where, minimum=0)
    pattern, separator = raw.get("pattern"), raw.get("separator")
    for key, value in (("pattern", pattern), ("separator", separator)):
        if value is not None and not isinstance(value, str):
            raise InvalidInput(f"{where}: {key} must be text, not {untrusted(value)}")
    if pattern is not None:
        try:
            _arrow_pattern(pattern)
        except InvalidInput as error:
            raise InvalidInput(f"{where}: {error}") from None
    return Derivation(prefix, pattern, separator)


def _check_default(feature: FeatureTransform, where: str) -> None:
    """The default's JSON type fits the feature: numbers for numeric kinds (text too where a
    derivation cuts a bucketized number out of it; a dense default is the number itself, never
    derived), text or integers for the others, a list of such for a multi-valued feature (or
    its separator's text)."""
    default = feature.default
    if default is None:
        return
    kind = feature.kind
    numeric = kind in ("bucketized", "dense")
    derived = feature.derivation.active and kind != "dense"

    def fits(value: Any) -> bool:
        if isinstance(value, bool):
            return False
        if isinstance(value, str):
            return derived or not numeric
        if isinstance(value, int):
            return True
        return isinstance(value, float) and numeric and math.isfinite(value)

    if feature.multi_valued and isinstance(default, list):
        ok = all(fits(value) for value in default)
    else:
        ok = fits(default)
    if not ok:
        shape = "list" if feature.multi_valued else "value"
        raise InvalidInput(f"{where}: default {untrusted(default)} does not fit a {kind} {shape}")


def check_transforms(transforms: Transforms, manifest: manifest_pb2.BundleManifest) -> None:
    """Checks the transforms against the manifest: the features it declares, and every sparse
    feature's id range equal to its embedding table's, so no encoded id can fall outside it.

    Raises:
        InvalidInput: naming the first disagreement.
    """
    declared = list(manifest.transforms.features)
    if declared != list(transforms.features):
        raise InvalidInput("transforms.json: its features differ from the manifest's transforms")
    if (transforms.item_key or "") != manifest.schema.item_id_feature or (
        transforms.user_key or ""
    ) != manifest.schema.user_id_feature:
        raise InvalidInput("transforms.json: its user and item keys differ from the schema's")
    for spec in manifest.schema.sparse_features:
        transform = transforms.features.get(spec.name)
        if transform is None:
            raise InvalidInput(f"transforms.json: no transform for feature {untrusted(spec.name)}")
        expected = {
            "categorical": len(transform.vocabulary or ()) + (transform.oov == "bucket"),
            "hashed": transform.buckets,
            "bucketized": len(transform.boundaries) + 1 + transform.missing_bucket,
        }.get(transform.kind)
        if expected is None or expected != spec.cardinality or transform.cardinality != expected:
            raise InvalidInput(
                f"transforms.json: {untrusted(spec.name)} gives {expected} ids, its table "
                f"holds {spec.cardinality}"
            )
