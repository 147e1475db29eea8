"""Request features -> model tensors, validated against a bundle's schema.

Every check names the query index and the field, so a client can fix its request:
`queries[2].sparse["user_id"].ids[0]: id 5000 is out of range [0, 943)`. Nothing here touches
a model; the output is plain numpy in the entry points' feature-major jagged layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from recship.base.errors import InvalidInput
from recship.base.jagged import NO_IDS, gather_bags
from recship.bundle.item_features import read_item_features
from recship.protos.v1 import manifest_pb2, recommender_pb2

# Largest number of ids one sparse feature of one query may carry.
MAX_IDS_PER_FEATURE = 4096


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


class FeatureCodec:
    """Validates request queries and encodes them for one bundle version's entry points.

    Thread-safety: immutable after construction; share it between threads.

    Args:
        manifest: the version's manifest.
        item_features_path: the version's item feature file (joined onto ranking rows).
    """

    def __init__(self, manifest: manifest_pb2.BundleManifest, item_features_path) -> None:
        schema = manifest.schema
        self.cardinality = {f.name: int(f.cardinality) for f in schema.sparse_features}
        self.query_side = {
            f.name for f in schema.sparse_features if f.side == manifest_pb2.FEATURE_SIDE_QUERY
        }
        entry_points = {entry.name: entry for entry in manifest.entry_points}
        self.query_tower_features = tuple(entry_points["query_tower"].sparse_feature_order)
        ranker_order = tuple(entry_points["ranker"].sparse_feature_order)
        self.ranker_query_features = tuple(f for f in ranker_order if f in self.query_side)
        self.ranker_item_features = tuple(f for f in ranker_order if f not in self.query_side)
        if ranker_order != self.ranker_query_features + self.ranker_item_features:
            raise InvalidInput("bundle ranker must take query-side features before item-side ones")
        self.required = tuple(sorted(self.query_side))
        self.query_dense = int(schema.query_dense_count)
        self.num_items = int(schema.num_items)
        # Checked against the manifest as it loads: one row per item, offsets that index their
        # values, ids inside each feature's cardinality, bounded bags (no join can fail).
        items, sparse_names, _ = read_item_features(item_features_path, manifest)
        self.items = items
        missing = [name for name in self.ranker_item_features if name not in sparse_names]
        if missing:
            raise InvalidInput(f"bundle item features lack {', '.join(missing)}")

    # -- validation -------------------------------------------------------------------------
    def _check_query(self, query: recommender_pb2.Query, where: str) -> None:
        """Raises the error naming the first bad field of `query` (none if it is valid)."""
        for name in self.required:
            if name not in query.sparse:
                raise InvalidInput(f'{where}.sparse["{name}"]: missing (required by the bundle)')
        for name, feature in query.sparse.items():
            if name not in self.query_side:
                known = ", ".join(self.required)
                raise InvalidInput(f'{where}.sparse["{name}"]: unknown feature (expected {known})')
            field = f'{where}.sparse["{name}"]'
            if len(feature.ids) > MAX_IDS_PER_FEATURE:
                raise InvalidInput(
                    f"{field}.ids: {len(feature.ids)} ids, at most {MAX_IDS_PER_FEATURE}"
                )
            if feature.weights:
                raise InvalidInput(f"{field}.weights: the bundle's feature {name} is not weighted")
            if feature.ids:
                ids = np.fromiter(feature.ids, dtype=np.int64, count=len(feature.ids))
                bad = np.flatnonzero((ids < 0) | (ids >= self.cardinality[name]))
                if bad.size:
                    position = int(bad[0])
                    raise InvalidInput(
                        f"{field}.ids[{position}]: id {int(ids[position])} is out of range "
                        f"[0, {self.cardinality[name]})"
                    )
        if len(query.dense) != self.query_dense:
            raise InvalidInput(
                f"{where}.dense: {len(query.dense)} values, the bundle expects {self.query_dense}"
            )

    def check_item_ids(self, ids: Sequence[int], where: str) -> np.ndarray:
        """Validates item ids (candidates, exclusions); returns them as int64."""
        if not ids:
            return NO_IDS
        array = np.fromiter(ids, dtype=np.int64, count=len(ids))
        bad = np.flatnonzero((array < 0) | (array >= self.num_items))
        if bad.size:
            position = int(bad[0])
            raise InvalidInput(
                f"{where}[{position}]: item id {int(array[position])} is out of range "
                f"[0, {self.num_items})"
            )
        return array

    # -- encoding ---------------------------------------------------------------------------
    def encode_queries(
        self, queries: Sequence[recommender_pb2.Query], where: Sequence[str]
    ) -> tuple[JaggedBlock, JaggedBlock, np.ndarray]:
        """Validates and encodes queries.

        One pass over the queries gathers every feature's ids and checks the shape of each
        query; the id ranges are then checked per feature over the whole request at once. Only
        when something is wrong does `_check_query` walk the bad query to word the error.

        Args:
            queries: the request's queries.
            where: each query's field path for error messages, e.g. "queries[3].query".

        Returns:
            (query tower block, ranker query-side block, dense float32 [n, query dense]).

        Raises:
            InvalidInput: naming the first bad field.
        """
        count = len(queries)
        ids: dict[str, list[int]] = {name: [] for name in self.required}
        lengths = {name: np.empty(count, dtype=np.int32) for name in self.required}
        dense = np.empty((count, self.query_dense), dtype=np.float32)
        for position, query in enumerate(queries):
            sparse = query.sparse
            if len(sparse) != len(self.required) or len(query.dense) != self.query_dense:
                self._check_query(query, where[position])
            for name in self.required:
                if name not in sparse:
                    self._check_query(query, where[position])
                feature = sparse[name]
                if feature.weights or len(feature.ids) > MAX_IDS_PER_FEATURE:
                    self._check_query(query, where[position])
                lengths[name][position] = len(feature.ids)
                ids[name].extend(feature.ids)
            if self.query_dense:
                dense[position] = query.dense
        values = {}
        for name in self.required:
            values[name] = np.array(ids[name], dtype=np.int64)
            bad = (values[name] < 0) | (values[name] >= self.cardinality[name])
            if bad.any():
                # The query holding the first bad id: its index among the bags' ends.
                ends = np.cumsum(lengths[name])
                position = int(np.searchsorted(ends, np.flatnonzero(bad)[0], side="right"))
                self._check_query(queries[position], where[position])

        def block(features: Sequence[str]) -> JaggedBlock:
            return JaggedBlock(
                tuple(values[name] for name in features), tuple(lengths[name] for name in features)
            )

        return block(self.query_tower_features), block(self.ranker_query_features), dense

    def item_block(self, item_ids: np.ndarray) -> tuple[JaggedBlock, np.ndarray]:
        """Item-side ranker features of `item_ids`: (sparse block, dense float32 [n, Fi])."""
        values, lengths = [], []
        for name in self.ranker_item_features:
            bag_values, bag_lengths = self.items.sparse[name].gather(item_ids)
            values.append(bag_values)
            lengths.append(bag_lengths.astype(np.int32))
        return JaggedBlock(tuple(values), tuple(lengths)), self.items.dense[item_ids]
