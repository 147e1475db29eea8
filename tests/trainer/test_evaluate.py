"""Evaluation functions against straightforward references on tiny hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recship.trainer.data.synthetic import generate
from recship.trainer.evaluate import binary_metrics, popularity_baseline, retrieval_metrics


def _pairwise_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    positive, negative = scores[labels == 1], scores[labels == 0]
    wins = (positive[:, None] > negative[None, :]).sum() + 0.5 * (
        positive[:, None] == negative[None, :]
    ).sum()
    return float(wins / (positive.size * negative.size))


def test_auc_and_log_loss_match_references_with_ties() -> None:
    rng = np.random.default_rng(0)
    logits = rng.integers(-3, 4, 400).astype(np.float64)  # many ties
    labels = (rng.random(400) < 1 / (1 + np.exp(-logits))).astype(np.float64)
    metrics = binary_metrics(logits, labels)
    assert metrics["auc"] == pytest.approx(_pairwise_auc(logits, labels), abs=1e-12)
    probability = 1 / (1 + np.exp(-logits))
    reference = -np.mean(labels * np.log(probability) + (1 - labels) * np.log(1 - probability))
    assert metrics["log_loss"] == pytest.approx(reference, rel=1e-9)
    assert np.isnan(binary_metrics(np.zeros(3), np.ones(3))["auc"])


def test_retrieval_metrics_exclude_training_positives() -> None:
    data = generate(num_users=4, num_items=30, interactions_per_user=6, seed=1)
    train, held_out = data.split(0.5, seed=0)
    # Score items so that each user's held-out items come first, then its training items.
    item_vectors = torch.eye(data.num_items)
    user_vectors = torch.zeros(data.num_users, data.num_items)
    for user, item in zip(held_out.user_ids, held_out.item_ids, strict=True):
        user_vectors[user, item] = 2.0
    for user, item in zip(train.user_ids, train.item_ids, strict=True):
        user_vectors[user, item] = 3.0  # would win if not excluded
    metrics = retrieval_metrics(user_vectors, item_vectors, train, held_out, ks=(3, 10))
    assert metrics["recall@3"] == pytest.approx(1.0)
    assert metrics["recall@10"] == pytest.approx(1.0)
    assert metrics["ndcg@10"] == pytest.approx(1.0)
    assert metrics["eval_users"] == 4
    # Reversed preferences: held-out items rank last among the unseen ones.
    metrics = retrieval_metrics(-user_vectors, item_vectors, train, held_out, ks=(3, 10))
    assert metrics["recall@3"] == 0.0 and metrics["ndcg@10"] == 0.0


def test_popularity_baseline_beats_random_on_skewed_data() -> None:
    data = generate(num_users=200, num_items=300, interactions_per_user=10, seed=2)
    train, held_out = data.split(0.2, seed=0)
    assert popularity_baseline(train, held_out)["recall@10"] > 3 * 10 / data.num_items


def _scored_ranker(data, scores: np.ndarray):
    """A real DLRM whose logit is `scores[user, item]`, for end-to-end tests.

    The over arch is replaced by a lookup: the ranker stage is what is tested, not the DLRM.
    """
    from pathlib import Path

    from recship.trainer.config import TrainConfig, model_config_for, resolve_defaults
    from recship.trainer.models import build_model

    config = resolve_defaults(
        TrainConfig(
            model="dlrm", data="synthetic", out=Path("unused"), embedding_dim=4, examples="labelled"
        ),
        data.schema.name,
    )
    model = build_model(model_config_for(config, data.schema))
    table = torch.from_numpy(scores.astype(np.float32))

    def forward(dense, sparse):
        features = sparse.to_dict()
        users = features["user_id"].values()
        items = features["item_id"].values()
        return table[users, items].unsqueeze(1)

    model.forward = forward  # type: ignore[method-assign]
    return model


def test_end_to_end_metrics_against_retrieval_and_an_oracle_ranker() -> None:
    from recship.trainer.evaluate import end_to_end_metrics

    data = generate(num_users=40, num_items=60, interactions_per_user=8, seed=5)
    train, held_out = data.split(0.25, seed=0)
    rng = np.random.default_rng(0)
    users = torch.from_numpy(rng.normal(size=(data.num_users, 5))).float()
    items = torch.from_numpy(rng.normal(size=(data.num_items, 5))).float()
    oracle = np.zeros((data.num_users, data.num_items))
    oracle[held_out.user_ids, held_out.item_ids] = 10.0
    metrics = end_to_end_metrics(
        users, items, _scored_ranker(data, oracle), train, held_out, ks=(5, 20, 60)
    )
    reference = retrieval_metrics(users, items, train, held_out, ks=(10,))
    assert metrics["retrieval/recall@10"] == pytest.approx(reference["recall@10"], abs=1e-9)
    assert metrics["retrieval/ndcg@10"] == pytest.approx(reference["ndcg@10"], abs=1e-9)
    # Popularity with ties among equal counts going to the lower item id, as candidates do
    # (popularity_baseline's topk breaks them otherwise: on 60 items ties are common).
    counts = np.bincount(train.item_ids, minlength=data.num_items).astype(np.float64)
    by_count = torch.from_numpy(counts - 1e-6 * np.arange(data.num_items)).unsqueeze(1)
    popularity = retrieval_metrics(
        torch.ones(data.num_users, 1, dtype=torch.float64), by_count, train, held_out, ks=(10,)
    )
    assert metrics["popularity/recall@10"] == pytest.approx(popularity["recall@10"], abs=1e-9)
    assert metrics["popularity/recall@10"] == pytest.approx(
        popularity_baseline(train, held_out, ks=(10,))["recall@10"], abs=0.05
    )
    # The oracle ranker serves every held-out item among the candidates: with K covering the
    # catalogue that is all of them (each user has 2 held-out items, fewer than 10).
    assert metrics["recommend@60/recall@10"] == pytest.approx(1.0)
    assert metrics["recommend@60/ndcg@10"] == pytest.approx(1.0)
    # With K = 5 it can only reorder the retrieval's first 5: recall@10 is retrieval's recall@5.
    assert metrics["recommend@5/recall@10"] == pytest.approx(
        retrieval_metrics(users, items, train, held_out, ks=(5,))["recall@5"], abs=1e-9
    )
    assert metrics["eval_users"] == reference["eval_users"]


def _untrained_two_tower(data):
    from pathlib import Path

    from recship.trainer.config import TrainConfig, model_config_for, resolve_defaults
    from recship.trainer.models import build_model

    config = resolve_defaults(
        TrainConfig(model="two-tower", data="synthetic", out=Path("unused"), embedding_dim=8),
        data.schema.name,
    )
    model_config = model_config_for(config, data.schema)
    torch.manual_seed(0)
    return model_config, build_model(model_config)


def test_a_sample_of_every_user_is_the_full_evaluation(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sampled evaluation (only the sampled users embedded, ranked in bounded blocks)
    equals the full one when the sample is every held-out user; the popularity baseline too."""
    from recship.trainer import evaluate as evaluation

    data = generate(num_users=300, num_items=120, interactions_per_user=8, seed=2)
    train, held_out = data.split(0.2, seed=0)
    model_config, model = _untrained_two_tower(data)
    full = evaluation.evaluate(model_config, model, train, held_out)
    everyone = np.unique(held_out.user_ids)
    assert evaluation.eval_user_sample(held_out, 0, seed=1) is None
    assert evaluation.eval_user_sample(held_out, everyone.size, seed=1) is None
    # Blocks of 7 users (7 * 120 scores): several blocks, one partial.
    monkeypatch.setattr(evaluation, "SCORES_PER_BLOCK", 7 * data.num_items)
    sampled = evaluation.evaluate(model_config, model, train, held_out, users=everyone)
    assert sampled == full  # exactly: the same float64 scores and ties
    assert full["eval_users"] == everyone.size
    assert popularity_baseline(train, held_out, users=everyone) == popularity_baseline(
        train, held_out
    )


def test_a_smaller_sample_is_seeded_and_ranks_only_its_users() -> None:
    from recship.trainer.evaluate import eval_user_sample, evaluate, tower_embeddings

    data = generate(num_users=300, num_items=120, interactions_per_user=8, seed=2)
    train, held_out = data.split(0.2, seed=0)
    sample = eval_user_sample(held_out, 40, seed=3)
    assert sample is not None and sample.size == 40
    assert np.array_equal(sample, eval_user_sample(held_out, 40, seed=3))
    assert not np.array_equal(sample, eval_user_sample(held_out, 40, seed=4))
    assert np.all(np.diff(sample) > 0) and np.isin(sample, held_out.user_ids).all()
    model_config, model = _untrained_two_tower(data)
    metrics = evaluate(model_config, model, train, held_out, users=sample)
    assert metrics["eval_users"] == 40
    # Reference: every user embedded, the held-out split cut to the sample, ranked in full.
    model.eval()
    queries = tower_embeddings(model.query_tower, train.users, model.query_tower.feature_names)
    items = tower_embeddings(
        model.candidate_tower, train.items, model.candidate_tower.feature_names
    )
    only = held_out._subset(np.isin(held_out.user_ids, sample))
    reference = retrieval_metrics(queries, items, train, only)
    assert metrics == pytest.approx(reference, abs=1e-12)
    with pytest.raises(ValueError, match=">= 0"):
        eval_user_sample(held_out, -1, seed=0)


def _view_state(model: torch.nn.Module, rows: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """The whole model's state with each user table cut to the rows a view keeps."""
    state = {}
    for key, value in model.state_dict().items():
        table = key.split(".")[-2] if ".embedding_bags." in key else None
        state[key] = value[torch.from_numpy(rows[table])] if table in rows else value
    return state


def test_evaluation_view_gives_the_whole_models_metrics_on_its_users() -> None:
    from recship.trainer.evaluate import eval_user_sample, evaluate, evaluation_view
    from recship.trainer.models import build_model

    data = generate(num_users=300, num_items=80, interactions_per_user=6, seed=3)
    train, held_out = data.split(0.3, seed=0)
    config, model = _untrained_two_tower(data)
    users = eval_user_sample(held_out, 50, seed=0)
    view = evaluation_view(config, train, held_out, users)
    assert 0 < view.rows["t_user_id"].size < data.num_users  # only the sampled users' rows
    small = build_model(view.model_config)
    small.load_state_dict(_view_state(model, view.rows))
    whole = evaluate(config, model, train, held_out, users=users)
    assert evaluate(view.model_config, small, view.train, view.held_out) == pytest.approx(whole)


def test_evaluation_view_of_no_users_keeps_one_row_per_user_table() -> None:
    from recship.trainer.evaluate import evaluate, evaluation_view
    from recship.trainer.models import build_model

    data = generate(num_users=30, num_items=40, interactions_per_user=4, seed=4)
    config, model = _untrained_two_tower(data)
    empty = data.split(0.0, seed=0)[1]
    view = evaluation_view(config, data, empty)
    assert view.users.size == 0 and all(rows.tolist() == [0] for rows in view.rows.values())
    small = build_model(view.model_config)
    small.load_state_dict(_view_state(model, view.rows))
    assert evaluate(view.model_config, small, view.train, view.held_out) == {}


def test_popularity_lists_equal_exact_ranking_by_count_for_the_asked_users() -> None:
    from recship.trainer.data.ranking_examples import mine_candidates
    from recship.trainer.evaluate import popularity_lists

    data = generate(num_users=120, num_items=25, interactions_per_user=9, seed=6)
    train, _ = data.split(0.2, seed=0)
    counts = np.bincount(train.item_ids, minlength=train.num_items).astype(np.float64)
    # Exact ranking of every item by count for every user, own items excluded, ties (common
    # with 25 items) to the lower id, -1 where fewer unseen items than asked remain.
    exact = mine_candidates(np.ones((train.num_users, 1)), counts[:, None], train, 20)
    users = np.array([0, 7, 8, 50, 119])
    assert (popularity_lists(train, users, 20) == exact[users]).all()
    assert (popularity_lists(train, users, 20) == -1).any()  # the padding is exercised
    assert popularity_lists(train, np.zeros(0, dtype=np.int64), 5).shape == (0, 5)
