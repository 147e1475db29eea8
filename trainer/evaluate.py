"""Held-out evaluation as plain functions over an unsharded model.

Two-tower: recall@K and NDCG@10 by exact full ranking of every item for every evaluated user,
with the user's training positives excluded (RecBole's definitions: recall@K = hits in the
top K / the user's held-out items; averaged over users with at least one held-out item). At
size the evaluated users are a seeded sample of the held-out users (`eval_user_sample`: the
trainer's --eval-users, `config.DEFAULT_EVAL_USERS`), ranked against every item in blocks of
users that bound the score matrix (`SCORES_PER_BLOCK`): exact, in memory independent of the
catalogue size.
DLRM: ROC AUC and log loss of the held-out interactions' labels.
End to end (`end_to_end_metrics`): what Recommend serves, offline and exact: each held-out
user's retrieval top K (training items excluded), re-ranked by the DLRM, cut to the top N,
against retrieval alone and popularity on the same users. Only held-out interactions count as
relevant; every one of them does (engagement, whatever the rating).

The same functions run at the end of training (on weights gathered from the shards) and on a
checkpoint reloaded in one process, so both give the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.models.dlrm import DLRM

from recship.base.jagged import EntityTable, JaggedColumn
from recship.trainer.config import ModelConfig
from recship.trainer.data.batches import entity_kjt, pair_batch, ranking_batches
from recship.trainer.data.dataset import InteractionDataset
from recship.trainer.data.ranking_examples import mine_candidates
from recship.trainer.models import TwoTower, dlrm_logits

RECALL_KS: tuple[int, ...] = (10, 50, 100)
NDCG_K = 10
#: Candidates retrieved per user before ranking in the end-to-end evaluation.
END_TO_END_KS: tuple[int, ...] = (50, 100, 200, 500, 1000)
#: Items served per user after ranking (Recommend's top_n) in the end-to-end evaluation.
END_TO_END_TOP_N = 10
#: The retrieve_k a bundle should default to with a ranker trained on interactions: on ML-100K
#: the end-to-end metrics are flat from K = 50 up (the ranker keeps the retrieval order's
#: information), so the smallest K with room for a client's excluded items wins on cost.
DEFAULT_RETRIEVE_K = 100
#: float64 scores held at once while ranking (users per block = this // items; 128 MiB).
SCORES_PER_BLOCK = 1 << 24


@dataclass(frozen=True)
class EvaluationView:
    """What an evaluation of some users reads, and nothing more: a model whose user-side
    tables hold only the rows those users' features look up, and the data re-indexed to it.

    At 10M users the user table alone is 2.4 GiB; gathering every table to one rank (twice
    over: the state, then the unsharded model) to evaluate 10k sampled users is what made one
    rank peak at 15.6 GiB. A view's model has the same weights for the rows it keeps, so its
    metrics equal those of the whole model on the same users.

    Attributes:
        users: int64 [U] the evaluated users' ids, sorted; user u of the view is users[u].
        rows: user-side table name -> int64 sorted rows of the whole table the view keeps
            (row r of the view's table is rows[r] of the whole one). Item tables are whole.
        model_config: the config of the view's model (user tables resized to their rows).
        train: the training interactions of `users`, on the view's user table.
        held_out: their held-out interactions, likewise.
    """

    users: np.ndarray
    rows: dict[str, np.ndarray]
    model_config: ModelConfig
    train: InteractionDataset
    held_out: InteractionDataset


def evaluation_view(
    config: ModelConfig,
    train: InteractionDataset,
    held_out: InteractionDataset,
    users: np.ndarray | None = None,
) -> EvaluationView:
    """The view of an evaluation of `users` (sorted ids; None: every held-out user)."""
    if users is None:
        users = np.unique(held_out.user_ids)
    users = np.asarray(users, dtype=np.int64)
    sparse, rows, tables = {}, {}, []
    for table in config.tables:
        if table.side != "user":
            tables.append(table)
            continue
        values, lengths = train.users.sparse[table.feature].gather(users)
        # No users (no held-out data) still keeps one row: a table cannot be empty.
        kept = np.unique(values) if values.size else np.zeros(1, dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        sparse[table.feature] = JaggedColumn(np.searchsorted(kept, values), offsets)
        rows[table.name] = kept
        tables.append(replace(table, num_embeddings=kept.size))
    compact = EntityTable(num_rows=users.size, sparse=sparse, dense=train.users.dense[users])

    def restrict(data: InteractionDataset) -> InteractionDataset:
        mine = np.isin(data.user_ids, users)
        return replace(
            data,
            users=compact,
            user_ids=np.searchsorted(users, data.user_ids[mine]),
            item_ids=data.item_ids[mine],
            labels=data.labels[mine],
            timestamps=data.timestamps[mine],
            ratings=None if data.ratings is None else data.ratings[mine],
            raw_user_ids=None if data.raw_user_ids is None else data.raw_user_ids[users],
        )

    return EvaluationView(
        users, rows, replace(config, tables=tuple(tables)), restrict(train), restrict(held_out)
    )


@torch.no_grad()
def tower_embeddings(
    tower: nn.Module,
    table: EntityTable,
    feature_names: Sequence[str],
    batch_size: int = 4096,
    ids: np.ndarray | None = None,
) -> torch.Tensor:
    """Embeds rows of an entity table with one tower: every row, or the rows `ids`.

    Returns:
        float32 [table.num_rows, D], row r = entity id r; with `ids`, [len(ids), D] in the
        order of `ids`.
    """
    if ids is None:
        ids = np.arange(table.num_rows, dtype=np.int64)
    parts = [
        tower(entity_kjt(table, ids[start : start + batch_size], feature_names))
        for start in range(0, ids.size, batch_size)
    ]
    return torch.cat(parts)


def eval_user_sample(held_out: InteractionDataset, count: int, seed: int) -> np.ndarray | None:
    """A seeded sample of `count` users with held-out interactions, sorted; None (every such
    user) when `count` is 0 or at least their number.

    The sample depends on the held-out split and the seed only, so the evaluations of one run
    (during training, at its end) and of a resumed run rank the same users.
    """
    if count < 0:
        raise ValueError(f"the evaluation sample must be >= 0 users, got {count}")
    users = np.unique(held_out.user_ids)
    if count == 0 or count >= users.size:
        return None
    rng = np.random.default_rng([seed & 0xFFFFFFFF, 0xE7A1])
    return np.sort(rng.choice(users, size=count, replace=False))


def positives_by_user(
    user_ids: np.ndarray, item_ids: np.ndarray, users: np.ndarray | None = None
) -> dict[int, np.ndarray]:
    """Maps each user id (of `users` only, when given) to the sorted unique items it
    interacted with."""
    if users is not None:
        wanted = np.zeros(max(int(user_ids.max(initial=-1)), int(users.max(initial=-1))) + 1, bool)
        wanted[users] = True
        mine = wanted[user_ids]
        user_ids, item_ids = user_ids[mine], item_ids[mine]
    order = np.lexsort((item_ids, user_ids))
    users, items = user_ids[order], item_ids[order]
    bounds = np.flatnonzero(np.diff(users)) + 1
    return {
        int(user_block[0]): np.unique(item_block)
        for user_block, item_block in zip(
            np.split(users, bounds), np.split(items, bounds), strict=True
        )
        if user_block.size
    }


def retrieval_metrics(
    user_embeddings: torch.Tensor,
    item_embeddings: torch.Tensor,
    train: InteractionDataset,
    held_out: InteractionDataset,
    ks: Sequence[int] = RECALL_KS,
    user_batch: int = 1024,
    users: np.ndarray | None = None,
) -> dict[str, float]:
    """Recall@K and NDCG@10 by exact full ranking, training positives excluded.

    Args:
        user_embeddings: float32 [num_users, D], row = user id; or, with `users`, either that
            or [len(users), D], row i = user users[i] (only the evaluated users embedded).
        item_embeddings: float32 [num_items, D].
        train: the training split (its positives are masked out of each user's ranking).
        held_out: the evaluation split (its positives are the targets).
        ks: the K of each recall@K.
        user_batch: users scored per matrix product (at most SCORES_PER_BLOCK // num_items).
        users: evaluate only these users (sorted unique ids, e.g. `eval_user_sample`); None:
            every user with a held-out interaction.

    Returns:
        {"recall@K": ..., "ndcg@10": ..., "eval_users": n}; zeros and n = 0 when the held-out
        split is empty.
    """
    rows_of: np.ndarray | None = None  # user id -> row of user_embeddings, when not the id
    if users is not None:
        users = np.asarray(users, dtype=np.int64)
        if user_embeddings.shape[0] == users.size:
            rows_of = np.full(max(train.num_users, held_out.num_users), -1, dtype=np.int64)
            rows_of[users] = np.arange(users.size)
    targets = positives_by_user(held_out.user_ids, held_out.item_ids, users)
    seen = positives_by_user(train.user_ids, train.item_ids, users)
    users = np.array(sorted(targets), dtype=np.int64)
    num_items = item_embeddings.shape[0]
    user_batch = max(1, min(user_batch, SCORES_PER_BLOCK // max(num_items, 1)))
    items_t = item_embeddings.double().T
    max_k = min(max(max(ks), NDCG_K), num_items)
    hits_at = {k: 0.0 for k in ks}
    ndcg_total = 0.0
    discounts = 1.0 / np.log2(np.arange(2, NDCG_K + 2))
    for start in range(0, users.size, user_batch):
        block = users[start : start + user_batch]
        block_rows = block if rows_of is None else rows_of[block]
        scores = user_embeddings[torch.from_numpy(block_rows)].double() @ items_t
        rows = [np.full(seen.get(int(u), np.empty(0)).size, i) for i, u in enumerate(block)]
        cols = [seen.get(int(u), np.empty(0, np.int64)) for u in block]
        if rows:
            scores[
                torch.from_numpy(np.concatenate(rows)), torch.from_numpy(np.concatenate(cols))
            ] = -torch.inf
        top = torch.topk(scores, max_k, dim=1).indices.numpy()
        for row, user in enumerate(block):
            relevant = targets[int(user)]
            is_hit = np.isin(top[row], relevant)
            for k in ks:
                hits_at[k] += is_hit[:k].sum() / relevant.size
            ideal = discounts[: min(relevant.size, NDCG_K)].sum()
            ndcg_total += float((is_hit[:NDCG_K] * discounts[: is_hit[:NDCG_K].size]).sum() / ideal)
    count = max(users.size, 1)
    metrics = {f"recall@{k}": float(hits_at[k] / count) for k in ks}
    metrics[f"ndcg@{NDCG_K}"] = ndcg_total / count
    metrics["eval_users"] = int(users.size)
    return metrics


def popularity_baseline(
    train: InteractionDataset,
    held_out: InteractionDataset,
    ks: Sequence[int] = RECALL_KS,
    users: np.ndarray | None = None,
) -> dict[str, float]:
    """Retrieval metrics of ranking items by training popularity (the bar a model must beat),
    on the users `users` (see `retrieval_metrics`) or every held-out user."""
    counts = np.bincount(train.item_ids, minlength=train.num_items).astype(np.float32)
    item_scores = torch.from_numpy(counts).unsqueeze(1)
    user_scores = torch.ones(train.num_users if users is None else len(users), 1)
    return retrieval_metrics(user_scores, item_scores, train, held_out, ks, users=users)


def binary_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """ROC AUC (ties get average ranks) and log loss of binary labels.

    Args:
        logits: float [N] raw scores (log-odds).
        labels: {0, 1} [N].

    Returns:
        {"auc", "log_loss", "eval_examples", "positive_rate"}; AUC is NaN with one class only.
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    positives = float(labels.sum())
    negatives = float(labels.size - positives)
    order = np.argsort(logits, kind="mergesort")
    sorted_logits = logits[order]
    ranks = np.empty(labels.size, dtype=np.float64)
    # Average 1-based ranks over runs of equal scores.
    boundaries = np.flatnonzero(np.diff(sorted_logits)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [labels.size]])
    for begin, end in zip(starts, ends, strict=True):
        ranks[order[begin:end]] = (begin + end + 1) / 2.0
    if positives == 0 or negatives == 0:
        auc = float("nan")
    else:
        auc = float(
            (ranks[labels == 1].sum() - positives * (positives + 1) / 2) / (positives * negatives)
        )
    log_loss = float(
        F.binary_cross_entropy_with_logits(torch.from_numpy(logits), torch.from_numpy(labels))
    )
    return {
        "auc": auc,
        "log_loss": log_loss,
        "eval_examples": int(labels.size),
        "positive_rate": positives / max(labels.size, 1),
    }


@torch.no_grad()
def evaluate(
    config: ModelConfig,
    model: nn.Module,
    train: InteractionDataset,
    held_out: InteractionDataset,
    batch_size: int = 4096,
    users: np.ndarray | None = None,
) -> dict[str, float]:
    """Evaluates an unsharded model on the held-out split.

    Args:
        config: the model's config (picks the metrics).
        model: `TwoTower` or `DLRM`, unsharded, on CPU.
        train: the training split (two-tower: positives excluded from the ranking).
        held_out: the evaluation split.
        batch_size: rows per forward pass.
        users: two-tower: rank for these users only (sorted ids, `eval_user_sample`; only
            they are embedded); None: every held-out user. DLRM: ignored (every held-out pair
            is scored, O(pairs)).

    Returns:
        Two-tower: recall@10/50/100, ndcg@10, eval_users. DLRM: auc, log_loss, eval_examples,
        positive_rate. Empty dict when the held-out split is empty.
    """
    if len(held_out) == 0:
        return {}
    was_training = model.training
    model.eval()
    try:
        if config.kind == "two-tower":
            if not isinstance(model, TwoTower):
                raise TypeError(f"two-tower config needs a TwoTower, got {type(model).__name__}")
            queries = tower_embeddings(
                model.query_tower, train.users, model.query_tower.feature_names, batch_size, users
            )
            items = tower_embeddings(
                model.candidate_tower, train.items, model.candidate_tower.feature_names, batch_size
            )
            return retrieval_metrics(queries, items, train, held_out, users=users)
        return evaluate_ranking(
            model, ranking_batches(held_out, batch_size, drop_last=False, shuffle=False)
        )
    finally:
        model.train(was_training)


@torch.no_grad()
def evaluate_ranking(model: nn.Module, batches: Iterable[Batch]) -> dict[str, float]:
    """AUC and log loss of an unsharded DLRM over ranking batches (see `binary_metrics`)."""
    if not isinstance(model, DLRM):
        raise TypeError(f"ranking evaluation needs a DLRM, got {type(model).__name__}")
    was_training = model.training
    model.eval()
    try:
        logits, labels = [], []
        for batch in batches:
            logits.append(dlrm_logits(model, batch).numpy())
            labels.append(batch.labels.numpy())
        if not logits:
            return {}
        return binary_metrics(np.concatenate(logits), np.concatenate(labels))
    finally:
        model.train(was_training)


def top_n_metrics(
    ranked: np.ndarray, targets: Sequence[np.ndarray], top_n: int = END_TO_END_TOP_N
) -> tuple[float, float]:
    """Mean recall@N and NDCG@N of served lists (the definitions of `retrieval_metrics`).

    Args:
        ranked: int [U, >= N] each user's served items, best first; -1 marks no item.
        targets: U arrays of the user's relevant (held-out) items, each non-empty.
        top_n: N.

    Returns:
        (recall@N, NDCG@N) averaged over the U users; (0, 0) when U is 0.
    """
    if len(targets) == 0:
        return 0.0, 0.0
    discounts = 1.0 / np.log2(np.arange(2, top_n + 2))
    recall = ndcg = 0.0
    for row, relevant in zip(ranked[:, :top_n], targets, strict=True):
        is_hit = np.isin(row, relevant) & (row >= 0)
        recall += is_hit.sum() / relevant.size
        ideal = discounts[: min(relevant.size, top_n)].sum()
        ndcg += float((is_hit * discounts[: is_hit.size]).sum() / ideal)
    return recall / len(targets), ndcg / len(targets)


@torch.no_grad()
def ranker_logits(
    ranker: nn.Module,
    data: InteractionDataset,
    user_ids: np.ndarray,
    item_ids: np.ndarray,
    batch_size: int = 16384,
) -> np.ndarray:
    """DLRM logits of arbitrary (user, item) pairs, features from `data`'s tables.

    Returns:
        float32 [len(user_ids)].
    """
    if not isinstance(ranker, DLRM):
        raise TypeError(f"ranking needs a DLRM, got {type(ranker).__name__}")
    was_training = ranker.training
    ranker.eval()
    try:
        parts = [np.zeros(0, dtype=np.float32)]
        for start in range(0, user_ids.size, batch_size):
            batch = pair_batch(
                data, user_ids[start : start + batch_size], item_ids[start : start + batch_size]
            )
            parts.append(dlrm_logits(ranker, batch).numpy())
        return np.concatenate(parts)
    finally:
        ranker.train(was_training)


@torch.no_grad()
def end_to_end_metrics(
    user_embeddings: torch.Tensor | np.ndarray,
    item_embeddings: torch.Tensor | np.ndarray,
    ranker: nn.Module,
    train: InteractionDataset,
    held_out: InteractionDataset,
    ks: Sequence[int] = END_TO_END_KS,
    top_n: int = END_TO_END_TOP_N,
) -> dict[str, float]:
    """Recommend offline: retrieve K, rank with the DLRM, serve the top N; vs. retrieval alone.

    For every user with held-out interactions: the exact inner-product top max(ks) items with
    the user's training items excluded (so K real candidates, as when a client excludes what
    the user has), DLRM logits for all of them, and for each K the N best-ranked of the first
    K. Popularity (training counts, training items excluded) is the floor to beat.

    Args:
        user_embeddings: float [num_users, D] query-tower outputs, row = user id.
        item_embeddings: float [num_items, D] candidate-tower outputs, row = item id.
        ranker: an unsharded DLRM.
        train: the training split (excluded from the candidates; supplies the features).
        held_out: the evaluation split: its interactions are the relevant items.
        ks: retrieval depths to rank.
        top_n: items served.

    Returns:
        {"popularity/recall@N", "popularity/ndcg@N", "retrieval/recall@N", "retrieval/ndcg@N",
        "recommend@K/recall@N", "recommend@K/ndcg@N" for each K, "eval_users"}; {} when the
        held-out split is empty.
    """
    targets = positives_by_user(held_out.user_ids, held_out.item_ids)
    if not targets:
        return {}
    users = np.array(sorted(targets), dtype=np.int64)
    max_k = max(max(ks), top_n)
    candidates = mine_candidates(user_embeddings, item_embeddings, train, max_k)[users]
    return pipeline_metrics(
        users,
        candidates,
        lambda user_ids, item_ids: ranker_logits(ranker, train, user_ids, item_ids),
        targets,
        train,
        ks,
        top_n,
    )


def popularity_lists(train: InteractionDataset, users: np.ndarray, top_n: int) -> np.ndarray:
    """int [U, top_n] the most interacted-with training items per user, the user's own
    training items excluded (the floor any recommender must beat)."""
    # One list for everyone (by count, ties to the lower item id, as `mine_candidates` breaks
    # them), cut per user: O(users x (top_n + own items)), not users x items.
    counts = np.bincount(train.item_ids, minlength=train.num_items)
    seen = positives_by_user(train.user_ids, train.item_ids, users)
    most_seen = max((items.size for items in seen.values()), default=0)
    ranked = np.argsort(-counts, kind="stable")[: top_n + most_seen]
    lists = np.full((users.size, min(top_n, train.num_items)), -1, dtype=np.int64)
    for row, user in enumerate(users.tolist()):
        own = seen.get(user)
        mine = ranked if own is None else ranked[~np.isin(ranked, own)]
        mine = mine[: lists.shape[1]]
        lists[row, : mine.size] = mine
    return lists


def pipeline_metrics(
    users: np.ndarray,
    candidates: np.ndarray,
    score: Callable[[np.ndarray, np.ndarray], np.ndarray],
    targets: Mapping[int, np.ndarray],
    train: InteractionDataset,
    ks: Sequence[int] = END_TO_END_KS,
    top_n: int = END_TO_END_TOP_N,
) -> dict[str, float]:
    """Top-N quality of popularity, retrieval alone and retrieve K -> rank -> top N.

    The one definition the trainer (fp32, exact retrieval) and the packager's gate (packaged
    query tower, index and ranker) share, so their figures compare.

    Args:
        users: int [U] evaluated users, each with held-out items in `targets`.
        candidates: int [U, >= max(ks)] each user's retrieved items, best first, training
            items already excluded; -1 pads.
        score: (user ids [P], item ids [P]) -> ranker logits [P] of those pairs.
        targets: user -> held-out (relevant) items.
        train: the training split (popularity counts; its items are excluded from it).
        ks: retrieval depths to rank; depths beyond `candidates`' width use all of it.
        top_n: items served.

    Returns:
        See `end_to_end_metrics`.
    """
    relevant = [targets[int(u)] for u in users]
    metrics: dict[str, float] = {}
    popular = popularity_lists(train, users, top_n)
    for name, served in (("popularity", popular), ("retrieval", candidates)):
        recall, ndcg = top_n_metrics(served, relevant, top_n)
        metrics[f"{name}/recall@{top_n}"] = recall
        metrics[f"{name}/ndcg@{top_n}"] = ndcg
    depth = min(max(ks), candidates.shape[1])
    candidates = candidates[:, :depth]
    valid = candidates >= 0
    rows = np.repeat(users, valid.sum(axis=1))
    logits = np.full(candidates.shape, -np.inf)
    logits[valid] = score(rows, candidates[valid])
    for k in ks:
        # Stable: equal logits keep the retrieval order.
        order = np.argsort(-logits[:, :k], axis=1, kind="stable")[:, :top_n]
        served = np.take_along_axis(candidates[:, :k], order, axis=1)
        recall, ndcg = top_n_metrics(served, relevant, top_n)
        metrics[f"recommend@{k}/recall@{top_n}"] = recall
        metrics[f"recommend@{k}/ndcg@{top_n}"] = ndcg
    metrics["eval_users"] = int(users.size)
    return metrics


@torch.no_grad()
def retrieval_embeddings(
    model: TwoTower, data: InteractionDataset, batch_size: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """(user embeddings [num_users, D], item embeddings [num_items, D]) of a two-tower model."""
    was_training = model.training
    model.eval()
    try:
        users = tower_embeddings(
            model.query_tower, data.users, model.query_tower.feature_names, batch_size
        )
        items = tower_embeddings(
            model.candidate_tower, data.items, model.candidate_tower.feature_names, batch_size
        )
        return users, items
    finally:
        model.train(was_training)
