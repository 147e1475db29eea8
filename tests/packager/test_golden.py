"""The golden self-test file round-trips, and checking it catches outputs that drifted."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from recship.base.errors import InvalidInput, NotFound
from recship.bundle.entrypoints import load_entry_point
from recship.bundle.golden import (
    GoldenRecord,
    check_golden,
    read_golden,
    write_golden,
)
from recship.packager.export import export_torchscript

ATOL, RTOL = 1e-5, 1e-4


@pytest.fixture(scope="module")
def exported(
    entry_case: Callable[[str, int], Any], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """Both int8 entry points exported as TorchScript, with golden records of their outputs."""
    folder = tmp_path_factory.mktemp("bundle")
    entry_points, records = {}, {}
    for name in ("query_tower", "ranker"):
        case = entry_case(name, 1)
        path = export_torchscript(case.module, case.inputs, folder / f"{name}.pt").path
        entry_points[name] = load_entry_point(path)
        with torch.no_grad():
            records[name] = GoldenRecord(case.inputs, case.module(*case.inputs))
    return {"entry_points": entry_points, "records": records}


def test_round_trip_keeps_names_tensors_and_tolerances(
    exported: dict[str, Any], tmp_path: Path
) -> None:
    records = exported["records"]
    write_golden(tmp_path / "golden.pt", records, ATOL, RTOL)
    assert [p.name for p in tmp_path.iterdir()] == ["golden.pt"]
    golden = read_golden(tmp_path / "golden.pt")
    assert golden.names == ("query_tower", "ranker")
    assert (golden.atol, golden.rtol) == (ATOL, RTOL)
    for name, record in records.items():
        read = golden.records[name]
        assert len(read.inputs) == len(record.inputs)
        for actual, expected in zip(read.inputs, record.inputs, strict=True):
            assert actual.dtype == expected.dtype
            assert torch.equal(actual, expected)
        assert torch.equal(read.output, record.output)
    ranker_inputs = golden.records["ranker"].inputs
    assert [t.dtype for t in ranker_inputs] == [torch.float32, torch.int64, torch.int32]


def test_exported_entry_points_pass_and_a_perturbed_output_fails(
    exported: dict[str, Any], tmp_path: Path
) -> None:
    records = dict(exported["records"])
    write_golden(tmp_path / "golden.pt", records, ATOL, RTOL)
    results = check_golden(exported["entry_points"], read_golden(tmp_path / "golden.pt"))
    assert list(results) == ["query_tower", "ranker"]
    assert all(result.passed and result.max_abs_diff <= 1e-6 for result in results.values())

    ranker = records["ranker"]
    perturbed = ranker.output.clone()
    perturbed[3] += 0.01
    records["ranker"] = GoldenRecord(ranker.inputs, perturbed)
    write_golden(tmp_path / "golden.pt", records, ATOL, RTOL)
    results = check_golden(exported["entry_points"], read_golden(tmp_path / "golden.pt"))
    assert results["query_tower"].passed
    assert not results["ranker"].passed
    assert results["ranker"].max_abs_diff == pytest.approx(0.01, rel=1e-3)


def test_tolerances_decide(exported: dict[str, Any], tmp_path: Path) -> None:
    record = exported["records"]["query_tower"]
    shifted = GoldenRecord(record.inputs, record.output + 1e-3)
    write_golden(tmp_path / "golden.pt", {"query_tower": shifted}, atol=2e-3, rtol=0.0)
    entry = {"query_tower": exported["entry_points"]["query_tower"]}
    assert check_golden(entry, read_golden(tmp_path / "golden.pt"))["query_tower"].passed
    write_golden(tmp_path / "golden.pt", {"query_tower": shifted}, atol=5e-4, rtol=0.0)
    assert not check_golden(entry, read_golden(tmp_path / "golden.pt"))["query_tower"].passed


def test_wrong_shape_and_nan_fail(tmp_path: Path) -> None:
    inputs = (torch.arange(4, dtype=torch.float32),)
    write_golden(tmp_path / "g.pt", {"double": GoldenRecord(inputs, inputs[0] * 2)}, ATOL, RTOL)
    golden = read_golden(tmp_path / "g.pt")
    assert check_golden({"double": lambda x: x * 2}, golden)["double"].passed
    shape = check_golden({"double": lambda x: (x * 2)[:3]}, golden)["double"]
    assert (shape.passed, shape.max_abs_diff) == (False, math.inf)
    nan = check_golden({"double": lambda x: x * float("nan")}, golden)["double"]
    assert not nan.passed


def test_check_one_entry_point_at_a_time_but_never_an_unknown_one(
    exported: dict[str, Any], tmp_path: Path
) -> None:
    write_golden(tmp_path / "golden.pt", exported["records"], ATOL, RTOL)
    golden = read_golden(tmp_path / "golden.pt")
    ranker_only = {"ranker": exported["entry_points"]["ranker"]}
    assert list(check_golden(ranker_only, golden)) == ["ranker"]
    with pytest.raises(InvalidInput, match=r"no golden record for entry point.*candidate_tower"):
        check_golden({"candidate_tower": lambda *x: x[0]}, golden)


def test_bad_records_and_files_are_refused(exported: dict[str, Any], tmp_path: Path) -> None:
    record = exported["records"]["ranker"]
    with pytest.raises(InvalidInput, match="at least one"):
        write_golden(tmp_path / "g.pt", {}, ATOL, RTOL)
    with pytest.raises(InvalidInput, match="identifier"):
        write_golden(tmp_path / "g.pt", {"my ranker": record}, ATOL, RTOL)
    with pytest.raises(InvalidInput, match="identifier"):
        write_golden(tmp_path / "g.pt", {"rank__er": record}, ATOL, RTOL)
    with pytest.raises(InvalidInput, match="atol must be"):
        write_golden(tmp_path / "g.pt", {"ranker": record}, -1.0, RTOL)
    with pytest.raises(InvalidInput, match="no inputs"):
        write_golden(tmp_path / "g.pt", {"ranker": GoldenRecord((), record.output)}, ATOL, RTOL)
    assert list(tmp_path.iterdir()) == []

    with pytest.raises(NotFound):
        read_golden(tmp_path / "g.pt")
    (tmp_path / "g.pt").write_text("garbage")
    with pytest.raises(InvalidInput, match="not a TorchScript golden file"):
        read_golden(tmp_path / "g.pt")
    entry_point_file = tmp_path / "plain.pt"
    torch.jit.save(torch.jit.script(torch.nn.Identity()), str(entry_point_file))
    with pytest.raises(InvalidInput, match="not a golden file, attribute 'format_version'"):
        read_golden(entry_point_file)
