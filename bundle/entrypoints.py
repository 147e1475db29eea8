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
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor

from recship.base.errors import InvalidInput, NotFound
from recship.protos.v1 import manifest_pb2


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
                f"{path}: cannot load as {export_format}: {first_line(error)}"
            ) from error


def _parse_format(value: ExportFormat | str) -> ExportFormat:
    try:
        return ExportFormat(value)
    except ValueError:
        choices = ", ".join(export_format.value for export_format in ExportFormat)
        raise InvalidInput(f"unknown entry point format {value!r} (choose {choices})") from None
