"""`recship doctor`: is the torch / torchrec / fbgemm_gpu / faiss set on this machine usable?

The triad is fragile (a wrong fbgemm_gpu build loads with undefined symbols, torchrec pulls the
CUDA fbgemm-gpu by default), so this checks by doing: it imports each library, calls an fbgemm
operator and compares its result, and runs a tiny FAISS search.
"""

from __future__ import annotations

import importlib
import os
import platform
from dataclasses import dataclass, field
from importlib import metadata

import click

from recship.base.errors import EnvironmentBroken
from recship.base.libraries import LIBRARY_DISTRIBUTIONS

# The set this release is tested with (constraints.txt); other versions get a warning.
KNOWN_GOOD = {
    "torch": "2.13.0",
    "torchrec": "1.8.0",
    "fbgemm_gpu": "1.8.0",
    "faiss": "1.15.1",
}

# Distributions that may provide a module, CPU build first: the bundle manifest's table (the
# libraries a bundle records) plus the serving stack.
DISTRIBUTIONS = {**LIBRARY_DISTRIBUTIONS, "grpcio": ("grpcio",), "protobuf": ("protobuf",)}


@dataclass
class DoctorReport:
    """What `doctor` found. `problems` is empty when the environment is usable."""

    rows: list[tuple[str, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _installed(component: str) -> str | None:
    """Version and distribution name of an installed component, e.g. '1.8.0 (fbgemm-gpu-cpu)'."""
    for distribution in DISTRIBUTIONS[component]:
        try:
            version = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            continue
        suffix = f" ({distribution})" if len(DISTRIBUTIONS[component]) > 1 else ""
        return version + suffix
    return None


def _check_import(report: DoctorReport, module: str, component: str) -> object | None:
    version = _installed(component)
    try:
        imported = importlib.import_module(module)
    except Exception as error:  # any import failure means a broken install, report it whole
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        report.rows.append((component, f"{version or 'not installed'}: import failed"))
        report.problems.append(f"{component} does not import: {first_line}")
        return None
    report.rows.append((component, version or getattr(imported, "__version__", "unknown")))
    wanted = KNOWN_GOOD.get(component)
    if wanted and version and version.split(" ")[0].split("+")[0] != wanted:
        report.warnings.append(f"{component} {version} is not the tested {wanted}")
    return imported


def _check_fbgemm_ops(report: DoctorReport) -> None:
    """Call two fbgemm operators the quantized models rely on and check their results."""
    import torch

    try:
        lengths = torch.tensor([1, 2, 3], dtype=torch.int64)
        offsets = torch.ops.fbgemm.asynchronous_complete_cumsum(lengths)
        if offsets.tolist() != [0, 1, 3, 6]:
            raise RuntimeError(f"asynchronous_complete_cumsum gave {offsets.tolist()}")
        rows = torch.tensor([[0.0, 0.5, 1.0, 2.0]], dtype=torch.float32)
        packed = torch.ops.fbgemm.FloatToFused8BitRowwiseQuantized(rows)
        restored = torch.ops.fbgemm.Fused8BitRowwiseQuantizedToFloat(packed)
        if not torch.allclose(restored, rows, atol=0.02):
            raise RuntimeError(f"int8 row-wise round trip gave {restored.tolist()}")
    except Exception as error:  # a missing operator or symbol surfaces as any exception type
        report.rows.append(("fbgemm ops", "FAILED"))
        report.problems.append(f"fbgemm operators do not work: {str(error).splitlines()[0]}")
        return
    report.rows.append(("fbgemm ops", "ok"))


def _check_faiss(report: DoctorReport, faiss: object) -> None:
    import numpy as np

    try:
        vectors = np.eye(4, dtype="float32")
        index = faiss.IndexFlatIP(4)  # type: ignore[attr-defined]
        index.add(vectors)
        _, ids = index.search(vectors[:1], 1)
        if int(ids[0, 0]) != 0:
            raise RuntimeError(f"a flat search returned id {int(ids[0, 0])} instead of 0")
        gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0  # type: ignore[attr-defined]
    except Exception as error:  # report any FAISS failure as a broken environment
        report.rows.append(("faiss search", "FAILED"))
        report.problems.append(f"faiss does not work: {str(error).splitlines()[0]}")
        return
    report.rows.append(("faiss search", "ok"))
    report.rows.append(("faiss GPU support", f"yes ({gpus} GPUs)" if gpus else "no"))


def run_doctor() -> DoctorReport:
    """Check every library recship needs; never raises, problems go into the report."""
    report = DoctorReport()
    report.rows.append(("python", platform.python_version()))
    report.rows.append(("platform", f"{platform.system()} {platform.machine()}"))
    torch = _check_import(report, "torch", "torch")
    fbgemm = _check_import(report, "fbgemm_gpu", "fbgemm_gpu") if torch else None
    if torch and fbgemm:
        _check_fbgemm_ops(report)
        _check_import(report, "torchrec", "torchrec")
    else:
        report.rows.append(("torchrec", "not checked (needs torch and fbgemm_gpu)"))
    faiss = _check_import(report, "faiss", "faiss")
    if faiss:
        _check_faiss(report, faiss)
    for module, component in (("grpc", "grpcio"), ("google.protobuf", "protobuf")):
        _check_import(report, module, component)
    report.rows.append(("cpu cores", str(os.cpu_count())))
    if torch:
        count = torch.cuda.device_count()  # type: ignore[attr-defined]
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(count))  # type: ignore[attr-defined]
        report.rows.append(("cuda devices", f"{count}" + (f" ({names})" if names else "")))
        report.rows.append(("torch cuda build", torch.version.cuda or "none (CPU build)"))  # type: ignore[attr-defined]
    return report


@click.command("doctor")
def doctor_command() -> None:
    """Check that torch, torchrec, fbgemm_gpu and faiss work together on this machine."""
    from rich.console import Console
    from rich.table import Table

    report = run_doctor()
    table = Table(title="recship doctor", show_header=True)
    table.add_column("component")
    table.add_column("status")
    for name, value in report.rows:
        table.add_row(name, value)
    console = Console()
    console.print(table)
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}")
    checks = dict(report.rows)
    console.print(f"fbgemm ops: {checks.get('fbgemm ops', 'not checked')}")
    if not report.ok:
        raise EnvironmentBroken("; ".join(report.problems))
    console.print("environment ok")
