"""The packager's quality gate: the packaged pipeline against the fp32 exact pipeline.

Retrieval: the exported, quantized query tower feeds the ANN index; recall@K on the
checkpoint's held-out split is compared with the fp32 query tower ranking every item exactly
(both exclude the user's training positives). Ranking: AUC of the exported, quantized ranker
against the fp32 DLRM on the held-out interactions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from recship.packager.options import QualityThresholds
from recship.trainer.data.dataset import InteractionDataset
from recship.trainer.evaluate import binary_metrics, positives_by_user

RECALL_KS: tuple[int, ...] = (10, 100)

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
    train: InteractionDataset,
    held_out: InteractionDataset,
    ks: Sequence[int] = RECALL_KS,
    user_batch: int = 512,
) -> tuple[dict[str, float], int]:
    """Recall@K of a retrieval function, the user's training positives excluded.

    Asks `search` for K plus as many results as the user has training positives, drops those,
    and counts held-out hits in the first K that remain (recall@K = hits / held-out items,
    averaged over users with held-out items).

    Args:
        query_embeddings: float32 [num_users, D], row = user id.
        search: the retrieval under test (exact or ANN).
        train / held_out: the checkpoint's split.
        ks: cut-offs.
        user_batch: users per search call.

    Returns:
        ({"recall@K": ...}, number of evaluated users).
    """
    targets = positives_by_user(held_out.user_ids, held_out.item_ids)
    seen = positives_by_user(train.user_ids, train.item_ids)
    users = np.array(sorted(targets), dtype=np.int64)
    max_k = max(ks)
    hits = dict.fromkeys(ks, 0.0)
    for start in range(0, users.size, user_batch):
        block = users[start : start + user_batch]
        most_seen = max((seen.get(int(u), np.empty(0)).size for u in block), default=0)
        _, found = search(np.ascontiguousarray(query_embeddings[block]), max_k + most_seen)
        for row, user in enumerate(block):
            ranked = found[row][found[row] >= 0]
            ranked = ranked[~np.isin(ranked, seen.get(int(user), np.empty(0, np.int64)))][:max_k]
            is_hit = np.isin(ranked, targets[int(user)])
            for k in ks:
                hits[k] += is_hit[:k].sum() / targets[int(user)].size
    count = max(users.size, 1)
    return {f"recall@{k}": float(hits[k] / count) for k in ks}, int(users.size)


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


def quality_gate(
    retrieval_fp32: dict[str, float],
    retrieval_packaged: dict[str, float],
    auc_fp32: float,
    auc_packaged: float,
    index_recall: float,
    thresholds: QualityThresholds,
    eval_queries: int,
    eval_examples: int,
) -> QualityResult:
    """Compares the packaged pipeline with the fp32 reference under the thresholds.

    Relative recall loss is (fp32 - packaged) / fp32 (0 when fp32 recall is 0).
    """
    metrics: dict[str, float] = {}
    checks = []
    for name, reference in sorted(retrieval_fp32.items()):
        packaged = retrieval_packaged[name]
        metrics[f"fp32_exact/{name}"] = reference
        metrics[f"packaged/{name}"] = packaged
        loss = (reference - packaged) / reference if reference > 0 else 0.0
        metrics[f"relative_loss/{name}"] = loss
        checks.append(Check(f"{name} relative loss", loss, thresholds.max_recall_loss, "<="))
    metrics["fp32/auc"] = auc_fp32
    metrics["packaged/auc"] = auc_packaged
    metrics["auc_loss"] = auc_fp32 - auc_packaged
    checks.append(Check("ranker AUC loss", auc_fp32 - auc_packaged, thresholds.max_auc_loss, "<="))
    metrics["index/recall@100_vs_exact"] = index_recall
    checks.append(
        Check("index recall@100 vs exact", index_recall, thresholds.min_index_recall, ">=")
    )
    return QualityResult(metrics, tuple(checks), eval_queries, eval_examples)
