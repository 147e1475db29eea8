"""The golden self-test file: recorded entry-point inputs and the outputs they must produce.

The packager records, per entry point, a batch of inputs and the output of the model it
exported, plus the tolerances the outputs must meet. `recship verify`, the runtime's load-time
self-test and the C++ example (`examples/cpp/`) rerun the bundle's entry points on those inputs
and compare.

The file (`golden.pt`) is a method-less TorchScript module so that libtorch alone reads it; its
attributes are listed in `bundle/FORMAT.md` (golden.pt). Besides the entry points' recorded
calls it may hold raw golden queries (`RawGolden`): query-side requests as a client sends them,
the query tower inputs they encode to and the tower's output on them, so that a host that
encodes raw values itself (the C++ example) checks its encoding against the recorded one.
`recship.bundle.raw_queries` makes and checks them; this module only stores and reads them.

Example::

    write_golden(bundle / "golden.pt", {"ranker": GoldenRecord(inputs, expected)}, 1e-4, 1e-4)
    golden = read_golden(bundle / "golden.pt")
    results = check_golden({"ranker": load_entry_point(bundle / "ranker.pt")}, golden)
    ok = all(result.passed for result in results.values())
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from recship.base.errors import InvalidInput, NotFound, clip, untrusted
from recship.base.files import atomic_output
from recship.bundle.entrypoints import check_archive, silenced_export_warnings
from recship.bundle.layout import QUERY_TOWER
from recship.protos.v1 import manifest_pb2

GOLDEN_FORMAT_VERSION = 1
INPUTS_SUFFIX = "__inputs"
OUTPUT_SUFFIX = "__output"
# The raw golden queries (optional; bundle/FORMAT.md, golden.pt): the JSON text of the queries,
# then one tensor attribute per suffix.
RAW_QUERIES = "raw_queries"
RAW_TENSORS = ("values", "lengths", "dense", "output")
# Entry point names become attribute names (C++ reads `<name>__inputs`), hence identifiers
# without the separator.
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


@dataclass(frozen=True)
class GoldenRecord:
    """One entry point's recorded call: positional input tensors and the expected output."""

    inputs: tuple[Tensor, ...]
    output: Tensor


@dataclass(frozen=True)
class RawGolden:
    """Raw query-side requests, the query tower inputs they encode to and the tower's output.

    Attributes:
        sparse_features: the query tower's sparse features, in its input order (F).
        dense_features: the query-side dense features (the ranker's first dense columns, Fd).
        queries: B requests, each a feature name -> raw value mapping as a client sends it: a
            str, an int, a float or a list of one of these (JSON types).
        values: int64 [N], the query tower's `values` encoded from `queries` (feature-major).
        lengths: int32 [F * B], its `lengths`.
        dense: float32 [B, Fd], the dense features encoded from `queries`.
        output: float32 [B, D], the packaged query tower's output on (values, lengths).
    """

    sparse_features: tuple[str, ...]
    dense_features: tuple[str, ...]
    queries: tuple[Mapping[str, Any], ...]
    values: Tensor
    lengths: Tensor
    dense: Tensor
    output: Tensor

    def document(self) -> str:
        """The JSON text stored as the `raw_queries` attribute (bundle/FORMAT.md, golden.pt)."""
        return json.dumps(
            {
                "sparse_features": list(self.sparse_features),
                "dense_features": list(self.dense_features),
                "queries": [dict(query) for query in self.queries],
            },
            allow_nan=False,
            ensure_ascii=False,
        )


@dataclass(frozen=True)
class GoldenSet:
    """The contents of a golden file: records by entry point name, the tolerances and the raw
    golden queries (None in versions packaged before they were recorded)."""

    records: Mapping[str, GoldenRecord]
    atol: float
    rtol: float
    raw: RawGolden | None = None

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


def write_golden(
    path: Path,
    records: Mapping[str, GoldenRecord],
    atol: float,
    rtol: float,
    raw: RawGolden | None = None,
) -> None:
    """Write a golden file atomically (temporary file in the same folder, then rename).

    Args:
        path: Destination, conventionally `<bundle version>/golden.pt`.
        records: Per entry point name, the inputs and expected output (copied to CPU).
        atol: Absolute tolerance, >= 0.
        rtol: Relative tolerance, >= 0.
        raw: The raw golden queries, if any (`recship.bundle.raw_queries.record_raw_queries`).

    Raises:
        InvalidInput: No records, a name that is not an identifier, a record without inputs,
            a non-tensor value, a negative or non-finite tolerance, or raw queries that are
            not JSON.
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
    if raw is not None:
        try:
            attributes[RAW_QUERIES] = raw.document()
        except (TypeError, ValueError) as error:
            raise InvalidInput(f"{path}: raw golden queries are not JSON ({error})") from None
        for suffix in RAW_TENSORS:
            attributes[f"{RAW_QUERIES}__{suffix}"] = _plain(getattr(raw, suffix))
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
    check_archive(path, context="not a TorchScript golden file")
    with silenced_export_warnings():
        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except Exception as error:
            raise InvalidInput(
                f"{path}: not a TorchScript golden file ({clip(str(error), 160)})"
            ) from error
    version = _attribute(module, "format_version", path)
    if version != GOLDEN_FORMAT_VERSION:
        raise InvalidInput(
            f"{path}: golden format_version {version} is not {GOLDEN_FORMAT_VERSION}"
        )
    names = _attribute(module, "names", path)
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise InvalidInput(f"{path}: attribute 'names' is not a list of strings")
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
        raw=_read_raw(module, path) if module._c.hasattr(RAW_QUERIES) else None,
    )


def _read_raw(module: torch.jit.ScriptModule, path: Path) -> RawGolden:
    """The raw golden queries of a golden file that records them (structure only; the tensors'
    shapes are checked against the manifest by `check_golden_shapes`)."""
    where = f"{path}: attribute {RAW_QUERIES!r}"
    text = _attribute(module, RAW_QUERIES, path)
    try:
        document = json.loads(text) if isinstance(text, str) else None
    except json.JSONDecodeError as error:
        raise InvalidInput(f"{where} is not JSON ({error})") from None
    names = ("sparse_features", "dense_features")
    if (
        not isinstance(document, dict)
        or not all(
            isinstance(document.get(key), list)
            and all(isinstance(name, str) for name in document[key])
            for key in names
        )
        or not isinstance(document.get("queries"), list)
        or not all(isinstance(query, dict) for query in document["queries"])
    ):
        raise InvalidInput(
            f"{where} must be an object with lists sparse_features, dense_features (names) "
            "and queries (objects)"
        )
    tensors = {}
    for suffix in RAW_TENSORS:
        value = _attribute(module, f"{RAW_QUERIES}__{suffix}", path)
        if not isinstance(value, Tensor):
            raise InvalidInput(f"{path}: attribute '{RAW_QUERIES}__{suffix}' is not a tensor")
        tensors[suffix] = value
    return RawGolden(
        sparse_features=tuple(document["sparse_features"]),
        dense_features=tuple(document["dense_features"]),
        queries=tuple(document["queries"]),
        **tensors,
    )


def check_golden_shapes(golden: GoldenSet, manifest: manifest_pb2.BundleManifest) -> None:
    """Checks the recorded inputs and outputs against the manifest's schema.

    Per entry point of the manifest: `GoldenSet.examples` rows, the entry point's feature
    order (F features: lengths [F * B], values as many as the lengths add up to, each feature's
    ids within its cardinality), the ranker's dense width (`schema.dense_features`) and the
    outputs' shapes ([B, retrieval_dim] embeddings, [B] logits). The self-test then shows that
    the entry point files compute those outputs from those inputs, which ties the files to the
    schema. Raw golden queries, when recorded, must name the query tower's features in its
    order and the query-side dense features, and their tensors fit the same way.

    Raises:
        InvalidInput: naming the entry point and the first disagreement.
    """
    schema = manifest.schema
    rows = int(manifest.golden.examples)
    cardinality = {f.name: int(f.cardinality) for f in schema.sparse_features}
    for entry in manifest.entry_points:
        record = golden.records.get(entry.name)
        where = f"golden record {untrusted(entry.name)}"
        if record is None:
            raise InvalidInput(f"{where}: missing")
        inputs = list(record.inputs)
        ranker = entry.name == "ranker"
        if len(inputs) != (3 if ranker else 2) or not all(isinstance(t, Tensor) for t in inputs):
            raise InvalidInput(f"{where}: {len(inputs)} inputs, expected {3 if ranker else 2}")
        if ranker:
            dense = inputs.pop(0)
            width = len(schema.dense_features)
            if dense.dtype != torch.float32 or tuple(dense.shape) != (rows, width):
                raise InvalidInput(
                    f"{where}: dense is {dense.dtype} {tuple(dense.shape)}, expected "
                    f"float32 ({rows}, {width})"
                )
        values, lengths = inputs
        _check_jagged(where, values, lengths, list(entry.sparse_feature_order), rows, cardinality)
        expected = (rows,) if ranker else (rows, int(schema.retrieval_dim))
        _check_float(where, "output", record.output, expected)
    if golden.raw is not None:
        _check_raw_shapes(golden.raw, manifest, cardinality)


def _check_jagged(
    where: str,
    values: Tensor,
    lengths: Tensor,
    order: list[str],
    rows: int,
    cardinality: Mapping[str, int],
) -> None:
    """Feature-major (values, lengths) of `rows` examples of the features `order`."""
    if (
        not isinstance(values, Tensor)
        or not isinstance(lengths, Tensor)
        or values.dtype != torch.int64
        or lengths.dtype != torch.int32
        or values.dim() != 1
        or tuple(lengths.shape) != (len(order) * rows,)
    ):
        raise InvalidInput(
            f"{where}: values {values.dtype} {tuple(values.shape)} and lengths "
            f"{lengths.dtype} {tuple(lengths.shape)} do not fit {len(order)} features x {rows}"
        )
    if (lengths < 0).any() or int(lengths.sum()) != values.numel():
        raise InvalidInput(f"{where}: lengths do not add up to the values")
    per_feature = torch.split(values, lengths.view(len(order), rows).sum(dim=1).tolist())
    for name, ids in zip(order, per_feature, strict=True):
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= cardinality.get(name, 0)):
            raise InvalidInput(
                f"{where}: ids of {untrusted(name)} outside its cardinality "
                f"[0, {cardinality.get(name, 0)})"
            )


def _check_float(where: str, label: str, tensor: object, expected: tuple[int, ...]) -> None:
    if (
        not isinstance(tensor, Tensor)
        or tensor.dtype != torch.float32
        or tuple(tensor.shape) != expected
    ):
        shape = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
        raise InvalidInput(f"{where}: {label} {shape}, expected float32 {expected}")


def _check_raw_shapes(
    raw: RawGolden, manifest: manifest_pb2.BundleManifest, cardinality: Mapping[str, int]
) -> None:
    """The raw golden queries name the query tower's features in its order and the query-side
    dense features, and their tensors fit those features and the number of queries."""
    where = "golden raw queries"
    schema = manifest.schema
    towers = [entry for entry in manifest.entry_points if entry.name == QUERY_TOWER]
    order = list(towers[0].sparse_feature_order) if towers else []
    dense = list(schema.dense_features[: schema.query_dense_count])
    if list(raw.sparse_features) != order or list(raw.dense_features) != dense:
        raise InvalidInput(
            f"{where}: they name features {list(raw.sparse_features)} and dense features "
            f"{list(raw.dense_features)}; the query tower takes {order} and the query side's "
            f"dense features are {dense}"
        )
    rows = len(raw.queries)
    if rows == 0:
        raise InvalidInput(f"{where}: no queries")
    _check_jagged(where, raw.values, raw.lengths, order, rows, cardinality)
    _check_float(where, "dense", raw.dense, (rows, len(dense)))
    _check_float(where, "output", raw.output, (rows, int(schema.retrieval_dim)))


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


def check_raw_output(query_tower: Callable[..., Tensor], golden: GoldenSet) -> GoldenResult:
    """Runs a query tower on the raw golden queries' recorded inputs and compares its output
    with the recorded one, within the golden tolerances.

    Whether the raw values encode to those inputs is `raw_queries.raw_golden_problems`' check;
    this one ties them to the entry point file.

    Raises:
        InvalidInput: the golden set records no raw queries.
        Exception: whatever the query tower raises on those inputs.
    """
    raw = golden.raw
    if raw is None:
        raise InvalidInput("the golden file records no raw queries")
    with torch.inference_mode():
        actual = query_tower(raw.values, raw.lengths).detach().to("cpu")
    return _compare(actual, raw.output, golden.atol, golden.rtol)


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
