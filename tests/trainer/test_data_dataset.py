"""Schema round-trips, jagged columns and the per-user held-out split of InteractionDataset."""

from __future__ import annotations

import json

import numpy as np
import pytest

from recship.base.errors import InvalidInput
from recship.base.jagged import EntityTable, JaggedColumn
from recship.trainer.data.dataset import (
    ITEM_POPULARITY_FEATURE,
    USER_ACTIVITY_FEATURE,
    InteractionDataset,
)
from recship.trainer.data.schema import DatasetSchema, DenseFeatureSpec, SparseFeatureSpec
from recship.trainer.data.synthetic import generate


@pytest.fixture(scope="module")
def data() -> InteractionDataset:
    return generate(num_users=300, num_items=120, interactions_per_user=9, seed=3)


def test_schema_round_trips_through_json(data: InteractionDataset) -> None:
    text = json.dumps(data.schema.to_dict())
    assert DatasetSchema.from_dict(json.loads(text)) == data.schema
    assert data.schema.user_sparse()[0].name == "user_id"
    assert [f.name for f in data.schema.item_dense()] == [ITEM_POPULARITY_FEATURE]
    assert data.schema.sparse_feature("item_genres").multi_valued


def test_schema_rejects_bad_definitions() -> None:
    user = SparseFeatureSpec("user_id", 3, "user")
    item = SparseFeatureSpec("item_id", 3, "item")
    with pytest.raises(InvalidInput, match="duplicate feature names"):
        DatasetSchema("s", (user, user), (), None, None)
    with pytest.raises(InvalidInput, match="user-side features before item-side"):
        DatasetSchema("s", (item, user), (), None, None)
    with pytest.raises(InvalidInput, match="single-valued item-side"):
        DatasetSchema("s", (user, item), (), "user_id", "user_id")
    with pytest.raises(InvalidInput, match="cardinality must be >= 1"):
        SparseFeatureSpec("x", 0, "user")
    with pytest.raises(InvalidInput, match="side must be one of"):
        DenseFeatureSpec("x", "context")  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="missing field 'sparse'"):
        DatasetSchema.from_dict({"name": "s"})


def test_jagged_column_gathers_bags_in_request_order() -> None:
    column = JaggedColumn.from_bags([[1, 2], [], [3], [4, 5, 6]])
    assert column.lengths().tolist() == [2, 0, 1, 3]
    values, lengths = column.gather(np.array([3, 0, 1, 3]))
    assert lengths.tolist() == [3, 2, 0, 3]
    assert values.tolist() == [4, 5, 6, 1, 2, 4, 5, 6]
    with pytest.raises(InvalidInput, match="offsets"):
        JaggedColumn(values=np.array([1, 2]), offsets=np.array([0, 1]))


def test_dataset_rejects_out_of_range_ids(data: InteractionDataset) -> None:
    with pytest.raises(InvalidInput, match="item_ids out of range"):
        InteractionDataset(
            schema=data.schema,
            users=data.users,
            items=data.items,
            user_ids=np.array([0]),
            item_ids=np.array([data.num_items]),
            labels=np.array([1.0]),
            timestamps=np.array([0]),
        )
    bad_items = EntityTable(
        num_rows=data.num_items,
        sparse={**data.items.sparse, "item_id": JaggedColumn.single(np.arange(data.num_items) + 1)},
        dense=data.items.dense,
    )
    with pytest.raises(InvalidInput, match="'item_id' has ids outside"):
        InteractionDataset(
            schema=data.schema,
            users=data.users,
            items=bad_items,
            user_ids=data.user_ids,
            item_ids=data.item_ids,
            labels=data.labels,
            timestamps=data.timestamps,
        )


def _pairs(d: InteractionDataset) -> set[tuple[int, int, int]]:
    # (user, item, timestamp) identifies an interaction of the synthetic data.
    return set(zip(d.user_ids.tolist(), d.item_ids.tolist(), d.timestamps.tolist(), strict=True))


def test_split_is_per_user_disjoint_and_complete(data: InteractionDataset) -> None:
    train, held_out = data.split(0.2, seed=7)
    assert len(train) + len(held_out) == len(data)
    assert not _pairs(train) & _pairs(held_out)
    assert _pairs(train) | _pairs(held_out) == _pairs(data)
    # 9 interactions per user: round(0.2 * 9) = 2 held out, 7 kept, for every user.
    assert np.bincount(held_out.user_ids, minlength=data.num_users).tolist() == [2] * 300
    assert np.bincount(train.user_ids, minlength=data.num_users).tolist() == [7] * 300
    assert held_out.users is train.users and held_out.items is train.items


def test_split_is_deterministic_and_seeded(data: InteractionDataset) -> None:
    a_train, a_eval = data.split(0.3, seed=1)
    b_train, b_eval = data.split(0.3, seed=1)
    _, c_eval = data.split(0.3, seed=2)
    np.testing.assert_array_equal(a_eval.item_ids, b_eval.item_ids)
    np.testing.assert_array_equal(a_train.user_ids, b_train.user_ids)
    assert not np.array_equal(a_eval.item_ids, c_eval.item_ids)


def test_split_fraction_zero_gives_empty_eval(data: InteractionDataset) -> None:
    train, held_out = data.split(0.0, seed=0)
    assert len(held_out) == 0 and len(train) == len(data)
    np.testing.assert_array_equal(train.users.dense, data.users.dense)
    with pytest.raises(InvalidInput, match=r"eval fraction must be in \[0, 1\)"):
        data.split(1.0, seed=0)


def test_split_keeps_single_interaction_users_and_never_empties_a_user(
    data: InteractionDataset,
) -> None:
    # User 0 keeps 1 interaction, user 1 keeps 2: tiny fractions still hold out one of user 1's.
    keep = (data.user_ids > 1) | np.isin(np.arange(len(data)), [0, 9, 10])
    small = data._subset(keep)
    train, held_out = small.split(0.01, seed=0)
    assert 0 not in held_out.user_ids
    assert np.sum(held_out.user_ids == 1) == 1 and np.sum(train.user_ids == 1) == 1
    _, most = small.split(0.99, seed=0)
    counts = np.bincount(most.user_ids, minlength=small.num_users)
    assert counts[2] == 8  # 9 interactions: all but one held out


def test_split_recomputes_activity_features_on_train_only(data: InteractionDataset) -> None:
    train, held_out = data.split(0.25, seed=0)
    names = [f.name for f in data.schema.user_dense()]
    activity = train.users.dense[:, names.index(USER_ACTIVITY_FEATURE)]
    expected = np.log1p(np.bincount(train.user_ids, minlength=data.num_users))
    np.testing.assert_allclose(activity, expected, rtol=1e-6)
    popularity = held_out.items.dense[:, 0]
    expected_pop = np.log1p(np.bincount(train.item_ids, minlength=data.num_items))
    np.testing.assert_allclose(popularity, expected_pop, rtol=1e-6)
    # The unsplit data still has the counts over all interactions.
    np.testing.assert_allclose(data.users.dense[:, 0], np.log1p(9.0), rtol=1e-6)
