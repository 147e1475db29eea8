"""The synthetic generator: determinism, shapes, and planted signal simple baselines can find."""

from __future__ import annotations

import numpy as np
import pytest

from recship.base.errors import InvalidInput
from recship.trainer.data.dataset import InteractionDataset
from recship.trainer.data.synthetic import generate


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann-Whitney AUC with average ranks for ties."""
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(scores.size)
    sorted_scores = scores[order]
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    average = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(average, counts)
    positives = labels == 1
    n1, n0 = positives.sum(), (~positives).sum()
    return float((ranks[positives].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def _recall_at_10(train: InteractionDataset, held_out: InteractionDataset, scores) -> float:
    recalls = []
    for user in np.unique(held_out.user_ids):
        s = scores(user).astype(float)
        s[train.item_ids[train.user_ids == user]] = -np.inf
        top = set(np.argsort(-s, kind="stable")[:10].tolist())
        truth = set(held_out.item_ids[held_out.user_ids == user].tolist())
        recalls.append(len(top & truth) / min(len(truth), 10))
    return float(np.mean(recalls))


@pytest.fixture(scope="module")
def data() -> InteractionDataset:
    return generate(num_users=600, num_items=300, interactions_per_user=15, seed=11)


def test_same_arguments_give_the_same_data() -> None:
    a = generate(num_users=50, num_items=40, interactions_per_user=5, seed=4)
    b = generate(num_users=50, num_items=40, interactions_per_user=5, seed=4)
    c = generate(num_users=50, num_items=40, interactions_per_user=5, seed=5)
    for name in ("user_ids", "item_ids", "labels", "timestamps"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    np.testing.assert_array_equal(
        a.items.sparse["item_genres"].values, b.items.sparse["item_genres"].values
    )
    assert not np.array_equal(a.item_ids, c.item_ids)


def test_shapes_and_schema(data: InteractionDataset) -> None:
    assert len(data) == 600 * 15
    assert data.num_users == 600 and data.num_items == 300
    assert data.schema.sparse_feature("user_id").cardinality == 600
    # Each user's items are distinct.
    pairs = data.user_ids * data.num_items + data.item_ids
    assert np.unique(pairs).size == pairs.size
    genres = data.items.sparse["item_genres"]
    assert set(genres.lengths().tolist()) <= {1, 2, 3} and genres.lengths().max() > 1
    assert 0.4 < data.labels.mean() < 0.6


def test_popularity_is_skewed(data: InteractionDataset) -> None:
    counts = np.sort(np.bincount(data.item_ids, minlength=data.num_items))[::-1]
    top_tenth = counts[: data.num_items // 10].sum() / counts.sum()
    assert top_tenth > 0.25  # a uniform choice would give 0.10


def test_popularity_baseline_beats_random_recall(data: InteractionDataset) -> None:
    train, held_out = data.split(0.2, seed=0)
    popularity = np.bincount(train.item_ids, minlength=data.num_items)
    rng = np.random.default_rng(0)
    popular = _recall_at_10(train, held_out, lambda _: popularity)
    random = _recall_at_10(train, held_out, lambda _: rng.random(data.num_items))
    assert popular > 3 * random
    assert popular > 0.05


def test_labels_carry_item_and_user_signal(data: InteractionDataset) -> None:
    train, held_out = data.split(0.2, seed=0)
    # Smoothed positive rate of the item and of the user's age bucket on train, scored on eval.
    item_rate = (np.bincount(train.item_ids, train.labels, data.num_items) + 1) / (
        np.bincount(train.item_ids, minlength=data.num_items) + 2
    )
    age = data.users.sparse["user_age_bucket"].values
    age_rate = np.bincount(age[train.user_ids], train.labels, 7) / np.maximum(
        np.bincount(age[train.user_ids], minlength=7), 1
    )
    scores = np.log(item_rate[held_out.item_ids]) + np.log(age_rate[age[held_out.user_ids]])
    assert _auc(scores, held_out.labels) > 0.62
    assert abs(_auc(np.random.default_rng(1).random(len(held_out)), held_out.labels) - 0.5) < 0.05


def test_any_size_and_bad_arguments() -> None:
    tiny = generate(num_users=1, num_items=1, interactions_per_user=1, seed=0)
    assert len(tiny) == 1
    with pytest.raises(InvalidInput, match="must not exceed num_items"):
        generate(num_users=5, num_items=3, interactions_per_user=4)
    with pytest.raises(InvalidInput, match="num_users must be an integer >= 1"):
        generate(num_users=0)
