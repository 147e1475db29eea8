"""The synthetic generator: determinism, shapes, O(n) size, the spec it goes through, and planted
signal that simple baselines and a trained two-tower find."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from recship.base.errors import InvalidInput
from recship.trainer.config import TrainConfig
from recship.trainer.data import synthetic
from recship.trainer.data.builtin import synthetic_spec
from recship.trainer.data.dataset import InteractionDataset
from recship.trainer.data.synthetic import generate, genre_names, synthetic_tables
from recship.trainer.data.tables import load_tables
from recship.trainer.train import launch


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


def test_raw_tables_go_through_the_built_in_spec() -> None:
    tables = synthetic_tables(num_users=80, num_items=50, interactions_per_user=4, seed=7)
    assert tables["users"].column_names == ["user_id", "age", "gender", "occupation", "zip"]
    assert tables["items"].column_names == ["item_id", "title", "genres", "year"]
    assert tables["interactions"].column_names == ["user_id", "item_id", "label", "timestamp"]
    assert set(tables["users"].column("gender").to_pylist()) <= {"gender_0", "gender_1"}
    zips = tables["users"].column("zip").to_pylist()
    assert all(len(z) == 5 for z in zips)
    data = load_tables(synthetic_spec(genre_names(18)), tables=tables)
    again = generate(num_users=80, num_items=50, interactions_per_user=4, seed=7)
    for name in ("user_ids", "item_ids", "labels", "timestamps"):
        np.testing.assert_array_equal(getattr(data, name), getattr(again, name))
    # Fitted by the spec's transforms, which travel to the bundle: raw ids are 1..n.
    assert again.transforms is not None
    assert again.raw_user_ids[:3].tolist() == ["1", "2", "3"]
    assert again.vocabularies["user_gender"] == ["gender_0", "gender_1"]
    assert again.transforms.features["user_occupation"].default in synthetic.OCCUPATIONS
    assert len(again.vocabularies["user_occupation"]) == synthetic.NUM_OCCUPATIONS
    # Raw values land in the buckets the spec declares.
    ages = np.asarray(tables["users"].column("age"))
    buckets = again.users.sparse["user_age_bucket"].values
    assert np.array_equal(buckets, np.searchsorted([18, 25, 35, 45, 50, 56], ages, side="right"))


def test_fixed_vocabularies_keep_cardinalities_on_tiny_data() -> None:
    tiny = generate(num_users=3, num_items=2, interactions_per_user=1, seed=0)
    big = generate(num_users=300, num_items=200, interactions_per_user=3, seed=0)
    for name in ("user_gender", "user_occupation", "user_zip_prefix", "item_genres"):
        assert (
            tiny.schema.sparse_feature(name).cardinality
            == big.schema.sparse_feature(name).cardinality
        )


def test_chunks_are_seeded_and_each_user_gets_distinct_items(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(synthetic, "USERS_PER_CHUNK", 64)
    a = generate(num_users=300, num_items=40, interactions_per_user=12, seed=2)
    b = generate(num_users=300, num_items=40, interactions_per_user=12, seed=2)
    np.testing.assert_array_equal(a.item_ids, b.item_ids)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert np.array_equal(np.bincount(a.user_ids), np.full(300, 12))
    pairs = a.user_ids * a.num_items + a.item_ids
    assert np.unique(pairs).size == pairs.size
    # Chunks draw from their own seeded streams: two chunks never repeat each other.
    first, second = (a.item_ids[a.user_ids // 64 == c][:200] for c in (0, 1))
    assert not np.array_equal(first, second)
    # Asking for every item of the catalogue still ends (the exact top-up).
    full = generate(num_users=20, num_items=12, interactions_per_user=12, seed=1)
    assert (np.sort(full.item_ids.reshape(20, 12), axis=1) == np.arange(12)).all()


def test_size_is_linear_not_users_times_items() -> None:
    # 10^5 x 10^5 would be 10^10 pair scores for a generator that scores every pair.
    start = time.perf_counter()
    data = generate(num_users=100_000, num_items=100_000, interactions_per_user=2, seed=0)
    elapsed = time.perf_counter() - start
    assert len(data) == 200_000 and data.num_items == 100_000
    assert elapsed < 30, f"{elapsed:.1f} s"  # about 1 s here; scoring every pair takes minutes


def test_taste_follows_user_attributes(data: InteractionDataset) -> None:
    """Popularity among users of the same age bucket and occupation beats global popularity:
    the clusters a user draws from follow its attributes."""
    train, held_out = data.split(0.2, seed=0)
    users = data.users.sparse
    group = users["user_age_bucket"].values * 21 + users["user_occupation"].values
    by_group = np.zeros((7 * 21, data.num_items))
    np.add.at(by_group, (group[train.user_ids], train.item_ids), 1.0)
    overall = np.bincount(train.item_ids, minlength=data.num_items).astype(float)
    popular = _recall_at_10(train, held_out, lambda _: overall)
    grouped = _recall_at_10(train, held_out, lambda user: by_group[group[user]] + 1e-3 * overall)
    assert grouped > 1.2 * popular


@pytest.mark.slow
def test_a_trained_two_tower_beats_popularity(tmp_path: Path) -> None:
    """Real TorchRec training (one rank, seeded) recovers the planted structure."""
    options = {"num_users": 500, "num_items": 400, "interactions_per_user": 10, "seed": 3}
    config = TrainConfig(
        model="two-tower",
        data="synthetic",
        out=tmp_path / "run",
        nproc=1,
        epochs=3,
        batch_size=256,
        seed=1,
        data_options=options,
    )
    metrics = launch(config)
    recall = metrics["eval"]["recall@10"]
    popular = metrics["baselines"]["popularity"]["recall@10"]
    assert recall > 1.3 * popular, (recall, popular)
    assert recall > 4 * 10 / options["num_items"]
