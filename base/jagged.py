"""Jagged id arrays and entity tables: the numpy layout of sparse features everywhere.

A sparse feature of many rows is one flat id array plus offsets (`JaggedColumn`); the features
of every user or every item are an `EntityTable` (sparse columns + a dense matrix, row = the
entity's dense id). The trainer builds batches from them, the bundle stores the item table in
this layout, and the runtime gathers request rows with `gather_bags`. Plain numpy, no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from recship.base.errors import InvalidInput

#: An empty, read-only id array: "no ids" (a bag without ids, a query without exclusions).
NO_IDS = np.zeros(0, dtype=np.int64)
NO_IDS.flags.writeable = False


@dataclass
class JaggedColumn:
    """One sparse feature for every entity: row r holds the ids of entity r.

    Attributes:
        values: int64 [total] ids of all rows, concatenated.
        offsets: int64 [num_rows + 1]; row r is values[offsets[r]:offsets[r + 1]].
    """

    values: np.ndarray
    offsets: np.ndarray

    def __post_init__(self) -> None:
        self.values = np.ascontiguousarray(self.values, dtype=np.int64)
        self.offsets = np.ascontiguousarray(self.offsets, dtype=np.int64)
        if (
            self.offsets.ndim != 1
            or self.offsets.size == 0
            or self.offsets[0] != 0
            or self.offsets[-1] != self.values.size
            or np.any(np.diff(self.offsets) < 0)
        ):
            raise InvalidInput(
                "jagged column: offsets must start at 0, never decrease and end at len(values)"
            )

    @classmethod
    def single(cls, values: np.ndarray) -> JaggedColumn:
        """A single-valued column: row r holds exactly values[r]."""
        values = np.asarray(values, dtype=np.int64)
        return cls(values=values, offsets=np.arange(values.size + 1, dtype=np.int64))

    @classmethod
    def from_bags(cls, bags: Sequence[Sequence[int]]) -> JaggedColumn:
        """A multi-valued column from one (possibly empty) list of ids per row."""
        lengths = np.fromiter((len(b) for b in bags), dtype=np.int64, count=len(bags))
        offsets = np.zeros(len(bags) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        values = np.fromiter((v for b in bags for v in b), dtype=np.int64, count=int(offsets[-1]))
        return cls(values=values, offsets=offsets)

    @property
    def num_rows(self) -> int:
        """Number of rows (entities)."""
        return self.offsets.size - 1

    def lengths(self) -> np.ndarray:
        """int64 [num_rows]: the number of ids in each row."""
        return np.diff(self.offsets)

    def gather(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The bags of `rows`, in that order (rows may repeat).

        Returns:
            (values int64 [sum of lengths], lengths int64 [len(rows)]).
        """
        return gather_bags(self.values, self.offsets, rows)


def gather_bags(
    values: np.ndarray, offsets: np.ndarray, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The bags of `rows` (in that order, rows may repeat) of a jagged (values, offsets) pair.

    The offsets are trusted (no validation), for callers on a hot path that built them.

    Returns:
        (values [sum of lengths], lengths int64 [len(rows)]).
    """
    rows = np.asarray(rows, dtype=np.int64)
    starts = offsets[rows]
    lengths = offsets[rows + 1] - starts
    total = int(lengths.sum())
    # Index of every gathered value: its row's start plus its position inside the bag.
    bag_begin = np.cumsum(lengths) - lengths
    index = np.repeat(starts - bag_begin, lengths) + np.arange(total, dtype=np.int64)
    return values[index], lengths


@dataclass
class EntityTable:
    """Features of every user (or every item), indexed by the entity's dense id.

    Attributes:
        num_rows: Number of entities.
        sparse: Feature name -> column; only features of this table's side.
        dense: float32 [num_rows, number of dense features of this side] (may have 0 columns),
            columns in schema order.
    """

    num_rows: int
    sparse: dict[str, JaggedColumn]
    dense: np.ndarray

    def __post_init__(self) -> None:
        self.dense = np.ascontiguousarray(self.dense, dtype=np.float32)
        if self.dense.ndim != 2 or self.dense.shape[0] != self.num_rows:
            raise InvalidInput(
                f"entity table: dense must be [{self.num_rows}, F], got {self.dense.shape}"
            )
        for name, column in self.sparse.items():
            if column.num_rows != self.num_rows:
                raise InvalidInput(
                    f"entity table: feature {name!r} has {column.num_rows} rows, "
                    f"expected {self.num_rows}"
                )
