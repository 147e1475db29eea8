"""item_features.npz: the per-item features the runtime joins onto any candidate id.

Row r is item id r; the arrays of the archive are listed in `bundle/FORMAT.md`
(item_features.npz). Uncompressed, so it loads fast; read without pickle.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from recship.base.errors import InvalidInput
from recship.base.files import atomic_output
from recship.base.jagged import EntityTable, JaggedColumn


def write_item_features(
    path: Path, items: EntityTable, sparse_features: Sequence[str], dense_features: Sequence[str]
) -> None:
    """Writes the item table atomically (temp file + rename).

    Args:
        path: destination file.
        items: every item's features, row = item id.
        sparse_features: item-side sparse features to store (all must be in `items`).
        dense_features: names of the columns of `items.dense`, in order.

    Raises:
        InvalidInput: a named feature is missing or the dense width disagrees.
    """
    missing = [name for name in sparse_features if name not in items.sparse]
    if missing:
        raise InvalidInput(f"item features {', '.join(missing)} are not in the item table")
    if items.dense.shape[1] != len(dense_features):
        raise InvalidInput(
            f"item table has {items.dense.shape[1]} dense columns, names given for "
            f"{len(dense_features)}"
        )
    arrays: dict[str, np.ndarray] = {
        "sparse_names": np.array(list(sparse_features), dtype=np.str_),
        "dense_names": np.array(list(dense_features), dtype=np.str_),
        "dense": items.dense.astype(np.float32),
    }
    for name in sparse_features:
        arrays[f"sparse.{name}.values"] = items.sparse[name].values
        arrays[f"sparse.{name}.offsets"] = items.sparse[name].offsets
    with atomic_output(path, ".npz") as temp, open(temp, "wb") as handle:
        np.savez(handle, **arrays)


def read_item_features(path: Path) -> tuple[EntityTable, list[str], list[str]]:
    """Loads the item table written by `write_item_features`.

    Returns:
        (items, sparse feature names, dense feature names).

    Raises:
        InvalidInput: the file is not a valid item feature table.
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            sparse_names = [str(name) for name in data["sparse_names"]]
            dense_names = [str(name) for name in data["dense_names"]]
            dense = data["dense"]
            sparse = {
                name: JaggedColumn(data[f"sparse.{name}.values"], data[f"sparse.{name}.offsets"])
                for name in sparse_names
            }
    except (OSError, KeyError, ValueError) as error:
        raise InvalidInput(f"{path}: not a valid item feature table ({error})") from error
    return (
        EntityTable(num_rows=dense.shape[0], sparse=sparse, dense=dense),
        sparse_names,
        dense_names,
    )
