"""Integration fixtures: `recship serve` subprocesses; the session bundle is tests/conftest.py's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from recship.runtime.front_end import BUILD_PACKAGES, missing_build_tools

RECSHIP = Path(sys.executable).parent / "recship"
_MISSING_BUILD_TOOLS = missing_build_tools()
#: For tests that build and run `recship-frontend`: skipped, naming what to install, on a host
#: without its build tools (CI has no gRPC C++).
needs_front_end_build = pytest.mark.skipif(
    bool(_MISSING_BUILD_TOOLS),
    reason=f"the native front end's build needs {', '.join(_MISSING_BUILD_TOOLS)} "
    f"(Debian: apt-get install {BUILD_PACKAGES})",
)


@dataclass
class ServeProcess:
    """A `recship serve` subprocess and the ports it announced."""

    process: subprocess.Popen[str]
    port: int
    metrics_port: int
    admin: str  # the admin API's address, or "-" without one

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def terminate(self, timeout: float = 60.0) -> int:
        """Sends SIGTERM and returns the exit code."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def scrape(self) -> dict[str, float]:
        """Samples of its metrics endpoint, "name{labels}" -> value."""
        url = f"http://127.0.0.1:{self.metrics_port}/"
        with urllib.request.urlopen(url, timeout=10) as response:
            lines = response.read().decode().splitlines()
        return {
            name: float(value)
            for name, value in (line.rsplit(" ", 1) for line in lines if line and line[0] != "#")
        }

    def children(self, command: bytes = b"") -> list[int]:
        """Its child processes (workers, the native front end) whose command line holds
        `command`, in pid order."""
        pid = self.process.pid
        found = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        return sorted(int(c) for c in found if command in Path(f"/proc/{c}/cmdline").read_bytes())


def start_serve(repo: Path, *flags: str) -> ServeProcess:
    """Starts `recship serve --port 0 --metrics-port 0 --admin-port 0` and reads its
    `listening on` line (later flags override these)."""
    ports = ["--port", "0", "--metrics-port", "0", "--admin-port", "0"]
    process = subprocess.Popen(
        [str(RECSHIP), "serve", "--repo", str(repo), *ports, *flags],
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
    # "listening on 127.0.0.1:PORT metrics M admin ADDRESS"
    words = line.split()
    return ServeProcess(process, int(words[2].rsplit(":", 1)[1]), int(words[4]), words[6])


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
