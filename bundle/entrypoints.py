"""Entry points: the exported model files of a version and how to load them.

An entry point is a TorchScript (`.pt`) or AOTInductor (`.pt2`) file whose forward takes plain
tensors and returns one tensor; its name, format, inputs and feature order are recorded in the
manifest (`EntryPoint`) and its layout is described in `bundle/FORMAT.md`. The packager writes
them (`recship.packager.export`); the runtime, `recship verify` and the C++ example load them.
Every loader imports fbgemm_gpu first: the quantized lookups call its operators.

Example::

    entry = load_entry_point(version_dir / "ranker.pt")
    logits = entry(dense, values, lengths)
"""

from __future__ import annotations

import contextlib
import enum
import logging
import warnings
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor

from recship.base.errors import InvalidInput, NotFound, clip, shown
from recship.protos.v1 import manifest_pb2

# A TorchScript or AOTI file is a zip archive. Tensors are stored uncompressed; code and debug
# records may be deflated, and together they decompress to far less than this.
_MAX_INFLATED_BYTES = 64 * 1024 * 1024
_MAX_ARCHIVE_MEMBERS = 100_000
# fbgemm's EmbeddingLocation.HOST: a CPU table, rows packed without alignment (row_alignment 1);
# tables on a GPU (DEVICE, MANAGED) pad each row to 16 bytes.
_HOST_PLACEMENT = 3
_GPU_ROW_ALIGNMENT = 16
# fbgemm aligns each table's start; a table's bytes exceed its rows' by less than this.
_TABLE_PADDING_BYTES = 256


class ExportFormat(enum.StrEnum):
    """How an entry point is stored; the value is what manifests and CLI flags spell."""

    TORCHSCRIPT = "torchscript"
    AOTI = "aoti"

    @property
    def suffix(self) -> str:
        """The file name suffix of this format: `.pt` or `.pt2`."""
        return ".pt" if self is ExportFormat.TORCHSCRIPT else ".pt2"


# ExportFormat <-> the manifest's EntryPointFormat.
MANIFEST_FORMATS: dict[ExportFormat, int] = {
    ExportFormat.TORCHSCRIPT: manifest_pb2.ENTRY_POINT_FORMAT_TORCHSCRIPT,
    ExportFormat.AOTI: manifest_pb2.ENTRY_POINT_FORMAT_AOTI,
}
FORMATS_BY_MANIFEST: dict[int, ExportFormat] = {v: k for k, v in MANIFEST_FORMATS.items()}

# fbgemm_gpu libraries a C++ host dlopens (RTLD_GLOBAL) before loading each format.
REQUIRED_LIBRARIES: dict[ExportFormat, tuple[str, ...]] = {
    ExportFormat.TORCHSCRIPT: ("fbgemm_gpu_tbe_inference.so", "fbgemm_gpu_py.so"),
    ExportFormat.AOTI: (
        "fbgemm_gpu_tbe_inference.so",
        "fbgemm_gpu_py.so",
        "fbgemm_gpu_tbe_common.so",
    ),
}


def entry_point_file(name: str, export_format: ExportFormat) -> str:
    """The file name of entry point `name` in `export_format`, e.g. "ranker.pt"."""
    return f"{name}{export_format.suffix}"


@contextlib.contextmanager
def silenced_export_warnings() -> Iterator[None]:
    """Silence the deprecation and tracing chatter of torch.jit, torch.fx and torch.export.

    TorchScript is deprecated upstream (torch 2.13 warns on every script/save/load) and the
    `is_fx_tracing` notice is logged on every export; neither is actionable for a user of
    recship. Every recship module that scripts, exports or loads entry points or golden files
    wraps those calls in this context, so the policy lives in one place. Like
    `warnings.catch_warnings`, it changes process-wide state: not for concurrent use.
    """
    fx_logger = logging.getLogger("torch.fx._symbolic_trace")
    previous_level = fx_logger.level
    fx_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            warnings.filterwarnings("ignore", module=r"torch\.(jit|fx|export|_export)")
            warnings.filterwarnings("ignore", module=r"torchrec\.fx")
            # Raised from the ast visitor (so not attributable to torch) while scripting.
            warnings.filterwarnings("ignore", message="The TorchScript type system")
            yield
    finally:
        fx_logger.setLevel(previous_level)


def import_fbgemm_ops() -> None:
    """Register fbgemm_gpu's operators and torchbind classes (quantized lookups need them)."""
    import fbgemm_gpu  # noqa: F401


def first_line(error: Exception) -> str:
    """The first line of an exception's message: the part a person reads."""
    text = str(error).strip()
    return text.splitlines()[0] if text else repr(error)


def format_of(path: Path) -> ExportFormat:
    """The export format implied by a file name (`.pt` or `.pt2`).

    Raises:
        InvalidInput: The suffix is neither.
    """
    for export_format in ExportFormat:
        if Path(path).suffix == export_format.suffix:
            return export_format
    raise InvalidInput(f"{path}: not an entry point file (expected a .pt or .pt2 suffix)")


def check_archive(path: Path, *, context: str = "") -> None:
    """Checks that a TorchScript / AOTI file is a zip archive that inflates to about its size.

    Reads only the zip directory: the members' declared sizes must add up to at most the
    archive's size plus `_MAX_INFLATED_BYTES`, so loading cannot decompress a small file into
    gigabytes.

    Args:
        path: the archive.
        context: what the caller was doing, to start the message with (e.g. "cannot load as
            torchscript").

    Raises:
        InvalidInput: not a zip archive, too many members, or a zip bomb.
    """
    path = Path(path)
    where = f"{path}: {context}: " if context else f"{path}: "
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise InvalidInput(f"{where}not a model archive ({clip(str(error), 120)})") from None
    if len(members) > _MAX_ARCHIVE_MEMBERS:
        raise InvalidInput(f"{where}{len(members)} archive members, at most {_MAX_ARCHIVE_MEMBERS}")
    inflated = sum(member.file_size for member in members)
    if inflated > path.stat().st_size + _MAX_INFLATED_BYTES:
        raise InvalidInput(
            f"{where}its members inflate to {inflated} bytes from {path.stat().st_size}; refused"
        )


def embedding_tables(module: Callable[..., Tensor]) -> list[tuple[int, int, int]]:
    """(dim, row bytes, table bytes) of every quantized embedding table of a TorchScript module.

    Read from the buffers of fbgemm's inference TBEs (`weights_offsets`, `weights_tys`,
    `D_offsets`, `weights_placements` and the weight buffers), in no particular order. A
    module that is not TorchScript (an AOTI package) yields [].
    """
    from fbgemm_gpu.split_embedding_configs import SparseType
    from fbgemm_gpu.split_table_batched_embeddings_ops_inference import (
        rounded_row_size_in_bytes,
    )

    if not isinstance(module, torch.jit.ScriptModule):
        return []
    state = module.state_dict()
    tables = []
    for key in sorted(state):
        if not key.endswith(".weights_offsets"):
            continue
        prefix = key.removesuffix(".weights_offsets")
        offsets = state[key].tolist()
        types = state[f"{prefix}.weights_tys"].tolist()
        dims = torch.diff(state[f"{prefix}.D_offsets"]).tolist()
        placements = state[f"{prefix}.weights_placements"].tolist()
        for table, offset in enumerate(offsets):
            host = placements[table] == _HOST_PLACEMENT
            buffer = (
                "weights_host"
                if host
                else ("weights_dev" if placements[table] == 0 else "weights_uvm")
            )
            size = state[f"{prefix}.{buffer}"].numel()
            ends = [
                o
                for o, p in zip(offsets, placements, strict=True)
                if p == placements[table] and o > offset
            ]
            end = min(ends, default=size)
            row = rounded_row_size_in_bytes(
                int(dims[table]),
                SparseType.from_int(int(types[table])),
                1 if host else _GPU_ROW_ALIGNMENT,
            )
            tables.append((int(dims[table]), int(row), int(end - offset)))
    return tables


def check_embedding_tables(
    module: Callable[..., Tensor],
    entry: manifest_pb2.EntryPoint,
    manifest: manifest_pb2.BundleManifest,
) -> None:
    """Compares a loaded entry point's embedding tables with the manifest's schema.

    The entry point's tables (those of its model whose features it takes) must match the
    module's quantized tables one to one by dimension, and each must hold at least its declared
    rows (so no valid id reads outside the table's bytes) and not many more (so the manifest
    did not shrink it either). Tables of one dimension are paired by size, so a manifest that
    swaps two same-dimension tables' sizes (and their features' cardinalities) consistently is
    not caught: only a signature covers that. AOTI packages are not inspected.

    Raises:
        InvalidInput: naming the entry point and the mismatch.
    """
    from recship.bundle.manifest import ENTRY_POINT_MODELS

    found = embedding_tables(module)
    if not found:
        return
    model = ENTRY_POINT_MODELS.get(entry.name)
    features = set(entry.sparse_feature_order)
    declared = [
        (int(t.embedding_dim), int(t.num_embeddings))
        for t in manifest.schema.tables
        if t.model == model and features.intersection(t.feature_names)
    ]
    where = shown(entry.file)
    if sorted(d for d, _ in declared) != sorted(d for d, _, _ in found):
        raise InvalidInput(
            f"{where}: its embedding tables have dimensions {sorted(d for d, _, _ in found)}, "
            f"the manifest declares {sorted(d for d, _ in declared)}"
        )
    for dim in sorted({d for d, _ in declared}):
        rows = sorted(r for d, r in declared if d == dim)
        spans = sorted((span, row) for d, row, span in found if d == dim)
        for want, (span, row) in zip(rows, spans, strict=True):
            if want * row > span or span - want * row >= _TABLE_PADDING_BYTES + row:
                raise InvalidInput(
                    f"{where}: a {dim}-dimension table holds {span // row} rows where the "
                    f"manifest declares {want}"
                )


def load_entry_point(
    path: Path, format: ExportFormat | str | None = None, *, device: str = "cpu"
) -> Callable[..., Tensor]:
    """Load an exported entry point for inference.

    fbgemm_gpu is imported first so that the quantized lookup operators and torchbind classes
    the file refers to exist.

    Args:
        path: A `.pt` (TorchScript) or `.pt2` (AOTInductor package) file.
        format: Its format; inferred from the suffix when omitted.
        device: Where a TorchScript module's tensors go ("cpu", "cuda:1"); an AOTI package
            runs on the device it was compiled for.

    Returns:
        A callable taking the entry point's plain tensors and returning its output tensor. A
        TorchScript module is returned in eval mode; an AOTI model runs on the CPU it was built
        for. Neither is documented as safe to call from several threads at once: give each
        executor thread its own, or serialise calls.

    Raises:
        NotFound: `path` does not exist.
        InvalidInput: The format is unknown or the file cannot be loaded (the message says why).
    """
    path = Path(path)
    export_format = format_of(path) if format is None else _parse_format(format)
    if not path.is_file():
        raise NotFound(f"{path}: entry point file not found")
    check_archive(path, context=f"cannot load as {export_format}")
    import_fbgemm_ops()
    with silenced_export_warnings():
        try:
            if export_format is ExportFormat.TORCHSCRIPT:
                module = torch.jit.load(str(path), map_location=device)
                module.eval()
                return module
            return torch._inductor.aoti_load_package(str(path))
        except Exception as error:
            raise InvalidInput(
                f"{path}: cannot load as {export_format}: {clip(first_line(error), 200)}"
            ) from error


def _parse_format(value: ExportFormat | str) -> ExportFormat:
    try:
        return ExportFormat(value)
    except ValueError:
        choices = ", ".join(export_format.value for export_format in ExportFormat)
        raise InvalidInput(f"unknown entry point format {value!r} (choose {choices})") from None
