"""Quantized (and sharded) entry points against the unsharded fp32 models they came from."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recship.base.errors import InvalidInput
from recship.packager.entrypoints import QueryTowerEntry, RankerEntry, jagged_inputs
from recship.packager.quantize import quantize_for_inference, table_quant_types
from recship.trainer.config import ModelConfig, tables_for
from recship.trainer.data.batches import ranking_batch
from recship.trainer.data.synthetic import generate
from recship.trainer.models import QueryTower, build_dlrm


@pytest.fixture(scope="module")
def data():
    return generate(num_users=300, num_items=200, interactions_per_user=5, seed=3)


def _randomize(module: torch.nn.Module) -> None:
    torch.manual_seed(0)
    for name, parameter in module.named_parameters():
        if "embedding_bags" in name:
            torch.nn.init.normal_(parameter, std=0.3)


def _query_entry(data) -> QueryTowerEntry:
    schema = data.schema
    config = ModelConfig(
        kind="two-tower",
        schema=schema,
        tables=tables_for(schema.user_sparse() + schema.item_sparse(), 32),
        embedding_dim=32,
        tower_layers=(64, 32),
        normalize=True,
    )
    tower = QueryTower(config.side_tables("user"), config.tower_layers, config.normalize)
    _randomize(tower)
    return QueryTowerEntry(tower, tower.feature_names).eval()


def _ranker_entry(data) -> RankerEntry:
    schema = data.schema
    config = ModelConfig(
        kind="dlrm",
        schema=schema,
        tables=tables_for(schema.sparse, 16),
        embedding_dim=16,
        dense_arch_layers=(32, 16),
        over_arch_layers=(32, 1),
    )
    dlrm = build_dlrm(config)
    _randomize(dlrm)
    return RankerEntry(dlrm, [feature.name for feature in schema.sparse]).eval()


def _query_inputs(data, entry: QueryTowerEntry, batch: int = 64):
    users = np.arange(batch) % data.num_users
    return jagged_inputs(data.users, users, entry.feature_names)


def _ranker_inputs(data, batch: int = 64):
    sparse_batch = ranking_batch(data, np.arange(batch))
    features = sparse_batch.sparse_features
    return sparse_batch.dense_features, features.values(), features.lengths()


@pytest.mark.parametrize("devices", [1, 2])
def test_int8_query_tower_matches_fp32_model(data, devices: int) -> None:
    entry = _query_entry(data)
    inputs = _query_inputs(data, entry)
    with torch.no_grad():
        reference = entry(*inputs)
    names = [name for name, *_ in _tables(entry)]
    quantized = quantize_for_inference(
        entry, inputs, table_quant_types(names, "int8", {}), device_count=devices
    )
    with torch.no_grad():
        packaged = quantized.module(*inputs)
    assert packaged.shape == reference.shape
    cosine = torch.nn.functional.cosine_similarity(packaged, reference, dim=1)
    assert cosine.min().item() > 0.995
    assert (packaged - reference).abs().max().item() < 0.05
    assert quantized.device_count == devices
    assert {p.table for p in quantized.placements} == set(names)
    used_ranks = {rank for p in quantized.placements for rank in p.ranks}
    assert used_ranks == set(range(devices))
    # The fp32 module is untouched.
    with torch.no_grad():
        assert torch.equal(entry(*inputs), reference)


@pytest.mark.parametrize("devices", [1, 2])
def test_int8_ranker_matches_fp32_model(data, devices: int) -> None:
    entry = _ranker_entry(data)
    inputs = _ranker_inputs(data)
    with torch.no_grad():
        reference = entry(*inputs)
    names = [name for name, *_ in _tables(entry)]
    quantized = quantize_for_inference(
        entry, inputs, table_quant_types(names, "int8", {}), device_count=devices
    )
    with torch.no_grad():
        packaged = quantized.module(*inputs)
    assert packaged.shape == (64,)
    assert (packaged - reference).abs().max().item() < 0.05
    assert np.corrcoef(packaged.numpy(), reference.numpy())[0, 1] > 0.999


def test_int8_embeddings_are_at_least_three_times_smaller(data) -> None:
    entry = _query_entry(data)
    inputs = _query_inputs(data, entry)
    names = [name for name, *_ in _tables(entry)]
    quantized = quantize_for_inference(entry, inputs, table_quant_types(names, "int8", {}))
    fp32 = sum(table.fp32_bytes for table in quantized.tables)
    packaged = sum(table.packaged_bytes for table in quantized.tables)
    assert fp32 / packaged >= 3.0


def test_per_table_overrides_and_int4(data) -> None:
    entry = _query_entry(data)
    inputs = _query_inputs(data, entry)
    names = [name for name, *_ in _tables(entry)]
    quant = table_quant_types(names, "int8", {names[0]: "int4"})
    quantized = quantize_for_inference(entry, inputs, quant, device_count=2)
    by_table = {table.table: table for table in quantized.tables}
    assert by_table[names[0]].quant == "int4"
    assert by_table[names[0]].packaged_bytes < by_table[names[1]].packaged_bytes * (
        by_table[names[0]].num_embeddings / by_table[names[1]].num_embeddings
    )


def test_fp16_is_allowed_unsharded_and_refused_sharded(data) -> None:
    entry = _query_entry(data)
    inputs = _query_inputs(data, entry)
    names = [name for name, *_ in _tables(entry)]
    quant = table_quant_types(names, "fp16", {})
    quantized = quantize_for_inference(entry, inputs, quant, device_count=1)
    with torch.no_grad():
        assert (quantized.module(*inputs) - entry(*inputs)).abs().max().item() < 0.01
    with pytest.raises(InvalidInput, match="fp16/fp32"):
        quantize_for_inference(entry, inputs, quant, device_count=2)


def test_bad_quantization_requests_name_the_problem() -> None:
    with pytest.raises(InvalidInput, match="unknown quantization 'int3'"):
        table_quant_types(["a"], "int3", {})  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="unknown table"):
        table_quant_types(["a"], "int8", {"b": "int4"})


def _tables(entry):
    from recship.packager.quantize import embedding_tables

    return embedding_tables(entry)
