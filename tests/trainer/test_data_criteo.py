"""The streamed Criteo TSV reader on generated files: the built-in spec's features against a
line-by-line reference, the split, the shuffle, ranks, resumes and one-line errors."""

from __future__ import annotations

import gzip
import math
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from recship.base.errors import InvalidInput, NotFound
from recship.bundle.transforms import FeatureTransform, fnv1a_64
from recship.trainer.data import criteo
from recship.trainer.data.criteo import (
    NUM_DENSE,
    NUM_SPARSE,
    SPARSE_FEATURES,
    CriteoSource,
    count_examples,
    criteo_batches,
    criteo_schema,
    criteo_transforms,
    dense_rows,
    hash_columns,
    hashed_ids,
)

_MASK64 = (1 << 64) - 1


def _line(rng: np.random.Generator, missing: float = 0.2, first: int | None = None) -> str:
    label = str(int(rng.random() < 0.3))
    dense = [
        "" if rng.random() < missing else str(int(rng.integers(-2, 1000))) for _ in range(NUM_DENSE)
    ]
    if first is not None:
        dense[0] = str(first)  # a row key: the example's number
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
    """500 lines; int_0 of line n is n - 1, so a batch row names its line."""
    rng = np.random.default_rng(0)
    return _write(tmp_path / "day.tsv", [_line(rng, first=n) for n in range(500)])


def _rows(batches) -> list[int]:
    """The line index (int_0) of every row of the batches, in order."""
    return [round(math.expm1(v)) for b in batches for v in b.dense_features[:, 0].tolist()]


def _reference(line: str, table_size: int) -> tuple[float, list[float], list[int]]:
    """One line as the spec says, value by value: label, log1p(max(x, 0)) (0 when missing),
    fnv1a_64(column index, text) mod table_size (missing: the empty text)."""
    fields = line.split("\t")
    dense = [math.log1p(max(int(t), 0)) if t else 0.0 for t in fields[1 : 1 + NUM_DENSE]]
    ids = [
        int(fnv1a_64(pa.array([text]), i)[0]) % table_size
        for i, text in enumerate(fields[1 + NUM_DENSE :])
    ]
    return float(fields[0]), dense, ids


def _old_is_eval(line_number: int, seed: int, eval_fraction: float) -> bool:
    """The reader's split before pyarrow (Python ints): kept so the split does not move."""
    z = ((seed & _MASK64) * 0x9E3779B97F4A7C15 + line_number) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return z < eval_fraction * 2.0**64


def test_schema_is_the_built_in_spec() -> None:
    schema = criteo_schema(1000)
    assert [f.name for f in schema.sparse] == list(SPARSE_FEATURES)
    assert all(f.cardinality == 1000 and f.side == "user" for f in schema.sparse)
    assert len(schema.dense) == NUM_DENSE
    assert schema.user_id_feature is None and schema.item_id_feature is None
    transforms = criteo_transforms(1000).features
    assert transforms["cat_3"].kind == "hashed" and transforms["cat_3"].seed == 3
    assert (transforms["int_0"].clip_min, transforms["int_0"].log1p) == (0, True)
    with pytest.raises(InvalidInput, match="table size must be >= 2"):
        criteo_schema(1)


def test_features_match_a_line_by_line_reference(criteo_file: Path) -> None:
    lines = criteo_file.read_text().splitlines()
    batches = list(criteo_batches(criteo_file, 100, table_size=997))
    labels = torch.cat([b.labels for b in batches]).tolist()
    dense = torch.cat([b.dense_features for b in batches]).numpy()
    ids = np.concatenate(
        [b.sparse_features.values().numpy().reshape(NUM_SPARSE, -1).T for b in batches]
    )  # KJT values are feature-major
    for row, line in enumerate(lines):
        label, row_dense, row_ids = _reference(line, 997)
        assert labels[row] == label
        np.testing.assert_allclose(dense[row], row_dense, rtol=1e-6, atol=0)
        assert ids[row].tolist() == row_ids, row


def test_one_line_by_hand(tmp_path: Path) -> None:
    line = "\t".join(["1", "5", "", "-3", *["0"] * 10, "ff", "", *["1a2b3c4d"] * 24])
    batch = next(criteo_batches(_write(tmp_path / "one.tsv", [line]), 1, table_size=101))
    assert batch.labels.tolist() == [1.0]
    assert batch.dense_features[0, :3].tolist() == pytest.approx([math.log(6), 0.0, 0.0])
    kjt = batch.sparse_features
    assert kjt.keys() == list(SPARSE_FEATURES) and kjt.stride() == 1
    assert kjt.lengths().tolist() == [1] * NUM_SPARSE
    values = kjt.values().tolist()
    assert values[0] == int(fnv1a_64(pa.array(["ff"]), 0)[0]) % 101
    assert values[1] == int(fnv1a_64(pa.array([""]), 1)[0]) % 101  # missing: the empty text
    assert values[2] == int(fnv1a_64(pa.array(["1a2b3c4d"]), 2)[0]) % 101


@pytest.mark.parametrize(
    "values",
    [
        ["0a1b2c3d", "ffffffff", "00000000"],  # one width: a plain reshape
        ["0a1b2c3d", "", "ffffffff", ""],  # Criteo: 8 hex digits or missing
        ["a", "", "bcd", "ééé", "x" * 40, "bcd", "7"],  # any text
        ["0a1b2c3d", None, "ffffffff", None],  # missing: the empty text
        ["a", None, "bcd"],
        [None, None],
        [],
    ],
)
def test_fast_hash_equals_the_transform(values: list[str | None]) -> None:
    transform = FeatureTransform("f", "user", "hashed", cardinality=1009, seed=7, buckets=1009)
    array = pa.array(values, pa.string())
    expected = transform.encode_ids(pa.array([v or "" for v in values], pa.string()), derived=True)[
        0
    ]
    np.testing.assert_array_equal(hashed_ids(transform, array), expected)
    sliced = pa.array(["zz", *values], pa.string()).slice(1)  # a non-zero array offset
    np.testing.assert_array_equal(hashed_ids(transform, sliced), expected)
    other = FeatureTransform("g", "user", "hashed", cardinality=31, seed=2, buckets=31)
    both = hash_columns([transform, other], [array, array])
    np.testing.assert_array_equal(both[1], other.encode_ids(pa.array([v or "" for v in values]))[0])


@pytest.mark.parametrize("missing", [0.0, 0.2, 1.0])
def test_fast_hash_of_criteo_columns_equals_the_reference_hash(missing: float) -> None:
    # 8-byte values are hashed as little-endian words (shift and mask): every byte value, at
    # every position, against the bundle's fnv1a_64 one value at a time.
    rng = np.random.default_rng(3)
    values = [
        None if rng.random() < missing else bytes(rng.integers(0, 256, 8).tolist()).hex()[:8]
        for _ in range(300)
    ] + ["éééé", "\x00" * 8, "\x7f" * 8]  # 8 UTF-8 bytes with the top bit set; zero bytes
    values += ["".join(chr(b) for b in rng.integers(32, 127, 8).tolist()) for _ in range(50)]
    for seed, buckets in ((0, 2), (25, 100_000), (7, (1 << 63) + 5)):
        transform = FeatureTransform(
            "f", "user", "hashed", cardinality=buckets, seed=seed, buckets=buckets
        )
        expected = [int(fnv1a_64(pa.array([v or ""]), seed)[0]) % buckets for v in values]
        np.testing.assert_array_equal(
            hashed_ids(transform, pa.array(values, pa.string())).view(np.uint64), expected
        )
        sliced = pa.array(["abc", *values], pa.string()).slice(1)  # words not 8-byte aligned
        np.testing.assert_array_equal(hashed_ids(transform, sliced).view(np.uint64), expected)


@pytest.mark.parametrize("offset", [0, 3])
def test_dense_rows_equal_the_transform(offset: int) -> None:
    rng = np.random.default_rng(4)
    ints = [None if rng.random() < 0.3 else int(v) for v in rng.integers(-5, 10**6, 200)]
    floats = [None if v is None else v / 7 for v in ints]
    columns = [pa.array([0] * offset + ints, pa.int64()).slice(offset),
               pa.array(ints, pa.int32()), pa.array(floats, pa.float64()),
               pa.array(ints, pa.int64())]  # fmt: skip
    transforms = [
        criteo_transforms(10).features["int_0"],  # Criteo's: log1p(max(x, 0)), default 0
        FeatureTransform("b", "user", "dense", clip_min=-1.0, clip_max=50.0, default=2),
        FeatureTransform("c", "user", "dense", log1p=True, mean=1.5, std=2.0, default=0.5),
        FeatureTransform("d", "user", "dense", default=-3),
    ]
    expected = [
        t.encode_dense(pa.compute.fill_null(c, t.default), derived=True)
        for t, c in zip(transforms, columns, strict=True)
    ]
    encoded = dense_rows(transforms, columns)
    assert encoded.dtype == np.float32 and encoded.shape == (4, 200)
    for row, want in zip(encoded, expected, strict=True):
        np.testing.assert_array_equal(row.view(np.uint32), want.view(np.uint32))  # bit for bit
    same = dense_rows([transforms[0]] * 3, [columns[0], columns[3], columns[0]])
    np.testing.assert_array_equal(same.view(np.uint32), np.stack([expected[0]] * 3).view(np.uint32))


def test_fast_hash_of_nulls_that_hold_bytes_and_of_a_default() -> None:
    # Arrow lets a null slot span bytes; it still hashes as missing, not as those bytes.
    validity = pa.py_buffer(bytes([0b10]))
    offsets = pa.py_buffer(np.array([0, 3, 6], dtype=np.int32).tobytes())
    array = pa.Array.from_buffers(pa.string(), 2, [validity, offsets, pa.py_buffer(b"abcdef")])
    transform = FeatureTransform("f", "user", "hashed", cardinality=97, seed=1, buckets=97)
    expected = transform.encode_ids(pa.array(["", "def"]))[0]
    np.testing.assert_array_equal(hashed_ids(transform, array), expected)
    defaulted = FeatureTransform("f", "user", "hashed", cardinality=97, buckets=97, default="?")
    values = pa.array(["ab", None])
    np.testing.assert_array_equal(
        hashed_ids(defaulted, values), defaulted.encode_ids(pa.array(["ab", "?"]))[0]
    )


def test_batches_are_in_file_order_with_valid_ids(criteo_file: Path) -> None:
    batches = list(criteo_batches(criteo_file, 64, table_size=50))
    assert len(batches) == 500 // 64
    assert _rows(batches) == list(range(len(batches) * 64))
    expected = [float(line.split("\t")[0]) for line in criteo_file.read_text().splitlines()]
    labels = torch.cat([b.labels for b in batches]).tolist()
    assert labels == expected[: len(labels)]
    for b in batches:
        values = b.sparse_features.values()
        assert int(values.min()) >= 0 and int(values.max()) < 50
        assert b.dense_features.dtype == torch.float32 and bool((b.dense_features >= 0).all())
        assert b.sparse_features.to_dict()["cat_1"].values().numel() == 64


def test_eval_split_is_seeded_disjoint_complete_and_unchanged(criteo_file: Path) -> None:
    def rows(split: str, seed: int) -> list[int]:
        return _rows(
            criteo_batches(
                criteo_file, 1, eval_fraction=0.2, seed=seed, split=split, drop_last=False
            )
        )

    train, held_out = rows("train", 3), rows("eval", 3)
    assert not set(train) & set(held_out)
    assert sorted(train + held_out) == list(range(500))
    assert 60 < len(held_out) < 140
    # The line-number hash of the line-by-line reader it replaced: the split did not move.
    assert held_out == [n for n in range(500) if _old_is_eval(n + 1, 3, 0.2)]
    assert rows("eval", 3) == held_out and rows("eval", 4) != held_out
    assert count_examples(criteo_file, eval_fraction=0.2, seed=3, split="eval") == len(held_out)
    assert count_examples(criteo_file, eval_fraction=0.0, seed=3, split="eval") == 0


def test_blank_lines_are_skipped_and_do_not_count(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    lines = [_line(rng, first=n) for n in range(6)]
    path = _write(tmp_path / "gaps.tsv", [lines[0], "", lines[1], lines[2], "", "", *lines[3:]])
    assert _rows(criteo_batches(path, 1)) == list(range(6))
    held = _rows(criteo_batches(path, 1, eval_fraction=0.5, seed=1, split="eval"))
    assert held == [n for n in range(6) if _old_is_eval(n + 1, 1, 0.5)]  # numbered w/o blanks


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("epoch", [None, 1])
def test_ranks_get_disjoint_equal_blocks(
    criteo_file: Path, world_size: int, epoch: int | None
) -> None:
    shares = [
        list(
            criteo_batches(
                criteo_file, 16, rank=r, world_size=world_size, epoch=epoch, shuffle_buffer=100
            )
        )
        for r in range(world_size)
    ]
    assert {len(s) for s in shares} == {500 // (16 * world_size)}
    # Step s of rank r is the r-th block of the s-th batch_size * world_size examples.
    order = _rows(criteo_batches(criteo_file, 1, epoch=epoch, shuffle_buffer=100))
    for r, share in enumerate(shares):
        for step, batch in enumerate(share):
            begin = (step * world_size + r) * 16
            assert _rows([batch]) == order[begin : begin + 16]


def test_shuffle_changes_the_order_per_epoch_not_the_multiset(criteo_file: Path) -> None:
    def order(epoch: int | None, buffer: int = 64, seed: int = 0) -> list[int]:
        return _rows(
            criteo_batches(
                criteo_file, 10, epoch=epoch, shuffle_buffer=buffer, seed=seed, drop_last=False
            )
        )

    plain = order(None)
    assert plain == list(range(500))
    epochs = [order(e) for e in range(3)]
    for shuffled in epochs:
        assert shuffled != plain and sorted(shuffled) == plain
    assert epochs[0] != epochs[1] != epochs[2]
    assert order(1) == epochs[1]  # seeded by (seed, epoch)
    assert order(1, seed=5) != epochs[1]
    assert order(1, buffer=1) == plain  # a buffer of one example keeps the file order
    # A buffer bounds how far an example moves: never more than two windows.
    assert max(abs(i - n) for i, n in enumerate(epochs[0])) < 2 * 64
    assert max(abs(i - n) for i, n in enumerate(order(0, buffer=1000))) > 128


def test_a_resume_sees_the_rest_of_the_epoch_under_any_world_size(criteo_file: Path) -> None:
    order = _rows(criteo_batches(criteo_file, 1, epoch=2, shuffle_buffer=50))
    # Two steps of 2 ranks x 32 were consumed; one rank of 64 takes the rest of the epoch.
    resumed = _rows(criteo_batches(criteo_file, 64, epoch=2, shuffle_buffer=50, start_batch=2))
    assert resumed == order[128 : 128 + 64 * ((500 - 128) // 64)]


def test_closing_the_stream_stops_its_reader_thread(
    criteo_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def readers() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "criteo-reader"]

    monkeypatch.setattr(criteo, "_BLOCK_BYTES", 4096)  # many blocks: the reader stays ahead
    batches = criteo_batches(criteo_file, 8)
    next(batches)
    assert readers()
    batches.close()  # what dropping a half-read stream does
    assert not readers()


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
    assert len(list(source.batches(5, epoch=0))) == 2


def test_scan_counts_examples_and_positives(criteo_file: Path) -> None:
    lines = criteo_file.read_text().splitlines()
    positives = sum(line.startswith("1\t") for line in lines)
    assert CriteoSource(criteo_file).scan() == (500, positives)
    empty = criteo_file.with_name("empty.tsv")
    empty.write_text("")
    assert CriteoSource(empty).scan() == (0, 0)
    assert list(criteo_batches(empty, 4, drop_last=False)) == []


def _error(path: Path, **options) -> str:
    with pytest.raises((InvalidInput, NotFound)) as caught:
        list(criteo_batches(path, 2, **options))
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_malformed_lines_name_file_line_and_problem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(2)
    good = [_line(rng) for _ in range(3)]
    path = tmp_path / "bad.tsv"
    _write(path, [*good, "1\t2\t3"])
    assert _error(path) == (
        f"{path}:4: expected 40 tab-separated columns (label, 13 integer, 26 categorical), got 3"
    )
    fields = good[0].split("\t")
    _write(path, [good[0], "", good[1], "\t".join(["2", *fields[1:]])])  # after a blank line
    assert _error(path) == f"{path}:4: label '2' is not 0 or 1"
    _write(path, [good[0], "\t".join(["", *fields[1:]])])
    assert _error(path) == f"{path}:2: label '' is not 0 or 1"
    _write(path, [*good[:2], "\t".join(["yes", *fields[1:]])])
    assert _error(path) == f"{path}:3: label 'yes' is not 0 or 1"
    _write(path, ["\t".join([fields[0], "1.5", *fields[2:]])])
    assert _error(path) == f"{path}:1: integer column 1 value '1.5' is not an integer"
    assert _error(tmp_path / "absent.tsv") == f"{tmp_path / 'absent.tsv'}: Criteo file not found"
    # Far into a file: the line is still found, also when every rank skips its rows there.
    monkeypatch.setattr(criteo, "_BLOCK_BYTES", 4096)
    many = [_line(rng) for _ in range(300)]
    many[250] = "\t".join([fields[0], "x7", *fields[2:]])
    _write(path, many)
    assert (
        _error(path, start_batch=140)
        == f"{path}:251: integer column 1 value 'x7' is not an integer"
    )
    with pytest.raises(InvalidInput, match=r"bad\.tsv:251: integer column 1"):
        CriteoSource(path).scan()


def test_any_text_is_a_category(tmp_path: Path) -> None:
    """Categories are hashed as text (not parsed as hexadecimal): nothing to refuse."""
    rng = np.random.default_rng(3)
    fields = _line(rng, missing=0.0).split("\t")
    path = _write(tmp_path / "text.tsv", ["\t".join([*fields[:14], "not hex é", *fields[15:]])])
    ids = next(criteo_batches(path, 1, table_size=1000)).sparse_features.values().tolist()
    assert ids[0] == int(fnv1a_64(pa.array(["not hex é"]), 0)[0]) % 1000


def test_bad_arguments_fail_at_call_time(criteo_file: Path) -> None:
    with pytest.raises(InvalidInput, match="rank must be in"):
        criteo_batches(criteo_file, 8, rank=3, world_size=2)
    with pytest.raises(InvalidInput, match="eval fraction must be in"):
        criteo_batches(criteo_file, 8, eval_fraction=1.5)
    with pytest.raises(InvalidInput, match="split must be 'train' or 'eval'"):
        criteo_batches(criteo_file, 8, split="test")  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="epoch must be >= 0"):
        criteo_batches(criteo_file, 8, epoch=-1)
    with pytest.raises(InvalidInput, match="shuffle buffer must be >= 1"):
        CriteoSource(criteo_file, shuffle_buffer=0)


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
    # A tail holding a whole batch for one rank is still the tail: never an extra step.
    shares = [len(list(criteo_batches(criteo_file, 100, rank=r, world_size=2))) for r in range(2)]
    assert shares == [2, 2]
