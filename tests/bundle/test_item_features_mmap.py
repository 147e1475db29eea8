"""item_features.npz read memory-mapped: the same tables as a copying read, read-only views of
the file, checked as strictly, and the format unchanged."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from recship.base.errors import InvalidInput
from recship.base.jagged import EntityTable, JaggedColumn
from recship.bundle.item_features import read_item_features, write_item_features


def _table(rows: int = 50) -> EntityTable:
    rng = np.random.default_rng(0)
    bags = [rng.integers(0, 30, rng.integers(0, 4)).tolist() for _ in range(rows)]
    return EntityTable(
        num_rows=rows,
        sparse={
            "item_id": JaggedColumn.single(np.arange(rows)),
            "item_genres": JaggedColumn.from_bags(bags),
        },
        dense=rng.random((rows, 2)).astype(np.float32),
    )


def test_a_mapped_read_equals_a_copying_read(tmp_path: Path) -> None:
    path = tmp_path / "item_features.npz"
    write_item_features(path, _table(), ["item_id", "item_genres"], ["a", "b"])
    copied, sparse, dense = read_item_features(path)
    mapped, mapped_sparse, mapped_dense = read_item_features(path, mmap=True)
    assert (mapped_sparse, mapped_dense) == (sparse, dense)
    assert np.array_equal(mapped.dense, copied.dense)
    for name in sparse:
        for part in ("values", "offsets"):
            got = getattr(mapped.sparse[name], part)
            assert np.array_equal(got, getattr(copied.sparse[name], part))
            assert not got.flags.writeable and not got.flags.owndata  # a view of the mapping
    rows = np.array([3, 0, 49])
    for got, want in zip(
        mapped.sparse["item_genres"].gather(rows),
        copied.sparse["item_genres"].gather(rows),
        strict=True,
    ):
        assert np.array_equal(got, want)


def test_a_mapped_read_refuses_what_a_copying_read_refuses(tmp_path: Path) -> None:
    path = tmp_path / "item_features.npz"
    write_item_features(path, _table(), ["item_id"], ["a", "b"])
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        first = archive.infolist()[0]
    data[first.header_offset : first.header_offset + 4] = b"XXXX"  # its local header
    path.write_bytes(bytes(data))
    with pytest.raises(InvalidInput):
        read_item_features(path, mmap=True)
    path.write_bytes(b"not a zip")
    with pytest.raises(InvalidInput, match=r"not a valid \.npz"):
        read_item_features(path, mmap=True)
