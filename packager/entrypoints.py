"""Entry points with plain-tensor signatures around the trained models.

A C++ host cannot build a `KeyedJaggedTensor`, so every exported model takes the flattened
jagged layout instead and builds the KJT inside:

- `QueryTowerEntry.forward(values: int64[N], lengths: int32[F * B]) -> float32[B, D]`
- `RankerEntry.forward(dense: float32[B, Fd], values: int64[N], lengths: int32[F * B])
  -> float32[B]` (logits)

`lengths` is feature-major: the B bag lengths of the first feature, then of the second, and so
on in `feature_names` order; `values` holds the ids in the same order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recship.base.jagged import EntityTable
from recship.trainer.data.batches import entity_kjt


class QueryTowerEntry(nn.Module):
    """The query tower of a two-tower model over plain tensors.

    Args:
        tower: a `recship.trainer.models.Tower` (forward(kjt) -> [B, D]).
        feature_names: KJT keys in the order `values` / `lengths` are laid out.
    """

    def __init__(self, tower: nn.Module, feature_names: Sequence[str]) -> None:
        super().__init__()
        self.tower = tower
        self.feature_names: list[str] = list(feature_names)

    def forward(self, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Embeds B queries: returns float32 [B, D]."""
        features = KeyedJaggedTensor(keys=self.feature_names, values=values, lengths=lengths)
        return self.tower(features)


class RankerEntry(nn.Module):
    """A DLRM ranker over plain tensors, returning one logit per row.

    Args:
        dlrm: `torchrec.models.dlrm.DLRM` (forward(dense, kjt) -> [B, 1]).
        feature_names: KJT keys in the order `values` / `lengths` are laid out.
    """

    def __init__(self, dlrm: nn.Module, feature_names: Sequence[str]) -> None:
        super().__init__()
        self.dlrm = dlrm
        self.feature_names: list[str] = list(feature_names)

    def forward(
        self, dense: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor
    ) -> torch.Tensor:
        """Scores B rows: returns float32 [B] logits."""
        features = KeyedJaggedTensor(keys=self.feature_names, values=values, lengths=lengths)
        return self.dlrm(dense, features).squeeze(-1)


def jagged_inputs(
    table: EntityTable, ids: np.ndarray, feature_names: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The features `feature_names` of the entities `ids` as entry-point inputs.

    Returns:
        (values int64 [N], lengths int32 [F * B]) in the feature-major layout above.
    """
    kjt = entity_kjt(table, ids, feature_names)
    return kjt.values(), kjt.lengths()
