"""Export inference modules as entry points a Python or C++ host can load: TorchScript and AOTI.

The writing half of `recship.bundle.entrypoints` (which loads them).

An entry point is an `nn.Module` (usually quantized and sharded for inference) whose `forward`
takes plain tensors and returns one tensor, e.g. a query tower
`forward(values: int64[N], lengths: int32[F * B]) -> float32[B, D]` or a ranker
`forward(dense: float32[B, Fd], values: int64[N], lengths: int32[F * B]) -> float32[B]`.
Such a module is written either as TorchScript (`.pt`: `torchrec.fx` trace, then
`torch.jit.script`) or as an AOTInductor package (`.pt2`: `torch.export`, then
`torch._inductor.aoti_compile_and_package`). Both load in C++ with libtorch once the fbgemm_gpu
operator libraries are loaded. Every export reloads what it wrote and reports how far the
reloaded entry point's output is from the eager module's, so a caller can gate on it.

Example::

    result = export_torchscript(query_tower, (values, lengths), bundle / "query_tower.pt")
    if result.max_abs_diff > 1e-5:
        ...
    entry = load_entry_point(result.path, ExportFormat.TORCHSCRIPT)
    embeddings = entry(values, lengths)
"""

from __future__ import annotations

import inspect
import time
import typing
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from recship.base.errors import InvalidInput
from recship.base.files import atomic_output
from recship.bundle.entrypoints import (
    ExportFormat,
    first_line,
    import_fbgemm_ops,
    load_entry_point,
    silenced_export_warnings,
)

# Parameter names that give an entry point input its dynamic first dimension in `export_aoti`:
# `*lengths` holds one length per feature and example (a multiple of the batch), `*values` and
# `*weights` hold the jagged ids / id weights (any length); every other input is batch-major.
_LENGTHS_SUFFIX = "lengths"
_JAGGED_SUFFIXES = ("values", "weights")

# The sharding types whose quantized lookups torch.export can trace; row-wise sharding routes
# ids through bucketisation on the meta device and fails (see ENVIRONMENT.md).
_AOTI_SHARDING_TYPES = frozenset({"table_wise"})

# Fully qualified as the fake class registry keys them.
_FBGEMM_TORCHBIND_CLASSES = (
    "__torch__.torch.classes.fbgemm.AtomicCounter",
    "__torch__.torch.classes.fbgemm.TensorQueue",
)


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote and how faithful it is.

    Attributes:
        path: The written file (`.pt` or `.pt2`), complete: it was written under a temporary
            name and renamed into place.
        format: The format of `path`.
        seconds: Wall time of tracing/exporting, compiling and saving (not the reload check).
        max_abs_diff: Largest absolute difference between the reloaded entry point's output and
            the eager module's output on the example inputs.
    """

    path: Path
    format: ExportFormat
    seconds: float
    max_abs_diff: float


def _register_fbgemm_fake_classes() -> None:
    """Give torch.export fake versions of fbgemm's torchbind objects held by quantized TBEs.

    Idempotent: torchrec's registration helper warns when called twice, so it only runs when
    a class is still missing.
    """
    from torch._library.fake_class_registry import has_fake_class
    from torchrec.pt2.utils import register_fake_classes

    if not all(has_fake_class(name) for name in _FBGEMM_TORCHBIND_CLASSES):
        register_fake_classes()


def _max_abs_diff(actual: Tensor, expected: Tensor) -> float:
    if actual.shape != expected.shape:
        return float("inf")
    if actual.numel() == 0:
        return 0.0
    return (actual.detach().float() - expected.detach().float()).abs().max().item()


def _eager_output(module: nn.Module, example_inputs: tuple[Tensor, ...]) -> Tensor:
    """Run the eager warm-up forward that torchrec tracing and torch.export both need."""
    try:
        with torch.no_grad():
            output = module(*example_inputs)
    except Exception as error:
        raise InvalidInput(
            f"{type(module).__name__} fails on the example inputs: {first_line(error)}"
        ) from error
    if not isinstance(output, Tensor):
        raise InvalidInput(
            f"{type(module).__name__}.forward must return one tensor to be an entry point, "
            f"got {type(output).__name__}"
        )
    return output


def _check_inputs(example_inputs: tuple[Tensor, ...]) -> None:
    for position, value in enumerate(example_inputs):
        if not isinstance(value, Tensor):
            raise InvalidInput(
                f"example input {position} is a {type(value).__name__}; "
                "entry points take plain tensors only"
            )


def _resolve_annotations(traced: torch.fx.GraphModule, module: nn.Module) -> None:
    """Give the traced graph's inputs and output real types instead of annotation strings.

    A module written with `from __future__ import annotations` carries `"Tensor"` strings,
    which torch.fx copies into the generated code as names TorchScript cannot resolve.
    """
    hints = typing.get_type_hints(type(module).forward)
    for node in traced.graph.nodes:
        if node.op == "placeholder" and node.target in hints:
            node.type = hints[node.target]
        elif node.op == "output" and "return" in hints:
            node.type = hints["return"]
    traced.recompile()


def export_torchscript(
    module: nn.Module, example_inputs: tuple[Tensor, ...], path: Path
) -> ExportResult:
    """Trace `module` with torchrec.fx, script it and save it as TorchScript at `path`.

    Args:
        module: The entry point; its forward takes plain tensors and returns one tensor.
            TorchRec modules (sharded quantized EBCs, KJT construction) trace with torchrec.fx.
        example_inputs: Inputs for the eager warm-up call and the reload check.
        path: Destination `.pt` file; its folder is created if needed.

    Returns:
        The written file, the export time and the reloaded-vs-eager max abs difference.

    Raises:
        InvalidInput: The inputs are not tensors, the output is not one tensor, or the module
            cannot be traced or scripted (the message carries the reason).
    """
    import torchrec.fx

    import_fbgemm_ops()
    _check_inputs(example_inputs)
    path = Path(path)
    started = time.perf_counter()
    expected = _eager_output(module, example_inputs)
    with silenced_export_warnings():
        try:
            traced = torchrec.fx.symbolic_trace(module)
            _resolve_annotations(traced, module)
            scripted = torch.jit.script(traced)
        except Exception as error:
            raise InvalidInput(
                f"cannot script {type(module).__name__} for {path.name}: {first_line(error)}"
            ) from error
        with atomic_output(path, ".pt") as staging:
            torch.jit.save(scripted, str(staging))
    seconds = time.perf_counter() - started
    reloaded = load_entry_point(path, ExportFormat.TORCHSCRIPT)
    with torch.no_grad():
        diff = _max_abs_diff(reloaded(*example_inputs), expected)
    return ExportResult(path, ExportFormat.TORCHSCRIPT, seconds, diff)


def _sharding_types(module: nn.Module) -> dict[str, set[str]]:
    """Map each sharded quantized embedding module's name to the sharding types it uses."""
    found: dict[str, set[str]] = {}
    for name, child in module.named_modules():
        infos = getattr(child, "sharding_type_device_group_to_sharding_infos", None)
        if callable(infos):
            found[name or type(child).__name__] = {sharding_type for sharding_type, _ in infos()}
    return found


def _check_aoti_sharding(module: nn.Module, path: Path) -> None:
    for name, types in _sharding_types(module).items():
        unsupported = sorted(types - _AOTI_SHARDING_TYPES)
        if unsupported:
            raise InvalidInput(
                f"cannot export {path.name} as AOTInductor: {name} uses "
                f"{', '.join(unsupported)} sharding, and torch.export only traces table-wise "
                "sharded quantized embeddings; shard table-wise or use --format torchscript"
            )


def _dynamic_shapes(
    module: nn.Module, example_inputs: tuple[Tensor, ...], batch: int, path: Path
) -> dict[str, dict[int, object]]:
    """Declare the batch dimension of every input dynamic, by the forward's parameter names.

    `*lengths` inputs get `k * batch` (k features), `*values` / `*weights` inputs a free jagged
    length, and every other input the batch itself as its first dimension.
    """
    names = list(inspect.signature(module.forward).parameters)
    if len(names) != len(example_inputs):
        raise InvalidInput(
            f"{type(module).__name__}.forward takes {len(names)} arguments "
            f"({', '.join(names)}) but {len(example_inputs)} example inputs were given"
        )
    if batch < 2:
        raise InvalidInput(
            f"cannot export {path.name} with a dynamic batch from example inputs of batch "
            f"{batch}: torch.export specialises sizes 0 and 1; use an example batch of 2 or more"
        )
    batch_dim = torch.export.Dim("batch", min=1)
    shapes: dict[str, dict[int, object]] = {}
    for name, value in zip(names, example_inputs, strict=True):
        size = value.shape[0] if value.dim() > 0 else None
        if name.endswith(_LENGTHS_SUFFIX):
            if size is None or size % batch:
                raise InvalidInput(
                    f"input {name!r} of {path.name} has {size} entries, not a multiple of "
                    f"the batch {batch} (one length per feature and example)"
                )
            shapes[name] = {0: (size // batch) * batch_dim}
        elif name.endswith(_JAGGED_SUFFIXES):
            if size is None or size < 2:
                raise InvalidInput(
                    f"input {name!r} of {path.name} has {size} entries; give at least 2 ids in "
                    "the example so that torch.export keeps its length dynamic"
                )
            shapes[name] = {0: torch.export.Dim(f"{name}_length", min=0)}
        else:
            if size != batch:
                raise InvalidInput(
                    f"input {name!r} of {path.name} has first dimension {size}, expected the "
                    f"batch {batch} (the output's first dimension)"
                )
            shapes[name] = {0: batch_dim}
    return shapes


def export_aoti(
    module: nn.Module,
    example_inputs: tuple[Tensor, ...],
    path: Path,
    *,
    dynamic_batch: bool = True,
) -> ExportResult:
    """Export `module` with torch.export and compile it into an AOTInductor package at `path`.

    Args:
        module: The entry point; its forward takes plain tensors and returns one tensor. Sharded
            quantized embeddings must be table-wise.
        example_inputs: Inputs for the eager warm-up call, export and the reload check. With
            `dynamic_batch`, their batch must be at least 2 and `*values` inputs at least 2 long.
        path: Destination `.pt2` file; its folder is created if needed.
        dynamic_batch: Accept any batch size at run time. The first dimension of `*lengths`
            inputs is declared a multiple of the batch, `*values` / `*weights` inputs get a free
            length and all other inputs are batch-major (see the module docstring). Without it,
            the package only accepts the exact example shapes.

    Returns:
        The written file, the export + compile time and the reloaded-vs-eager max abs diff.

    Raises:
        InvalidInput: The configuration cannot be exported (e.g. row-wise sharded tables), the
            example inputs do not fit the batch rules, or torch.export fails (with its reason).
    """
    import_fbgemm_ops()
    _check_inputs(example_inputs)
    path = Path(path)
    _check_aoti_sharding(module, path)
    _register_fbgemm_fake_classes()
    started = time.perf_counter()
    expected = _eager_output(module, example_inputs)
    shapes = (
        _dynamic_shapes(module, example_inputs, expected.shape[0], path) if dynamic_batch else None
    )
    with silenced_export_warnings():
        try:
            program = torch.export.export(
                module, example_inputs, dynamic_shapes=shapes, strict=False
            )
        except Exception as error:
            raise InvalidInput(
                f"torch.export cannot export {path.name}: {first_line(error)}"
            ) from error
        with atomic_output(path, ".pt2") as staging:
            torch._inductor.aoti_compile_and_package(program, package_path=str(staging))
    seconds = time.perf_counter() - started
    reloaded = load_entry_point(path, ExportFormat.AOTI)
    with torch.no_grad():
        diff = _max_abs_diff(reloaded(*example_inputs), expected)
    return ExportResult(path, ExportFormat.AOTI, seconds, diff)
