"""examples/cpp builds against the torch wheel's libtorch and passes a bundle's golden self-test.

The test builds `recship_golden_check` with CMake in a temporary folder, exports the int8 entry
points (TorchScript for both, AOTInductor for the ranker) and a golden file into a directory
laid out like a bundle version, and runs the program on it: it must load everything through
libtorch + fbgemm_gpu's libraries, reproduce the recorded outputs (exit 0), and notice a
tampered recording (exit 1).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from recship.bundle.golden import GoldenRecord, read_golden, write_golden
from recship.packager.export import export_aoti, export_torchscript

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("cmake") is None or shutil.which("g++") is None,
        reason="needs cmake and g++ to build examples/cpp",
    ),
]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "cpp"
ATOL, RTOL = 1e-5, 1e-5


def _fbgemm_dir() -> str:
    import fbgemm_gpu

    return os.path.dirname(fbgemm_gpu.__file__)


def _run(command: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def golden_check(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built `recship_golden_check` binary."""
    build = tmp_path_factory.mktemp("cpp-build")
    configure = _run(
        [
            "cmake",
            "-S",
            str(EXAMPLE),
            "-B",
            str(build),
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
        ],
        timeout=300,
    )
    assert configure.returncode == 0, configure.stdout + configure.stderr
    compiled = _run(["cmake", "--build", str(build), "-j2"], timeout=600)
    assert compiled.returncode == 0, compiled.stdout + compiled.stderr
    return build / "recship_golden_check"


@pytest.fixture(scope="module")
def bundle(
    entry_case: Callable[[str, int], Any],
    entry_inputs: Callable[..., tuple[torch.Tensor, ...]],
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    """query_tower.pt, ranker.pt, ranker.pt2 and golden.pt (batch 16, unseen inputs)."""
    folder = tmp_path_factory.mktemp("bundle")
    records = {}
    for name in ("query_tower", "ranker"):
        case = entry_case(name, 1)
        export_torchscript(case.module, case.inputs, folder / f"{name}.pt")
        inputs = entry_inputs(name, 16, 21)
        with torch.no_grad():
            records[name] = GoldenRecord(inputs, case.module(*inputs))
    ranker = entry_case("ranker", 1)
    export_aoti(ranker.module, ranker.inputs, folder / "ranker.pt2")
    write_golden(folder / "golden.pt", records, ATOL, RTOL)
    return folder


def test_cpp_reproduces_recorded_outputs(golden_check: Path, bundle: Path) -> None:
    result = _run([str(golden_check), str(bundle), "--fbgemm-dir", _fbgemm_dir()], timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line.split() for line in result.stdout.splitlines() if line.endswith(("PASS", "FAIL"))]
    assert [(row[0], row[1], row[-1]) for row in rows] == [
        ("query_tower", "query_tower.pt", "PASS"),
        ("ranker", "ranker.pt", "PASS"),
        ("ranker", "ranker.pt2", "PASS"),
    ]
    assert all(float(row[2]) <= 1e-6 for row in rows), result.stdout


def test_cpp_fails_on_a_tampered_recording(
    golden_check: Path, bundle: Path, tmp_path: Path
) -> None:
    for path in bundle.iterdir():
        (tmp_path / path.name).symlink_to(path)
    golden = read_golden(bundle / "golden.pt")
    records = dict(golden.records)
    ranker = records["ranker"]
    records["ranker"] = GoldenRecord(ranker.inputs, ranker.output + 0.01)
    (tmp_path / "golden.pt").unlink()
    write_golden(tmp_path / "golden.pt", records, golden.atol, golden.rtol)

    env = {**os.environ, "RECSHIP_FBGEMM_DIR": _fbgemm_dir()}
    result = subprocess.run(
        [str(golden_check), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    verdicts = {
        tuple(line.split()[:2]): line.split()[-1]
        for line in result.stdout.splitlines()
        if line.endswith(("PASS", "FAIL"))
    }
    assert verdicts == {
        ("query_tower", "query_tower.pt"): "PASS",
        ("ranker", "ranker.pt"): "FAIL",
        ("ranker", "ranker.pt2"): "FAIL",
    }


def test_cpp_usage_errors_exit_2(golden_check: Path, bundle: Path) -> None:
    env = {key: value for key, value in os.environ.items() if key != "RECSHIP_FBGEMM_DIR"}
    no_fbgemm = subprocess.run(
        [str(golden_check), str(bundle)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )
    assert no_fbgemm.returncode == 2
    assert "--fbgemm-dir" in no_fbgemm.stderr
    missing = _run([str(golden_check), str(bundle / "nowhere"), "--fbgemm-dir", "x"], timeout=60)
    assert missing.returncode == 2
    assert "not a directory" in missing.stderr


def test_cpp_passes_a_published_bundle_in_both_formats(
    golden_check: Path, trained_runs: tuple[Path, Path], tmp_path: Path
) -> None:
    from recship.packager.api import package
    from recship.packager.options import PackageOptions

    report = package(
        PackageOptions(
            retrieval=trained_runs[0],
            ranking=trained_runs[1],
            repo=tmp_path / "repo",
            name="movies",
            export_format="both",
        )
    )
    files = {entry.file for entry in report.manifest.entry_points}
    assert files == {"query_tower.pt", "query_tower.pt2", "ranker.pt", "ranker.pt2"}
    result = _run(
        [str(golden_check), str(report.ref.path), "--fbgemm-dir", _fbgemm_dir()], timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    verdicts = [
        (line.split()[1], line.split()[-1])
        for line in result.stdout.splitlines()
        if line.endswith(("PASS", "FAIL"))
    ]
    assert sorted(verdicts) == [(name, "PASS") for name in sorted(files)]
    # `recship verify` reruns the same recordings from Python for every listed file.
    verified = _run(
        [str(Path(sys.executable).with_name("recship")), "verify", str(report.ref.path)],
        timeout=300,
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
