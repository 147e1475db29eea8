"""Integration fixtures: the session bundle of tests/runtime and `recship serve` subprocesses.

The bundle builder lives in tests/runtime/conftest.py; it is loaded here by path (test folders
are not packages) and builds into the same session folder, so a session running both folders
trains and packages once.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "recship_tests_runtime_fixtures", Path(__file__).parents[1] / "runtime" / "conftest.py"
)
assert _spec is not None and _spec.loader is not None
runtime_fixtures = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = runtime_fixtures  # dataclasses look their module up there
_spec.loader.exec_module(runtime_fixtures)

REPO_ROOT = Path(__file__).resolve().parents[2]
RECSHIP = Path(sys.executable).parent / "recship"


@pytest.fixture(scope="session")
def bundle_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's repository with `movies/1` (shared with tests/runtime)."""
    return runtime_fixtures.build_bundle(tmp_path_factory.getbasetemp() / "recship-serving-bundle")


@pytest.fixture(scope="session")
def make_user():
    return runtime_fixtures.user


@dataclass
class ServeProcess:
    """A `recship serve` subprocess and the ports it announced."""

    process: subprocess.Popen[str]
    port: int
    metrics_port: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def terminate(self, timeout: float = 60.0) -> int:
        """Sends SIGTERM and returns the exit code."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)


def start_serve(repo: Path, *flags: str) -> ServeProcess:
    """Starts `recship serve --port 0 --metrics-port 0` and reads its `listening on` line."""
    process = subprocess.Popen(
        [str(RECSHIP), "serve", "--repo", str(repo), "--port", "0", "--metrics-port", "0", *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.startswith("listening on "):
        process.kill()
        process.wait()
        raise AssertionError(f"recship serve did not start: {line!r}")
    # "listening on 127.0.0.1:PORT metrics M"
    words = line.split()
    return ServeProcess(process, int(words[2].rsplit(":", 1)[1]), int(words[4]))


@pytest.fixture
def serve_process() -> Iterator[object]:
    """`serve_process(repo, *flags)`: a `recship serve` subprocess, killed if still running."""
    started: list[ServeProcess] = []

    def start(repo: Path, *flags: str) -> ServeProcess:
        started.append(start_serve(repo, *flags))
        return started[-1]

    yield start
    for serve in started:
        if serve.process.poll() is None:
            serve.process.kill()
            serve.process.wait()
        if serve.process.stdout is not None:
            serve.process.stdout.close()
