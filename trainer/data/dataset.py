"""In-memory interaction data: per-entity feature tables plus (user, item, label) interactions.

Everything here is numpy; torch only appears when `batches` builds tensors. A user's (or an
item's) features live once in an `EntityTable` row indexed by its dense id, and interactions refer
to rows, so a batch gathers features by id instead of storing them per interaction.

Example::

    train, held_out = data.split(eval_fraction=0.1, seed=0)
    # both halves share the same tables, whose activity features were computed on `train`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa

from recship.base.errors import InvalidInput
from recship.base.jagged import EntityTable
from recship.bundle.transforms import Transforms
from recship.trainer.data.schema import DatasetSchema

#: Dense feature log1p(number of the user's interactions), recomputed on the training split.
USER_ACTIVITY_FEATURE = "user_log_activity"
#: Dense feature log1p(number of the item's interactions), recomputed on the training split.
ITEM_POPULARITY_FEATURE = "item_log_popularity"


@dataclass
class InteractionDataset:
    """Users, items and their interactions (MovieLens-like and synthetic sources).

    Attributes:
        schema: The feature schema; `users` holds its user-side features, `items` the item-side.
        users: User feature table (row = user id).
        items: Item feature table (row = item id).
        user_ids: int64 [N] user of each interaction.
        item_ids: int64 [N] item of each interaction.
        labels: float32 [N] in {0, 1}: the DLRM label (MovieLens: rating >= 4).
        timestamps: int64 [N] seconds since the epoch (0 where unknown).
        ratings: float32 [N] explicit ratings when the source has them.
        raw_user_ids: [num_users] the source's user id strings (dense id -> raw id).
        raw_item_ids: [num_items] the source's item id strings (dense id -> raw id).
        item_titles: Title of each item (dense id -> title) when the source has titles.
        vocabularies: Sparse feature name -> meaning of each id (e.g. genre names), where known.
        transforms: The fitted transforms that turn raw values into these features (data read
            through a feature spec), or None.

    Raises:
        InvalidInput: when arrays disagree in length, ids are out of range, or a table lacks a
            schema feature.
    """

    schema: DatasetSchema
    users: EntityTable
    items: EntityTable
    user_ids: np.ndarray
    item_ids: np.ndarray
    labels: np.ndarray
    timestamps: np.ndarray
    ratings: np.ndarray | None = None
    raw_user_ids: np.ndarray | None = None
    raw_item_ids: np.ndarray | None = None
    item_titles: list[str] | None = None
    vocabularies: dict[str, list[str]] = field(default_factory=dict)
    transforms: Transforms | None = None

    def __post_init__(self) -> None:
        self.user_ids = np.ascontiguousarray(self.user_ids, dtype=np.int64)
        self.item_ids = np.ascontiguousarray(self.item_ids, dtype=np.int64)
        self.labels = np.ascontiguousarray(self.labels, dtype=np.float32)
        self.timestamps = np.ascontiguousarray(self.timestamps, dtype=np.int64)
        n = self.user_ids.size
        for name in ("item_ids", "labels", "timestamps", "ratings"):
            array = getattr(self, name)
            if array is not None and array.shape != (n,):
                raise InvalidInput(f"dataset: {name} has shape {array.shape}, expected ({n},)")
        for name, ids, table in (
            ("user_ids", self.user_ids, self.users),
            ("item_ids", self.item_ids, self.items),
        ):
            if n and (ids.min() < 0 or ids.max() >= table.num_rows):
                raise InvalidInput(f"dataset: {name} out of range [0, {table.num_rows})")
        for side, table, sparse, dense in (
            ("user", self.users, self.schema.user_sparse(), self.schema.user_dense()),
            ("item", self.items, self.schema.item_sparse(), self.schema.item_dense()),
        ):
            if table.dense.shape[1] != len(dense):
                raise InvalidInput(
                    f"dataset: {side} table has {table.dense.shape[1]} dense columns, "
                    f"schema has {len(dense)}"
                )
            for spec in sparse:
                column = table.sparse.get(spec.name)
                if column is None:
                    raise InvalidInput(f"dataset: {side} table lacks feature {spec.name!r}")
                if column.values.size and (
                    column.values.min() < 0 or column.values.max() >= spec.cardinality
                ):
                    raise InvalidInput(
                        f"dataset: feature {spec.name!r} has ids outside [0, {spec.cardinality})"
                    )
                if not spec.multi_valued and np.any(column.lengths() != 1):
                    raise InvalidInput(
                        f"dataset: single-valued feature {spec.name!r} has rows without "
                        "exactly one id"
                    )

    def __len__(self) -> int:
        return int(self.user_ids.size)

    @property
    def num_users(self) -> int:
        """Number of users (rows of the user table, with or without interactions)."""
        return self.users.num_rows

    @property
    def num_items(self) -> int:
        """Number of items (rows of the item table, with or without interactions)."""
        return self.items.num_rows

    def with_activity_features(self) -> InteractionDataset:
        """A copy whose aggregate dense features are recomputed from this data set's interactions.

        Every dense feature declared `aggregate = "count"` (and, in schemas written before
        aggregates were declared, `user_log_activity` and `item_log_popularity`) becomes the
        entity's number of interactions here, encoded by its transform (log1p, clipping, and
        standardisation whose statistics are refitted on these counts). Other dense columns
        are kept; this data set is unchanged.
        """
        transforms = dict(self.transforms.features) if self.transforms is not None else {}
        tables = {}
        for side, table, ids, specs in (
            ("user", self.users, self.user_ids, self.schema.user_dense()),
            ("item", self.items, self.item_ids, self.schema.item_dense()),
        ):
            dense = table.dense
            counts = np.bincount(ids, minlength=table.num_rows).astype(np.float64)
            for column, spec in enumerate(specs):
                if not _is_count(spec.name, spec.aggregate, side):
                    continue
                if dense is table.dense:
                    dense = dense.copy()
                fitted = transforms.get(spec.name)
                if fitted is None:
                    dense[:, column] = np.log1p(counts).astype(np.float32)
                    continue
                if fitted.std > 0:  # standardised: refit the statistics on these counts
                    plain = replace(fitted, mean=0.0, std=0.0).encode_dense(
                        pa.array(counts), derived=True
                    )
                    fitted = replace(fitted, mean=float(plain.mean()), std=float(plain.std()))
                    transforms[spec.name] = fitted
                dense[:, column] = fitted.encode_dense(pa.array(counts), derived=True)
            tables[side] = EntityTable(num_rows=table.num_rows, sparse=table.sparse, dense=dense)
        refitted = (
            replace(self.transforms, features=transforms) if self.transforms is not None else None
        )
        return replace(self, users=tables["user"], items=tables["item"], transforms=refitted)

    def split(
        self, eval_fraction: float, seed: int
    ) -> tuple[InteractionDataset, InteractionDataset]:
        """Per-user held-out split into (train, eval).

        Every user with at least 2 interactions has round(eval_fraction * n) of them held out
        (at least 1 when eval_fraction > 0, never all of them); the held-out ones are drawn with
        `np.random.default_rng(seed)`, so the split is deterministic for (data, fraction, seed).
        Users with one interaction stay entirely in train. The activity dense features are
        recomputed from the train part only (no leakage) and both halves share those tables.
        Interactions keep their original relative order in each half.

        Args:
            eval_fraction: Share of each user's interactions to hold out, 0 <= f < 1; 0 gives an
                empty eval part.
            seed: Seed of the random choice.

        Raises:
            InvalidInput: if eval_fraction is outside [0, 1).
        """
        if not 0.0 <= eval_fraction < 1.0:
            raise InvalidInput(f"eval fraction must be in [0, 1), got {eval_fraction}")
        n = len(self)
        held_out = np.zeros(n, dtype=bool)
        if eval_fraction > 0 and n:
            counts = np.bincount(self.user_ids, minlength=self.num_users)
            wanted = np.floor(eval_fraction * counts + 0.5).astype(np.int64)
            wanted = np.where(counts >= 2, np.clip(wanted, 1, counts - 1), 0)
            # A random key per interaction; within each user the k smallest keys are held out.
            keys = np.random.default_rng(seed).random(n)
            order = np.lexsort((keys, self.user_ids))
            group_start = np.cumsum(counts) - counts
            rank_in_user = np.arange(n) - group_start[self.user_ids[order]]
            held_out[order] = rank_in_user < wanted[self.user_ids[order]]
        train = self._subset(~held_out).with_activity_features()
        evaluation = replace(self._subset(held_out), users=train.users, items=train.items)
        return train, evaluation

    def _subset(self, mask: np.ndarray) -> InteractionDataset:
        """The interactions selected by a boolean mask, with the same tables."""
        return replace(
            self,
            user_ids=self.user_ids[mask],
            item_ids=self.item_ids[mask],
            labels=self.labels[mask],
            timestamps=self.timestamps[mask],
            ratings=None if self.ratings is None else self.ratings[mask],
        )


def _is_count(name: str, aggregate: str | None, side: str) -> bool:
    """Whether a dense feature holds its entity's interaction count."""
    if aggregate is not None:
        return aggregate == "count"
    legacy = USER_ACTIVITY_FEATURE if side == "user" else ITEM_POPULARITY_FEATURE
    return name == legacy
