"""KeyedJaggedTensor batches: shapes, feature values, and sharding over ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recship.base.errors import InvalidInput
from recship.trainer.data.batches import (
    TwoTowerBatch,
    entity_kjt,
    num_batches,
    ranking_batches,
    two_tower_batches,
)
from recship.trainer.data.dataset import InteractionDataset
from recship.trainer.data.synthetic import generate


@pytest.fixture(scope="module")
def data() -> InteractionDataset:
    return generate(num_users=101, num_items=50, interactions_per_user=7, seed=5)


def test_entity_kjt_layout_and_values(data: InteractionDataset) -> None:
    ids = np.array([4, 0, 4])
    kjt = entity_kjt(data.items, ids, ["item_id", "item_genres"])
    assert kjt.keys() == ["item_id", "item_genres"]
    assert kjt.stride() == 3
    assert kjt.lengths().dtype == torch.int32 and kjt.values().dtype == torch.int64
    genres = data.items.sparse["item_genres"]
    per_key = kjt.to_dict()
    assert per_key["item_id"].values().tolist() == [4, 0, 4]
    bags = per_key["item_genres"].to_dense()
    for row, item in enumerate(ids):
        expected = genres.values[genres.offsets[item] : genres.offsets[item + 1]].tolist()
        assert bags[row].tolist() == expected
    with pytest.raises(InvalidInput, match="'user_id' is not in the table"):
        entity_kjt(data.items, ids, ["user_id"])


def test_two_tower_batch_shapes(data: InteractionDataset) -> None:
    batch = next(two_tower_batches(data, 16, seed=1))
    assert isinstance(batch, TwoTowerBatch)
    assert batch.query.keys() == [f.name for f in data.schema.user_sparse()]
    assert batch.candidate.keys() == [f.name for f in data.schema.item_sparse()]
    assert batch.query.stride() == batch.candidate.stride() == 16
    assert batch.item_ids.shape == (16,) and batch.item_ids.dtype == torch.int64
    assert batch.candidate.to_dict()["item_id"].values().tolist() == batch.item_ids.tolist()
    moved = batch.to(torch.device("cpu"), non_blocking=False)
    assert moved.item_ids.tolist() == batch.item_ids.tolist()


def test_ranking_batch_shapes_and_content(data: InteractionDataset) -> None:
    batch = next(ranking_batches(data, 8, shuffle=False))
    assert batch.dense_features.shape == (8, 2) and batch.dense_features.dtype == torch.float32
    assert batch.labels.tolist() == data.labels[:8].tolist()
    assert batch.sparse_features.keys() == [f.name for f in data.schema.sparse]
    features = batch.sparse_features.to_dict()
    assert features["user_id"].values().tolist() == data.user_ids[:8].tolist()
    assert features["item_id"].values().tolist() == data.item_ids[:8].tolist()
    np.testing.assert_allclose(
        batch.dense_features[:, 1].numpy(), data.items.dense[data.item_ids[:8], 0]
    )


def _interaction_indices(batches: list[TwoTowerBatch], data: InteractionDataset) -> list[int]:
    # Map (user, item) back to interaction rows; synthetic pairs are unique.
    row = {(u, i): k for k, (u, i) in enumerate(zip(data.user_ids, data.item_ids, strict=True))}
    out = []
    for b in batches:
        users = b.query.to_dict()["user_id"].values().tolist()
        out += [row[(u, i)] for u, i in zip(users, b.item_ids.tolist(), strict=True)]
    return out


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ranks_get_disjoint_equal_shares(data: InteractionDataset, world_size: int) -> None:
    expected = num_batches(len(data), 32, world_size)
    shares = [
        list(two_tower_batches(data, 32, rank=r, world_size=world_size, epoch=2, seed=9))
        for r in range(world_size)
    ]
    assert [len(s) for s in shares] == [expected] * world_size
    assert all(b.item_ids.numel() == 32 for s in shares for b in s)
    seen = [_interaction_indices(s, data) for s in shares]
    flat = [i for s in seen for i in s]
    assert len(flat) == len(set(flat)) == expected * 32 * world_size


def test_shuffle_depends_on_seed_and_epoch_only(data: InteractionDataset) -> None:
    def first_items(**kw: int) -> list[int]:
        return next(two_tower_batches(data, 32, **kw)).item_ids.tolist()

    assert first_items(seed=1, epoch=0) == first_items(seed=1, epoch=0)
    assert first_items(seed=1, epoch=0) != first_items(seed=1, epoch=1)
    assert first_items(seed=1, epoch=0) != first_items(seed=2, epoch=0)


def test_start_batch_resumes_where_it_left_off(data: InteractionDataset) -> None:
    full = list(two_tower_batches(data, 20, rank=1, world_size=2, epoch=1))
    resumed = list(two_tower_batches(data, 20, rank=1, world_size=2, epoch=1, start_batch=3))
    assert len(resumed) == len(full) - 3
    for a, b in zip(full[3:], resumed, strict=True):
        assert a.item_ids.tolist() == b.item_ids.tolist()
    with pytest.raises(InvalidInput, match="start batch"):
        two_tower_batches(data, 20, start_batch=100)


def test_without_drop_last_every_example_is_seen_once(data: InteractionDataset) -> None:
    n = len(data)  # 707
    assert num_batches(n, 100, 2, drop_last=False) == 4
    seen = []
    for rank in range(2):
        batches = list(ranking_batches(data, 100, rank=rank, world_size=2, drop_last=False))
        assert len(batches) == 4
        seen += [b.labels.numel() for b in batches]
    assert sum(seen) == n
    assert sorted(seen)[:2] == [53, 54]  # the remaining 107 split as evenly as possible


def test_bad_sharding_arguments_are_rejected(data: InteractionDataset) -> None:
    with pytest.raises(InvalidInput, match="rank must be in"):
        two_tower_batches(data, 8, rank=2, world_size=2)
    with pytest.raises(InvalidInput, match="batch size must be >= 1"):
        ranking_batches(data, 0)
    with pytest.raises(InvalidInput, match="seed and epoch must be >= 0"):
        ranking_batches(data, 8, seed=-1)
    with pytest.raises(InvalidInput, match="world size must be >= 1"):
        num_batches(10, 2, 0)
