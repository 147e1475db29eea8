"""Prometheus metrics of one recship server, and their HTTP exposition endpoint.

Each `ServerMetrics` owns a dedicated `CollectorRegistry` (never the process-global one), so
several servers, or several tests, can live in one process without clashing. Every method is
thread-safe (prometheus-client's own locking) and cheap enough for the event loop.

Metric names:

| name | type | labels |
|---|---|---|
| recship_requests_total | counter | method, code |
| recship_request_latency_seconds | histogram | method |
| recship_refusal_latency_seconds | histogram (RESOURCE_EXHAUSTED answers only) | method |
| recship_batch_rows | histogram | model |
| recship_batch_cost | histogram | model |
| recship_batch_seconds | histogram | model |
| recship_batch_requests | histogram | model |
| recship_queue_wait_seconds | histogram | model |
| recship_queue_rows | gauge | model |
| recship_queue_cost | gauge | model |
| recship_admission_refusals_total | counter | model, reason |
| recship_dropped_total | counter | model, reason |
| recship_service_rate_cost_per_second | gauge | model |
| recship_version_state | gauge (1 per version, at its current state) | bundle, version, state |
| recship_default_version | gauge | bundle |
| recship_version_switches_total | counter | bundle |
| recship_switch_unavailable_seconds | histogram | bundle |

An undecodable request body is counted as its method with code INVALID_ARGUMENT.

The exposition endpoint (`MetricsHTTPServer`) is a small HTTP/1.1 server on the event loop
(asyncio streams): no thread per connection, keep-alive with an idle timeout, a bound on open
connections and on the request head, and the text rendered on one shared worker thread (at
most one rendering at a time, shared by concurrent scrapes), so scrapes never block the loop.

Example::

    metrics = ServerMetrics()
    http = await start_metrics_http(metrics.registry, port=9090)
    ...
    await http.stop()
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from dataclasses import dataclass

import grpc
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

from recship.runtime.policy import VersionState

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
REFUSAL_BUCKETS = (0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 1.0)
QUEUE_WAIT_BUCKETS = (0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0)
ROW_BUCKETS = tuple(float(2**i) for i in range(14))  # 1 .. 8192 rows
COST_BUCKETS = tuple(float(4**i) for i in range(11))  # 1 .. ~1 M ids
BATCH_SECONDS_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
REQUEST_BUCKETS = tuple(float(2**i) for i in range(9))  # 1 .. 256 requests per batch
WINDOW_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


@dataclass(frozen=True)
class ModelBatchMetrics:
    """The batch metrics of one model, in the shape `recship.runtime.batcher` reports them.

    Several batchers (replicas, versions) of the same model may share one instance: queue
    depths are kept as sums of the deltas they report, so they are the model's totals; the
    service rate is that of the replica that ran the latest batch.
    """

    model: str
    _rows: Histogram
    _cost: Histogram
    _seconds: Histogram
    _requests: Histogram
    _wait: Histogram
    _queue_rows: Gauge
    _queue_cost: Gauge
    _refusals: Counter
    _dropped: Counter
    _rate: Gauge

    def observe_batch(self, rows: int, items: int, cost: int, seconds: float) -> None:
        """One batch of `rows` rows and `cost` ids from `items` requests ran in `seconds`."""
        self._rows.observe(rows)
        self._cost.observe(cost)
        self._seconds.observe(seconds)
        self._requests.observe(items)

    def observe_queue_wait(self, seconds: float) -> None:
        """One request waited `seconds` in the queue before its first batch started."""
        self._wait.observe(seconds)

    def add_queue(self, rows: int, cost: int) -> None:
        """The rows and cost waiting in a queue changed by these deltas (negative: left)."""
        self._queue_rows.inc(rows)
        self._queue_cost.inc(cost)

    def observe_refused(self, reason: str) -> None:
        """A request was refused at admission ("queue_full", "client_share", "deadline")."""
        self._refusals.labels(self.model, reason).inc()

    def observe_dropped(self, reason: str) -> None:
        """Queued work left without being computed ("deadline", "cancelled")."""
        self._dropped.labels(self.model, reason).inc()

    def observe_service_rate(self, cost_per_second: float) -> None:
        """A replica's measured service rate after its latest batch."""
        self._rate.set(cost_per_second)


class ServerMetrics:
    """All metrics of one server, registered in `self.registry`."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        """Args: registry: where to register; a fresh `CollectorRegistry` when None."""
        self.registry = CollectorRegistry() if registry is None else registry
        r = self.registry
        # process_cpu_seconds_total, process_resident_memory_bytes, ... (Linux; empty elsewhere):
        # what `recship bench` divides by the requests served, and what a memory alert watches.
        ProcessCollector(registry=r)
        self._requests = Counter(
            "recship_requests", "Finished RPCs by method and status code.",
            ["method", "code"], registry=r,
        )  # fmt: skip
        self._latency = Histogram(
            "recship_request_latency_seconds", "RPC latency on the server, by method.",
            ["method"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self._refusal_latency = Histogram(
            "recship_refusal_latency_seconds", "Time the server took to answer RESOURCE_EXHAUSTED "
            "(overload: from the call's start on the server to the refusal), by method.",
            ["method"], buckets=REFUSAL_BUCKETS, registry=r,
        )  # fmt: skip
        self._batch_rows = Histogram(
            "recship_batch_rows", "Rows per model batch (a Rank query with 500 candidates "
            "is 500 rows).", ["model"], buckets=ROW_BUCKETS, registry=r,
        )  # fmt: skip
        self._batch_cost = Histogram(
            "recship_batch_cost", "Cost per model batch: the ids its rows look up.",
            ["model"], buckets=COST_BUCKETS, registry=r,
        )  # fmt: skip
        self._batch_seconds = Histogram(
            "recship_batch_seconds", "Model time per batch (on the replica's thread).",
            ["model"], buckets=BATCH_SECONDS_BUCKETS, registry=r,
        )  # fmt: skip
        self._batch_requests = Histogram(
            "recship_batch_requests", "Requests (or request parts) coalesced per model batch.",
            ["model"], buckets=REQUEST_BUCKETS, registry=r,
        )  # fmt: skip
        self._queue_wait = Histogram(
            "recship_queue_wait_seconds", "Time a request waited in a batch queue.",
            ["model"], buckets=QUEUE_WAIT_BUCKETS, registry=r,
        )  # fmt: skip
        self._queue_rows = Gauge(
            "recship_queue_rows", "Rows waiting in the batch queues of a model.",
            ["model"], registry=r,
        )  # fmt: skip
        self._queue_cost = Gauge(
            "recship_queue_cost", "Cost (ids) waiting in the batch queues of a model.",
            ["model"], registry=r,
        )  # fmt: skip
        self._refusals = Counter(
            "recship_admission_refusals", "Requests refused at enqueue time (RESOURCE_EXHAUSTED) "
            "by reason: queue_full, client_share, deadline (could not finish in time).",
            ["model", "reason"], registry=r,
        )  # fmt: skip
        self._dropped = Counter(
            "recship_dropped", "Admitted requests that left the queue before being computed "
            "(whole or in part), by reason: deadline, cancelled.",
            ["model", "reason"], registry=r,
        )  # fmt: skip
        self._service_rate = Gauge(
            "recship_service_rate_cost_per_second", "Measured service rate of a model's replica "
            "(EWMA of ids computed per second), which admission divides queued cost by.",
            ["model"], registry=r,
        )  # fmt: skip
        self._version_state = Gauge(
            "recship_version_state", "1 for each version at its current lifecycle state.",
            ["bundle", "version", "state"], registry=r,
        )  # fmt: skip
        self._default_version = Gauge(
            "recship_default_version", "The version serving requests that name none (0: none).",
            ["bundle"], registry=r,
        )  # fmt: skip
        self._switches = Counter(
            "recship_version_switches", "Times the default version of a bundle changed.",
            ["bundle"], registry=r,
        )  # fmt: skip
        self._unavailable = Histogram(
            "recship_switch_unavailable_seconds", "Length of the windows in which a bundle had "
            "no version to serve because a switch had to unload the old version first (one "
            "replica, memory budget too small for two versions).",
            ["bundle"], buckets=WINDOW_BUCKETS, registry=r,
        )  # fmt: skip
        self._lock = threading.Lock()
        self._states: dict[tuple[str, int], VersionState] = {}
        self._defaults: dict[str, int | None] = {}

    def observe_request(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        """Counts one finished RPC; matches `recship.runtime.grpc_errors.RequestObserver`."""
        self._requests.labels(method, code.name).inc()
        self._latency.labels(method).observe(seconds)
        if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
            self._refusal_latency.labels(method).observe(seconds)

    def batch_metrics(self, model: str) -> ModelBatchMetrics:
        """The batch observer for `model` (e.g. "movies/rank"), to hand to its batchers."""
        return ModelBatchMetrics(
            model,
            self._batch_rows.labels(model),
            self._batch_cost.labels(model),
            self._batch_seconds.labels(model),
            self._batch_requests.labels(model),
            self._queue_wait.labels(model),
            self._queue_rows.labels(model),
            self._queue_cost.labels(model),
            self._refusals,
            self._dropped,
            self._service_rate.labels(model),
        )

    def set_version_state(self, bundle: str, version: int, state: VersionState) -> None:
        """Moves a version's state series: `state` becomes 1, its previous state disappears."""
        with self._lock:
            previous = self._states.get((bundle, version))
            if previous is not None and previous is not state:
                self._version_state.remove(bundle, str(version), previous.name)
            self._states[(bundle, version)] = state
            self._version_state.labels(bundle, str(version), state.name).set(1)

    def forget_version(self, bundle: str, version: int) -> None:
        """Removes a version's state series (it left the repository and the server)."""
        with self._lock:
            previous = self._states.pop((bundle, version), None)
            if previous is not None:
                self._version_state.remove(bundle, str(version), previous.name)

    def set_default_version(self, bundle: str, version: int | None) -> None:
        """Records the bundle's default version (None: none READY).

        A switch is counted when traffic moves from one version to another, not when the
        first version becomes ready or the last one goes away.
        """
        with self._lock:
            old = self._defaults.get(bundle)
            self._defaults[bundle] = version
            self._default_version.labels(bundle).set(0 if version is None else version)
            if old is not None and version is not None and old != version:
                self._switches.labels(bundle).inc()

    def observe_unavailable_window(self, bundle: str, seconds: float) -> None:
        """Records one unavailable window of `bundle` during a version switch."""
        self._unavailable.labels(bundle).observe(seconds)


#: Seconds a metrics connection may stay idle (or take to send a request head) before it is
#: closed. Prometheus reconnects when its scrape interval is longer.
DEFAULT_IDLE_TIMEOUT_S = 30.0
#: Open metrics connections at most; beyond, a new one evicts the longest idle.
DEFAULT_MAX_CONNECTIONS = 64
#: Largest request head (request line and headers) accepted.
MAX_REQUEST_HEAD_BYTES = 8192
#: Seconds `stop()` lets closed connections finish a scrape before it cancels them.
STOP_GRACE_S = 1.0


@dataclass
class _Connection:
    """An open connection of the metrics endpoint: how to close it, and since when it waits
    for a request (None while it is answering one)."""

    writer: asyncio.StreamWriter
    idle_since: float | None


class MetricsHTTPServer:
    """Prometheus exposition over HTTP/1.1 on the event loop; `stop()` frees the port.

    Any path answers the text format to GET (and HEAD); other methods get 405, malformed
    requests 400. Connections are kept alive (HTTP/1.1, unless the client says "close") and
    closed after `idle_timeout_s` without a complete request head. At most `max_connections`
    are open: a new one evicts the connection idle the longest (a scraper is never locked out
    by idle sockets), or is closed at once if every connection is busy. Rendering runs on one
    worker thread, shared by concurrent scrapes, so the loop never waits for it and the
    endpoint uses at most one thread however many connections are open.

    Threading: `start`, `stop` and the connections run on one event loop.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        if idle_timeout_s <= 0 or max_connections < 1:
            raise ValueError(
                f"idle_timeout_s must be > 0 and max_connections >= 1, got {idle_timeout_s} "
                f"and {max_connections}"
            )
        self._registry = registry
        self._idle_timeout_s = idle_timeout_s
        self._max_connections = max_connections
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.Task[None], _Connection] = {}
        self._render_thread = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="metrics-render"
        )
        self._rendering: asyncio.Future[bytes] | None = None
        self.port: int | None = None

    @property
    def open_connections(self) -> int:
        """Connections open now."""
        return len(self._connections)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listens on `host:port` (0 picks a free port); returns the port."""
        self._server = await asyncio.start_server(
            self._accept, host, port, limit=MAX_REQUEST_HEAD_BYTES
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def stop(self) -> None:
        """Stops listening, closes every connection and the render thread. Idempotent."""
        if self._server is not None:
            self._server.close()
            for connection in self._connections.values():
                connection.writer.close()
            if self._connections:
                # Closed, a connection's task ends at its next read; one stuck elsewhere is
                # cancelled after a grace period.
                _, pending = await asyncio.wait(list(self._connections), timeout=STOP_GRACE_S)
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None
        self._render_thread.shutdown(wait=False)

    def _make_room(self) -> bool:
        """Evicts the longest-idle connection if all slots are taken; False if none is idle."""
        if len(self._connections) < self._max_connections:
            return True
        idle = [
            (connection.idle_since, task)
            for task, connection in self._connections.items()
            if connection.idle_since is not None
        ]
        if not idle:
            return False
        _, oldest = min(idle, key=lambda entry: entry[0])
        # Closing ends the connection's task at its pending read. Cancelling it instead would
        # make Python 3.11's asyncio.streams log a CancelledError traceback for each eviction.
        self._connections.pop(oldest).writer.close()
        return True

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is None or not self._make_room():
            writer.close()
            return
        self._connections[task] = _Connection(writer, asyncio.get_running_loop().time())
        try:
            await self._serve(task, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        finally:
            self._connections.pop(task, None)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _serve(
        self, task: asyncio.Task[None], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self._idle_timeout_s)
            except asyncio.LimitOverrunError:
                await self._respond(writer, b"431 Request Header Fields Too Large", b"", False)
                return
            except asyncio.IncompleteReadError:
                return  # the client closed the connection (or sent half a head)
            connection = self._connections.get(task)
            if connection is None:
                return  # evicted meanwhile
            connection.idle_since = None
            lines = head.split(b"\r\n")
            parts = lines[0].split()
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip().lower()
            if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
                await self._respond(writer, b"400 Bad Request", b"", False)
                return
            if headers.get(b"content-length", b"0") != b"0" or b"transfer-encoding" in headers:
                await self._respond(writer, b"400 Bad Request", b"", False)
                return  # a body we will not read: the connection's framing is lost
            wanted = headers.get(b"connection", b"")
            keep_alive = wanted != b"close" if parts[2] == b"HTTP/1.1" else wanted == b"keep-alive"
            if parts[0] not in (b"GET", b"HEAD"):
                await self._respond(writer, b"405 Method Not Allowed", b"", keep_alive)
            else:
                body = await self._render()
                await self._respond(
                    writer, b"200 OK", b"" if parts[0] == b"HEAD" else body, keep_alive, len(body)
                )
            if not keep_alive:
                return
            connection.idle_since = loop.time()

    async def _respond(
        self,
        writer: asyncio.StreamWriter,
        status: bytes,
        body: bytes,
        keep_alive: bool,
        length: int | None = None,
    ) -> None:
        head = (
            b"HTTP/1.1 " + status + b"\r\n"
            b"Content-Type: " + CONTENT_TYPE_LATEST.encode() + b"\r\n"
            b"Content-Length: " + str(len(body) if length is None else length).encode() + b"\r\n"
            b"Connection: " + (b"keep-alive" if keep_alive else b"close") + b"\r\n\r\n"
        )
        writer.write(head + body)
        await asyncio.wait_for(writer.drain(), self._idle_timeout_s)

    async def _render(self) -> bytes:
        """The registry in text format; concurrent scrapes share one rendering."""
        if self._rendering is None:
            loop = asyncio.get_running_loop()
            self._rendering = asyncio.ensure_future(
                loop.run_in_executor(self._render_thread, generate_latest, self._registry)
            )
            self._rendering.add_done_callback(lambda _: setattr(self, "_rendering", None))
        return await asyncio.shield(self._rendering)


async def start_metrics_http(
    registry: CollectorRegistry,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
) -> MetricsHTTPServer:
    """Serves `registry` in Prometheus text format over HTTP (any path) on the running loop.

    Args:
        registry: the registry to expose, usually `ServerMetrics.registry`.
        host: address to bind; loopback by default.
        port: TCP port; 0 picks a free one (read it from the result's `port`).
        idle_timeout_s: an idle connection is closed after this long.
        max_connections: connections beyond this many are closed at once.

    Returns:
        The running server (`await stop()` when done).
    """
    server = MetricsHTTPServer(
        registry, idle_timeout_s=idle_timeout_s, max_connections=max_connections
    )
    await server.start(host, port)
    return server
