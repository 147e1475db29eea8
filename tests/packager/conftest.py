"""Small int8 entry points (a query tower and a DLRM ranker), quantized and sharded for inference.

They follow the bundle's entry-point signatures: the query tower takes
`(values: int64[N], lengths: int32[F * B]) -> float32[B, D]` and the ranker
`(dense: float32[B, Fd], values: int64[N], lengths: int32[F * B]) -> float32[B]`, with the
`KeyedJaggedTensor` built inside. Each fixture value also carries the unsharded fp32 module's
output, so tests compare exported files against the fp32 model, not only against themselves.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.distributed.global_settings import set_propogate_device
from torchrec.inference.modules import (
    assign_weights_to_tbe,
    get_table_to_weights_from_tbe,
    quantize_inference_model,
    shard_quant_model,
)
from torchrec.models.dlrm import DLRM

QUERY_FEATURES = ("user_id", "user_age", "user_genres")
RANKER_FEATURES = ("user_id", "item_id", "item_genres")
RANKER_DENSE = 4
BATCH = 8
# int8 row-wise quantization of N(0, 0.5) tables: outputs stay within this of the fp32 model.
INT8_ATOL = 0.05


class QueryTower(nn.Module):
    """User features -> 32-d embedding, indexing pooled embeddings by feature name."""

    def __init__(self) -> None:
        super().__init__()
        self.ebc = EmbeddingBagCollection(
            tables=[
                EmbeddingBagConfig(
                    name="t_user_id",
                    embedding_dim=32,
                    num_embeddings=1000,
                    feature_names=["user_id"],
                ),
                EmbeddingBagConfig(
                    name="t_user_age",
                    embedding_dim=32,
                    num_embeddings=10,
                    feature_names=["user_age"],
                ),
                EmbeddingBagConfig(
                    name="t_user_genres",
                    embedding_dim=16,
                    num_embeddings=20,
                    feature_names=["user_genres"],
                ),
            ],
            device=torch.device("cpu"),
        )
        self.mlp = nn.Sequential(nn.Linear(80, 64), nn.ReLU(), nn.Linear(64, 32))

    def forward(self, values: Tensor, lengths: Tensor) -> Tensor:
        features = KeyedJaggedTensor(keys=list(QUERY_FEATURES), values=values, lengths=lengths)
        pooled = self.ebc(features).to_dict()
        return self.mlp(torch.cat([pooled[name] for name in QUERY_FEATURES], dim=1))


class Ranker(nn.Module):
    """A torchrec DLRM behind the plain-tensor ranker signature, returning logits [B]."""

    def __init__(self) -> None:
        super().__init__()
        ebc = EmbeddingBagCollection(
            tables=[
                EmbeddingBagConfig(
                    name=f"t_{name}",
                    embedding_dim=16,
                    num_embeddings=cardinality,
                    feature_names=[name],
                )
                for name, cardinality in zip(RANKER_FEATURES, (1000, 500, 20), strict=True)
            ],
            device=torch.device("cpu"),
        )
        self.dlrm = DLRM(
            embedding_bag_collection=ebc,
            dense_in_features=RANKER_DENSE,
            dense_arch_layer_sizes=[16],
            over_arch_layer_sizes=[32, 1],
        )

    def forward(self, dense: Tensor, values: Tensor, lengths: Tensor) -> Tensor:
        features = KeyedJaggedTensor(keys=list(RANKER_FEATURES), values=values, lengths=lengths)
        return self.dlrm(dense, features).squeeze(1)


@dataclass(frozen=True)
class EntryCase:
    """One quantized, inference-sharded entry point with inputs and its fp32 reference output."""

    name: str
    world_size: int
    module: nn.Module
    inputs: tuple[Tensor, ...]
    fp32_output: Tensor
    fp32_atol: float = INT8_ATOL


def sparse_inputs(
    generator: torch.Generator, cardinalities: tuple[int, ...], batch: int
) -> tuple[Tensor, Tensor]:
    """Random ids and int32 lengths (feature-major), with a multi-hot last feature."""
    lengths = [torch.ones(batch, dtype=torch.int32) for _ in cardinalities[:-1]]
    lengths.append(torch.randint(0, 4, (batch,), generator=generator, dtype=torch.int32))
    values = [
        torch.randint(0, cardinality, (int(length.sum()),), generator=generator)
        for cardinality, length in zip(cardinalities, lengths, strict=True)
    ]
    return torch.cat(values), torch.cat(lengths)


def inputs_for(name: str, batch: int, seed: int = 1) -> tuple[Tensor, ...]:
    """Seeded random inputs of entry point `name` for `batch` examples."""
    generator = torch.Generator().manual_seed(seed)
    if name == "query_tower":
        return sparse_inputs(generator, (1000, 10, 20), batch)
    dense = torch.randn(batch, RANKER_DENSE, generator=generator)
    return (dense, *sparse_inputs(generator, (1000, 500, 20), batch))


def fp32_model(name: str) -> nn.Module:
    """The seeded fp32 `QueryTower` ("query_tower") or `Ranker` ("ranker"), in eval mode."""
    torch.manual_seed(0)
    model = QueryTower() if name == "query_tower" else Ranker()
    for table in model.modules():
        if isinstance(table, EmbeddingBagCollection):
            for weight in table.parameters():
                nn.init.normal_(weight, std=0.5)
    return model.eval()


def build_case(name: str, world_size: int) -> EntryCase:
    """Quantize to int8 and shard table-wise over `world_size` CPU shards, weights carried over."""
    set_propogate_device(True)
    model = fp32_model(name)
    inputs = inputs_for(name, BATCH)
    with torch.no_grad():
        fp32_output = model(*inputs)
    quantized = quantize_inference_model(copy.deepcopy(model))
    weights = get_table_to_weights_from_tbe(quantized)
    sharded, _ = shard_quant_model(
        quantized, world_size=world_size, compute_device="cpu", sharding_device="cpu"
    )
    assign_weights_to_tbe(sharded, weights)
    return EntryCase(name, world_size, sharded, inputs, fp32_output)


@pytest.fixture(scope="session")
def entry_case() -> Callable[[str, int], EntryCase]:
    """`entry_case(name, world_size)`: a cached `EntryCase` ("query_tower" or "ranker")."""
    cache: dict[tuple[str, int], EntryCase] = {}

    def get(name: str, world_size: int) -> EntryCase:
        if (name, world_size) not in cache:
            cache[(name, world_size)] = build_case(name, world_size)
        return cache[(name, world_size)]

    return get


@pytest.fixture(scope="session")
def entry_inputs() -> Callable[..., tuple[Tensor, ...]]:
    """`entry_inputs(name, batch, seed=1)`: seeded inputs of the entry point `name`."""
    return inputs_for


@pytest.fixture(scope="session")
def entry_fp32_model() -> Callable[[str], nn.Module]:
    """`entry_fp32_model(name)`: a fresh seeded fp32 model of the entry point `name`."""
    return fp32_model
