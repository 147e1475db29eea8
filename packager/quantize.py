"""Quantize embedding tables and shard them for inference over W devices.

torchrec's inference path has traps that silently produce wrong models (see ENVIRONMENT.md):
`shard_quant_model` does not carry the quantized weights into the sharded tables, and the
quantized kernels try to initialise CUDA unless device propagation is switched on. This module
is the one place that handles them; its tests compare against the fp32 eager model.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torchrec.distributed.global_settings import set_propogate_device
from torchrec.inference.modules import (
    assign_weights_to_tbe,
    get_table_to_weights_from_tbe,
    quantize_inference_model,
    shard_quant_model,
)
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from recship.base.errors import InvalidInput
from recship.packager.options import QUANT_TYPES, QuantType

_TORCH_DTYPES: dict[str, torch.dtype] = {
    "int8": torch.qint8,
    "int4": torch.quint4x2,
    "fp16": torch.float16,
    "fp32": torch.float32,
}
# Quantized types whose tables torchrec 1.8 can shard over several devices; fp16 / fp32 tables
# crash in its quant_state ('NoneType' object has no attribute 'shape').
_SHARDABLE = frozenset({"int8", "int4"})


@dataclass(frozen=True)
class TableQuantStats:
    """Storage of one table before and after quantization, in bytes."""

    table: str
    quant: QuantType
    num_embeddings: int
    embedding_dim: int
    fp32_bytes: int
    packaged_bytes: int


@dataclass(frozen=True)
class TablePlacement:
    """Where one table's shards live: device ranks 0..W-1 of one replica."""

    table: str
    sharding_type: str
    ranks: tuple[int, ...]


@dataclass(frozen=True)
class QuantizedModel:
    """A quantized (and, for W > 1, sharded) copy of an entry-point module.

    `module` takes the same plain tensors as the fp32 entry point it came from.
    """

    module: nn.Module
    tables: tuple[TableQuantStats, ...]
    placements: tuple[TablePlacement, ...]
    device_count: int
    device_type: str


def table_quant_types(
    table_names: list[str], default: QuantType, overrides: Mapping[str, QuantType]
) -> dict[str, QuantType]:
    """Resolves the quantization of every table from a default and per-table overrides.

    Raises:
        InvalidInput: an override names an unknown table or an unknown type.
    """
    for name, quant in {"(default)": default, **overrides}.items():
        if quant not in QUANT_TYPES:
            raise InvalidInput(
                f"unknown quantization {quant!r} for table {name}; choose one of "
                + ", ".join(QUANT_TYPES)
            )
    unknown = sorted(set(overrides) - set(table_names))
    if unknown:
        raise InvalidInput(
            f"quantization override for unknown table(s) {', '.join(unknown)}; tables are "
            + ", ".join(sorted(table_names))
        )
    return {name: overrides.get(name, default) for name in table_names}


def embedding_tables(module: nn.Module) -> list[tuple[str, int, int]]:
    """(name, rows, dim) of every table of every EmbeddingBagCollection inside `module`."""
    found = []
    for child in module.modules():
        if isinstance(child, EmbeddingBagCollection):
            for config in child.embedding_bag_configs():
                found.append((config.name, config.num_embeddings, config.embedding_dim))
    return found


def _packaged_bytes(weight_and_qparams: tuple[torch.Tensor, torch.Tensor | None]) -> int:
    """Bytes of one quantized table: its rows plus the per-row scale/bias when stored apart."""
    return sum(
        tensor.numel() * tensor.element_size()
        for tensor in weight_and_qparams
        if tensor is not None
    )


def quantize_for_inference(
    module: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    quant: Mapping[str, QuantType],
    device_count: int = 1,
    device_type: str = "cpu",
) -> QuantizedModel:
    """Quantizes every embedding table of an entry-point module and shards it table-wise.

    The fp32 `module` is not modified. Dense layers stay fp32.

    Args:
        module: an fp32 entry point (plain-tensor forward) containing EmbeddingBagCollections.
        example_inputs: inputs for the eager warm-up forward torchrec needs before sharding.
        quant: quantization per table name (from `table_quant_types`).
        device_count: W, the devices one replica spans; tables are sharded table-wise over
            them (W = 1 puts every table on device 0).
        device_type: "cpu" (W logical CPU shards) or "cuda" (tables on cuda:0..W-1; the
            exported graph is tied to that device count).

    Returns:
        The quantized module with per-table sizes and the placement plan.

    Raises:
        InvalidInput: W < 1, W larger than the number of tables, W > 1 with fp16/fp32 tables,
            or cuda requested with fewer than W visible GPUs.
    """
    tables = embedding_tables(module)
    if device_count < 1:
        raise InvalidInput(f"--devices must be >= 1, got {device_count}")
    if device_count > 1 and device_count > len(tables):
        raise InvalidInput(
            f"--devices {device_count} is more than the model's {len(tables)} tables; "
            "table-wise sharding needs at least one table per device"
        )
    if device_type not in ("cpu", "cuda"):
        raise InvalidInput(f"device type must be cpu or cuda, not {device_type!r}")
    if device_type == "cuda" and torch.cuda.device_count() < device_count:
        raise InvalidInput(
            f"sharding for {device_count} cuda devices needs {device_count} visible GPUs, "
            f"found {torch.cuda.device_count()}"
        )
    unshardable = sorted(name for name, kind in quant.items() if kind not in _SHARDABLE)
    # Shard whenever torchrec can, W = 1 included: the sharded module is what torch.export
    # (AOTInductor) handles; only fp16/fp32 tables on one CPU device stay unsharded.
    shard = not unshardable or device_count > 1 or device_type == "cuda"
    if shard and unshardable:
        raise InvalidInput(
            f"tables {', '.join(unshardable)} use fp16/fp32, which torchrec 1.8 cannot shard "
            f"over {device_count} {device_type} device(s); use int8 or int4"
            + (", or --devices 1 on cpu" if device_type == "cpu" else "")
        )
    # Without device propagation the quantized kernels try to initialise CUDA on CPU hosts.
    set_propogate_device(True)
    per_table = {name: _TORCH_DTYPES[quant[name]] for name, _, _ in tables}
    quantized = quantize_inference_model(copy.deepcopy(module), per_table_weight_dtype=per_table)
    with torch.no_grad():
        quantized(*example_inputs)
    weights = get_table_to_weights_from_tbe(quantized)
    stats = tuple(
        TableQuantStats(
            table=name,
            quant=quant[name],
            num_embeddings=rows,
            embedding_dim=dim,
            fp32_bytes=rows * dim * 4,
            packaged_bytes=_packaged_bytes(weights[name]),
        )
        for name, rows, dim in tables
    )
    if not shard:
        placements = tuple(TablePlacement(name, "table_wise", (0,)) for name, _, _ in tables)
        return QuantizedModel(quantized, stats, placements, 1, device_type)
    sharded, plan = shard_quant_model(
        quantized,
        world_size=device_count,
        compute_device=device_type,
        sharding_device=device_type,
    )
    # shard_quant_model builds fresh tables: copy the quantized rows in, or they are garbage.
    assign_weights_to_tbe(sharded, weights)
    with torch.no_grad():
        sharded(*example_inputs)
    placements = []
    for module_plan in plan.plan.values():
        for table, parameter in module_plan.items():  # type: ignore[union-attr]
            ranks = tuple(sorted(set(parameter.ranks or ())))
            placements.append(TablePlacement(table, str(parameter.sharding_type), ranks))
    placements.sort(key=lambda placement: placement.table)
    return QuantizedModel(sharded, stats, tuple(placements), device_count, device_type)
