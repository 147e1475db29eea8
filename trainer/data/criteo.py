"""Criteo-format TSV files (click logs), streamed into DLRM batches.

Each line is `label \\t 13 integer columns \\t 26 hexadecimal categorical columns`; any column
but the label may be empty (missing). The file is read line by line, never held in memory:

- label: "0" or "1";
- dense: log(1 + max(x, 0)) of each integer, 0 when missing;
- sparse: each categorical value is hashed into its table: id 1 + (int(hex) mod (table_size - 1)),
  with id 0 reserved for missing values, so every row has exactly one id per feature;
- eval split: a line is held out when a seeded 64-bit hash of its line number falls below
  eval_fraction, so train and eval are disjoint and stable without reading the file twice;
- ranks: global step s takes the next batch_size * world_size examples of the split, rank r
  gets the r-th block of batch_size; an incomplete last step is dropped (or, with
  drop_last=False, yielded as whatever part of it each rank got, possibly empty), so every rank
  yields the same number of batches. Every rank parses every line of the split, so a malformed line
  fails on all ranks at once (none is left waiting in a collective).

Criteo has no user/item structure: all features are query-side ("user") and the schema has no
id features; it is for DLRM only.

Example::

    for batch in criteo_batches(Path("day_0.tsv"), 512, rank=0, world_size=2,
                                table_size=100_000, eval_fraction=0.1, seed=0, split="train"):
        logits = dlrm(batch.dense_features, batch.sparse_features)
"""

from __future__ import annotations

import gzip
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

import numpy as np
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recship.base.errors import InvalidInput, NotFound
from recship.trainer.data.batches import num_batches
from recship.trainer.data.schema import DatasetSchema, DenseFeatureSpec, SparseFeatureSpec

NUM_DENSE = 13
NUM_SPARSE = 26
NUM_COLUMNS = 1 + NUM_DENSE + NUM_SPARSE
DENSE_FEATURES: tuple[str, ...] = tuple(f"int_{i}" for i in range(NUM_DENSE))
SPARSE_FEATURES: tuple[str, ...] = tuple(f"cat_{i}" for i in range(NUM_SPARSE))
DEFAULT_TABLE_SIZE = 100_000
Split = Literal["train", "eval"]
_MASK64 = (1 << 64) - 1


def criteo_schema(table_size: int = DEFAULT_TABLE_SIZE) -> DatasetSchema:
    """The Criteo schema: 13 dense features and 26 sparse features of `table_size` ids each.

    Raises:
        InvalidInput: if table_size < 2 (id 0 is reserved for missing values).
    """
    _check_table_size(table_size)
    return DatasetSchema(
        name="criteo",
        sparse=tuple(
            SparseFeatureSpec(
                name,
                table_size,
                "user",
                description=f"hashed categorical column {i + 1}, 0 = missing",
            )
            for i, name in enumerate(SPARSE_FEATURES)
        ),
        dense=tuple(
            DenseFeatureSpec(name, "user", description=f"log(1 + max(integer column {i + 1}, 0))")
            for i, name in enumerate(DENSE_FEATURES)
        ),
        user_id_feature=None,
        item_id_feature=None,
    )


@dataclass(frozen=True)
class CriteoSource:
    """A Criteo TSV file (optionally .gz) and the table size its categories are hashed into.

    Attributes:
        path: The file.
        table_size: Rows of every embedding table (>= 2).
    """

    path: Path
    table_size: int = DEFAULT_TABLE_SIZE

    def __post_init__(self) -> None:
        _check_table_size(self.table_size)

    @property
    def schema(self) -> DatasetSchema:
        """The schema of this source's batches."""
        return criteo_schema(self.table_size)

    def num_examples(self, *, eval_fraction: float, seed: int, split: Split) -> int:
        """Number of examples of `split` (reads the file once, without parsing the columns)."""
        return count_examples(self.path, eval_fraction=eval_fraction, seed=seed, split=split)

    def scan(self) -> tuple[int, int]:
        """(examples, positives) of the whole file, parsing and so validating every line.

        Raises:
            NotFound: if the file does not exist.
            InvalidInput: on the first malformed line.
        """
        examples = positives = 0
        with _open(self.path) as lines:
            for number, line in enumerate(lines, start=1):
                if line.strip():
                    label, _, _ = _parse(self.path, number, line, self.table_size)
                    examples += 1
                    positives += int(label)
        return examples, positives

    def batches(
        self,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        eval_fraction: float = 0.0,
        seed: int = 0,
        split: Split = "train",
        start_batch: int = 0,
        drop_last: bool = True,
    ) -> Iterator[Batch]:
        """This rank's batches of `split`; see `criteo_batches`."""
        return criteo_batches(
            self.path,
            batch_size,
            rank=rank,
            world_size=world_size,
            table_size=self.table_size,
            eval_fraction=eval_fraction,
            seed=seed,
            split=split,
            start_batch=start_batch,
            drop_last=drop_last,
        )


def count_examples(path: Path, *, eval_fraction: float, seed: int, split: Split) -> int:
    """Number of non-blank lines of `path` in `split` (no column is parsed).

    Raises:
        NotFound: if the file does not exist.
        InvalidInput: on a bad eval_fraction or split.
    """
    _check_split(eval_fraction, split)
    want_eval = split == "eval"
    with _open(path) as lines:
        return sum(
            1
            for number, line in enumerate(lines, start=1)
            if line.strip() and _is_eval(number, seed, eval_fraction) == want_eval
        )


def criteo_batches(
    path: Path,
    batch_size: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    table_size: int = DEFAULT_TABLE_SIZE,
    eval_fraction: float = 0.0,
    seed: int = 0,
    split: Split = "train",
    start_batch: int = 0,
    drop_last: bool = True,
) -> Iterator[Batch]:
    """Stream this rank's DLRM batches of one split of a Criteo TSV file.

    Args:
        path: The TSV file (gzip-compressed if its name ends in .gz).
        batch_size: Examples per rank per step.
        rank: This rank, 0 <= rank < world_size.
        world_size: Number of ranks.
        table_size: Rows of each embedding table; ids are in [0, table_size).
        eval_fraction: Share of lines held out for evaluation, 0 <= f < 1.
        seed: Seed of the line-number hash that picks the held-out lines.
        split: "train" or "eval".
        start_batch: Number of this split's batches to skip (already consumed before a resume).
        drop_last: Drop the examples that do not fill a whole global step. With False, one more
            batch holds this rank's part of them (all of them when world_size is 1; possibly an
            empty batch on some ranks), so that evaluation sees every example.

    Yields:
        Batch(dense_features float32 [B, 13], sparse_features KJT with the 26 features, one
        id each, labels float32 [B]) in file order.

    Raises:
        NotFound: if the file does not exist (when the first batch is asked for).
        InvalidInput: on bad arguments (at once) or a malformed line (naming file, line and
            problem, when that line is reached).
    """
    _check_table_size(table_size)
    _check_split(eval_fraction, split)
    num_batches(0, batch_size, world_size)  # validates batch_size and world_size
    if not 0 <= rank < world_size:
        raise InvalidInput(f"rank must be in [0, {world_size}), got {rank}")
    if start_batch < 0:
        raise InvalidInput(f"start batch must be >= 0, got {start_batch}")
    return _stream(
        Path(path),
        batch_size,
        rank,
        world_size,
        table_size,
        eval_fraction,
        seed,
        split,
        start_batch,
        drop_last,
    )


def _stream(
    path: Path,
    batch_size: int,
    rank: int,
    world_size: int,
    table_size: int,
    eval_fraction: float,
    seed: int,
    split: Split,
    start_batch: int,
    drop_last: bool,
) -> Iterator[Batch]:
    step_size = batch_size * world_size
    mine = range(rank * batch_size, (rank + 1) * batch_size)
    want_eval = split == "eval"
    position = 0  # index of the example within the split
    labels: list[float] = []
    dense: list[list[float]] = []
    sparse: list[list[int]] = []
    with _open(path) as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip() or _is_eval(number, seed, eval_fraction) != want_eval:
                continue
            step, slot = divmod(position, step_size)
            position += 1
            if step < start_batch:
                continue
            label, row_dense, row_sparse = _parse(path, number, line, table_size)
            if slot in mine:
                labels.append(label)
                dense.append(row_dense)
                sparse.append(row_sparse)
            if slot == step_size - 1:
                yield _batch(labels, dense, sparse)
                labels, dense, sparse = [], [], []
    if not drop_last and position % step_size and position // step_size >= start_batch:
        yield _batch(labels, dense, sparse)


def _batch(labels: list[float], dense: list[list[float]], sparse: list[list[int]]) -> Batch:
    size = len(labels)
    # KJT layout is feature-major: all rows of cat_0, then all rows of cat_1, ...
    values = np.asarray(sparse, dtype=np.int64).reshape(size, NUM_SPARSE).T.reshape(-1)
    return Batch(
        dense_features=torch.tensor(dense, dtype=torch.float32).reshape(size, NUM_DENSE),
        sparse_features=KeyedJaggedTensor(
            keys=list(SPARSE_FEATURES),
            values=torch.from_numpy(np.ascontiguousarray(values)),
            lengths=torch.ones(size * NUM_SPARSE, dtype=torch.int32),
            stride=size,
        ),
        labels=torch.tensor(labels, dtype=torch.float32),
    )


def _parse(
    path: Path, number: int, line: str, table_size: int
) -> tuple[float, list[float], list[int]]:
    """(label, 13 transformed dense values, 26 hashed ids) of one line."""
    fields = line.rstrip("\r\n").split("\t")
    if len(fields) != NUM_COLUMNS:
        raise InvalidInput(
            f"{path}:{number}: expected {NUM_COLUMNS} tab-separated columns "
            f"(label, {NUM_DENSE} integer, {NUM_SPARSE} categorical), got {len(fields)}"
        )
    label_text = fields[0].strip()
    if label_text not in ("0", "1"):
        raise InvalidInput(f"{path}:{number}: label {label_text!r} is not 0 or 1")
    dense = []
    for i, text in enumerate(fields[1 : 1 + NUM_DENSE]):
        if not text.strip():
            dense.append(0.0)
            continue
        try:
            value = int(text)
        except ValueError:
            raise InvalidInput(
                f"{path}:{number}: integer column {i + 1} value {text!r} is not an integer"
            ) from None
        dense.append(math.log1p(max(value, 0)))
    ids = []
    for i, text in enumerate(fields[1 + NUM_DENSE :]):
        if not text.strip():
            ids.append(0)
            continue
        try:
            value = int(text, 16)
        except ValueError:
            raise InvalidInput(
                f"{path}:{number}: categorical column {i + 1} value {text!r} is not hexadecimal"
            ) from None
        ids.append(1 + value % (table_size - 1))
    return float(label_text), dense, ids


def _is_eval(line_number: int, seed: int, eval_fraction: float) -> bool:
    """Whether a line is held out: splitmix64(seed, line number) / 2**64 < eval_fraction."""
    if eval_fraction <= 0.0:
        return False
    z = ((seed & _MASK64) * 0x9E3779B97F4A7C15 + line_number) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return z < eval_fraction * 2.0**64


def _open(path: Path) -> IO[str]:
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"{path}: Criteo file not found")
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", errors="replace", newline="")
    return open(path, encoding="utf-8", errors="replace", newline="")


def _check_table_size(table_size: int) -> None:
    if table_size < 2:
        raise InvalidInput(
            f"Criteo table size must be >= 2 (id 0 is for missing values), got {table_size}"
        )


def _check_split(eval_fraction: float, split: str) -> None:
    if not 0.0 <= eval_fraction < 1.0:
        raise InvalidInput(f"eval fraction must be in [0, 1), got {eval_fraction}")
    if split not in ("train", "eval"):
        raise InvalidInput(f"split must be 'train' or 'eval', got {split!r}")
