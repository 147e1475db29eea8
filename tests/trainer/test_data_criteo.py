"""The streamed Criteo TSV reader on generated files: parsing, hashing, splits, ranks, errors."""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from recship.base.errors import InvalidInput, NotFound
from recship.trainer.data.criteo import (
    NUM_DENSE,
    NUM_SPARSE,
    SPARSE_FEATURES,
    CriteoSource,
    count_examples,
    criteo_batches,
    criteo_schema,
)


def _line(rng: np.random.Generator, missing: float = 0.2) -> str:
    label = str(int(rng.random() < 0.3))
    dense = [
        "" if rng.random() < missing else str(int(rng.integers(-2, 1000))) for _ in range(NUM_DENSE)
    ]
    sparse = [
        "" if rng.random() < missing else f"{int(rng.integers(0, 2**32)):08x}"
        for _ in range(NUM_SPARSE)
    ]
    return "\t".join([label, *dense, *sparse])


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


@pytest.fixture()
def criteo_file(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    return _write(tmp_path / "day.tsv", [_line(rng) for _ in range(500)])


def test_schema_has_26_tables_and_13_dense_features() -> None:
    schema = criteo_schema(1000)
    assert [f.name for f in schema.sparse] == list(SPARSE_FEATURES)
    assert all(f.cardinality == 1000 and f.side == "user" for f in schema.sparse)
    assert len(schema.dense) == NUM_DENSE
    assert schema.user_id_feature is None and schema.item_id_feature is None
    with pytest.raises(InvalidInput, match="table size must be >= 2"):
        criteo_schema(1)


def test_parses_labels_dense_and_hashed_categoricals(tmp_path: Path) -> None:
    line = "\t".join(["1", "5", "", "-3", *["0"] * 10, "ff", "", *["1a2b3c4d"] * 24])
    path = _write(tmp_path / "one.tsv", [line])
    batch = next(criteo_batches(path, 1, table_size=101))
    assert batch.labels.tolist() == [1.0]
    assert batch.dense_features.shape == (1, NUM_DENSE)
    assert batch.dense_features[0, :3].tolist() == pytest.approx([math.log(6), 0.0, 0.0])
    kjt = batch.sparse_features
    assert kjt.keys() == list(SPARSE_FEATURES) and kjt.stride() == 1
    assert kjt.lengths().tolist() == [1] * NUM_SPARSE
    values = kjt.values().tolist()
    assert values[0] == 1 + 0xFF % 100
    assert values[1] == 0  # missing
    assert values[2] == 1 + 0x1A2B3C4D % 100


def test_batches_are_in_file_order_with_valid_ids(criteo_file: Path) -> None:
    batches = list(criteo_batches(criteo_file, 64, table_size=50))
    assert len(batches) == 500 // 64
    expected = [float(line.split("\t")[0]) for line in criteo_file.read_text().splitlines()]
    labels = torch.cat([b.labels for b in batches]).tolist()
    assert labels == expected[: len(labels)]
    for b in batches:
        values = b.sparse_features.values()
        assert int(values.min()) >= 0 and int(values.max()) < 50
        assert b.dense_features.dtype == torch.float32 and bool((b.dense_features >= 0).all())
        # Feature-major layout: row 0 of cat_1 is the second value of cat_1's block.
        per_key = b.sparse_features.to_dict()
        assert per_key["cat_1"].values().numel() == 64


def test_eval_split_is_seeded_disjoint_and_complete(criteo_file: Path) -> None:
    def labels_and_dense(split: str, seed: int) -> set[tuple[float, ...]]:
        rows = set()
        for b in criteo_batches(criteo_file, 1, eval_fraction=0.2, seed=seed, split=split):
            rows.add((float(b.labels[0]), *b.dense_features[0].tolist()))
        return rows

    train, held_out = labels_and_dense("train", 3), labels_and_dense("eval", 3)
    assert not train & held_out
    assert len(train) + len(held_out) == 500
    assert 60 < len(held_out) < 140
    assert labels_and_dense("eval", 3) == held_out
    assert labels_and_dense("eval", 4) != held_out
    assert count_examples(criteo_file, eval_fraction=0.2, seed=3, split="eval") == len(held_out)
    assert count_examples(criteo_file, eval_fraction=0.0, seed=3, split="eval") == 0


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_get_disjoint_equal_shares(criteo_file: Path, world_size: int) -> None:
    shares = [
        list(criteo_batches(criteo_file, 16, rank=r, world_size=world_size, table_size=10**6))
        for r in range(world_size)
    ]
    assert len({len(s) for s in shares}) == 1
    assert len(shares[0]) == 500 // (16 * world_size)
    rows = [tuple(row) for s in shares for b in s for row in b.dense_features.tolist()]
    single = [
        tuple(row) for b in criteo_batches(criteo_file, 1) for row in b.dense_features.tolist()
    ]
    assert sorted(rows) == sorted(single[: len(rows)])


def test_start_batch_skips_consumed_batches(criteo_file: Path) -> None:
    full = list(criteo_batches(criteo_file, 32, rank=1, world_size=2))
    resumed = list(criteo_batches(criteo_file, 32, rank=1, world_size=2, start_batch=2))
    assert len(resumed) == len(full) - 2
    assert torch.equal(resumed[0].dense_features, full[2].dense_features)


def test_gzip_files_are_read(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    path = tmp_path / "day.tsv.gz"
    with gzip.open(path, "wt") as out:
        out.write("".join(_line(rng) + "\n" for _ in range(10)))
    source = CriteoSource(path, table_size=20)
    assert source.num_examples(eval_fraction=0.0, seed=0, split="train") == 10
    assert source.scan()[0] == 10
    assert len(list(source.batches(5))) == 2


def _error(path: Path) -> str:
    with pytest.raises((InvalidInput, NotFound)) as caught:
        list(criteo_batches(path, 2))
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_malformed_lines_name_file_line_and_problem(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    good = [_line(rng) for _ in range(3)]
    path = tmp_path / "bad.tsv"
    _write(path, [*good, "1\t2\t3"])
    assert _error(path) == (
        f"{path}:4: expected 40 tab-separated columns (label, 13 integer, 26 categorical), got 3"
    )
    fields = good[0].split("\t")
    _write(path, [*good[:2], "\t".join(["2", *fields[1:]])])
    assert _error(path) == f"{path}:3: label '2' is not 0 or 1"
    _write(path, ["\t".join([fields[0], "1.5", *fields[2:]])])
    assert _error(path) == f"{path}:1: integer column 1 value '1.5' is not an integer"
    _write(path, ["\t".join([*fields[:14], "zz9", *fields[15:]])])
    assert _error(path) == f"{path}:1: categorical column 1 value 'zz9' is not hexadecimal"
    assert _error(tmp_path / "absent.tsv") == f"{tmp_path / 'absent.tsv'}: Criteo file not found"


def test_bad_arguments_fail_at_call_time(criteo_file: Path) -> None:
    with pytest.raises(InvalidInput, match="rank must be in"):
        criteo_batches(criteo_file, 8, rank=3, world_size=2)
    with pytest.raises(InvalidInput, match="eval fraction must be in"):
        criteo_batches(criteo_file, 8, eval_fraction=1.5)
    with pytest.raises(InvalidInput, match="split must be 'train' or 'eval'"):
        criteo_batches(criteo_file, 8, split="test")  # type: ignore[arg-type]


def test_without_drop_last_the_tail_is_yielded(criteo_file: Path) -> None:
    batches = list(criteo_batches(criteo_file, 64, drop_last=False))
    assert [b.labels.numel() for b in batches] == [64] * 7 + [500 - 7 * 64]
    # Two ranks of 200: step 0 holds 400 examples, the tail of 100 all lands on rank 0.
    shares = [
        [
            b.labels.numel()
            for b in criteo_batches(criteo_file, 200, rank=r, world_size=2, drop_last=False)
        ]
        for r in range(2)
    ]
    assert shares == [[200, 100], [200, 0]]
    empty = list(criteo_batches(criteo_file, 200, rank=1, world_size=2, drop_last=False))[-1]
    assert empty.dense_features.shape == (0, NUM_DENSE) and empty.sparse_features.stride() == 0
