"""The native front end (`recship serve --front-end native`): its build and its process.

`recship-frontend` (`native/frontend.cc`, C++ gRPC) listens on the inference port and sends
the serving processes whole batches of calls (`recship.runtime.batch_plane`), so that no
per-call gRPC work runs under a Python interpreter lock. Why: on a 2-core host the grpc.aio
server spends about half its CPU per Recommend call in gRPC's Python machinery and event
loop (benchmarks/README, "recship vs TorchServe"), which a batch-level hop removes.

The binary is built on first use from the sources shipped in the package, with the host's
compiler and gRPC C++ (Debian: `apt-get install g++ pkg-config libgrpc++-dev
protobuf-compiler-grpc`), into `<cache root>/native/<hash of sources and gRPC version>/`
(`recship.base.files.default_cache_dir`), written under a temporary name and renamed into
place, so concurrent builds and interrupted ones never leave a broken binary.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge

from recship.base.errors import FailedPrecondition, Unavailable
from recship.base.files import default_cache_dir
from recship.protos import PROTO_ROOT

logger = logging.getLogger(__name__)

#: Who answers the inference port (`ServerConfig.front_end`); the first is the default.
FRONT_ENDS = ("grpcio", "native")
SOURCE = Path(__file__).with_name("native") / "frontend.cc"
BATCH_PLANE_PROTO = "recship/v1/batch_plane.proto"
BINARY_NAME = "recship-frontend"
#: What the build needs, as Debian packages: for the message that names them.
BUILD_PACKAGES = "g++ pkg-config libgrpc++-dev protobuf-compiler-grpc"
#: The front end's default fill wait (`--max-delay-ms`), in ms: a batch not full waits this
#: long for more calls, only while more are due (fewer held than lately), so a lone client never
#: waits. At concurrency 64 on 2 cores it made batches 13 -> 17 calls and QPS 9-14 % higher
#: (5 ms: no better), with concurrency 1 unchanged (benchmarks/README).
DEFAULT_FILL_WAIT_MS = 2.0
#: Most calls per batch (`--max-batch-calls`): 64 Recommend calls of 100 candidates are 6,400
#: ranking rows.
DEFAULT_BATCH_CALLS = 64
#: Batches one worker runs at once (`--max-inflight`): 1 measured better than 2 at concurrency
#: 64 on 2 cores (the calls that arrive meanwhile make the next batch larger instead of a second
#: small one, and two batches in one worker contend for its interpreter lock: benchmarks/README).
#: Where the model runs off the host's cores (a GPU), 2 lets one batch's decoding overlap
#: another's compute.
DEFAULT_INFLIGHT = 1
#: Most calls waiting in the front end before RESOURCE_EXHAUSTED.
QUEUE_CALLS = 4096
#: How long the front end may take to listen once started.
START_TIMEOUT_S = 30.0


def missing_build_tools() -> list[str]:
    """The tools or libraries the build needs that this host lacks (empty: it can build)."""
    missing = [tool for tool in ("g++", "protoc", "grpc_cpp_plugin", "pkg-config")
               if shutil.which(tool) is None]  # fmt: skip
    if "pkg-config" not in missing:
        probe = subprocess.run(
            ["pkg-config", "--exists", "grpc++", "protobuf"], capture_output=True, check=False
        )
        if probe.returncode != 0:
            missing.append("grpc++ (pkg-config)")
    return missing


def _pkg_config(*args: str) -> list[str]:
    result = subprocess.run(
        ["pkg-config", *args, "grpc++", "protobuf"], capture_output=True, text=True, check=True
    )
    return result.stdout.split()


def front_end_binary(cache_dir: Path | None = None) -> Path:
    """The built `recship-frontend`, building it first when this source has no build yet.

    Raises:
        FailedPrecondition: the host lacks a tool or library of the build, or it failed
            (the compiler's last lines are in the message).
    """
    missing = missing_build_tools()
    if missing:
        raise FailedPrecondition(
            f"--front-end native needs {', '.join(missing)} to build recship-frontend "
            f"(Debian: apt-get install {BUILD_PACKAGES}); or serve with --front-end grpcio"
        )
    proto = PROTO_ROOT / BATCH_PLANE_PROTO
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), proto.read_bytes(), " ".join(_pkg_config("--modversion"))):
        digest.update(part if isinstance(part, bytes) else part.encode())
    folder = (cache_dir or default_cache_dir()) / "native" / digest.hexdigest()[:16]
    binary = folder / BINARY_NAME
    if binary.is_file():
        return binary
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".build-") as work:
        work_dir = Path(work)
        plugin = shutil.which("grpc_cpp_plugin")
        steps = [
            ["protoc", f"-I{PROTO_ROOT}", f"--cpp_out={work_dir}", f"--grpc_out={work_dir}",
             f"--plugin=protoc-gen-grpc={plugin}", str(proto)],
            ["g++", "-O2", "-std=c++17", f"-I{work_dir}", str(SOURCE),
             str(work_dir / "recship/v1/batch_plane.pb.cc"),
             str(work_dir / "recship/v1/batch_plane.grpc.pb.cc"),
             *_pkg_config("--cflags", "--libs"), "-lpthread", "-o", str(work_dir / BINARY_NAME)],
        ]  # fmt: skip
        for step in steps:
            logger.info("building the native front end: %s", step[0])
            result = subprocess.run(step, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-8:])
                raise FailedPrecondition(f"building recship-frontend failed ({step[0]}):\n{tail}")
        os.replace(work_dir / BINARY_NAME, binary)
    return binary


class FrontEndMetrics:
    """The front end's counters (its "stats" lines, totals since it started) as Prometheus
    metrics of the supervisor's registry; a restarted front end's totals continue them."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.queued = Gauge(
            "recship_front_end_queued_calls",
            "Calls waiting in the native front end's queues.",
            registry=registry,
        )
        self.batches = Counter(
            "recship_front_end_batches",
            "Batches the native front end sent to the workers.",
            registry=registry,
        )
        self.batched_calls = Counter(
            "recship_front_end_batched_calls",
            "Calls sent in those batches (divided by the batches: calls per batch).",
            registry=registry,
        )
        self.refused = Counter(
            "recship_front_end_refused_calls",
            "Calls the native front end answered without a worker, by reason.",
            ["reason"],
            registry=registry,
        )
        self.failed_batches = Counter(
            "recship_front_end_failed_batches",
            "Batches a worker did not answer (their calls were answered UNAVAILABLE).",
            registry=registry,
        )
        self._last: dict[str, int] = {}

    def started(self) -> None:
        """A new front end process: its totals start from 0."""
        self._last = {}

    def update(self, line: str) -> None:
        """Takes one "stats key=value ..." line; anything else is ignored."""
        words = line.split()
        if not words or words[0] != "stats":
            return
        try:
            totals = {key: int(value) for key, value in (w.split("=", 1) for w in words[1:])}
        except ValueError:
            return
        self.queued.set(totals.get("queued", 0))
        counters = {
            "batches": self.batches,
            "batched_calls": self.batched_calls,
            "failed_batches": self.failed_batches,
            "queue_full": self.refused.labels("queue_full"),
            "expired": self.refused.labels("deadline"),
            "cancelled": self.refused.labels("cancelled"),
        }
        for key, counter in counters.items():
            total = totals.get(key, 0)
            last = self._last.get(key, 0)
            counter.inc(max(0, total - last))
            self._last[key] = total


class FrontEndProcess:
    """One running `recship-frontend`: started, watched and stopped by the supervisor.

    Threading: event loop only.
    """

    def __init__(
        self, binary: Path, arguments: Sequence[str], metrics: FrontEndMetrics | None = None
    ) -> None:
        self.binary = binary
        self.arguments = list(arguments)
        self.metrics = metrics
        self.process: asyncio.subprocess.Process | None = None
        self.port: int | None = None
        self.started_at = 0.0
        self._reading: asyncio.Task[None] | None = None

    @property
    def alive(self) -> bool:
        """Whether the process runs."""
        return self.process is not None and self.process.returncode is None

    async def start(self) -> int:
        """Starts it and waits until it listens; returns its port.

        Raises:
            Unavailable: it exited or did not listen within `START_TIMEOUT_S`.
        """
        self.started_at = time.monotonic()
        # Its stdin stays open as long as this process lives: at its end it drains and exits.
        self.process = await asyncio.create_subprocess_exec(
            str(self.binary), *self.arguments, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, process_group=0,
        )  # fmt: skip
        assert self.process.stdout is not None
        try:
            line = await asyncio.wait_for(self.process.stdout.readline(), START_TIMEOUT_S)
        except TimeoutError:
            line = b""
        words = line.decode(errors="replace").split()
        if len(words) != 4 or words[:3] != [BINARY_NAME, "listening", "on"]:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            code = await self.process.wait()
            raise Unavailable(f"{BINARY_NAME} did not start (exit code {code}; see its stderr)")
        self.port = int(words[3])
        if self.metrics is not None:
            self.metrics.started()
        # Read on (a full pipe would stall its stats and signal thread) into the metrics.
        self._reading = asyncio.get_running_loop().create_task(
            self._read(self.process.stdout), name="recship-front-end-stats"
        )
        return self.port

    async def _read(self, stdout: asyncio.StreamReader) -> None:
        while line := await stdout.readline():
            if self.metrics is not None:
                self.metrics.update(line.decode(errors="replace"))

    async def stop(self, grace_s: float) -> None:
        """SIGTERM: it stops taking calls and lets those in flight finish; killed if it takes
        longer than `grace_s` plus a margin."""
        if not self.alive or self.process is None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), grace_s + 5.0)
        except TimeoutError:
            logger.error("%s did not stop in time; killed", BINARY_NAME)
            self.process.kill()
            await self.process.wait()
