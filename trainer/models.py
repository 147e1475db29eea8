"""The two model families and their training wrappers.

Two-tower retrieval: `QueryTower` (user-side sparse features) and `CandidateTower` (item-side
sparse features), each an `EmbeddingBagCollection` and an MLP into the same D-dim space; the
score is their dot product. Each tower is its own module with `forward(kjt) -> [B, D]` so the
packager can export them separately.

DLRM ranking: `torchrec.models.dlrm.DLRM` over the dense features and every sparse feature.

`TwoTowerTrain` / `DLRMTrain` / `WeightedDLRMTrain` wrap a model with its loss in the
`forward(batch) -> (loss, outputs)` shape that `TrainPipelineSparseDist` expects. Pooled
embeddings are always indexed by feature name: once sharded, `KeyedTensor.values()` follows
shard placement, not table order.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.models.dlrm import DLRM, DLRMTrain
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recship.trainer.config import ModelConfig, TableSpec
from recship.trainer.data.batches import TwoTowerBatch, WeightedBatch

_POOLING = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN}


def embedding_bag_configs(tables: tuple[TableSpec, ...]) -> list[EmbeddingBagConfig]:
    """Returns the torchrec table configs for `tables` (one feature per table)."""
    return [
        EmbeddingBagConfig(
            name=table.name,
            embedding_dim=table.embedding_dim,
            num_embeddings=table.num_embeddings,
            feature_names=[table.feature],
            pooling=_POOLING[table.pooling],
        )
        for table in tables
    ]


def _mlp(in_features: int, layers: tuple[int, ...], device: torch.device | None) -> nn.Sequential:
    """ReLU MLP whose last layer is linear (tower outputs are scores, not activations)."""
    modules: list[nn.Module] = []
    width = in_features
    for index, size in enumerate(layers):
        modules.append(nn.Linear(width, size, device=device))
        if index < len(layers) - 1:
            modules.append(nn.ReLU())
        width = size
    return nn.Sequential(*modules)


class Tower(nn.Module):
    """Pooled embeddings of one side's sparse features, concatenated, through an MLP.

    Args:
        tables: this side's tables (one per feature).
        layers: MLP sizes; the last one is the output dimension D.
        normalize: L2-normalise the output (scores become cosines).
        device: where the MLP lives (default CPU).
        table_device: where the tables live (default `device`); "meta" defers their
            allocation to `DistributedModelParallel`.

    Example::

        tower = QueryTower(config.side_tables("user"), (128, 64), normalize=True)
        embeddings = tower(kjt)  # [B, 64]
    """

    def __init__(
        self,
        tables: tuple[TableSpec, ...],
        layers: tuple[int, ...],
        normalize: bool,
        device: torch.device | None = None,
        table_device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.ebc = EmbeddingBagCollection(
            tables=embedding_bag_configs(tables), device=table_device or device
        )
        self.feature_names: list[str] = [table.feature for table in tables]
        self.normalize = normalize
        in_features = sum(table.embedding_dim for table in tables)
        self.mlp = _mlp(in_features, layers, device)

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """Embeds a batch.

        Args:
            features: KJT with (at least) this tower's feature names as keys, batch size B.

        Returns:
            float32 [B, D].
        """
        pooled = self.ebc(features).to_dict()
        hidden = torch.cat([pooled[name] for name in self.feature_names], dim=1)
        output = self.mlp(hidden)
        return F.normalize(output, dim=-1) if self.normalize else output


class QueryTower(Tower):
    """The user-side tower of a two-tower model."""


class CandidateTower(Tower):
    """The item-side tower of a two-tower model."""


class TwoTower(nn.Module):
    """Query and candidate towers into one D-dim space; score = dot product.

    Args:
        config: a "two-tower" model config.
        device: where the MLPs live (default CPU).
        table_device: where the tables live (default `device`; "meta" for DMP).
    """

    def __init__(
        self,
        config: ModelConfig,
        device: torch.device | None = None,
        table_device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.query_tower = QueryTower(
            config.side_tables("user"), config.tower_layers, config.normalize, device, table_device
        )
        self.candidate_tower = CandidateTower(
            config.side_tables("item"), config.tower_layers, config.normalize, device, table_device
        )

    def forward(
        self, query: KeyedJaggedTensor, candidate: KeyedJaggedTensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (query embeddings [B, D], candidate embeddings [B, D])."""
        return self.query_tower(query), self.candidate_tower(candidate)


class TwoTowerTrain(nn.Module):
    """A two-tower model with its in-batch loss, in the shape `TrainPipelineSparseDist` expects.

    Every other item in the batch is a negative for each (user, item) pair. Both losses use the
    logQ correction (each logit minus the log of the item's sampling probability, so popular
    items are not over-penalised for appearing often as negatives). "softmax" is the sampled
    softmax over the batch; "bce" scores every pair independently. In both, a batch item equal
    to the positive is masked out rather than counted as a negative.

    Args:
        model: the towers.
        loss: "softmax" or "bce".
        temperature: logits are divided by it.
        item_log_q: float32 [num_items]: log of each item's share of the training
            interactions (the in-batch sampling probability). Not saved in checkpoints: it is
            recomputed from the data.
    """

    def __init__(
        self, model: TwoTower, loss: str, temperature: float, item_log_q: torch.Tensor
    ) -> None:
        super().__init__()
        self.model = model
        self.loss = loss
        self.temperature = temperature
        self.register_buffer("item_log_q", item_log_q, persistent=False)

    def forward(self, batch: TwoTowerBatch) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Returns (loss, (detached loss, detached positive logits))."""
        query, candidate = self.model(batch.query, batch.candidate)
        loss, positive_logits = in_batch_loss(
            query, candidate, batch.item_ids, self.item_log_q, self.loss, self.temperature
        )
        return loss, (loss.detach(), positive_logits.detach())


@torch.fx.wrap
def in_batch_loss(
    query: torch.Tensor,
    candidate: torch.Tensor,
    item_ids: torch.Tensor,
    item_log_q: torch.Tensor,
    loss: str,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The in-batch loss of `TwoTowerTrain` (a leaf for torch.fx: the train pipeline traces
    the model, and this function's shape-dependent code cannot be traced).

    Args:
        query: [B, D] query embeddings.
        candidate: [B, D] candidate embeddings; row i is the positive of query row i.
        item_ids: int64 [B] the candidates' item ids.
        item_log_q: [num_items] log sampling probability of each item.
        loss: "softmax" or "bce".
        temperature: logits are divided by it.

    Returns:
        (scalar loss, [B] positive-pair logits).
    """
    logits = query @ candidate.T / temperature
    same_item = item_ids.unsqueeze(0) == item_ids.unsqueeze(1)
    eye = torch.eye(item_ids.shape[0], dtype=torch.bool, device=logits.device)
    duplicate = same_item & ~eye
    # Popular items are in-batch negatives more often than uniform sampling would make them.
    corrected = logits - item_log_q[item_ids].unsqueeze(0)
    if loss == "softmax":
        corrected = corrected.masked_fill(duplicate, torch.finfo(logits.dtype).min)
        targets = torch.arange(item_ids.shape[0], device=logits.device)
        value = F.cross_entropy(corrected, targets)
    else:
        weights = (~duplicate).to(logits.dtype)
        value = F.binary_cross_entropy_with_logits(corrected, eye.to(logits.dtype), weight=weights)
    return value, logits.diagonal()


def item_log_frequencies(item_ids: np.ndarray, num_items: int) -> torch.Tensor:
    """Returns log(share of interactions) per item, add-one smoothed so unseen items are finite."""
    counts = np.bincount(item_ids, minlength=num_items).astype(np.float64) + 1.0
    return torch.from_numpy(np.log(counts / counts.sum()).astype(np.float32))


def build_dlrm(
    config: ModelConfig,
    device: torch.device | None = None,
    table_device: torch.device | None = None,
) -> DLRM:
    """Returns `torchrec.models.dlrm.DLRM` over the schema's dense and sparse features.

    Args:
        config: a "dlrm" model config.
        device: where the dense and over arch live (default CPU).
        table_device: where the tables live (default `device`; "meta" for DMP).
    """
    ebc = EmbeddingBagCollection(
        tables=embedding_bag_configs(config.tables), device=table_device or device
    )
    return DLRM(
        embedding_bag_collection=ebc,
        dense_in_features=len(config.schema.dense),
        dense_arch_layer_sizes=list(config.dense_arch_layers),
        over_arch_layer_sizes=list(config.over_arch_layers),
        dense_device=device,
    )


class WeightedDLRMTrain(nn.Module):
    """A DLRM with a per-example weighted binary cross-entropy (`WeightedBatch.weights`).

    Used for ranking examples built from interactions, where positives carry their rating as a
    weight. Its state dict is the model's under "model.", like torchrec's `DLRMTrain`, so a
    checkpoint loads into either wrapper.

    Args:
        model: the DLRM.
    """

    def __init__(self, model: DLRM) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, batch: WeightedBatch
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Returns (loss, (detached loss, detached logits [B], labels [B]))."""
        logits = self.model(batch.dense_features, batch.sparse_features).squeeze(-1)
        labels = batch.labels.float()
        loss = F.binary_cross_entropy_with_logits(logits, labels, weight=batch.weights)
        return loss, (loss.detach(), logits.detach(), labels.detach())


def build_model(
    config: ModelConfig,
    device: torch.device | None = None,
    table_device: torch.device | None = None,
) -> nn.Module:
    """Returns the unsharded model a `ModelConfig` describes (`TwoTower` or `DLRM`).

    Args:
        config: the model config.
        device: where the MLPs live (default CPU).
        table_device: where the tables live (default `device`); "meta" defers their
            allocation to `DistributedModelParallel`.
    """
    if config.kind == "two-tower":
        return TwoTower(config, device, table_device)
    return build_dlrm(config, device, table_device)


def build_train_module(
    config: ModelConfig,
    model: nn.Module,
    item_log_q: torch.Tensor | None = None,
    weighted: bool = False,
) -> nn.Module:
    """Wraps `model` with its loss: `TwoTowerTrain`, torchrec's `DLRMTrain`, or (DLRM with
    `weighted`) `WeightedDLRMTrain`, which takes `WeightedBatch`es.

    The wrapper's state dict is the model's under the prefix "model.", which is the layout of
    the checkpoints.
    """
    if config.kind == "two-tower":
        if not isinstance(model, TwoTower):
            raise TypeError(f"two-tower config needs a TwoTower, got {type(model).__name__}")
        if item_log_q is None:
            # Uniform sampling probability: only the loss uses it, and loading does not train.
            item_feature = config.schema.item_id_feature or ""
            num_items = config.schema.sparse_feature(item_feature).cardinality
            item_log_q = torch.full((num_items,), -float(np.log(num_items)))
        return TwoTowerTrain(model, config.loss, config.temperature, item_log_q)
    if not isinstance(model, DLRM):
        raise TypeError(f"dlrm config needs a DLRM, got {type(model).__name__}")
    return WeightedDLRMTrain(model) if weighted else DLRMTrain(model)


def dlrm_logits(model: DLRM, batch: Batch) -> torch.Tensor:
    """Returns the DLRM logits [B] of a ranking batch."""
    return model(batch.dense_features, batch.sparse_features).squeeze(-1)
