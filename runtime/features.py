"""Request features -> model tensors: raw values in, through the bundle's transforms.

A query carries raw values by feature name (`recship.v1.Value`: text, integers, numbers,
lists). The codec fills what a query does not send from the bundle's user table (when the query
names a stored user) or the feature's declared default, checks and encodes the values sent for
each feature a whole request's column at once (`recship.bundle.query_values`, the bundle's
request rule), and lays the ids out in the entry points' feature-major jagged layout. Item ids
cross the wire as the catalogue's raw ids and are mapped to item indices here, both ways.

Request values repeat heavily (genders, ages, a hot set of users), so the codec remembers, per
feature, the id of each value it accepted and the row of each user key (bounded caches): a
request of values seen before costs dict lookups, not Arrow kernels, and gets the same answer.

Every refusal names the query index and the field, so a client can fix its request:
`queries[2].query.features["user_gender"]: value 'X' is not in its vocabulary`. Nothing here
touches a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from recship.base.errors import InvalidInput, shown, untrusted
from recship.base.jagged import NO_IDS, EntityTable, gather_bags
from recship.bundle.contents import VersionContents
from recship.bundle.query_values import (
    CACHED_VALUES,
    SentIdCache,
    cache_key,
    default_dense,
    remembered,
    sent_dense,
    sent_ids,
)
from recship.bundle.transforms import (
    FeatureTransform,
    Transforms,
)
from recship.protos.v1 import manifest_pb2, recommender_pb2


@dataclass(frozen=True)
class JaggedBlock:
    """Sparse features of n rows: per feature, the rows' ids and bag lengths.

    Attributes:
        values: per feature (in the block's feature order), int64 ids of all n rows.
        lengths: per feature, int32 [n] bag lengths.
    """

    values: tuple[np.ndarray, ...]
    lengths: tuple[np.ndarray, ...]

    @property
    def rows(self) -> int:
        return int(self.lengths[0].size) if self.lengths else 0

    def take(self, rows: np.ndarray) -> JaggedBlock:
        """The bags of `rows`, in that order; rows may repeat (a query's features once per
        candidate)."""
        values, lengths = [], []
        for feature_values, feature_lengths in zip(self.values, self.lengths, strict=True):
            bag_values, bag_lengths = gather_bags(feature_values, _offsets(feature_lengths), rows)
            values.append(bag_values)
            lengths.append(bag_lengths.astype(np.int32))
        return JaggedBlock(tuple(values), tuple(lengths))

    def slice(self, rows: slice) -> JaggedBlock:
        """Consecutive rows `rows` (one part of a split request); the block itself if whole."""
        if rows.start == 0 and rows.stop == self.rows:
            return self
        values, lengths = [], []
        for feature_values, feature_lengths in zip(self.values, self.lengths, strict=True):
            offsets = _offsets(feature_lengths)
            values.append(feature_values[offsets[rows.start] : offsets[rows.stop]])
            lengths.append(feature_lengths[rows])
        return JaggedBlock(tuple(values), tuple(lengths))

    @staticmethod
    def concat(blocks: Sequence[JaggedBlock]) -> JaggedBlock:
        """The rows of several blocks (same features), block after block."""
        features = range(len(blocks[0].values))
        return JaggedBlock(
            tuple(np.concatenate([block.values[f] for block in blocks]) for f in features),
            tuple(np.concatenate([block.lengths[f] for block in blocks]) for f in features),
        )

    def feature_major(self) -> tuple[np.ndarray, np.ndarray]:
        """(values int64 [N], lengths int32 [F * rows]): feature 0's bags of every row, then
        feature 1's, and so on; the layout the entry points take."""
        return (
            np.concatenate(self.values).astype(np.int64, copy=False),
            np.concatenate(self.lengths).astype(np.int32, copy=False),
        )


def _offsets(lengths: np.ndarray) -> np.ndarray:
    """int64 [n + 1] bag offsets of n bag lengths."""
    offsets = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def join_blocks(*parts: JaggedBlock) -> JaggedBlock:
    """Features side by side for the same rows (query features, then item features)."""
    return JaggedBlock(
        tuple(v for part in parts for v in part.values),
        tuple(length for part in parts for length in part.lengths),
    )


_REQUEST, _STORED, _DEFAULT, _EMPTY = 0, 1, 2, 3
# Sources in the order a feature's values are encoded, so the first refusal is always the same.
_SOURCES = (_REQUEST, _STORED, _DEFAULT, _EMPTY)
# Most user keys missing from the key cache that are looked up one by one in plain Python
# (`Vocabulary.id_of`, about 2.5 us each) rather than as one Arrow array (`Vocabulary.lookup`,
# about 50 us however few, so the two cross near 20 keys); CPU time measured on the test
# bundle's 300-user vocabulary.
_KEYS_LOOKED_UP_ALONE = 16


def _field(where: str, name: str) -> str:
    """The field path of one feature of a query, e.g. `queries[2].query.features["user_id"]`."""
    return f'{where}.features["{shown(name)}"]'


def _raw(value: recommender_pb2.Value, where: str, name: str) -> Any:
    """The Python value of one wire value (a list for `list_value`); `where` and `name` name
    it in a refusal (the field path is only built then: most values are fine)."""
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "int_value":
        return value.int_value
    if kind == "double_value":
        return value.double_value
    if kind == "list_value":
        lists = value.list_value
        filled = [x for x in (lists.strings, lists.ints, lists.doubles) if len(x)]
        if len(filled) > 1:
            raise InvalidInput(
                f"{_field(where, name)}: a list holds one kind of value (strings, ints or doubles)"
            )
        return list(filled[0]) if filled else []
    raise InvalidInput(f"{_field(where, name)}: no value set")


def _by_source(sources: list[int]) -> dict[int, list[int]]:
    """The queries of each source present, in query order."""
    groups: dict[int, list[int]] = {}
    for query, source in enumerate(sources):
        groups.setdefault(source, []).append(query)
    return groups


class FeatureCodec:
    """Validates request queries and encodes them for one bundle version's entry points.

    Thread-safety: share it between threads. What it encodes with is immutable after
    construction; the encodings it remembers across requests (bounded caches, see
    `bundle.query_values.SentIdCache`) change only by single dict operations under the GIL, and
    never change a result.

    Args:
        manifest: the version's manifest.
        contents: its tables and transforms, checked (`recship.bundle.contents.read_contents`).
    """

    def __init__(self, manifest: manifest_pb2.BundleManifest, contents: VersionContents) -> None:
        self.query_tower_features = contents.query_tower_features
        self.ranker_query_features = contents.ranker_query_features
        self.ranker_item_features = contents.ranker_item_features
        self.sparse_needed = contents.sparse_needed
        self.dense_needed = contents.dense_needed
        self.num_items = int(manifest.schema.num_items)
        self.transforms: Transforms = contents.transforms
        self.user_key = self.transforms.user_key
        self.accepted = frozenset({*self.sparse_needed, *self.dense_needed} | (
            {self.user_key} if self.user_key else set()))  # fmt: skip
        self.items = contents.items
        self.users: EntityTable | None = contents.users
        self.user_sparse: tuple[str, ...] = contents.user_sparse
        self.user_dense: tuple[str, ...] = contents.user_dense
        self.item_vocabulary = contents.item_vocabulary
        # Encodings remembered across requests (request values repeat heavily); bounded, and
        # never a different answer than encoding afresh (`SentIdCache`).
        self._key_cache: dict[tuple[type, str], int] = {}
        self._id_caches = {
            name: SentIdCache(self.transforms.features[name])
            for name in self.sparse_needed
            if not self.transforms.features[name].multi_valued
        }
        self._defaults: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._dense_defaults: dict[str, np.float32] = {}

    # -- items --------------------------------------------------------------------------------
    def item_indices(self, ids: Sequence[str], where: str, *, unknown: str = "error") -> np.ndarray:
        """Item indices of raw item ids (candidates, exclusions).

        Args:
            ids: the catalogue's item ids.
            where: the field, for messages, e.g. "queries[0].candidate_item_ids".
            unknown: "error" (INVALID_ARGUMENT naming the first unknown id) or "drop".
        """
        if not ids:
            return NO_IDS
        found = self.item_vocabulary.lookup(pa.array(list(ids), pa.string()))
        bad = np.flatnonzero(found < 0)
        if bad.size == 0:
            return found
        if unknown == "drop":
            return found[found >= 0]
        position = int(bad[0])
        raise InvalidInput(f"{where}[{position}]: unknown item id {untrusted(ids[position])}")

    def item_ids(self, indices: np.ndarray) -> list[str]:
        """The catalogue's item ids of item indices."""
        return self.item_vocabulary.values.take(pa.array(indices, pa.int64())).to_pylist()

    # -- queries -------------------------------------------------------------------------------
    def encode_queries(
        self, queries: Sequence[recommender_pb2.Query], where: Sequence[str]
    ) -> tuple[JaggedBlock, JaggedBlock, np.ndarray, np.ndarray]:
        """Validates and encodes queries.

        Args:
            queries: the request's queries.
            where: each query's field path for error messages, e.g. "queries[3].query".

        Returns:
            (query tower block, ranker query-side block, dense float32 [n, query dense],
            cold start bool [n]: the query's user key is unknown to the bundle).

        Raises:
            InvalidInput: naming the first bad field.
        """
        raw: list[dict[str, Any]] = []
        accepted = self.accepted
        for position, query in enumerate(queries):
            values = {}
            for name, value in query.features.items():
                if name not in accepted:
                    known = ", ".join(sorted(accepted))
                    raise InvalidInput(
                        f"{_field(where[position], name)}: unknown feature (the bundle takes "
                        f"{known})"
                    )
                values[name] = _raw(value, where[position], name)
            raw.append(values)
        rows, cold = self._user_rows(raw, where)
        row_list = rows.tolist()
        columns = {
            name: self._sparse(name, raw, rows, row_list, where) for name in self.sparse_needed
        }
        dense = np.zeros((len(raw), len(self.dense_needed)), dtype=np.float32)
        for column, name in enumerate(self.dense_needed):
            dense[:, column] = self._dense(name, raw, rows, row_list, where)

        def block(features: Sequence[str]) -> JaggedBlock:
            return JaggedBlock(
                tuple(columns[n][0] for n in features), tuple(columns[n][1] for n in features)
            )

        return block(self.query_tower_features), block(self.ranker_query_features), dense, cold

    def _user_rows(
        self, raw: list[dict[str, Any]], where: Sequence[str]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Each query's row in the user table (-1: none), and whether its key is unknown."""
        rows = np.full(len(raw), -1, dtype=np.int64)
        cold = np.zeros(len(raw), dtype=bool)
        if self.user_key is None:
            return rows, cold
        with_key = [i for i, values in enumerate(raw) if self.user_key in values]
        if not with_key:
            return rows, cold
        keys = []
        for i in with_key:
            key = raw[i][self.user_key]
            if isinstance(key, list | float):
                field = _field(where[i], self.user_key)
                raise InvalidInput(f"{field}: the user key is one text or integer value")
            keys.append(str(key))
        found = self._key_rows(keys)
        rows[with_key] = found
        cold[with_key] = found < 0
        return rows, cold

    def _key_rows(self, keys: list[str]) -> np.ndarray:
        """int64 rows of user keys in the user key's vocabulary (-1: unknown), through the
        bounded key cache; the few keys it lacks are looked up one by one, many as one array."""
        vocabulary = self.transforms.features[self.user_key or ""].vocabulary
        assert vocabulary is not None

        def look_up(missing: list[int]) -> list[int]:
            if len(missing) <= _KEYS_LOOKED_UP_ALONE:
                return [vocabulary.id_of(keys[i]) for i in missing]
            return vocabulary.lookup(pa.array([keys[i] for i in missing], pa.string())).tolist()

        memo_keys = [cache_key(key) for key in keys]
        found = remembered(self._key_cache, CACHED_VALUES, memo_keys, look_up)
        return np.array(found, dtype=np.int64)

    def _sources(
        self,
        name: str,
        raw: list[dict[str, Any]],
        rows: list[int],
        stored: bool,
        transform: FeatureTransform,
        where: Sequence[str],
    ) -> dict[int, list[int]]:
        """The queries of each source `name` comes from: the request, the user table, the
        default, or nothing (an unknown user's key: an empty bag, the cold-start query)."""
        sources = []
        for i, values in enumerate(raw):
            if name in values:
                cold_key = name == self.user_key and rows[i] < 0
                sources.append(_EMPTY if cold_key else _REQUEST)
            elif stored and rows[i] >= 0:
                sources.append(_STORED)
            elif transform.default is not None:
                sources.append(_DEFAULT)
            else:
                hint = (
                    f" (or send {self.user_key} of a stored user)"
                    if stored and name != self.user_key
                    else ""
                )
                raise InvalidInput(
                    f"{_field(where[i], name)}: missing, required by the bundle{hint}"
                )
        return _by_source(sources)

    def _sparse(
        self,
        name: str,
        raw: list[dict[str, Any]],
        rows: np.ndarray,
        row_list: list[int],
        where: Sequence[str],
    ) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64, lengths int32 [n]) of one sparse feature over the request's queries."""
        transform = self.transforms.features[name]
        is_key = name == self.user_key
        stored = is_key or name in self.user_sparse
        groups = self._sources(name, raw, row_list, stored, transform, where)
        parts: list[tuple[list[int], np.ndarray, np.ndarray]] = []  # (queries, ids, lengths)
        for source in _SOURCES:
            queries = groups.get(source)
            if queries is None:
                continue
            if source == _REQUEST:
                ids, lengths = self._requested_ids(transform, raw, rows, queries, where)
            elif source == _STORED:
                if is_key:
                    ids, lengths = rows[queries], np.ones(len(queries), dtype=np.int32)
                else:
                    assert self.users is not None
                    ids, lengths = self.users.sparse[name].gather(rows[queries])
                lengths = lengths.astype(np.int32)
            elif source == _DEFAULT:
                ids, lengths = self._default_ids(transform)
                ids, lengths = np.tile(ids, len(queries)), np.repeat(lengths, len(queries))
            else:
                ids, lengths = NO_IDS, np.zeros(len(queries), dtype=np.int32)
            parts.append((queries, ids, lengths))
        if len(parts) == 1:  # one source for every query: already in query order
            return parts[0][1].astype(np.int64, copy=False), parts[0][2]
        values = np.concatenate([ids for _, ids, _ in parts])
        lengths = np.concatenate([lengths for _, _, lengths in parts])
        position = np.empty(len(raw), dtype=np.int64)
        position[np.concatenate([queries for queries, _, _ in parts])] = np.arange(len(raw))
        bag_values, bag_lengths = gather_bags(values, _offsets(lengths), position)
        return bag_values, bag_lengths.astype(np.int32)

    def _requested_ids(
        self,
        transform: FeatureTransform,
        raw: list[dict[str, Any]],
        rows: np.ndarray,
        queries: list[int],
        where: Sequence[str],
    ) -> tuple[np.ndarray, np.ndarray]:
        """Ids of the values `queries` send for one sparse feature, each refusal naming its
        query (`bundle.query_values.sent_ids`, through the feature's cache when it has one).

        A known user key sent as is encodes to its row (`_user_rows` looked it up in this very
        vocabulary, and checked its type), so it is not looked up twice."""
        name = transform.name
        if name == self.user_key and not transform.derivation.active:
            return rows[queries], np.ones(len(queries), dtype=np.int32)
        column = [raw[i][name] for i in queries]
        cache = self._id_caches.get(name)
        if cache is not None:
            return cache.ids(column, lambda j: _field(where[queries[j]], name))
        return sent_ids(transform, column, [_field(where[i], name) for i in queries])

    def _default_ids(self, transform: FeatureTransform) -> tuple[np.ndarray, np.ndarray]:
        """(ids, lengths) of one query taking the feature's default, encoded once; a default
        that does not encode is refused on every request that needs it."""
        known = self._defaults.get(transform.name)
        if known is None:
            field = _field("(its default)", transform.name)
            known = sent_ids(transform, [transform.default], [field])
            self._defaults[transform.name] = known
        return known

    def _dense(
        self,
        name: str,
        raw: list[dict[str, Any]],
        rows: np.ndarray,
        row_list: list[int],
        where: Sequence[str],
    ) -> np.ndarray:
        """float32 [n] of one dense query-side feature."""
        transform = self.transforms.features[name]
        stored = name in self.user_dense
        groups = self._sources(name, raw, row_list, stored, transform, where)
        out = np.empty(len(raw), dtype=np.float32)
        requested = groups.get(_REQUEST)
        if requested is not None:
            out[requested] = sent_dense(
                transform,
                [raw[i][name] for i in requested],
                [_field(where[i], name) for i in requested],
            )
        from_table = groups.get(_STORED)
        if from_table is not None:
            assert self.users is not None
            out[from_table] = self.users.dense[rows[from_table], self.user_dense.index(name)]
        defaulted = groups.get(_DEFAULT)
        if defaulted is not None:
            known = self._dense_defaults.get(name)
            if known is None:
                known = default_dense(transform, f"{shown(name)} (its default)")
                self._dense_defaults[name] = known
            out[defaulted] = known
        return out

    def item_block(self, item_ids: np.ndarray) -> tuple[JaggedBlock, np.ndarray]:
        """Item-side ranker features of `item_ids`: (sparse block, dense float32 [n, Fi])."""
        values, lengths = [], []
        for name in self.ranker_item_features:
            bag_values, bag_lengths = self.items.sparse[name].gather(item_ids)
            values.append(bag_values)
            lengths.append(bag_lengths.astype(np.int32))
        return JaggedBlock(tuple(values), tuple(lengths)), self.items.dense[item_ids]
