"""The packager's quality gate, on validation users (`recship.packager.evaluation`).

Per stage: the exported, quantized query tower feeds the ANN index, and its recall@K is
compared with the fp32 query tower ranking every item exactly (both exclude the user's training
positives); the packaged ranker's AUC on held-out labelled pairs with the fp32 DLRM's. End to
end: the packaged Recommend pipeline (retrieve K with training items excluded inside the search
-> packaged ranker -> top N) against packaged retrieval alone, over a sweep of K that also picks
the bundle's default retrieve_k.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from recship.bundle.manifest import DEFAULT_MAX_TOP_K, END_TO_END_PREFIX
from recship.packager.options import QualityThresholds
from recship.trainer.data.dataset import InteractionDataset
from recship.trainer.evaluate import (
    END_TO_END_KS,
    END_TO_END_TOP_N,
    binary_metrics,
    pipeline_metrics,
)

RECALL_KS: tuple[int, ...] = (10, 100)
#: A deeper default retrieve_k must gain more than this (relative) in recall and NDCG.
RETRIEVE_K_TOLERANCE = 0.01

# search(queries float32 [B, D], k) -> (scores [B, k], item ids int64 [B, k]; -1 = no result)
SearchFn = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class Check:
    """One gate check: `value` compared with `threshold` by `comparison` ("<=" or ">=")."""

    name: str
    value: float
    threshold: float
    comparison: str

    @property
    def passed(self) -> bool:
        if np.isnan(self.value):
            return False
        if self.comparison == "<=":
            return self.value <= self.threshold
        return self.value >= self.threshold


@dataclass(frozen=True)
class QualityResult:
    """Measured metrics and the checks made on them."""

    metrics: dict[str, float]
    checks: tuple[Check, ...]
    eval_queries: int
    eval_examples: int
    end_to_end: EndToEnd | None = None

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    def failures(self) -> list[str]:
        """One readable line per failed check, with its numbers."""
        return [
            f"{check.name} = {check.value:.4f} (needs {check.comparison} {check.threshold:.4f})"
            for check in self.checks
            if not check.passed
        ]


def ranked_recall(
    query_embeddings: np.ndarray,
    search: SearchFn,
    users: np.ndarray,
    targets: Mapping[int, np.ndarray],
    seen: Mapping[int, np.ndarray],
    ks: Sequence[int] = RECALL_KS,
    user_batch: int = 512,
) -> dict[str, float]:
    """Recall@K of a retrieval function, the user's training positives excluded.

    Asks `search` for K plus as many results as the user has training positives, drops those,
    and counts relevant hits in the first K that remain (recall@K = hits / relevant items,
    averaged over `users`).

    Args:
        query_embeddings: float32 [len(users), D], row i = users[i].
        search: the retrieval under test (exact or ANN).
        users: the evaluated users, each with items in `targets`.
        targets: user -> relevant items.
        seen: user -> training positives (excluded; `positives_by_user` of the training split).
        ks: cut-offs.
        user_batch: users per search call.

    Returns:
        {"recall@K": ...}.
    """
    max_k = max(ks)
    hits = dict.fromkeys(ks, 0.0)
    for start in range(0, users.size, user_batch):
        block = users[start : start + user_batch]
        most_seen = max((seen.get(int(u), np.empty(0)).size for u in block), default=0)
        queries = np.ascontiguousarray(query_embeddings[start : start + user_batch])
        _, found = search(queries, max_k + most_seen)
        for row, user in enumerate(block):
            ranked = found[row][found[row] >= 0]
            ranked = ranked[~np.isin(ranked, seen.get(int(user), np.empty(0, np.int64)))][:max_k]
            is_hit = np.isin(ranked, targets[int(user)])
            for k in ks:
                hits[k] += is_hit[:k].sum() / targets[int(user)].size
    count = max(users.size, 1)
    return {f"recall@{k}": float(hits[k] / count) for k in ks}


def exact_search(item_embeddings: np.ndarray) -> SearchFn:
    """Exact inner-product search over all items (the fp32 reference)."""
    items = torch.from_numpy(np.ascontiguousarray(item_embeddings, dtype=np.float32)).double()

    def search(queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores = torch.from_numpy(queries).double() @ items.T
        top = torch.topk(scores, min(k, items.shape[0]), dim=1)
        return top.values.float().numpy(), top.indices.numpy().astype(np.int64)

    return search


def auc(logits: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC with average ranks for ties; NaN when only one class is present."""
    return binary_metrics(logits, labels)["auc"]


@dataclass(frozen=True)
class EndToEnd:
    """The packaged Recommend pipeline against packaged retrieval alone on validation users.

    Attributes:
        metrics: `pipeline_metrics`' figures ("retrieval/recall@N", "recommend@K/ndcg@N", ...).
        sweep: the retrieve_k values measured.
        retrieve_k: the one chosen as the bundle's default (`choose_retrieve_k`).
        top_n: N.
        users: validation users measured.
    """

    metrics: dict[str, float]
    sweep: tuple[int, ...]
    retrieve_k: int
    top_n: int
    users: int

    def retrieval(self) -> tuple[float, float]:
        """(recall@N, NDCG@N) of retrieval alone."""
        return self._pair("retrieval")

    def recommend(self, retrieve_k: int | None = None) -> tuple[float, float]:
        """(recall@N, NDCG@N) of Recommend at `retrieve_k` (default: the chosen one)."""
        return self._pair(f"recommend@{retrieve_k or self.retrieve_k}")

    def _pair(self, prefix: str) -> tuple[float, float]:
        n = self.top_n
        return self.metrics[f"{prefix}/recall@{n}"], self.metrics[f"{prefix}/ndcg@{n}"]


def retrieve_k_sweep(num_items: int, max_k: int = DEFAULT_MAX_TOP_K) -> tuple[int, ...]:
    """The retrieve_k values the gate measures: END_TO_END_KS that the catalogue can fill."""
    ks = tuple(k for k in END_TO_END_KS if k <= min(num_items, max_k))
    return ks or (min(num_items, max_k),)


def choose_retrieve_k(
    metrics: Mapping[str, float],
    sweep: Sequence[int],
    top_n: int,
    tolerance: float = RETRIEVE_K_TOLERANCE,
) -> int:
    """The smallest retrieve_k whose recall@N and NDCG@N are both within `tolerance`
    (relative) of the best over the sweep: deeper retrieval costs ranker work per request."""

    def figures(k: int) -> tuple[float, float]:
        return metrics[f"recommend@{k}/recall@{top_n}"], metrics[f"recommend@{k}/ndcg@{top_n}"]

    best_recall = max(figures(k)[0] for k in sweep)
    best_ndcg = max(figures(k)[1] for k in sweep)
    for k in sorted(sweep):
        recall, ndcg = figures(k)
        if recall >= best_recall * (1 - tolerance) and ndcg >= best_ndcg * (1 - tolerance):
            return k
    return max(sweep)  # unreachable: the best K meets its own figures


def measure_end_to_end(
    users: np.ndarray,
    queries: np.ndarray,
    retrieve: Callable[[np.ndarray, int, list[np.ndarray]], np.ndarray],
    score: Callable[[np.ndarray, np.ndarray], np.ndarray],
    train: InteractionDataset,
    seen: Mapping[int, np.ndarray],
    targets: Mapping[int, np.ndarray],
    sweep: Sequence[int],
    top_n: int = END_TO_END_TOP_N,
    user_batch: int = 1024,
) -> EndToEnd:
    """Retrieve max(sweep) with each user's training items excluded inside the search, rank
    with `score`, and measure every depth of the sweep (see `pipeline_metrics`).

    Args:
        users: int [U] validation users; `queries` float32 [U, D] their query embeddings.
        retrieve: (queries, k, exclusions) -> item ids [Q, k], -1 pads (the packaged index).
        score: (user ids, item ids) -> ranker logits (the packaged ranker).
        train / seen / targets: the training split (popularity), its positives per user
            (excluded) and the relevant items per user.
    """
    empty = np.zeros(0, dtype=np.int64)
    depth = max(sweep)
    blocks = []
    for start in range(0, users.size, user_batch):
        block = users[start : start + user_batch]
        exclusions = [seen.get(int(user), empty) for user in block]
        blocks.append(retrieve(queries[start : start + user_batch], depth, exclusions))
    candidates = np.concatenate(blocks) if blocks else np.zeros((0, depth), np.int64)
    metrics = pipeline_metrics(users, candidates, score, targets, train, sweep, top_n)
    chosen = choose_retrieve_k(metrics, sweep, top_n)
    return EndToEnd(metrics, tuple(sweep), chosen, top_n, int(users.size))


def _relative_loss(reference: float, measured: float) -> float:
    """(reference - measured) / reference; 0 when the reference is 0."""
    return (reference - measured) / reference if reference > 0 else 0.0


def quality_gate(
    retrieval_fp32: dict[str, float],
    retrieval_packaged: dict[str, float],
    ranker_auc: tuple[float, float] | None,
    index_recall: float,
    end_to_end: EndToEnd,
    thresholds: QualityThresholds,
    eval_examples: int,
) -> QualityResult:
    """Compares the packaged pipeline with the fp32 reference, and Recommend with retrieval
    alone, under the thresholds.

    Args:
        retrieval_fp32 / retrieval_packaged: `ranked_recall` of the fp32 exact and the packaged
            retrieval.
        ranker_auc: (fp32, packaged) AUC on held-out labelled pairs; None without any.
        index_recall: the index's recall@100 against exact search.
        end_to_end: the packaged Recommend pipeline against retrieval alone.
        eval_examples: labelled pairs the AUC was measured on.
    """
    metrics: dict[str, float] = {}
    checks = []
    for name, reference in sorted(retrieval_fp32.items()):
        packaged = retrieval_packaged[name]
        metrics[f"fp32_exact/{name}"] = reference
        metrics[f"packaged/{name}"] = packaged
        loss = _relative_loss(reference, packaged)
        metrics[f"relative_loss/{name}"] = loss
        checks.append(Check(f"{name} relative loss", loss, thresholds.max_recall_loss, "<="))
    if ranker_auc is not None:
        auc_fp32, auc_packaged = ranker_auc
        metrics["fp32/auc"] = auc_fp32
        metrics["packaged/auc"] = auc_packaged
        metrics["auc_loss"] = auc_fp32 - auc_packaged
        loss = auc_fp32 - auc_packaged
        checks.append(Check("ranker AUC loss", loss, thresholds.max_auc_loss, "<="))
    metrics["index/recall@100_vs_exact"] = index_recall
    checks.append(
        Check("index recall@100 vs exact", index_recall, thresholds.min_index_recall, ">=")
    )
    metrics.update(
        {f"{END_TO_END_PREFIX}{name}": value for name, value in end_to_end.metrics.items()}
    )
    n = end_to_end.top_n
    for label, retrieval, recommend in zip(
        (f"recall@{n}", f"ndcg@{n}"), end_to_end.retrieval(), end_to_end.recommend(), strict=True
    ):
        checks.append(
            Check(
                f"Recommend@{end_to_end.retrieve_k} vs retrieval alone {label} relative loss",
                _relative_loss(retrieval, recommend),
                thresholds.max_recommend_loss,
                "<=",
            )
        )
    return QualityResult(metrics, tuple(checks), end_to_end.users, eval_examples, end_to_end)
