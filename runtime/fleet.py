"""`recship serve --workers N`: N serving processes on one port, one version decision for all.

One Python process serves at most about one core (the interpreter lock), so a host's other
cores need more processes. The design follows the grpc project's multiprocessing example:

- The supervisor (this module, the process `recship serve` started) reserves the inference
  port with an `SO_REUSEPORT` socket that never listens, and starts N workers
  (`recship.runtime.worker`, fresh interpreters: no gRPC state crosses a fork). Each worker
  listens on that port with `SO_REUSEPORT`; the kernel spreads new connections over the
  workers, so a client balances by opening several channels (`RecshipClient(channels=...)`).
- The supervisor owns the repository watch, the version policies, the labels and the admin
  API: its `VersionManager` runs unchanged over a `FleetLoader`, whose "load" is "load this
  version in every worker and wait until all are READY" (a worker that fails it FAILS the
  version, and it is unloaded from the others), and whose servables' `close` unloads it from
  every worker. Defaults and labels are pushed to every worker after each change, in order
  with the loads and unloads, so a default moves away from a version in every worker before
  that version is drained anywhere: when the supervisor reports the old version UNLOADED, no
  worker can answer with it. `recship status` and `recship rollout` talk to the supervisor.
- A worker that dies is logged and restarted (with a growing delay if it keeps dying); the
  new one loads every version the supervisor has loaded, takes its view, and only then binds
  the port. Calls on the dead worker's connections fail with UNAVAILABLE (the transport
  closes); reconnecting callers reach the other workers.
- Health (on the admin listener) is SERVING when the supervisor's bundles are ready and every
  worker serves; a worker binds the port only once it serves the whole set, and its own
  health (what the inference port answers) follows its readiness.
- SIGTERM (or SIGINT) stops every worker gracefully at once (in-flight calls finish within
  `--grace-s`), then the supervisor.
- The Prometheus endpoint is the supervisor's: each scrape asks every worker for its text and
  exposes the sums (counters, histograms and gauges per label set), beside the supervisor's
  own metrics; the version metrics come from the supervisor only. Summed counters and
  histograms never go down across worker restarts or missed scrapes (`CumulativeCarry`). Per
  worker: `recship_worker_scraped{worker}` (0 when it was down or slower than
  `SCRAPE_TIMEOUT_S`) and `recship_worker_requests_total{worker}`.
- Workers map the index from the bundle file (`read_index(mmap=True)`) and the Arrow tables
  are memory-mapped already, so those pages are shared by the workers through the page cache.
- `--front-end native`: the workers listen on Unix sockets in a private folder instead, and
  the supervisor starts `recship-frontend` (`recship.runtime.front_end`) on the inference port
  once they serve; it balances whole batches of calls over them (the least busy first), so
  clients need no more than one channel. It is restarted if it dies (its callers see
  UNAVAILABLE); SIGTERM drains it first, while the workers still answer its calls, then them.

The memory budget (`--memory-budget-bytes`) is the supervisor's, for the host: its manager
plans every switch (`plan_switch`) with the estimates of the versions in all workers together
(`estimated_bytes` with every worker's replicas: the files once, since the workers map them
through the page cache, and the quantized tables of each worker's replicas). The workers load
what it decides without a budget of their own. A version that does not fit beside the default
one unloads it first, in every worker (a logged, measured unavailable window): the workers
serve one set of versions, so there is no replica-by-replica swap across them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from recship.base import errors
from recship.base.errors import InvalidInput, RecshipError, Unavailable
from recship.bundle.store import BundleStore, ValidatedVersion
from recship.protos.v1 import manifest_pb2
from recship.runtime.front_end import (
    DEFAULT_BATCH_CALLS,
    DEFAULT_INFLIGHT,
    QUEUE_CALLS,
    FrontEndMetrics,
    FrontEndProcess,
    front_end_binary,
)
from recship.runtime.manager import VersionManager
from recship.runtime.metrics import MetricsHTTPServer, ServerMetrics, start_metrics_http
from recship.runtime.servable import ServableLoader
from recship.runtime.server import (
    MAX_SEND_BYTES,
    RECOMMENDER_SERVICE,
    ServerConfig,
    bind_admin,
    load_initial,
    poll_repository,
    receive_limit,
    tcp_address,
)
from recship.runtime.versions import BundleInfo
from recship.runtime.worker import backend_socket, encode_config

logger = logging.getLogger(__name__)

# A worker has this long to start (import torch, ...) and say hello.
START_TIMEOUT_S = 120.0
# Restart delays of a process (a worker, the native front end) that keeps dying: doubled per
# quick death, up to the last (`RestartBackoff`).
RESTART_DELAY_S = 0.5
MAX_RESTART_DELAY_S = 30.0
# A process that ran this long before dying is restarted after the first delay again.
STABLE_AFTER_S = 60.0
# A scrape waits this long for the workers' metrics; a worker too slow is left out of it.
SCRAPE_TIMEOUT_S = 5.0
# Families only the supervisor reports: what it decided, and per-process facts a sum would
# misstate. Everything else is summed over the supervisor and the workers.
SUPERVISOR_ONLY = frozenset(
    {
        "recship_version_state",
        "recship_default_version",
        "recship_version_switches",
        "recship_switch_unavailable_seconds",
        "process_start_time_seconds",
        "process_max_fds",
    }
)


def reserve_port(host: str, port: int) -> socket.socket:
    """Binds (never listens on) `host:port` with `SO_REUSEPORT`; the workers listen on it.

    Holding it keeps the port while a worker restarts, and resolves port 0 once for all.

    Raises:
        InvalidInput: the address cannot be bound.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as error:
        sock.close()
        raise InvalidInput(f"cannot listen on {host}:{port}: {error.strerror}") from None
    return sock


class RestartBackoff:
    """How long to wait before restarting a process that died: `RESTART_DELAY_S` after one
    that had run `STABLE_AFTER_S`, else twice the last wait, up to `MAX_RESTART_DELAY_S`."""

    def __init__(self) -> None:
        self._delay = RESTART_DELAY_S

    def next(self, lived_s: float) -> float:
        """The wait before restarting a process that died after `lived_s` seconds."""
        delay = RESTART_DELAY_S if lived_s > STABLE_AFTER_S else self._delay
        self._delay = min(delay * 2, MAX_RESTART_DELAY_S)
        return delay


class WorkerProcess:
    """One worker: its process, its control pipe and the commands waiting for replies.

    Threading: event loop only.
    """

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: asyncio.subprocess.Process | None = None
        self.serving = False
        self.started_at = 0.0
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self._reading: asyncio.Task[None] | None = None

    @property
    def alive(self) -> bool:
        """Whether the process runs and its replies are read."""
        return (
            self.process is not None
            and self.process.returncode is None
            and self._reading is not None
            and not self._reading.done()
        )

    async def start(self, config: ServerConfig, log_level: str) -> None:
        """Starts the process and waits for its hello.

        Raises:
            Unavailable: it exited or did not answer within `START_TIMEOUT_S`.
        """
        self.serving = False
        self.started_at = time.monotonic()
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "recship.runtime.worker",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=64 << 20,
            # Its own process group: a terminal's Ctrl-C reaches the supervisor, which stops
            # the workers in order instead of racing them.
            process_group=0,
        )
        assert self.process.stdin is not None
        self.process.stdin.write(encode_config(config, self.index, log_level))
        hello = asyncio.get_running_loop().create_future()
        self._pending[0] = hello
        self._reading = asyncio.get_running_loop().create_task(self._read())
        try:
            reply = await asyncio.wait_for(hello, START_TIMEOUT_S)
        except TimeoutError:
            self.kill()
            raise Unavailable(
                f"worker {self.index} did not start in {START_TIMEOUT_S:.0f} s"
            ) from None
        logger.info("worker %d started (pid %d)", self.index, reply["pid"])

    def send(self, op: str, **fields: Any) -> asyncio.Future[dict[str, Any]]:
        """Writes one command now (commands keep their order) and returns its reply's future.

        The future fails with Unavailable when the worker exits first, or with the error the
        worker answered.
        """
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        if not self.alive or self.process is None or self.process.stdin is None:
            future.set_exception(Unavailable(f"worker {self.index} is not running"))
            return future
        number = next(self._ids)
        self._pending[number] = future
        self.process.stdin.write(json.dumps({"id": number, "op": op, **fields}).encode() + b"\n")
        return future

    def kill(self) -> None:
        """Kills the process (it did not start, or did not stop in time)."""
        if self.alive and self.process is not None:
            self.process.kill()

    def terminate(self) -> None:
        """Asks the process to stop gracefully (SIGTERM)."""
        if self.alive and self.process is not None:
            self.process.send_signal(signal.SIGTERM)

    async def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        stdout = self.process.stdout
        with contextlib.suppress(ConnectionError, ValueError):
            while line := await stdout.readline():
                reply = json.loads(line)
                future = self._pending.pop(reply.get("id", -1), None)
                if future is None or future.done():
                    continue
                if reply.get("ok"):
                    future.set_result(reply)
                else:
                    future.set_exception(_error(reply))
        gone = Unavailable(f"worker {self.index} exited")
        for future in self._pending.values():
            if not future.done():
                future.set_exception(gone)
        self._pending.clear()


def _error(reply: dict[str, Any]) -> RecshipError:
    """The `RecshipError` a worker answered (its class by name, RecshipError if unknown)."""
    kind = getattr(errors, str(reply.get("kind", "")), RecshipError)
    if not (isinstance(kind, type) and issubclass(kind, RecshipError)):
        kind = RecshipError
    return kind(str(reply.get("error", "the worker gave no reason")))


class FleetVersion:
    """What the supervisor's manager holds for a version loaded in every worker."""

    def __init__(
        self, fleet: Fleet, bundle: str, version: int, replicas: int, devices: Sequence[str]
    ):
        self._fleet = fleet
        self.bundle = bundle
        self.version = version
        self._replicas = replicas
        self._devices = tuple(devices)

    @property
    def replica_count(self) -> int:
        """Replicas in all workers together."""
        return self._replicas * len(self._fleet.workers)

    @property
    def devices(self) -> tuple[str, ...]:
        """Devices of one worker's replicas (every worker places them alike)."""
        return self._devices

    @property
    def free_slots(self) -> tuple[int, ...]:
        """Empty: a fleet loads and unloads a version in every worker at once."""
        return ()

    @property
    def swappable_replicas(self) -> int:
        """0: every worker serves the same versions, so a switch that does not fit beside the
        default unloads it first in all of them (`plan_switch`: an unavailable window)."""
        return 0

    @property
    def queued_rows(self) -> int:
        """The supervisor queues nothing; the workers' queues are in the summed metrics."""
        return 0

    async def close(self) -> None:
        """Unloads this version from every worker (each drains its requests first)."""
        await self._fleet.unload(self.bundle, self.version)


class Fleet:
    """The workers, and the versions, defaults and labels every one of them must serve.

    Args:
        config: the server configuration each worker gets (its port already resolved).
        count: how many workers.
        metrics: the supervisor's metrics (worker restarts are counted there).
        log_level: the workers' log level.
        on_change: called on the event loop when a worker starts or stops serving.

    Threading: event loop only, except `FleetLoader.load`, which waits from a thread.
    """

    def __init__(
        self,
        config: ServerConfig,
        count: int,
        metrics: ServerMetrics,
        log_level: str,
        on_change: Callable[[], None],
    ) -> None:
        self.config = config
        self.workers = [WorkerProcess(index) for index in range(count)]
        self._log_level = log_level
        self._on_change = on_change
        # (bundle, version) -> (replicas per worker, devices) for what every worker must hold.
        self._loaded: dict[tuple[str, int], tuple[int, tuple[str, ...]]] = {}
        self._view: dict[str, dict[str, Any]] = {}
        self._lock = asyncio.Lock()
        self._serve = False
        self._stopping = False
        self._watching: list[asyncio.Task[None]] = []
        self._restarts = Counter(
            "recship_worker_restarts",
            "Worker processes restarted after they died.",
            registry=metrics.registry,
        )
        self._serving = Gauge(
            "recship_workers_serving",
            "Worker processes listening on the inference port.",
            registry=metrics.registry,
        )
        self._serving.set_function(lambda: sum(w.serving for w in self.workers))

    @property
    def ready(self) -> bool:
        """Whether every worker runs and serves."""
        return all(w.alive and w.serving for w in self.workers)

    async def start(self) -> None:
        """Starts every worker and its watch (restarts).

        Raises:
            Unavailable: a worker did not start.
        """
        await asyncio.gather(*(w.start(self.config, self._log_level) for w in self.workers))
        loop = asyncio.get_running_loop()
        self._watching = [
            loop.create_task(self._watch(w), name=f"recship-worker-{w.index}") for w in self.workers
        ]

    async def serve(self) -> None:
        """Lets every worker bind the port (after the initial load); restarted ones follow."""
        self._serve = True
        async with self._lock:
            targets = [w for w in self.workers if w.alive]
            replies = await asyncio.gather(
                *(self._start_serving(w) for w in targets), return_exceptions=True
            )
        for worker, reply in zip(targets, replies, strict=True):
            if isinstance(reply, BaseException) and not isinstance(reply, Unavailable):
                logger.error("worker %d cannot serve: %s", worker.index, reply)

    async def load(self, bundle: str, version: int) -> FleetVersion:
        """Loads a version in every worker and waits until each has it READY.

        A worker that dies meanwhile does not fail it: its successor loads it.

        Raises:
            RecshipError: a worker failed to load it (the reason of the first); it is unloaded
                from the workers that had loaded it.
        """
        async with self._lock:
            targets = [w for w in self.workers if w.alive]
            replies = await asyncio.gather(
                *(w.send("load", bundle=bundle, version=version) for w in targets),
                return_exceptions=True,
            )
            failure: RecshipError | None = None
            done: list[WorkerProcess] = []
            placed: tuple[int, tuple[str, ...]] = (0, ())
            for worker, reply in zip(targets, replies, strict=True):
                if isinstance(reply, BaseException):
                    if worker.alive:  # an answer, not a death
                        failure = failure or _as_error(reply)
                    continue
                if reply["state"] != "READY":
                    failure = failure or InvalidInput(reply["reason"] or reply["state"])
                    continue
                done.append(worker)
                placed = (int(reply["replicas"]), tuple(reply["devices"]))
            if failure is not None:
                await asyncio.gather(
                    *(w.send("unload", bundle=bundle, version=version) for w in done),
                    return_exceptions=True,
                )
                raise failure
            self._loaded[(bundle, version)] = placed
        return FleetVersion(self, bundle, version, *placed)

    async def unload(self, bundle: str, version: int) -> None:
        """Unloads a version from every worker (nothing to do once the fleet stops)."""
        async with self._lock:
            if self._loaded.pop((bundle, version), None) is None or self._stopping:
                return
            replies = await asyncio.gather(
                *(
                    w.send("unload", bundle=bundle, version=version)
                    for w in self.workers
                    if w.alive
                ),
                return_exceptions=True,
            )
        for reply in replies:
            if isinstance(reply, RecshipError) and not isinstance(reply, Unavailable):
                logger.warning("bundle %s v%d: unload in a worker: %s", bundle, version, reply)

    def publish(self, bundles: Iterable[BundleInfo]) -> None:
        """Pushes the supervisor's defaults and labels to every worker if they changed.

        Written at once, in order with the loads and unloads already sent.
        """
        view = {
            info.name: {
                "default": next((v.version for v in info.versions if v.is_default), None),
                "labels": {label: v.version for v in info.versions for label in v.labels},
            }
            for info in bundles
        }
        if view == self._view:
            return
        self._view = view
        for worker in self.workers:
            if worker.alive:
                _log_failure(worker.send("view", bundles=view), f"worker {worker.index}: view")

    async def scrape(self) -> dict[int, tuple[float, str] | None]:
        """Each worker's (start time, Prometheus text) by worker index; None for one that is
        not running, or did not answer within `SCRAPE_TIMEOUT_S`. The start time tells a
        restarted worker from its predecessor."""
        texts: dict[int, tuple[float, str] | None] = {w.index: None for w in self.workers}
        futures = {
            w.index: asyncio.ensure_future(w.send("metrics")) for w in self.workers if w.alive
        }
        started = {w.index: w.started_at for w in self.workers}
        if not futures:
            return texts
        _, pending = await asyncio.wait(futures.values(), timeout=SCRAPE_TIMEOUT_S)
        for future in pending:
            future.cancel()
        for index, future in futures.items():
            if future.done() and not future.cancelled() and future.exception() is None:
                texts[index] = (started[index], future.result()["text"])
        return texts

    async def stop(self, grace_s: float) -> None:
        """Stops every worker gracefully, all at once; kills those still running after
        `grace_s` plus a margin for draining."""
        self._stopping = True
        for task in self._watching:
            task.cancel()
        for worker in self.workers:
            worker.terminate()
        waits = [w.process.wait() for w in self.workers if w.process is not None]
        try:
            await asyncio.wait_for(asyncio.gather(*waits), grace_s + 15.0)
        except TimeoutError:
            for worker in self.workers:
                if worker.alive:
                    logger.error("worker %d did not stop in time; killed", worker.index)
                    worker.kill()
            await asyncio.gather(*waits, return_exceptions=True)
        for worker in self.workers:
            worker.serving = False

    async def _start_serving(self, worker: WorkerProcess) -> None:
        await worker.send("serve")
        worker.serving = True
        self._on_change()

    async def _watch(self, worker: WorkerProcess) -> None:
        """Restarts `worker` whenever it dies, until the fleet stops."""
        backoff = RestartBackoff()
        while True:
            assert worker.process is not None
            code = await worker.process.wait()
            worker.serving = False
            self._on_change()
            if self._stopping:
                return
            lived = time.monotonic() - worker.started_at
            delay = backoff.next(lived)
            logger.error(
                "worker %d (pid %d) exited with %s after %.1f s; restarting in %.1f s",
                worker.index,
                worker.process.pid,
                f"signal {-code}" if code < 0 else f"code {code}",
                lived,
                delay,
                extra={"worker": worker.index, "exit_code": code},
            )
            self._restarts.inc()
            await asyncio.sleep(delay)
            try:
                await worker.start(self.config, self._log_level)
                await self._resync(worker)
            except RecshipError as error:
                logger.error("worker %d did not come back: %s", worker.index, error)
                worker.kill()

    async def _resync(self, worker: WorkerProcess) -> None:
        """Gives a restarted worker every loaded version and the view, then lets it serve."""
        async with self._lock:
            for bundle, version in sorted(self._loaded):
                await worker.send("load", bundle=bundle, version=version)
            if self._view:
                await worker.send("view", bundles=self._view)
            if self._serve:
                await self._start_serving(worker)
        logger.info("worker %d is back: %d version(s) loaded", worker.index, len(self._loaded))


def _as_error(error: BaseException) -> RecshipError:
    if isinstance(error, RecshipError):
        return error
    return RecshipError(f"{type(error).__name__}: {error}")


def _log_failure(future: asyncio.Future[dict[str, Any]], what: str) -> None:
    """Logs a command nobody waits for if it fails for another reason than a dead worker."""

    def done(f: asyncio.Future[dict[str, Any]]) -> None:
        error = None if f.cancelled() else f.exception()
        if error is not None and not isinstance(error, Unavailable):
            logger.warning("%s: %s", what, error)

    future.add_done_callback(done)


class FleetLoader:
    """The supervisor's `recship.runtime.loader.Loader`: a version loads in every worker.

    `load` is called on a worker thread by the manager; it waits for the fleet's coroutine on
    the supervisor's event loop.
    """

    def __init__(self, fleet: Fleet, loop: asyncio.AbstractEventLoop) -> None:
        self._fleet = fleet
        self._loop = loop
        self._placement = ServableLoader(fleet.config.loader_config())

    def replicas(self, manifest: manifest_pb2.BundleManifest) -> int:
        """Replicas of a version in all workers together."""
        return self._placement.replicas(manifest) * len(self._fleet.workers)

    def load(self, version: ValidatedVersion, slots: Sequence[int] | None = None) -> FleetVersion:
        """Loads `version` in every worker (blocking; `slots` is not used in a fleet)."""
        name, number = version.manifest.name, int(version.manifest.version)
        return asyncio.run_coroutine_threadsafe(self._fleet.load(name, number), self._loop).result()


class FleetCollector:
    """The supervisor's Prometheus collector: its own metrics plus the workers' sums, and per
    worker whether it answered this scrape and the requests it answered.

    A worker that is down or too slow to answer a scrape has `recship_worker_scraped` 0, and
    the sums hold its last counts (`CumulativeCarry`); `recship_worker_requests_total` shows
    how the load spreads.

    `collect` runs on the metrics endpoint's render thread and waits for the workers' texts
    on the event loop.
    """

    def __init__(
        self, own: CollectorRegistry, fleet: Fleet, loop: asyncio.AbstractEventLoop
    ) -> None:
        self._own = own
        self._fleet = fleet
        self._loop = loop
        self._carry = CumulativeCarry()

    def collect(self) -> list[Metric]:
        future = asyncio.run_coroutine_threadsafe(self._fleet.scrape(), self._loop)
        try:
            texts = future.result(SCRAPE_TIMEOUT_S + 1.0)
        except (TimeoutError, RecshipError):
            texts = dict.fromkeys(range(len(self._fleet.workers)))
        workers = {
            index: None if entry is None else (entry[0], _parsed(entry[1]))
            for index, entry in texts.items()
        }
        summed = merge_families(list(self._own.collect()), self._carry.families(workers))
        scraped = {index: None if e is None else e[1] for index, e in workers.items()}
        return [*summed, *per_worker_families(scraped)]


def _parsed(text: str) -> list[Metric]:
    return list(text_string_to_metric_families(text))


#: Family types whose samples only grow while a worker runs.
_CUMULATIVE = frozenset({"counter", "histogram", "summary"})


class CumulativeCarry:
    """Keeps the summed counters and histograms from going down when workers restart or miss
    a scrape.

    A restarted worker's counters start again from 0, and a worker left out of a scrape adds
    nothing: either would lower a summed counter, which Prometheus's `rate()` reads as a reset
    of the whole sum (a spurious spike). So each worker's last cumulative samples are kept: a
    worker missing from a scrape still counts with them, and when a worker has restarted, its
    predecessor's last samples stay in the sums for good. (What a worker counted after its
    last scrape before it died is lost.) Gauges are not kept: a dead worker queues nothing.

    Thread-safety: one scrape at a time (the metrics endpoint renders on one thread).
    """

    def __init__(self) -> None:
        self._last: dict[int, tuple[float, list[Metric]]] = {}  # worker -> (start, families)
        self._retired: list[Metric] = []  # the summed families of workers that restarted

    def families(
        self, workers: Mapping[int, tuple[float, list[Metric]] | None]
    ) -> list[list[Metric]]:
        """What to add to the sums: each scraped worker's families (start time, families),
        the last cumulative ones of a worker that is None (left out), and the retired."""
        summed = []
        for index, entry in workers.items():
            previous = self._last.get(index)
            if entry is None:
                if previous is not None:
                    summed.append(previous[1])
                continue
            started, families = entry
            if previous is not None and previous[0] != started:
                self._retired = merge_families(self._retired, [previous[1]])
            self._last[index] = (started, [f for f in families if f.type in _CUMULATIVE])
            summed.append(families)
        return [*summed, self._retired]


def per_worker_families(workers: Mapping[int, list[Metric] | None]) -> list[Metric]:
    """`recship_worker_scraped` (1: the worker's metrics came with this scrape; 0: it was down
    or slow, and the sums hold its last counts) for every worker, and
    `recship_worker_requests_total` (its answered requests) for those scraped."""
    scraped = GaugeMetricFamily(
        "recship_worker_scraped",
        "1 when the worker answered this scrape, 0 when it was down or slow (the sums hold "
        "its last counts).",
        labels=["worker"],
    )
    requests = CounterMetricFamily(
        "recship_worker_requests",
        "Requests the worker answered, any code (since it started).",
        labels=["worker"],
    )
    for index in sorted(workers):
        families = workers[index]
        scraped.add_metric([str(index)], 0.0 if families is None else 1.0)
        if families is not None:
            answered = sum(
                sample.value
                for family in families
                if family.name == "recship_requests"
                for sample in family.samples
                if sample.name == "recship_requests_total"
            )
            requests.add_metric([str(index)], answered)
    return [scraped, requests]


def merge_families(own: list[Metric], workers: list[list[Metric]]) -> list[Metric]:
    """The supervisor's families with every worker's samples added per name and label set.

    Families in `SUPERVISOR_ONLY` keep the supervisor's samples alone; workers' `_created`
    samples (timestamps, not amounts) are dropped.
    """
    merged: dict[str, Metric] = {}
    sums: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}

    def add(family: Metric, samples: Iterable[Sample]) -> None:
        if family.name not in merged:
            merged[family.name] = Metric(family.name, family.documentation, family.type)
            sums[family.name] = {}
        values = sums[family.name]
        for sample in samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            values[key] = values.get(key, 0.0) + sample.value

    for family in own:
        add(family, family.samples)
    for families in workers:
        for family in families:
            if family.name not in SUPERVISOR_ONLY:
                add(family, (s for s in family.samples if not s.name.endswith("_created")))
    for name, family in merged.items():
        for (sample, labels), value in sums[name].items():
            family.add_sample(sample, dict(labels), value)
    return list(merged.values())


class Supervisor:
    """`recship serve --workers N` without its signal handling (see `serve_fleet`).

    Call `start()`, then `wait_ready()`, finally `stop()`, on one event loop.

    Attributes:
        port: the inference port every worker listens on.
        metrics_port: the Prometheus endpoint's port once started (None without one).
        admin_address: the admin API's target (None without one).
    """

    def __init__(self, config: ServerConfig) -> None:
        self.front_end: FrontEndProcess | None = None
        self._backend_dir: Path | None = None
        if config.front_end == "native":
            binary = front_end_binary()  # before anything starts: a missing compiler is one line
            self._backend_dir = Path(tempfile.mkdtemp(prefix="recship-backends-"))  # mode 0700
            config = replace(config, backend_dir=self._backend_dir)
        self._reservation = reserve_port(config.host, config.port)
        self.port = int(self._reservation.getsockname()[1])
        self.config = replace(config, port=self.port)
        # The workers log at the supervisor's level (`configure_logging` set it).
        log_level = logging.getLevelName(logging.getLogger("recship").getEffectiveLevel())
        self.metrics = ServerMetrics()
        self.health = health_aio.HealthServicer()
        self.fleet = Fleet(self.config, config.workers, self.metrics, log_level, self._changed)
        if self._backend_dir is not None:
            self.front_end = FrontEndProcess(
                binary, self._front_end_arguments(), FrontEndMetrics(self.metrics.registry)
            )
        loop = asyncio.get_running_loop()
        self.manager = VersionManager(
            BundleStore(
                config.repo,
                public_key=config.public_key,
                require_signature=config.require_signature,
            ),
            FleetLoader(self.fleet, loop),
            self.metrics,
            bundles=config.bundles,
            policies=config.policies,
            memory_budget_bytes=config.memory_budget_bytes,
            on_change=self._changed,
        )
        self.admin_server, self.admin_address = bind_admin(
            self.config, self.manager, self.health, self.metrics
        )
        self._exposed = CollectorRegistry(auto_describe=False)
        self._exposed.register(FleetCollector(self.metrics.registry, self.fleet, loop))
        self.metrics_port: int | None = None
        self._metrics_http: MetricsHTTPServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._loading: asyncio.Task[None] | None = None
        self._polling: asyncio.Task[None] | None = None
        self.settled = asyncio.Event()
        self.load_error: RecshipError | None = None
        self._watching_front_end: asyncio.Task[None] | None = None
        self._front_end_restarts = Counter(
            "recship_front_end_restarts",
            "Native front end processes restarted after they died.",
            registry=self.metrics.registry,
        )

    async def start(self) -> None:
        """Starts the admin API, the metrics endpoint and the workers, then loads (background).

        Raises:
            Unavailable: a worker did not start.
        """
        for service in ("", RECOMMENDER_SERVICE):
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.admin_server is not None:
            await self.admin_server.start()
        if self.config.metrics_port is not None:
            self._metrics_http = await start_metrics_http(
                self._exposed,
                self.config.metrics_host,
                self.config.metrics_port,
                idle_timeout_s=self.config.metrics_idle_timeout_s,
            )
            self.metrics_port = self._metrics_http.port
        await self.fleet.start()
        self._loading = asyncio.get_running_loop().create_task(self._load(), name="recship-load")
        logger.info(
            "%d workers on %s:%d (metrics on %s, admin on %s)",
            len(self.fleet.workers),
            self.config.host,
            self.port,
            self.metrics_port,
            self.admin_address,
        )

    def _front_end_arguments(self) -> list[str]:
        config = self.config
        assert config.backend_dir is not None
        arguments = [
            "--listen", tcp_address(config.host, self.port),
            "--max-receive-bytes", str(receive_limit(config.limits)),
            "--max-batch-bytes", str(receive_limit(config.limits)),
            "--max-send-bytes", str(MAX_SEND_BYTES),
            "--max-batch-calls", str(config.max_batch_calls or DEFAULT_BATCH_CALLS),
            "--max-queue-calls", str(QUEUE_CALLS),
            "--max-inflight", str(config.max_inflight or DEFAULT_INFLIGHT),
            "--max-delay-ms", str(config.delay_ms),
            "--grace-s", str(config.grace_s),
        ]  # fmt: skip
        for worker in self.fleet.workers:
            arguments += ["--backend", f"unix:{backend_socket(config.backend_dir, worker.index)}"]
        if config.tls is not None:
            arguments += ["--tls-cert", str(config.tls.cert), "--tls-key", str(config.tls.key)]
            if config.tls.client_ca is not None:
                arguments += ["--tls-client-ca", str(config.tls.client_ca)]
        return arguments

    async def _load(self) -> None:
        self.load_error = await load_initial(self.manager, self.config.labels)
        if self.load_error is None:
            await self.fleet.serve()
            if self.front_end is not None:
                try:
                    await self.front_end.start()
                except Unavailable as error:
                    self.load_error = error
                else:
                    self._watching_front_end = asyncio.get_running_loop().create_task(
                        self._watch_front_end(), name="recship-front-end"
                    )
                    self._changed()
        self.settled.set()
        if self.load_error is None and self.config.poll_interval_s > 0:
            self._polling = asyncio.get_running_loop().create_task(
                poll_repository(self.manager, self.config.poll_interval_s), name="recship-poll"
            )

    async def _watch_front_end(self) -> None:
        """Restarts the native front end whenever it dies, until the supervisor stops (with
        the workers' `RestartBackoff`; a failed start is one more death)."""
        front_end = self.front_end
        assert front_end is not None and front_end.process is not None
        backoff = RestartBackoff()
        while True:
            code = await front_end.process.wait()
            self._changed()
            lived = time.monotonic() - front_end.started_at
            delay = backoff.next(lived)
            logger.error(
                "recship-frontend (pid %d) exited with %s after %.1f s; restarting in %.1f s",
                front_end.process.pid,
                f"signal {-code}" if code < 0 else f"code {code}",
                lived,
                delay,
                extra={"exit_code": code},
            )
            self._front_end_restarts.inc()
            await asyncio.sleep(delay)
            try:
                await front_end.start()
            except Unavailable as error:
                logger.error("recship-frontend did not come back: %s", error)
            self._changed()

    def _changed(self) -> None:
        """After any change of the supervisor's versions or of a worker: view and health."""
        self.fleet.publish(self.manager.status())
        front_end_up = self.front_end is None or self.front_end.alive
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if self.manager.ready and self.fleet.ready and front_end_up
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )

        async def update() -> None:
            for service in ("", RECOMMENDER_SERVICE):
                await self.health.set(service, status)

        task = asyncio.get_running_loop().create_task(update())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        """Health NOT_SERVING, every worker drained and stopped, then the supervisor's parts."""
        started = time.perf_counter()
        await self.health.enter_graceful_shutdown()
        if self._watching_front_end is not None:
            self._watching_front_end.cancel()
        if self.front_end is not None:
            # First: its calls in flight still reach the workers.
            await self.front_end.stop(self.config.grace_s)
        await self.fleet.stop(self.config.grace_s)
        if self._backend_dir is not None:
            shutil.rmtree(self._backend_dir, ignore_errors=True)
        for task in (self._polling, self._loading):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.admin_server is not None:
            await self.admin_server.stop(1.0)
        await self.manager.close()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._metrics_http is not None:
            await self._metrics_http.stop()
        self._reservation.close()
        logger.info("stopped in %.2f s", time.perf_counter() - started)


async def serve_fleet(config: ServerConfig, *, announce: bool = True) -> None:
    """Runs a supervisor and its workers until SIGTERM or SIGINT, then stops them gracefully.

    Prints the same `listening on` line as a single-process server.

    Raises:
        RecshipError: the initial load failed, or a worker did not start.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    supervisor = Supervisor(config)
    try:
        await supervisor.start()
        if announce:
            print(
                f"listening on {config.host}:{supervisor.port} metrics {supervisor.metrics_port} "
                f"admin {supervisor.admin_address or '-'}",
                flush=True,
            )
        stopping = loop.create_task(stop.wait())
        settled = loop.create_task(supervisor.settled.wait())
        await asyncio.wait({stopping, settled}, return_when=asyncio.FIRST_COMPLETED)
        if supervisor.load_error is None and not stop.is_set():
            await stop.wait()
        stopping.cancel()
        settled.cancel()
        logger.info("stopping (grace %.1f s)", config.grace_s)
    finally:
        await supervisor.stop()
    if supervisor.load_error is not None:
        raise supervisor.load_error
