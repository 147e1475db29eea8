"""Ranking examples from interactions: candidate mining and negative sampling vs references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recship.base.errors import InvalidInput
from recship.trainer.data.batches import WeightedBatch, pair_batch, pair_batches
from recship.trainer.data.ranking_examples import (
    ExampleRecipe,
    build_examples,
    mine_candidates,
    positive_weights,
)
from recship.trainer.data.synthetic import generate


@pytest.fixture(scope="module")
def split():
    data = generate(num_users=50, num_items=40, interactions_per_user=8, seed=4)
    return data.split(0.25, seed=0)


def _seen(train) -> set[tuple[int, int]]:
    return set(zip(train.user_ids.tolist(), train.item_ids.tolist(), strict=True))


def test_mined_candidates_are_the_exact_top_k_of_unseen_items(split) -> None:
    train, _ = split
    rng = np.random.default_rng(0)
    users = torch.from_numpy(rng.normal(size=(train.num_users, 6)))
    items = torch.from_numpy(rng.normal(size=(train.num_items, 6)))
    candidates = mine_candidates(users, items, train, k=10)
    seen = _seen(train)
    scores = (users @ items.T).numpy()
    for user in range(train.num_users):
        unseen = [i for i in range(train.num_items) if (user, i) not in seen]
        # Reference: sort unseen items by score descending, ties by item id.
        expected = sorted(unseen, key=lambda i: (-scores[user, i], i))[:10]
        assert candidates[user].tolist() == expected


def test_mining_pads_users_with_fewer_unseen_items_than_k(split) -> None:
    train, _ = split
    candidates = mine_candidates(
        torch.ones(train.num_users, 1), torch.ones(train.num_items, 1), train, k=train.num_items
    )
    counts = np.bincount(train.user_ids, minlength=train.num_users)
    for user in range(train.num_users):
        row = candidates[user]
        assert (row >= 0).sum() == train.num_items - counts[user]
        assert np.all(row[row.size - counts[user] :] == -1)
        # Equal scores: ascending item ids (a deterministic order on every rank).
        assert np.all(np.diff(row[row >= 0]) > 0)
    with pytest.raises(InvalidInput, match="do not match"):
        mine_candidates(torch.ones(3, 1), torch.ones(train.num_items, 1), train, k=5)


def test_examples_hold_every_positive_and_unseen_negatives_from_their_sources(split) -> None:
    train, _ = split
    rng = np.random.default_rng(1)
    candidates = mine_candidates(
        rng.normal(size=(train.num_users, 4)), rng.normal(size=(train.num_items, 4)), train, k=6
    )
    recipe = ExampleRecipe(hard_negatives=2, random_negatives=3)
    examples = build_examples(train, recipe, candidates, epoch=0, seed=0)
    n = len(train)
    assert len(examples) == n * recipe.examples_per_positive
    assert examples.labels[:n].tolist() == [1.0] * n
    assert not examples.labels[n:].any()
    np.testing.assert_array_equal(examples.item_ids[:n], train.item_ids)
    seen = _seen(train)
    negatives = list(
        zip(examples.user_ids[n:].tolist(), examples.item_ids[n:].tolist(), strict=True)
    )
    assert not any(pair in seen for pair in negatives)
    hard = negatives[: 2 * n]
    assert all(item in candidates[user] for user, item in hard)
    # Each positive's negatives belong to its user.
    np.testing.assert_array_equal(examples.user_ids[n : 3 * n], np.repeat(train.user_ids, 2))
    np.testing.assert_array_equal(examples.user_ids[3 * n :], np.repeat(train.user_ids, 3))


def test_random_negatives_cover_the_unseen_items_uniformly(split) -> None:
    train, _ = split
    recipe = ExampleRecipe(hard_negatives=0, random_negatives=400)
    examples = build_examples(train, recipe, None, epoch=0, seed=0)
    n = len(train)
    user = int(train.user_ids[0])
    drawn = examples.item_ids[n:][examples.user_ids[n:] == user]
    unseen = sorted(set(range(train.num_items)) - {i for u, i in _seen(train) if u == user})
    counts = np.bincount(drawn, minlength=train.num_items)[unseen]
    expected = drawn.size / len(unseen)
    assert counts.min() > 0
    # Uniform within sampling noise (a loose chi-square bound for ~30 cells).
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 3 * len(unseen)


def test_negatives_are_redrawn_per_epoch_and_reproducible(split) -> None:
    train, _ = split
    recipe = ExampleRecipe(hard_negatives=0, random_negatives=2)
    first = build_examples(train, recipe, None, epoch=0, seed=0)
    again = build_examples(train, recipe, None, epoch=0, seed=0)
    other = build_examples(train, recipe, None, epoch=1, seed=0)
    np.testing.assert_array_equal(first.item_ids, again.item_ids)
    assert not np.array_equal(first.item_ids, other.item_ids)


def test_recipe_checks_its_counts_and_needs_candidates_for_hard_negatives(split) -> None:
    train, _ = split
    with pytest.raises(InvalidInput, match="at least one negative"):
        ExampleRecipe(0, 0)
    with pytest.raises(InvalidInput, match=">= 0"):
        ExampleRecipe(-1, 2)
    with pytest.raises(InvalidInput, match="retrieval candidates"):
        build_examples(train, ExampleRecipe(1, 0), None, epoch=0, seed=0)


def test_positives_are_weighted_by_rating_with_mean_one(split) -> None:
    train, _ = split
    assert np.all(positive_weights(train, True) == 1.0)  # synthetic data has no ratings
    rated = train._subset(np.ones(len(train), dtype=bool))
    rated.ratings = np.linspace(1.0, 5.0, len(train)).astype(np.float32)
    weights = positive_weights(rated, True)
    assert weights.mean() == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(weights, rated.ratings / rated.ratings.mean(), rtol=1e-6)
    assert np.all(positive_weights(rated, False) == 1.0)
    examples = build_examples(rated, ExampleRecipe(0, 1), None, epoch=0, seed=0)
    np.testing.assert_allclose(examples.weights[: len(rated)], weights)
    assert np.all(examples.weights[len(rated) :] == 1.0)


def test_pair_batches_carry_weights_and_match_pair_batch(split) -> None:
    train, _ = split
    examples = build_examples(train, ExampleRecipe(0, 1), None, epoch=0, seed=0)
    batches = list(
        pair_batches(
            train,
            examples.user_ids,
            examples.item_ids,
            examples.labels,
            16,
            weights=examples.weights,
            shuffle=False,
        )
    )
    assert all(isinstance(batch, WeightedBatch) for batch in batches)
    first = batches[0]
    reference = pair_batch(
        train, examples.user_ids[:16], examples.item_ids[:16], examples.labels[:16]
    )
    torch.testing.assert_close(first.dense_features, reference.dense_features)
    torch.testing.assert_close(first.sparse_features.values(), reference.sparse_features.values())
    torch.testing.assert_close(first.weights, torch.from_numpy(examples.weights[:16]))
    with pytest.raises(InvalidInput, match="start batch"):
        pair_batches(
            train, examples.user_ids, examples.item_ids, examples.labels, 16, start_batch=10**6
        )
