"""The `recship` root command: fast help and version, doctor, one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from click.testing import CliRunner

from recship.cli.doctor import run_doctor
from recship.cli.main import cli

RECSHIP = str(Path(sys.executable).with_name("recship"))
REPO_ROOT = Path(__file__).resolve().parents[2]


def test_help_lists_commands_without_importing_torch() -> None:
    probe = (
        "import sys\n"
        "from recship.cli.main import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit as done:\n"
        "    assert done.code == 0, done.code\n"
        "assert 'torch' not in sys.modules, 'recship --help imported torch'\n"
        "assert 'faiss' not in sys.modules, 'recship --help imported faiss'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "doctor" in result.stdout


def test_help_and_version_answer_in_well_under_a_second_as_a_real_process() -> None:
    for args in (["--help"], ["--version"]):
        started = time.perf_counter()
        result = subprocess.run([RECSHIP, *args], capture_output=True, text=True, check=False)
        elapsed = time.perf_counter() - started
        assert result.returncode == 0, result.stderr
        assert elapsed < 1.0, f"recship {' '.join(args)} took {elapsed:.2f} s"
    assert "recship, version" in result.stdout


def test_cli_runner_help() -> None:
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    assert "doctor" in result.output


def test_doctor_reports_a_working_triad() -> None:
    report = run_doctor()
    rows = dict(report.rows)
    assert report.ok, report.problems
    assert rows["fbgemm ops"] == "ok"
    assert rows["faiss search"] == "ok"
    assert rows["cuda devices"].split()[0].isdigit()


def test_doctor_command_in_cli_runner_and_subprocess() -> None:
    result = CliRunner().invoke(cli, ["doctor"])
    assert result.exit_code == 0, result.output
    assert "fbgemm ops: ok" in result.output
    process = subprocess.run([RECSHIP, "doctor"], capture_output=True, text=True, check=False)
    assert process.returncode == 0, process.stderr
    assert "fbgemm ops: ok" in process.stdout
    assert "environment ok" in process.stdout


def test_doctor_exits_non_zero_with_one_line_when_fbgemm_is_broken(tmp_path: Path) -> None:
    # A stand-in fbgemm_gpu earlier on sys.path that fails to load, like a mismatched build.
    (tmp_path / "fbgemm_gpu").mkdir()
    (tmp_path / "fbgemm_gpu" / "__init__.py").write_text(
        "raise OSError('libfbgemm_gpu_py.so: undefined symbol: _ZN3c10')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    process = subprocess.run(
        [RECSHIP, "doctor"], capture_output=True, text=True, env=env, check=False
    )
    assert process.returncode == 5
    error_lines = [line for line in process.stderr.splitlines() if line.strip()]
    assert error_lines == [
        "error: fbgemm_gpu does not import: libfbgemm_gpu_py.so: undefined symbol: _ZN3c10"
    ]
    assert "Traceback" not in process.stderr


def test_unknown_command_is_a_usage_error() -> None:
    process = subprocess.run(
        [RECSHIP, "no-such-command"], capture_output=True, text=True, check=False
    )
    assert process.returncode == 2
    assert "No such command" in process.stderr


def test_bare_folder_names_are_not_importable_even_from_the_repo_root() -> None:
    for name in ("runtime", "trainer", "packager", "protos"):
        result = subprocess.run(
            [sys.executable, "-c", f"import {name}"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode != 0, f"import {name} worked"
        assert "ImportError" in result.stderr or "ModuleNotFoundError" in result.stderr
    ok = subprocess.run(
        [
            sys.executable,
            "-c",
            "import recship.runtime, recship.trainer, recship.packager, recship.protos.v1",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
