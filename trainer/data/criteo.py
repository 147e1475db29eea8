"""Criteo-format TSV files (click logs): the built-in Criteo spec, streamed into DLRM batches.

Each line is `label \\t 13 integer columns \\t 26 categorical columns`; any column but the label
may be empty (missing). The file is streamed, never held in memory: pyarrow's CSV reader
parses it in record batches of a few MiB (in C++, no Python per line; .gz files are
decompressed on the fly), and every batch is encoded at once, vectorised, by the feature
transforms of the built-in spec `specs/criteo.toml`, the mechanism any team's spec uses:

- label: 0 or 1;
- dense: log1p(max(x, 0)) of each integer, 0 when missing;
- sparse: fnv1a_64(seed = column index, text) mod table_size (the portable hash of
  `bundle/transforms.py`); a missing value hashes like the empty text, so it has an id of its
  own kind but no reserved one (it may share a bucket with real values);
- eval split: an example is held out when splitmix64(seed, n) / 2**64 < eval_fraction, where n
  is its 1-based number among the file's non-empty lines (its line number when the file has no
  blank lines), so train and eval are disjoint and stable without reading the file twice;
- shuffle: given an `epoch`, the split passes through a shuffle buffer of `shuffle_buffer`
  examples: consecutive windows of that many examples, each permuted, the first window's size
  drawn per epoch so that boundaries move, all seeded by (seed, epoch); so the order changes
  every epoch, the multiset never does, and every rank computes the same order. Without an
  epoch: file order;
- ranks: global step s takes the next batch_size * world_size examples of the (shuffled)
  split, rank r gets the r-th block of batch_size; an incomplete last step is dropped (or,
  with drop_last=False, yielded as whatever part of it each rank got, possibly empty), so
  every rank yields the same number of batches. Every rank parses every line of the split, so
  a malformed line fails on all ranks at once (none is left waiting in a collective); only its
  own rows are encoded.

Criteo has no user/item structure: all features are query-side ("user") and the schema has no
id features; it is for DLRM only.

Example::

    for batch in criteo_batches(Path("day_0.tsv"), 512, rank=0, world_size=2,
                                table_size=100_000, eval_fraction=0.1, seed=0, split="train",
                                epoch=3):
        logits = dlrm(batch.dense_features, batch.sparse_features)
"""

from __future__ import annotations

import functools
import gzip
import re
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from queue import Full, Queue
from typing import IO, Any, Literal, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recship.base.errors import InvalidInput, NotFound
from recship.bundle.transforms import FeatureTransform, Transforms, as_text, fnv1a_64
from recship.trainer.data.batches import num_batches
from recship.trainer.data.builtin import criteo_spec
from recship.trainer.data.schema import DatasetSchema, DenseFeatureSpec, SparseFeatureSpec
from recship.trainer.data.spec import DataSpec
from recship.trainer.data.tables import fit_transform, raw_values

NUM_DENSE = 13
NUM_SPARSE = 26
NUM_COLUMNS = 1 + NUM_DENSE + NUM_SPARSE
LABEL = "label"
DENSE_FEATURES: tuple[str, ...] = tuple(f"int_{i}" for i in range(NUM_DENSE))
SPARSE_FEATURES: tuple[str, ...] = tuple(f"cat_{i}" for i in range(NUM_SPARSE))
DEFAULT_TABLE_SIZE = 100_000
#: Examples a training epoch's shuffle permutes together (about 30 MiB of raw Arrow rows).
DEFAULT_SHUFFLE_BUFFER = 1 << 16
Split = Literal["train", "eval"]
#: Bytes of the file pyarrow parses per record batch (about 17k Criteo lines).
_BLOCK_BYTES = 1 << 22
_MASK64 = (1 << 64) - 1
_FNV_PRIME = np.uint64(0x100000001B3)
_BYTE_SHIFTS = tuple(np.uint64(8 * j) for j in range(8))
_LOW_BYTE = np.uint64(0xFF)
_T = TypeVar("_T")


def criteo_schema(table_size: int = DEFAULT_TABLE_SIZE) -> DatasetSchema:
    """The Criteo schema: 13 dense features and 26 sparse features of `table_size` ids each,
    as the built-in spec declares them.

    Raises:
        InvalidInput: if table_size < 2.
    """
    _check_table_size(table_size)
    encoder = _encoder(table_size)
    return DatasetSchema(
        name=encoder.spec.name,
        sparse=tuple(
            SparseFeatureSpec(
                f.name,
                encoder.transforms.features[f.name].cardinality,
                "user",
                description=f.description,
            )
            for f in encoder.spec.features
            if f.kind != "dense"
        ),
        dense=tuple(
            DenseFeatureSpec(f.name, "user", description=f.description)
            for f in encoder.spec.features
            if f.kind == "dense"
        ),
        user_id_feature=None,
        item_id_feature=None,
    )


def criteo_transforms(table_size: int = DEFAULT_TABLE_SIZE) -> Transforms:
    """The transforms of the built-in spec (nothing is fitted: hashes and fixed dense rules),
    the ones a bundle of a Criteo model serves with.

    Raises:
        InvalidInput: if table_size < 2.
    """
    _check_table_size(table_size)
    return _encoder(table_size).transforms


@dataclass(frozen=True)
class CriteoSource:
    """A Criteo TSV file (optionally .gz) and how its examples are encoded and shuffled.

    Attributes:
        path: The file.
        table_size: Rows of every embedding table (hash buckets, >= 2).
        shuffle_buffer: Examples a training epoch's shuffle permutes together (>= 1; 1 keeps
            the file order).
    """

    path: Path
    table_size: int = DEFAULT_TABLE_SIZE
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER

    def __post_init__(self) -> None:
        _check_table_size(self.table_size)
        _check_shuffle_buffer(self.shuffle_buffer)

    @property
    def schema(self) -> DatasetSchema:
        """The schema of this source's batches."""
        return criteo_schema(self.table_size)

    @property
    def transforms(self) -> Transforms:
        """The feature transforms that encode this source's raw values."""
        return criteo_transforms(self.table_size)

    def num_examples(self, *, eval_fraction: float, seed: int, split: Split) -> int:
        """Number of examples of `split` (reads the file once, converting only the labels)."""
        return count_examples(self.path, eval_fraction=eval_fraction, seed=seed, split=split)

    def scan(self) -> tuple[int, int]:
        """(examples, positives) of the whole file, parsing and so validating every line.

        Raises:
            NotFound: if the file does not exist.
            InvalidInput: on the first malformed line.
        """
        examples = positives = 0
        for table in _split_tables(
            Path(self.path), _encoder(self.table_size).spec, 0.0, 0, "train"
        ):
            examples += len(table)
            positives += int(pc.sum(table.column(LABEL)).as_py() or 0)
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
        epoch: int | None = None,
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
            epoch=epoch,
            shuffle_buffer=self.shuffle_buffer,
        )


def count_examples(path: Path, *, eval_fraction: float, seed: int, split: Split) -> int:
    """Number of non-empty lines of `path` in `split` (only the label column is converted).

    Raises:
        NotFound: if the file does not exist.
        InvalidInput: on a bad eval_fraction or split, or a line pyarrow cannot split.
    """
    _check_split(eval_fraction, split)
    spec = _encoder(DEFAULT_TABLE_SIZE).spec
    want_eval = split == "eval"
    total = seen = 0
    for batch in _record_batches(Path(path), spec, columns=[LABEL]):
        numbers = np.arange(seen + 1, seen + 1 + batch.num_rows, dtype=np.uint64)
        seen += batch.num_rows
        total += int(np.count_nonzero(_is_eval(numbers, seed, eval_fraction) == want_eval))
    return total


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
    epoch: int | None = None,
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
) -> Iterator[Batch]:
    """Stream this rank's DLRM batches of one split of a Criteo TSV file.

    Args:
        path: The TSV file (gzip-compressed if its name ends in .gz).
        batch_size: Examples per rank per step.
        rank: This rank, 0 <= rank < world_size.
        world_size: Number of ranks.
        table_size: Rows of each embedding table; ids are in [0, table_size).
        eval_fraction: Share of lines held out for evaluation, 0 <= f < 1.
        seed: Seed of the line-number hash that picks the held-out lines, and of the shuffle.
        split: "train" or "eval".
        start_batch: Number of this split's batches to skip (already consumed before a resume;
            with the same epoch, the shuffle repeats, so the skipped ones are the consumed ones,
            whatever the world size was).
        drop_last: Drop the examples that do not fill a whole global step. With False, one more
            batch holds this rank's part of them (all of them when world_size is 1; possibly an
            empty batch on some ranks), so that evaluation sees every example.
        epoch: Shuffle the split with this epoch's seed (see the module docstring); None keeps
            the file order.
        shuffle_buffer: Examples the shuffle permutes together (>= 1).

    Yields:
        Batch(dense_features float32 [B, 13], sparse_features KJT with the 26 features, one
        id each, labels float32 [B]).

    Raises:
        NotFound: if the file does not exist (when the first batch is asked for).
        InvalidInput: on bad arguments (at once) or a malformed line (naming file, line and
            problem, when that line is reached).
    """
    _check_table_size(table_size)
    _check_split(eval_fraction, split)
    _check_shuffle_buffer(shuffle_buffer)
    num_batches(0, batch_size, world_size)  # validates batch_size and world_size
    if not 0 <= rank < world_size:
        raise InvalidInput(f"rank must be in [0, {world_size}), got {rank}")
    if start_batch < 0:
        raise InvalidInput(f"start batch must be >= 0, got {start_batch}")
    if epoch is not None and epoch < 0:
        raise InvalidInput(f"epoch must be >= 0, got {epoch}")
    return _stream(
        Path(path),
        _encoder(table_size),
        _Steps(batch_size, rank, world_size, start_batch),
        eval_fraction,
        seed,
        split,
        drop_last,
        None if epoch is None or shuffle_buffer == 1 else (epoch, shuffle_buffer),
    )


# -- the stream --------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Steps:
    """Which positions of the split's stream are this rank's: its block of every step."""

    batch_size: int
    rank: int
    world_size: int
    start_batch: int

    @property
    def step_size(self) -> int:
        return self.batch_size * self.world_size

    def mine(self, first: int, count: int) -> np.ndarray:
        """Offsets (0..count-1) of stream positions first.. that this rank encodes."""
        if self.world_size == 1 and first // self.step_size >= self.start_batch:
            return np.arange(count)  # one rank past the skipped steps: all of them
        positions = np.arange(first, first + count, dtype=np.int64)
        step, slot = np.divmod(positions, self.step_size)
        block = slot // self.batch_size
        return np.flatnonzero((block == self.rank) & (step >= self.start_batch))

    def complete(self, position: int) -> int:
        """Steps from start_batch on that are complete once `position` examples have passed."""
        return max(0, position // self.step_size - self.start_batch)


def _stream(
    path: Path,
    encoder: _Encoder,
    steps: _Steps,
    eval_fraction: float,
    seed: int,
    split: Split,
    drop_last: bool,
    shuffle: tuple[int, int] | None,
) -> Iterator[Batch]:
    tables = _prefetched(_split_tables(path, encoder.spec, eval_fraction, seed, split))
    windows = (
        _shuffled(tables, shuffle[1], seed, shuffle[0]) if shuffle else ((t, None) for t in tables)
    )
    pending = _Pending()
    position = yielded = 0
    for table, order in windows:
        rows = steps.mine(position, len(table))
        position += len(table)
        if order is not None:
            rows = order[rows]
        if rows.size == len(table) and order is None:
            pending.add(*encoder.encode(table))
        elif rows.size:
            pending.add(*encoder.encode(table.take(pa.array(rows))))
        while yielded < steps.complete(position):
            yield _batch(*pending.take(steps.batch_size))
            yielded += 1
    if (
        not drop_last
        and position % steps.step_size
        and position // steps.step_size >= steps.start_batch
    ):
        yield _batch(*pending.take(len(pending)))


def _split_tables(
    path: Path, spec: DataSpec, eval_fraction: float, seed: int, split: Split
) -> Iterator[pa.Table]:
    """The split's examples in file order, a table per record batch, labels checked."""
    want_eval = split == "eval"
    seen = 0  # examples (non-empty lines) before this batch
    for batch in _record_batches(path, spec):
        table = pa.Table.from_batches([batch])
        _check_labels(path, table.column(LABEL), seen)
        count = len(table)
        if eval_fraction > 0:
            numbers = np.arange(seen + 1, seen + 1 + count, dtype=np.uint64)
            keep = _is_eval(numbers, seed, eval_fraction) == want_eval
            table = table.filter(pa.array(keep)) if not keep.all() else table
        elif want_eval:
            table = table.slice(0, 0)
        seen += count
        if len(table):
            yield table


def _prefetched(items: Iterator[_T], depth: int = 2) -> Iterator[_T]:
    """`items`, advanced on a background thread up to `depth` items ahead.

    pyarrow parses without holding the GIL, so the next record batch is parsed while the
    caller encodes this one (numpy releases the GIL too). The thread is the only one that
    advances `items`; an exception there is raised here, in order; closing this iterator stops
    the thread (after the item it is on) and closes `items`.
    """
    queue: Queue[tuple[bool, Any]] = Queue(maxsize=depth)
    stop = threading.Event()

    def offer(entry: tuple[bool, Any]) -> bool:
        while not stop.is_set():
            try:
                queue.put(entry, timeout=0.1)
                return True
            except Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not offer((True, item)):
                    return
            offer((False, None))
        except BaseException as error:  # handed to the consumer, raised there
            offer((False, error))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=work, name="criteo-reader", daemon=True)
    thread.start()
    try:
        while True:
            more, value = queue.get()
            if not more:
                if value is not None:
                    raise value
                return
            yield value
    finally:
        stop.set()
        thread.join()


def _shuffled(
    tables: Iterator[pa.Table], size: int, seed: int, epoch: int
) -> Iterator[tuple[pa.Table, np.ndarray]]:
    """(window, order): consecutive windows of `size` examples and a permutation of each, the
    first window's size drawn from [1, size] so that the boundaries move every epoch."""
    rng = np.random.default_rng([seed & _MASK64, epoch, 0x5EED])
    wanted = int(rng.integers(1, size + 1))
    parts: list[pa.Table] = []
    have = 0
    for table in tables:
        while len(table):
            part = table.slice(0, wanted - have)
            table = table.slice(len(part))
            parts.append(part)
            have += len(part)
            if have == wanted:
                yield pa.concat_tables(parts), rng.permutation(have)
                parts, have, wanted = [], 0, size
    if have:
        yield pa.concat_tables(parts), rng.permutation(have)


class _Pending:
    """Encoded rows of this rank waiting for their batch: pieces appended in order, a batch
    taken from the front (copied once, when the batch is made).

    A piece is (labels float32 [n], dense float32 [13, n], ids int64 [26, n]): both matrices
    feature-major, as encoded, so a batch is column slices of the pieces.
    """

    def __init__(self) -> None:
        self.pieces: deque[tuple[np.ndarray, np.ndarray, np.ndarray]] = deque()
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def add(self, labels: np.ndarray, dense: np.ndarray, ids: np.ndarray) -> None:
        self.pieces.append((labels, dense, ids))
        self.size += len(labels)

    def take(self, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The first `count` rows (all of them when fewer), removed."""
        parts = []
        while count > 0 and self.pieces:
            labels, dense, ids = self.pieces[0]
            if len(labels) <= count:
                parts.append(self.pieces.popleft())
            else:
                parts.append((labels[:count], dense[:, :count], ids[:, :count]))
                self.pieces[0] = (labels[count:], dense[:, count:], ids[:, count:])
            count -= len(parts[-1][0])
            self.size -= len(parts[-1][0])
        if not parts:
            return (
                np.zeros(0, np.float32),
                np.zeros((NUM_DENSE, 0), np.float32),
                np.zeros((NUM_SPARSE, 0), np.int64),
            )
        return (
            np.concatenate([p[0] for p in parts]),
            np.concatenate([p[1] for p in parts], axis=1),
            np.concatenate([p[2] for p in parts], axis=1),
        )


def _batch(labels: np.ndarray, dense: np.ndarray, ids: np.ndarray) -> Batch:
    """The DLRM batch of B encoded rows: labels [B], dense [13, B] and ids [26, B]."""
    size = len(labels)
    # ids [26, B] are feature-major like a KJT's values: all rows of cat_0, then of cat_1, ...
    values = np.ascontiguousarray(ids).reshape(-1)  # concatenated already: no copy
    return Batch(
        # dense [13, B] -> [B, 13]: one small transposing copy per batch, in cache.
        dense_features=torch.from_numpy(np.ascontiguousarray(dense.T)).reshape(size, NUM_DENSE),
        sparse_features=KeyedJaggedTensor(
            keys=list(SPARSE_FEATURES),
            values=torch.from_numpy(values),
            lengths=torch.ones(size * NUM_SPARSE, dtype=torch.int32),
            stride=size,
        ),
        labels=torch.from_numpy(np.ascontiguousarray(labels)),
    )


# -- encoding ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Encoder:
    """The built-in spec's transforms, applied to a table of raw rows."""

    spec: DataSpec
    transforms: Transforms

    def encode(self, table: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(labels float32 [n], dense float32 [13, n], ids int64 [26, n]) of raw rows, both
        matrices feature-major."""
        where = str(self.spec.interactions.path)
        labels = table.column(LABEL).to_numpy().astype(np.float32)
        dense = dense_rows(
            [self.transforms.features[name] for name in DENSE_FEATURES],
            [self._raw(name, table, where) for name in DENSE_FEATURES],
        )
        ids = hash_columns(
            [self.transforms.features[name] for name in SPARSE_FEATURES],
            [self._raw(name, table, where) for name in SPARSE_FEATURES],
        )
        return labels, dense, ids

    def _raw(self, name: str, table: pa.Table, where: str) -> pa.Array:
        """The feature's raw values (`tables.raw_values`: its column after the spec's
        derivations); a plain column of one chunk is that chunk, not a copy."""
        column_name = self._plain_columns.get(name)
        if column_name is not None and table.schema.get_field_index(column_name) >= 0:
            column = table.column(column_name)
            dense_text = name in self._dense and pa.types.is_string(column.type)
            if column.num_chunks == 1 and not dense_text:
                return column.chunk(0)
        return raw_values(self.spec.feature(name), table, where)

    @functools.cached_property
    def _plain_columns(self) -> dict[str, str]:
        """Feature name -> its column, for the features that are their column as it is (no
        derivation): looked up once, not per record batch and feature."""
        return {
            f.name: f.column
            for f in self.spec.features
            if not (f.prefix is not None or f.pattern or f.separator or f.flags)
        }

    @functools.cached_property
    def _dense(self) -> frozenset[str]:
        return frozenset(f.name for f in self.spec.features if f.kind == "dense")


@functools.lru_cache(maxsize=8)
def _encoder(table_size: int) -> _Encoder:
    spec = criteo_spec(Path("criteo.tsv"), table_size)
    features = {f.name: fit_transform(f, pa.array([], pa.string())) for f in spec.features}
    return _Encoder(spec, Transforms(features, None, None))


def _fill_numbers(row: np.ndarray, values: pa.Array, default: float) -> None:
    """row (float64 [n]) = fill_null(values, default) as float64 (what `encode_dense` casts
    them to). An int64 column (Criteo's) is read from its Arrow buffers in place, its nulls
    then set from the validity bitmap: no filled copy of the column."""
    if not pa.types.is_int64(values.type):
        filled = pc.fill_null(values, default) if values.null_count else values
        row[:] = filled.to_numpy(zero_copy_only=False)
        return
    count, offset = len(values), values.offset
    validity, data = values.buffers()
    row[:] = np.frombuffer(data, dtype=np.int64, count=count, offset=offset * 8)
    if values.null_count:
        bits = np.unpackbits(
            np.frombuffer(validity, dtype=np.uint8), count=offset + count, bitorder="little"
        )
        np.putmask(row, ~bits[offset:].view(bool), float(default))


def dense_rows(transforms: list[FeatureTransform], columns: list[pa.Array]) -> np.ndarray:
    """`transform.encode_dense(fill_null(values, transform.default), derived=True)` of several
    dense features of the same rows: float32 [len(columns), n], feature-major.

    The same steps as `FeatureTransform.encode_dense` (float64, clip, log1p, standardise, then
    float32; tested against it), taken at once over all the features that share their
    parameters (Criteo's 13 do): a few numpy passes over one matrix rather than a dozen Arrow
    and numpy calls per feature. A feature that is not numbers with a numeric default goes
    through `encode_dense` itself (which refuses what it must).
    """
    count = len(columns[0]) if columns else 0
    encoded = np.empty((len(columns), count), dtype=np.float32)
    numbers = np.empty((len(columns), count), dtype=np.float64)
    groups: dict[tuple[Any, ...], list[int]] = {}
    for index, (transform, values) in enumerate(zip(transforms, columns, strict=True)):
        default = transform.default
        numeric = pa.types.is_integer(values.type) or pa.types.is_floating(values.type)
        if numeric and isinstance(default, int | float) and not isinstance(default, bool):
            _fill_numbers(numbers[index], values, default)
            steps = (transform.clip_min, transform.clip_max, transform.log1p)
            groups.setdefault((*steps, transform.mean, transform.std), []).append(index)
        else:
            encoded[index] = transform.encode_dense(pc.fill_null(values, default), derived=True)
    for (clip_min, clip_max, log1p, mean, std), rows in groups.items():
        block = numbers if len(rows) == len(columns) else numbers[rows]
        if clip_min is not None or clip_max is not None:
            np.clip(block, clip_min, clip_max, out=block)
        if log1p:
            with np.errstate(divide="ignore", invalid="ignore"):  # as encode_dense
                np.log1p(block, out=block)
        if std > 0:
            block -= mean
            block /= std
        encoded[rows] = block
    return encoded


def hashed_ids(
    transform: FeatureTransform, values: pa.Array, out: np.ndarray | None = None
) -> np.ndarray:
    """`transform.encode_ids(values, derived=True)[0]` of a single-valued hashed feature,
    computed faster.

    The same FNV-1a 64 as `bundle.transforms.fnv1a_64` (tested against it), taken over the
    values of each length at once as a byte matrix, one vector step per byte position: a
    column of Criteo's 8 hex digits (or nothing) is one matrix, read in place from the Arrow
    buffer. Missing values hash as the feature's default text (the empty text without one).

    Args:
        transform: a hashed, single-valued feature.
        values: its n values, derived already (`tables.raw_values`).
        out: int64 [n] to write the ids into (a row of `hash_columns`' matrix), or None.

    Returns:
        int64 [n] (`out` when given).
    """
    text = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    default = "" if transform.default is None else str(transform.default)
    if text.null_count and default:
        text = pc.fill_null(text, default)
    hashes = None
    if pa.types.is_string(text.type):
        hashes = _fnv1a_64_by_length(
            text, transform.seed, None if out is None else out.view(np.uint64)
        )
    if hashes is None:
        hashes = fnv1a_64(pc.fill_null(as_text(text), default), transform.seed)
        if out is not None:
            out.view(np.uint64)[:] = hashes
            hashes = out.view(np.uint64)
    _remainder(hashes, transform.buckets)
    return hashes.view(np.int64)  # < buckets: the same values


def hash_columns(transforms: list[FeatureTransform], columns: list[pa.Array]) -> np.ndarray:
    """`hashed_ids` of several features of the same rows: int64 [len(columns), n], feature-major
    (the layout of a KJT's values), each feature's ids written in place into its row.

    Column by column on purpose: one column's byte matrix and hash states (~0.1 MiB for a
    record batch) stay in the CPU cache across its 8 byte steps; hashing all the columns as
    one concatenated matrix measured slower."""
    count = len(columns[0]) if columns else 0
    ids = np.empty((len(columns), count), dtype=np.int64)
    for index, (transform, values) in enumerate(zip(transforms, columns, strict=True)):
        hashed_ids(transform, values, out=ids[index])
    return ids


def _fnv1a_64_by_length(
    text: pa.Array, seed: int, out: np.ndarray | None = None
) -> np.ndarray | None:
    """`fnv1a_64(text, seed)` of a string array (nulls hash as the empty text, as there),
    grouped by value length, into `out` (uint64 [n]) when given; None when a null holds bytes
    (then the reference decides)."""
    count = len(text)
    basis = _basis(seed)
    hashes = np.empty(count, dtype=np.uint64) if out is None else out
    hashes.fill(basis)
    _, offsets_buffer, data_buffer = text.buffers()
    if count == 0 or data_buffer is None:
        return hashes
    offsets = np.frombuffer(offsets_buffer, dtype=np.int32)[text.offset : text.offset + count + 1]
    data = np.frombuffer(data_buffer, dtype=np.uint8)
    lengths = np.diff(offsets)
    if text.null_count and np.any(
        lengths.astype(bool) & ~text.is_valid().to_numpy(zero_copy_only=False)
    ):
        return None
    present = lengths != 0  # a boolean mask: numpy's nonzero and scatter are fastest on one
    rows = int(np.count_nonzero(present))
    if rows == 0:
        return hashes
    width = int(lengths.max())
    if offsets[-1] - offsets[0] == width * rows:  # one length, back to back: a reshape
        matrix = data[offsets[0] : offsets[-1]].reshape(-1, width)
        if rows == count:
            _fnv1a_rows(hashes, matrix)
        else:
            hashes[present] = _fnv1a_rows(np.full(rows, basis, dtype=np.uint64), matrix)
        return hashes
    for length in np.unique(lengths[present]).tolist():
        group = np.flatnonzero(lengths == length)
        matrix = data[offsets[group][:, None] + np.arange(length)]
        hashes[group] = _fnv1a_rows(np.full(group.size, basis, dtype=np.uint64), matrix)
    return hashes


def _fnv1a_rows(state: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """FNV-1a 64 `state` (uint64 [k]) advanced over the bytes of each row of `matrix` (uint8
    [k, width]), in place; returns `state`.

    Rows of 8 bytes (Criteo's categories) are read as one little-endian word each and their
    bytes taken by shift and mask: four uint64 passes per byte that numpy vectorises, faster
    than xor-ing a strided uint8 column into uint64 (a casting loop)."""
    if matrix.shape[1] == 8 and matrix.strides[1] == 1:
        words = matrix.view("<u8").reshape(-1)  # byte j of a row = (word >> 8j) & 0xFF
        byte = np.empty_like(state)
        for shift in _BYTE_SHIFTS:
            if shift == 0:
                np.bitwise_and(words, _LOW_BYTE, out=byte)
            else:
                np.right_shift(words, shift, out=byte)
                if shift != 56:  # the top byte has nothing above it to mask
                    np.bitwise_and(byte, _LOW_BYTE, out=byte)
            np.bitwise_xor(state, byte, out=state)
            np.multiply(state, _FNV_PRIME, out=state)
        return state
    for column in matrix.T:  # uint8, widened by the ufunc: no uint64 copy of the matrix
        np.bitwise_xor(state, column, out=state, casting="unsafe")
        np.multiply(state, _FNV_PRIME, out=state)
    return state


def _remainder(hashes: np.ndarray, buckets: int) -> None:
    """hashes %= buckets in place (uint64), as h - (h // buckets) * buckets: numpy divides
    an integer array by a scalar with multiply-and-shift (libdivide), some 10x faster than its
    `remainder` loop, which divides element by element."""
    divisor = np.uint64(buckets)
    quotient = np.floor_divide(hashes, divisor)
    np.multiply(quotient, divisor, out=quotient)
    np.subtract(hashes, quotient, out=hashes)


@functools.cache
def _basis(seed: int) -> np.uint64:
    """The FNV-1a 64 state after the seed's bytes: the hash of the empty text."""
    return np.uint64(fnv1a_64(pa.array([""]), seed)[0])


# -- reading -----------------------------------------------------------------------------------
def _record_batches(
    path: Path, spec: DataSpec, columns: list[str] | None = None
) -> Iterator[pa.RecordBatch]:
    """The file's non-empty lines parsed by pyarrow's streaming reader, in record batches.

    Raises:
        NotFound: the file does not exist.
        InvalidInput: a line pyarrow cannot split or convert, naming the line and the problem.
    """
    table = spec.interactions
    if not path.is_file():
        raise NotFound(f"{path}: Criteo file not found")
    bad_rows: list[pacsv.InvalidRow] = []

    def invalid(row: pacsv.InvalidRow) -> str:
        bad_rows.append(row)
        return "error"

    types = {name: pa.string() if kind == "string" else pa.int64()
             for name, kind in table.types.items()}  # fmt: skip
    try:
        reader = pacsv.open_csv(
            str(path),
            read_options=pacsv.ReadOptions(
                column_names=list(table.columns), block_size=_BLOCK_BYTES, use_threads=True
            ),
            parse_options=pacsv.ParseOptions(
                delimiter="\t",
                quote_char=False,
                double_quote=False,
                escape_char=False,
                invalid_row_handler=invalid,
            ),
            convert_options=pacsv.ConvertOptions(
                column_types=types,
                null_values=[""],
                strings_can_be_null=False,  # an empty category is "": it hashes as missing
                include_columns=columns,
                check_utf8=False,  # categories are hashed as bytes: nothing to validate
            ),
        )
        yield from reader
    except pa.ArrowInvalid as error:
        if "empty csv file" in str(error).lower():
            return
        raise InvalidInput(_located(path, str(error), bad_rows)) from None


def _located(path: Path, reason: str, bad_rows: list[pacsv.InvalidRow]) -> str:
    """pyarrow's reason for refusing a line, reworded to name the line (found by scanning the
    file: the error path only)."""
    if bad_rows:
        row = bad_rows[0]
        number, _ = _first_line(path, lambda _, line: line == row.text)
        return (
            f"{path}:{number}: expected {NUM_COLUMNS} tab-separated columns "
            f"(label, {NUM_DENSE} integer, {NUM_SPARSE} categorical), got {row.actual_columns}"
        )
    conversion = re.search(r"column #(\d+).*conversion error to \w+: invalid value '(.*)'", reason)
    if conversion:
        column, value = int(conversion.group(1)), conversion.group(2)

        def has_value(_: int, line: str) -> bool:
            fields = line.split("\t")
            return column < len(fields) and fields[column] == value

        number, _ = _first_line(path, has_value)
        if column == 0:
            return f"{path}:{number}: label {value!r} is not 0 or 1"
        return f"{path}:{number}: integer column {column} value {value!r} is not an integer"
    return f"{path}: {reason.strip().splitlines()[0]}"


def _check_labels(path: Path, labels: pa.ChunkedArray, seen: int) -> None:
    """Every label is 0 or 1; otherwise names the line of the first that is not.

    Args:
        seen: examples before these labels' first.
    """
    if labels.null_count == 0:  # the usual case, in one pass: 0 <= min and max <= 1
        bounds = pc.min_max(labels).as_py()
        if bounds["min"] is None or (bounds["min"] >= 0 and bounds["max"] <= 1):
            return
    valid = pc.fill_null(pc.is_in(labels, value_set=pa.array([0, 1], pa.int64())), False)
    if pc.all(valid).as_py():
        return
    first = seen + 1 + int(np.flatnonzero(~valid.to_numpy(zero_copy_only=False))[0])
    number, line = _first_line(path, lambda example, _: example == first)
    raise InvalidInput(f"{path}:{number}: label {line.split(chr(9))[0].strip()!r} is not 0 or 1")


def _first_line(path: Path, found: Callable[[int, str], bool]) -> tuple[int, str]:
    """(1-based number, text) of the first line for which found(example number, text) holds,
    examples being numbered over the non-empty lines; (0, "") if none does."""
    example = 0
    with _open_text(path) as lines:
        for number, line in enumerate(lines, start=1):
            text = line.rstrip("\r\n")
            if not text:
                continue
            example += 1
            if found(example, text):
                return number, text
    return 0, ""


def _open_text(path: Path) -> IO[str]:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", errors="replace", newline="")
    return open(path, encoding="utf-8", errors="replace", newline="")


def _is_eval(numbers: np.ndarray, seed: int, eval_fraction: float) -> np.ndarray:
    """Whether each example is held out: splitmix64(seed, its number) / 2**64 < eval_fraction.

    Args:
        numbers: uint64 [n] 1-based example numbers.
    """
    if eval_fraction <= 0.0:
        return np.zeros(numbers.shape, dtype=bool)
    with np.errstate(over="ignore"):
        z = np.uint64((seed & _MASK64) * 0x9E3779B97F4A7C15 & _MASK64) + numbers
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    # The exact threshold of `z < eval_fraction * 2**64` for integers z.
    threshold = -int(-(eval_fraction * 2.0**64) // 1)
    return z < np.uint64(min(threshold, _MASK64))


def _check_table_size(table_size: int) -> None:
    if table_size < 2:
        raise InvalidInput(f"Criteo table size must be >= 2, got {table_size}")


def _check_shuffle_buffer(shuffle_buffer: int) -> None:
    if shuffle_buffer < 1:
        raise InvalidInput(f"Criteo shuffle buffer must be >= 1 example, got {shuffle_buffer}")


def _check_split(eval_fraction: float, split: str) -> None:
    if not 0.0 <= eval_fraction < 1.0:
        raise InvalidInput(f"eval fraction must be in [0, 1), got {eval_fraction}")
    if split not in ("train", "eval"):
        raise InvalidInput(f"split must be 'train' or 'eval', got {split!r}")
