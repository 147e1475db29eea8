"""Exported entry points (TorchScript and AOTInductor) reproduce the eager int8 models.

The models come from conftest.py: int8-quantized, inference-sharded table-wise over 1 or 2 CPU
shards. Each exported file is compared with the sharded eager module (bit-for-bit up to 1e-6)
and with the unsharded fp32 model (within int8 error), on the export batch and on other batch
sizes, since the batch dimension is dynamic.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.inference.modules import quantize_inference_model, shard_quant_model

from recship.base.errors import InvalidInput, NotFound
from recship.bundle.entrypoints import ExportFormat, format_of, load_entry_point
from recship.packager.export import ExportResult, export_aoti, export_torchscript

EXACT = 1e-6
Case = Callable[[str, int], Any]
Inputs = Callable[..., tuple[Tensor, ...]]


def _assert_faithful(result: ExportResult, case: Any, entry_inputs: Inputs) -> None:
    assert result.path.is_file()
    assert [p.name for p in result.path.parent.iterdir()] == [result.path.name], "temp file left"
    assert result.seconds > 0
    assert result.max_abs_diff <= EXACT
    entry = load_entry_point(result.path)
    with torch.no_grad():
        assert (entry(*case.inputs) - case.fp32_output).abs().max() <= case.fp32_atol
        for batch in (1, 3, 64):
            inputs = entry_inputs(case.name, batch, 11)
            actual = entry(*inputs)
            assert actual.shape[0] == batch
            torch.testing.assert_close(actual, case.module(*inputs), atol=EXACT, rtol=0)


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("name", ["query_tower", "ranker"])
def test_torchscript_export_matches_eager_and_fp32(
    entry_case: Case, entry_inputs: Inputs, tmp_path: Path, name: str, world_size: int
) -> None:
    case = entry_case(name, world_size)
    result = export_torchscript(case.module, case.inputs, tmp_path / f"{name}.pt")
    assert result.format is ExportFormat.TORCHSCRIPT
    _assert_faithful(result, case, entry_inputs)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "world_size"), [("ranker", 1), ("query_tower", 2)])
def test_aoti_export_matches_eager_and_fp32(
    entry_case: Case, entry_inputs: Inputs, tmp_path: Path, name: str, world_size: int
) -> None:
    case = entry_case(name, world_size)
    result = export_aoti(case.module, case.inputs, tmp_path / f"{name}.pt2")
    assert result.format is ExportFormat.AOTI
    _assert_faithful(result, case, entry_inputs)
    empty = (torch.zeros(0, dtype=torch.int64), torch.zeros(3 * 4, dtype=torch.int32))
    if name == "query_tower":
        # Every bag empty: the jagged length is dynamic down to 0.
        entry = load_entry_point(result.path)
        with torch.no_grad():
            torch.testing.assert_close(entry(*empty), case.module(*empty), atol=EXACT, rtol=0)


def test_aoti_refuses_row_wise_sharding(
    entry_case: Case, entry_fp32_model: Callable[[str], nn.Module], tmp_path: Path
) -> None:
    case = entry_case("query_tower", 1)
    quantized = quantize_inference_model(entry_fp32_model("query_tower"))
    constraints = {
        table: ParameterConstraints(sharding_types=["row_wise"], compute_kernels=["quant"])
        for table in ("t_user_id", "t_user_age", "t_user_genres")
    }
    row_wise, _ = shard_quant_model(
        quantized,
        world_size=2,
        compute_device="cpu",
        sharding_device="cpu",
        constraints=constraints,
    )
    with pytest.raises(InvalidInput, match="row_wise sharding"):
        export_aoti(row_wise, case.inputs, tmp_path / "query_tower.pt2")
    assert list(tmp_path.iterdir()) == []


def test_aoti_rejects_inputs_it_cannot_make_dynamic(
    entry_case: Case, entry_inputs: Inputs, tmp_path: Path
) -> None:
    case = entry_case("ranker", 1)
    with pytest.raises(InvalidInput, match="example batch of 2 or more"):
        export_aoti(case.module, entry_inputs("ranker", 1), tmp_path / "ranker.pt2")
    dense, values, lengths = case.inputs
    with pytest.raises(InvalidInput, match="fails on the example inputs"):
        export_aoti(case.module, (dense[:3], values, lengths), tmp_path / "ranker.pt2")
    assert list(tmp_path.iterdir()) == []


class _TwoOutputs(nn.Module):
    def forward(self, values: Tensor) -> tuple[Tensor, Tensor]:
        return values, values


def test_entry_points_take_and_return_plain_tensors(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="must return one tensor"):
        export_torchscript(_TwoOutputs(), (torch.ones(2),), tmp_path / "two.pt")
    with pytest.raises(InvalidInput, match="plain tensors only"):
        export_torchscript(_TwoOutputs(), ([1, 2],), tmp_path / "two.pt")  # type: ignore[arg-type]


def test_load_entry_point_errors(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="not found"):
        load_entry_point(tmp_path / "missing.pt")
    with pytest.raises(InvalidInput, match=r"\.pt or \.pt2"):
        load_entry_point(tmp_path / "model.onnx")
    with pytest.raises(InvalidInput, match="unknown entry point format 'onnx'"):
        load_entry_point(tmp_path / "model.pt", "onnx")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a zip archive")
    with pytest.raises(InvalidInput, match="cannot load as torchscript"):
        load_entry_point(garbage)
    assert format_of(Path("ranker.pt2")) is ExportFormat.AOTI
    assert ExportFormat("torchscript").suffix == ".pt"
