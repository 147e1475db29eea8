"""The golden self-test file: recorded entry-point inputs and the outputs they must produce.

The packager records, per entry point, a batch of inputs and the output of the model it
exported, plus the tolerances the outputs must meet. `recship verify`, the runtime's load-time
self-test and the C++ example (`examples/cpp/`) rerun the bundle's entry points on those inputs
and compare.

The file (`golden.pt`) is a method-less TorchScript module so that libtorch alone reads it; its
attributes are listed in `bundle/FORMAT.md` (golden.pt).

Example::

    write_golden(bundle / "golden.pt", {"ranker": GoldenRecord(inputs, expected)}, 1e-4, 1e-4)
    golden = read_golden(bundle / "golden.pt")
    results = check_golden({"ranker": load_entry_point(bundle / "ranker.pt")}, golden)
    ok = all(result.passed for result in results.values())
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from recship.base.errors import InvalidInput, NotFound
from recship.base.files import atomic_output
from recship.bundle.entrypoints import silenced_export_warnings

GOLDEN_FORMAT_VERSION = 1
INPUTS_SUFFIX = "__inputs"
OUTPUT_SUFFIX = "__output"
# Entry point names become attribute names (C++ reads `<name>__inputs`), hence identifiers
# without the separator.
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


@dataclass(frozen=True)
class GoldenRecord:
    """One entry point's recorded call: positional input tensors and the expected output."""

    inputs: tuple[Tensor, ...]
    output: Tensor


@dataclass(frozen=True)
class GoldenSet:
    """The contents of a golden file: records by entry point name and the tolerances."""

    records: Mapping[str, GoldenRecord]
    atol: float
    rtol: float

    @property
    def names(self) -> tuple[str, ...]:
        """Entry point names in the order they were written."""
        return tuple(self.records)


@dataclass(frozen=True)
class GoldenResult:
    """How one entry point did: its largest absolute deviation and whether it is in tolerance.

    `max_abs_diff` is `inf` when the output's shape or dtype differs from the recorded one
    and `nan` when the output holds NaNs; neither passes.
    """

    max_abs_diff: float
    passed: bool


class _GoldenHolder(nn.Module):
    """A method-less module whose instance attributes TorchScript turns into typed attributes."""

    def __init__(self, attributes: Mapping[str, object]) -> None:
        super().__init__()
        for key, value in attributes.items():
            setattr(self, key, value)


def _check_name(name: str) -> None:
    if not _NAME.fullmatch(name) or "__" in name:
        raise InvalidInput(
            f"golden entry point name {name!r} must be an identifier (letters, digits, single "
            "underscores) so that it can name attributes"
        )


def _plain(tensor: Tensor) -> Tensor:
    """A detached, compact CPU copy: the file then holds only the recorded elements."""
    return tensor.detach().to("cpu").contiguous().clone()


def write_golden(path: Path, records: Mapping[str, GoldenRecord], atol: float, rtol: float) -> None:
    """Write a golden file atomically (temporary file in the same folder, then rename).

    Args:
        path: Destination, conventionally `<bundle version>/golden.pt`.
        records: Per entry point name, the inputs and expected output (copied to CPU).
        atol: Absolute tolerance, >= 0.
        rtol: Relative tolerance, >= 0.

    Raises:
        InvalidInput: No records, a name that is not an identifier, a record without inputs,
            a non-tensor value, or a negative or non-finite tolerance.
    """
    if not records:
        raise InvalidInput(f"{path}: a golden file needs at least one entry point record")
    for label, tolerance in (("atol", atol), ("rtol", rtol)):
        if not math.isfinite(tolerance) or tolerance < 0:
            raise InvalidInput(f"{path}: {label} must be a finite number >= 0, got {tolerance}")
    attributes: dict[str, object] = {
        "format_version": GOLDEN_FORMAT_VERSION,
        "names": list(records),
        "atol": float(atol),
        "rtol": float(rtol),
    }
    for name, record in records.items():
        _check_name(name)
        if not record.inputs:
            raise InvalidInput(f"{path}: golden record {name!r} has no inputs")
        if not all(isinstance(value, Tensor) for value in (*record.inputs, record.output)):
            raise InvalidInput(f"{path}: golden record {name!r} holds a value that is no tensor")
        attributes[name + INPUTS_SUFFIX] = [_plain(value) for value in record.inputs]
        attributes[name + OUTPUT_SUFFIX] = _plain(record.output)
    with atomic_output(Path(path), ".pt") as staging, silenced_export_warnings():
        torch.jit.save(torch.jit.script(_GoldenHolder(attributes)), str(staging))


def _attribute(module: torch.jit.ScriptModule, key: str, path: Path) -> object:
    if not module._c.hasattr(key):
        raise InvalidInput(f"{path}: not a golden file, attribute {key!r} is missing")
    return getattr(module, key)


def read_golden(path: Path) -> GoldenSet:
    """Read a golden file written by `write_golden`.

    Raises:
        NotFound: `path` does not exist.
        InvalidInput: The file is not a TorchScript archive, lacks an attribute, or has an
            unknown format version.
    """
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"{path}: golden file not found")
    with silenced_export_warnings():
        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except Exception as error:
            raise InvalidInput(f"{path}: not a TorchScript golden file ({error})") from error
    version = _attribute(module, "format_version", path)
    if version != GOLDEN_FORMAT_VERSION:
        raise InvalidInput(
            f"{path}: golden format_version {version} is not {GOLDEN_FORMAT_VERSION}"
        )
    names = _attribute(module, "names", path)
    records = {
        name: GoldenRecord(
            inputs=tuple(_attribute(module, name + INPUTS_SUFFIX, path)),
            output=_attribute(module, name + OUTPUT_SUFFIX, path),
        )
        for name in names
    }
    return GoldenSet(
        records=records,
        atol=float(_attribute(module, "atol", path)),
        rtol=float(_attribute(module, "rtol", path)),
    )


def _compare(actual: Tensor, expected: Tensor, atol: float, rtol: float) -> GoldenResult:
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        return GoldenResult(max_abs_diff=math.inf, passed=False)
    if actual.numel() == 0:
        return GoldenResult(max_abs_diff=0.0, passed=True)
    diff = (actual.double() - expected.double()).abs().max().item()
    passed = bool(torch.allclose(actual, expected, rtol=rtol, atol=atol))
    return GoldenResult(max_abs_diff=diff, passed=passed and math.isfinite(diff))


def check_golden(
    entry_points: Mapping[str, Callable[..., Tensor]], golden: GoldenSet
) -> dict[str, GoldenResult]:
    """Run entry points on their golden inputs and compare with the recorded outputs.

    Args:
        entry_points: Callables by entry point name (a loaded `.pt` or `.pt2`, or an eager
            module). Each must have a record in `golden`; records of names not given are not
            run, so a caller can check one file at a time (e.g. `ranker.pt`, then `ranker.pt2`).
        golden: What `read_golden` returned.

    Returns:
        Per given name, in the order given, the largest absolute difference and whether the
        output is within `golden.atol` / `golden.rtol`.

    Raises:
        InvalidInput: An entry point has no golden record.
        Exception: Whatever an entry point raises when called on its golden inputs.
    """
    unknown = [name for name in entry_points if name not in golden.records]
    if unknown:
        raise InvalidInput(
            f"no golden record for entry point(s) {', '.join(unknown)} "
            f"(the golden file records {', '.join(golden.names)})"
        )
    results: dict[str, GoldenResult] = {}
    with torch.inference_mode():
        for name, entry_point in entry_points.items():
            record = golden.records[name]
            actual = entry_point(*record.inputs).detach().to("cpu")
            results[name] = _compare(actual, record.output, golden.atol, golden.rtol)
    return results


def describe_failures(results: Mapping[str, GoldenResult], golden: GoldenSet) -> list[str]:
    """One line per failing entry point: "<name> differs by up to <diff> (atol .., rtol ..)"."""
    return [
        f"{name} differs by up to {result.max_abs_diff:.3g} "
        f"(atol {golden.atol:g}, rtol {golden.rtol:g})"
        for name, result in results.items()
        if not result.passed
    ]


def self_test(entry_points: Mapping[str, Callable[..., Tensor]], golden: GoldenSet) -> list[str]:
    """Runs `check_golden` and words every failure (`describe_failures`); empty when all pass.

    The one self-test loop of recship: the runtime runs it on each replica before the replica
    takes traffic, `recship verify` on every entry point file of a version.
    """
    return describe_failures(check_golden(entry_points, golden), golden)
