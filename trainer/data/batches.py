"""TorchRec batches from an `InteractionDataset`: two-tower batches and DLRM ranking batches.

Sharding over ranks: each epoch shuffles the interactions with a generator seeded by
(seed, epoch); global step s takes the next `batch_size * world_size` examples and rank r gets
the r-th of `world_size` equal parts. Every rank therefore sees a disjoint share and the same
number of steps (DistributedModelParallel's collectives need equal step counts), and a resumed
run skips exactly the steps already consumed with `start_batch`.

Example::

    for batch in two_tower_batches(train, 256, rank=rank, world_size=world_size, epoch=e):
        loss = model(batch.query, batch.candidate)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from recship.base.errors import InvalidInput
from recship.base.jagged import EntityTable
from recship.trainer.data.dataset import InteractionDataset


def entity_kjt(
    table: EntityTable, ids: np.ndarray, feature_names: Sequence[str]
) -> KeyedJaggedTensor:
    """The features `feature_names` of the entities `ids`, one bag per id.

    Args:
        table: User or item table holding every named feature.
        ids: int [B] rows of `table` (may repeat).
        feature_names: KJT keys, in order.

    Returns:
        A KJT with keys=feature_names, stride B, int64 values and int32 lengths.

    Raises:
        InvalidInput: if a feature is not in the table.
    """
    rows = np.asarray(ids, dtype=np.int64)
    return _build_kjt([(table, rows, name) for name in feature_names], stride=rows.size)


@dataclass
class TwoTowerBatch(Pipelineable):
    """One two-tower training batch: B (user, item) positive pairs.

    Attributes:
        query: KJT of the user-side sparse features of each interaction's user.
        candidate: KJT of the item-side sparse features of each interaction's item.
        item_ids: int64 [B] item id of each interaction (for logQ correction and dedup of
            in-batch negatives).
    """

    query: KeyedJaggedTensor
    candidate: KeyedJaggedTensor
    item_ids: torch.Tensor

    def to(self, device: torch.device, non_blocking: bool = False) -> TwoTowerBatch:
        """The batch on `device`."""
        return TwoTowerBatch(
            query=self.query.to(device=device, non_blocking=non_blocking),
            candidate=self.candidate.to(device=device, non_blocking=non_blocking),
            item_ids=self.item_ids.to(device=device, non_blocking=non_blocking),
        )

    def record_stream(self, stream: torch.Stream) -> None:
        """Mark every tensor as used by `stream` (CUDA pipelining)."""
        self.query.record_stream(stream)
        self.candidate.record_stream(stream)
        self.item_ids.record_stream(stream)

    def pin_memory(self) -> TwoTowerBatch:
        """The batch in pinned host memory."""
        return TwoTowerBatch(
            query=self.query.pin_memory(),
            candidate=self.candidate.pin_memory(),
            item_ids=self.item_ids.pin_memory(),
        )


@dataclass
class WeightedBatch(Batch):
    """A DLRM batch whose examples carry loss weights (torchrec's `Batch` plus `weights`).

    Attributes:
        weights: float32 [B] per-example weight of the binary cross-entropy (1 = plain), e.g.
            positives weighted by their explicit rating.
    """

    weights: torch.Tensor = field(default_factory=lambda: torch.ones(0))

    def to(self, device: torch.device, non_blocking: bool = False) -> WeightedBatch:
        """The batch on `device`."""
        return WeightedBatch(
            dense_features=self.dense_features.to(device=device, non_blocking=non_blocking),
            sparse_features=self.sparse_features.to(device=device, non_blocking=non_blocking),
            labels=self.labels.to(device=device, non_blocking=non_blocking),
            weights=self.weights.to(device=device, non_blocking=non_blocking),
        )

    def record_stream(self, stream: torch.Stream) -> None:
        """Mark every tensor as used by `stream` (CUDA pipelining)."""
        super().record_stream(stream)
        self.weights.record_stream(stream)

    def pin_memory(self) -> WeightedBatch:
        """The batch in pinned host memory."""
        return WeightedBatch(
            dense_features=self.dense_features.pin_memory(),
            sparse_features=self.sparse_features.pin_memory(),
            labels=self.labels.pin_memory(),
            weights=self.weights.pin_memory(),
        )


def num_batches(num_examples: int, batch_size: int, world_size: int, drop_last: bool = True) -> int:
    """Number of batches every rank gets per epoch.

    With drop_last the examples that do not fill a whole global step (batch_size * world_size)
    are skipped; without it the last step splits them as evenly as possible over the ranks (a
    rank's last batch may then be smaller, or even empty when fewer examples than ranks remain).

    Raises:
        InvalidInput: if batch_size or world_size < 1 or num_examples < 0.
    """
    if batch_size < 1:
        raise InvalidInput(f"batch size must be >= 1, got {batch_size}")
    if world_size < 1:
        raise InvalidInput(f"world size must be >= 1, got {world_size}")
    if num_examples < 0:
        raise InvalidInput(f"number of examples must be >= 0, got {num_examples}")
    step = batch_size * world_size
    return num_examples // step if drop_last else -(-num_examples // step)


def two_tower_batches(
    data: InteractionDataset,
    batch_size: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    epoch: int = 0,
    seed: int = 0,
    drop_last: bool = True,
    start_batch: int = 0,
) -> Iterator[TwoTowerBatch]:
    """This rank's shuffled two-tower batches of one epoch (see the module doc for sharding).

    Args:
        data: Interactions (the positives) with user and item tables.
        batch_size: Examples per rank per step.
        rank: This rank, 0 <= rank < world_size.
        world_size: Number of ranks.
        epoch: Epoch number; with `seed` it picks the shuffle.
        seed: Shuffle seed.
        drop_last: Skip the examples that do not fill a whole global step.
        start_batch: Number of this epoch's batches to skip (already consumed before a resume).

    Raises:
        InvalidInput: on a bad rank, world size, batch size or start_batch.
    """
    user_features = [f.name for f in data.schema.user_sparse()]
    item_features = [f.name for f in data.schema.item_sparse()]
    batches = _rank_indices(
        len(data), batch_size, rank, world_size, epoch, seed, drop_last, start_batch, True
    )
    return (
        TwoTowerBatch(
            query=entity_kjt(data.users, data.user_ids[index], user_features),
            candidate=entity_kjt(data.items, data.item_ids[index], item_features),
            item_ids=torch.from_numpy(data.item_ids[index]),
        )
        for index in batches
    )


def ranking_batches(
    data: InteractionDataset,
    batch_size: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    epoch: int = 0,
    seed: int = 0,
    drop_last: bool = True,
    start_batch: int = 0,
    shuffle: bool = True,
) -> Iterator[Batch]:
    """This rank's DLRM batches of one epoch (see `two_tower_batches` for the arguments).

    Each `Batch` holds dense_features float32 [B, F] (user dense columns, then item dense
    columns), sparse_features: a KJT of every sparse feature in schema order (user-side, then
    item-side), and labels float32 [B]. With shuffle=False the examples come in data order
    (for evaluation, usually with drop_last=False so every example is seen exactly once).
    """
    batches = _rank_indices(
        len(data), batch_size, rank, world_size, epoch, seed, drop_last, start_batch, shuffle
    )
    return (ranking_batch(data, index) for index in batches)


def ranking_batch(data: InteractionDataset, index: np.ndarray) -> Batch:
    """The DLRM batch of the interactions `index` (row ids of `data`, in that order).

    Dense features are the user's then the item's columns; the KJT holds every sparse feature
    in schema order (user side, then item side) with int32 lengths.
    """
    return pair_batch(data, data.user_ids[index], data.item_ids[index], data.labels[index])


def pair_batch(
    data: InteractionDataset,
    user_rows: np.ndarray,
    item_rows: np.ndarray,
    labels: np.ndarray | None = None,
) -> Batch:
    """The DLRM batch of arbitrary (user, item) pairs, interactions or not.

    The layout is `ranking_batch`'s: dense features are the user's then the item's columns, the
    KJT holds every sparse feature in schema order. Used for sampled negatives and for scoring
    retrieval candidates, which are pairs the data set has no row for.

    Args:
        data: the data set whose user and item tables hold the features.
        user_rows: int [B] user ids.
        item_rows: int [B] item ids (same length).
        labels: float [B] labels; zeros when None (scoring only).

    Raises:
        InvalidInput: if the id arrays differ in length.
    """
    user_rows = np.asarray(user_rows, dtype=np.int64)
    item_rows = np.asarray(item_rows, dtype=np.int64)
    if user_rows.shape != item_rows.shape or user_rows.ndim != 1:
        raise InvalidInput(
            f"pair batch: user ids {user_rows.shape} and item ids {item_rows.shape} must be "
            "1-d and of equal length"
        )
    dense = np.concatenate([data.users.dense[user_rows], data.items.dense[item_rows]], axis=1)
    sparse = _build_kjt(
        [
            (data.users, user_rows, f.name) if f.side == "user" else (data.items, item_rows, f.name)
            for f in data.schema.sparse
        ],
        stride=user_rows.size,
    )
    if labels is None:
        labels = np.zeros(user_rows.size, dtype=np.float32)
    return Batch(
        dense_features=torch.from_numpy(dense),
        sparse_features=sparse,
        labels=torch.from_numpy(np.ascontiguousarray(labels, dtype=np.float32)),
    )


def _build_kjt(parts: list[tuple[EntityTable, np.ndarray, str]], stride: int) -> KeyedJaggedTensor:
    """A KJT whose key `name` holds, for each of `rows`, that row's bag in `table`."""
    keys: list[str] = []
    values: list[np.ndarray] = []
    lengths: list[np.ndarray] = []
    for table, rows, name in parts:
        column = table.sparse.get(name)
        if column is None:
            raise InvalidInput(f"feature {name!r} is not in the table (has {sorted(table.sparse)})")
        bag_values, bag_lengths = column.gather(rows)
        keys.append(name)
        values.append(bag_values)
        lengths.append(bag_lengths)
    return KeyedJaggedTensor(
        keys=keys,
        values=torch.from_numpy(np.concatenate(values) if values else np.zeros(0, np.int64)),
        lengths=torch.from_numpy(
            np.concatenate(lengths).astype(np.int32) if lengths else np.zeros(0, np.int32)
        ),
        stride=stride,
    )


def _rank_indices(
    num_examples: int,
    batch_size: int,
    rank: int,
    world_size: int,
    epoch: int,
    seed: int,
    drop_last: bool,
    start_batch: int,
    shuffle: bool,
) -> Iterator[np.ndarray]:
    """Example indices of each of this rank's batches, from batch `start_batch` on.

    Arguments are checked here, when the caller asks for the batches, not at the first batch.
    """
    total = num_batches(num_examples, batch_size, world_size, drop_last)
    if not 0 <= rank < world_size:
        raise InvalidInput(f"rank must be in [0, {world_size}), got {rank}")
    if not 0 <= start_batch <= total:
        raise InvalidInput(f"start batch must be in [0, {total}], got {start_batch}")
    if seed < 0 or epoch < 0:
        raise InvalidInput(f"seed and epoch must be >= 0, got seed {seed}, epoch {epoch}")
    if shuffle:
        order = np.random.default_rng([seed, epoch]).permutation(num_examples)
    else:
        order = np.arange(num_examples, dtype=np.int64)
    step = batch_size * world_size
    # A full group splits into equal parts of batch_size; the last partial one (only without
    # drop_last) into parts whose sizes differ by at most one.
    return (
        np.array_split(order[s * step : (s + 1) * step], world_size)[rank]
        for s in range(start_batch, total)
    )


def pair_batches(
    data: InteractionDataset,
    user_ids: np.ndarray,
    item_ids: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    *,
    weights: np.ndarray | None = None,
    rank: int = 0,
    world_size: int = 1,
    epoch: int = 0,
    seed: int = 0,
    drop_last: bool = True,
    start_batch: int = 0,
    shuffle: bool = True,
) -> Iterator[Batch]:
    """This rank's DLRM batches over arbitrary (user, item, label) examples.

    Sharded and shuffled exactly like `ranking_batches` (see the module doc), over examples
    that need not be interactions of `data`, e.g. the sampled negatives of
    `recship.trainer.data.ranking_examples`.

    Args:
        data: the tables the features come from.
        user_ids / item_ids / labels: [N] the examples.
        batch_size, rank, world_size, epoch, seed, drop_last, start_batch, shuffle: as in
            `ranking_batches`.
        weights: float [N] loss weights; given, the batches are `WeightedBatch`es.
    """
    batches = _rank_indices(
        int(user_ids.size),
        batch_size,
        rank,
        world_size,
        epoch,
        seed,
        drop_last,
        start_batch,
        shuffle,
    )
    if weights is None:
        return (pair_batch(data, user_ids[i], item_ids[i], labels[i]) for i in batches)
    return (
        _weighted(pair_batch(data, user_ids[i], item_ids[i], labels[i]), weights[i])
        for i in batches
    )


def _weighted(batch: Batch, weights: np.ndarray) -> WeightedBatch:
    """`batch` with per-example loss weights."""
    return WeightedBatch(
        dense_features=batch.dense_features,
        sparse_features=batch.sparse_features,
        labels=batch.labels,
        weights=torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32)),
    )
