"""The recship gRPC server: assembly, lifecycle, health, reflection, metrics and logs.

`build_server(config) -> (server, port)` wires the parts: a `VersionManager` over the bundle
repository (whose store enforces the signature policy) and two listeners.

- The inference listener (`host:port`): the `Recommender` servicer behind the one
  error-mapping interceptor, the standard `grpc.health.v1` health service (NOT_SERVING until
  every bundle has a READY version) and server reflection of exactly those services (so
  `grpcurl` and `grpc_health_probe` work without the protos; the admin API is not in it).
- The admin listener (`admin_host:admin_port`, loopback by default, or a Unix socket of mode
  0600): `BundleAdmin`, health and its own reflection, every call behind the bearer token when
  one is configured (`recship.runtime.security`). Without a token it may only be local.

Both use TLS (mTLS with a client CA) when `tls` is set. Every request body of both is decoded
by `ErrorMappingInterceptor` (undecodable or over `ServiceLimits.max_request_bytes` ->
INVALID_ARGUMENT, before any servicer code). The Prometheus endpoint has its own HTTP port on
`metrics_host` (loopback by default), served on the server's event loop (no thread per
connection, idle connections closed after `metrics_idle_timeout_s`). `serve(config)` runs the
server until SIGTERM or SIGINT, then stops accepting calls, lets in-flight calls finish within
the grace period, drains the versions and returns (the CLI exits 0).

Example::

    async def main():
        server, port = build_server(ServerConfig(repo=Path("repo"), port=0))
        await server.start()
        await server.wait_ready()
        ...
        await server.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import stat
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import grpc.aio
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection, reflection_pb2

from recship.base.errors import InvalidInput, RecshipError
from recship.bundle.store import BundleStore
from recship.protos.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    batch_plane_pb2,
    batch_plane_pb2_grpc,
    recommender_pb2,
    recommender_pb2_grpc,
)
from recship.runtime.admin import BundleAdminService
from recship.runtime.batch_plane import BatchPlaneService
from recship.runtime.batcher import (
    DEFAULT_MAX_BATCH_COST,
    DEFAULT_MAX_BATCH_ROWS,
    DEFAULT_MAX_DELAY_S,
    DEFAULT_MAX_QUEUE_COST,
    DEFAULT_MAX_QUEUE_ROWS,
)
from recship.runtime.front_end import DEFAULT_FILL_WAIT_MS, FRONT_ENDS
from recship.runtime.grpc_errors import ErrorMappingInterceptor
from recship.runtime.limits import ServiceLimits
from recship.runtime.manager import VersionManager
from recship.runtime.metrics import (
    DEFAULT_IDLE_TIMEOUT_S,
    MetricsHTTPServer,
    ServerMetrics,
    start_metrics_http,
)
from recship.runtime.policy import VersionPolicy
from recship.runtime.security import (
    BearerTokenInterceptor,
    ServerTLS,
    check_admin_exposure,
    check_token,
)
from recship.runtime.servable import (
    BatchingConfig,
    LoaderConfig,
    ServableLoader,
    configure_threads,
)
from recship.runtime.service import RecommenderService

logger = logging.getLogger(__name__)

RECOMMENDER_SERVICE = recommender_pb2.DESCRIPTOR.services_by_name["Recommender"].full_name
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["BundleAdmin"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
BATCH_PLANE_RUN = f"{batch_plane_pb2.DESCRIPTOR.services_by_name['BatchPlane'].full_name}/Run"
# Responses can carry many items; requests are bounded by ServiceLimits.max_request_bytes.
MAX_SEND_BYTES = 64 * 1024 * 1024
# Admin requests are small; a larger one is refused by the transport.
MAX_ADMIN_RECEIVE_BYTES = 1024 * 1024
DEFAULT_ADMIN_PORT = 8501


@dataclass(frozen=True)
class ServerConfig:
    """One `recship serve`. CLI flags map one to one onto these fields.

    Attributes:
        repo: bundle repository root.
        bundles: bundles to serve; empty serves every bundle in `repo`.
        host: address of the inference listener.
        port: gRPC port; 0 picks a free one (`build_server` returns it).
        metrics_port: Prometheus HTTP port (0 picks one), or None for no endpoint.
        metrics_host: address of the Prometheus endpoint; loopback by default, whatever `host`.
        metrics_idle_timeout_s: a metrics connection idle this long is closed.
        admin_host: address of the admin listener; loopback by default. Any other address
            needs `admin_token`.
        admin_port: its TCP port (0 picks one); None (with no `admin_socket`): no admin API.
        admin_socket: serve the admin API on this Unix socket (mode 0600) instead of TCP.
        admin_token: the bearer token every admin call must carry; None leaves the (local)
            admin API open to whoever can connect. Never logged.
        tls: certificate, key and optional client CA (mTLS) for both listeners; None: plaintext.
        public_key: PEM public key that verifies versions' MANIFEST.sig.
        require_signature: load only versions whose MANIFEST.sig verifies with `public_key`;
            the others are FAILED with the reason.
        max_batch_size: most model rows per batch (a Rank query with 500 candidates is 500).
        max_delay_ms: longest wait of a queued request for its batch to fill; None: the
            default of whoever waits (`delay_ms`). The replicas' batchers default to 0
            (`DEFAULT_MAX_DELAY_S`: flush as soon as the replica is free). Behind the native
            front end the wait is the front end's (its batches of calls, `DEFAULT_FILL_WAIT_MS`,
            and only while more calls are due), not the workers'.
        max_queue_rows: queue bound per replica and model; beyond it RESOURCE_EXHAUSTED.
        max_batch_cost: most cost per batch (the ids its rows look up), which is also the
            longest slice one request may hold a replica for; costlier requests are cut.
        max_queue_cost: cost bound per replica and model; beyond it RESOURCE_EXHAUSTED.
            Requests with a deadline are refused sooner, when they could not finish in time.
        batching: False runs every request part alone (for `recship bench --compare-unbatched`).
        replicas: CPU replicas (default 1); on GPUs it follows from the devices.
        threads: intra-op threads of torch and FAISS (process-wide).
        devices: devices to place replicas on, e.g. ("cuda:0", "cuda:1"); empty: all visible.
        format: entry point format to load ("torchscript" / "aoti"); None: the bundle's first.
        limits: per-request bounds.
        grace_s: how long in-flight calls may take to finish after SIGTERM.
        poll_interval_s: how often the repository is re-read for new versions (seconds);
            0 disables polling (the `RefreshRepository` admin RPC still works).
        policies: version policy per bundle (`latest` for the others).
        labels: labels set after the initial load, as (bundle, label, version); one whose
            version is not READY then is logged and skipped.
        memory_budget_bytes: most memory the loaded versions may take by their manifests'
            estimates (host bytes once + device bytes per replica, see
            `recship.runtime.policy.estimated_bytes`); None (the default) is unlimited. When a
            new version does not fit beside the old one, the switch goes replica by replica
            (>= 2 replicas) or through a brief, reported unavailable window (1 replica). A
            supervisor holds the budget for all its workers (`recship.runtime.fleet`).
        workers: serving processes sharing the inference port (`SO_REUSEPORT`); above 1 a
            supervisor decides the versions and the workers serve them
            (`recship.runtime.fleet`).
        front_end: who answers the inference port: "grpcio" (each serving process's own
            grpc.aio server) or "native" (`recship-frontend`, C++, in front of the workers,
            which it sends whole batches of calls; `recship.runtime.front_end`). "native"
            runs the supervisor and its workers even with one worker.
        max_batch_calls: with the native front end, most calls per batch it sends a worker;
            None: `DEFAULT_BATCH_CALLS`.
        max_inflight: with the native front end, batches one worker runs at once; None:
            `DEFAULT_INFLIGHT`.
        backend_dir: where the workers' Unix sockets are with the native front end (set by
            the supervisor, not a flag).
    """

    repo: Path
    bundles: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: int = 8500
    metrics_port: int | None = None
    max_batch_size: int = DEFAULT_MAX_BATCH_ROWS
    max_delay_ms: float | None = None
    max_queue_rows: int = DEFAULT_MAX_QUEUE_ROWS
    max_batch_cost: int = DEFAULT_MAX_BATCH_COST
    max_queue_cost: int = DEFAULT_MAX_QUEUE_COST
    batching: bool = True
    replicas: int | None = None
    threads: int = 1
    devices: tuple[str, ...] = ()
    format: str | None = None
    limits: ServiceLimits = field(default_factory=ServiceLimits)
    grace_s: float = 10.0
    poll_interval_s: float = 5.0
    policies: Mapping[str, VersionPolicy] = field(default_factory=dict)
    labels: tuple[tuple[str, str, int], ...] = ()
    memory_budget_bytes: int | None = None
    metrics_host: str = "127.0.0.1"
    metrics_idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S
    admin_host: str = "127.0.0.1"
    admin_port: int | None = DEFAULT_ADMIN_PORT
    admin_socket: Path | None = None
    admin_token: str | None = field(default=None, repr=False)
    tls: ServerTLS | None = None
    public_key: Path | None = None
    require_signature: bool = False
    workers: int = 1
    front_end: str = "grpcio"
    max_batch_calls: int | None = None
    max_inflight: int | None = None
    backend_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise InvalidInput(f"--workers must be >= 1, got {self.workers}")
        if self.front_end not in FRONT_ENDS:
            raise InvalidInput(
                f"--front-end must be one of {', '.join(FRONT_ENDS)}, got {self.front_end!r}"
            )
        for flag, value in (("--max-batch-calls", self.max_batch_calls),
                            ("--max-inflight", self.max_inflight)):  # fmt: skip
            if value is not None and self.front_end != "native":
                raise InvalidInput(f"{flag} is the native front end's: it needs --front-end native")
            if value is not None and value < 1:
                raise InvalidInput(f"{flag} must be >= 1, got {value}")
        if self.poll_interval_s < 0:
            raise InvalidInput(f"poll_interval_s must be >= 0, got {self.poll_interval_s}")
        if self.memory_budget_bytes is not None and self.memory_budget_bytes <= 0:
            raise InvalidInput(f"--memory-budget-bytes must be > 0, got {self.memory_budget_bytes}")
        if self.admin_token is not None:
            check_token(self.admin_token, "admin token")
        if self.admin_enabled:
            check_admin_exposure(self.admin_host, self.admin_socket, self.admin_token, self.tls)
        if self.require_signature and self.public_key is None:
            raise InvalidInput("--require-signature needs --public-key to check signatures with")

    @property
    def delay_ms(self) -> float:
        """The fill wait in force: `max_delay_ms`, or the default of whoever waits."""
        if self.max_delay_ms is not None:
            return self.max_delay_ms
        return DEFAULT_FILL_WAIT_MS if self.front_end == "native" else DEFAULT_MAX_DELAY_S * 1000.0

    @property
    def batcher_delay_s(self) -> float:
        """The replicas' batchers' fill wait: none behind the native front end, whose batches
        arrive whole (the wait is the front end's), else `delay_ms`."""
        return 0.0 if self.front_end == "native" else self.delay_ms / 1000.0

    @property
    def supervised(self) -> bool:
        """Whether a supervisor runs worker processes (`recship.runtime.fleet`)."""
        return self.workers > 1 or self.front_end == "native"

    @property
    def admin_enabled(self) -> bool:
        """Whether the server has an admin listener."""
        return self.admin_socket is not None or self.admin_port is not None

    def loader_config(self) -> LoaderConfig:
        """The loader's share of this configuration."""
        return LoaderConfig(
            devices=self.devices,
            replicas=self.replicas,
            format=self.format,
            batching=BatchingConfig(
                max_batch_rows=self.max_batch_size,
                max_delay_s=self.batcher_delay_s,
                max_queue_rows=self.max_queue_rows,
                max_batch_cost=self.max_batch_cost,
                max_queue_cost=self.max_queue_cost,
                enabled=self.batching,
            ),
        )


class RecshipServer:
    """A built server: call `start()`, then `wait_ready()`, finally `stop()`.

    Threading: all methods run on the event loop `build_server` was called on.

    Attributes:
        port: the bound gRPC port.
        metrics: the server's Prometheus metrics.
        manager: the version manager.
        metrics_port: the Prometheus endpoint's port once started (None without one).
        admin_server: the admin listener's gRPC server (None without an admin API).
        admin_address: the admin API's target for clients: "host:port" or "unix:/path"
            (None without an admin API).
    """

    def __init__(
        self,
        config: ServerConfig,
        grpc_server: grpc.aio.Server,
        port: int,
        manager: VersionManager,
        metrics: ServerMetrics,
        health: health_aio.HealthServicer,
        admin_server: grpc.aio.Server | None = None,
        admin_address: str | None = None,
    ) -> None:
        self.config = config
        self.grpc_server = grpc_server
        self.admin_server = admin_server
        self.admin_address = admin_address
        self.port = port
        self.manager = manager
        self.metrics = metrics
        self.health = health
        self.metrics_port: int | None = None
        self._metrics_http: MetricsHTTPServer | None = None
        self._loading: asyncio.Task[None] | None = None
        self._polling: asyncio.Task[None] | None = None
        self._settled = asyncio.Event()
        self._health_tasks: set[asyncio.Task[None]] = set()
        self.load_error: RecshipError | None = None

    async def start(self) -> None:
        """Starts answering (health NOT_SERVING) and loads the bundles in the background."""
        for service in ("", RECOMMENDER_SERVICE):
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.grpc_server.start()
        if self.admin_server is not None:
            await self.admin_server.start()
            _restrict_socket(self.config.admin_socket)
        if self.config.metrics_port is not None:
            self._metrics_http = await start_metrics_http(
                self.metrics.registry,
                self.config.metrics_host,
                self.config.metrics_port,
                idle_timeout_s=self.config.metrics_idle_timeout_s,
            )
            self.metrics_port = self._metrics_http.port
        self._loading = asyncio.get_running_loop().create_task(self._load(), name="recship-load")
        logger.info(
            "listening on %s:%d (metrics on %s, admin on %s%s%s)",
            self.config.host,
            self.port,
            self.metrics_port,
            self.admin_address,
            "" if self.config.admin_token is None else ", token required",
            "" if self.config.tls is None else ", TLS",
            extra={
                "port": self.port,
                "metrics_port": self.metrics_port,
                "admin": self.admin_address,
            },
        )
        if self.admin_server is not None and self.config.admin_token is None:
            logger.warning(
                "the admin API on %s has no token: anyone who can connect to it can unload "
                "versions; give --admin-token-file (or $RECSHIP_ADMIN_TOKEN)",
                self.admin_address,
            )

    async def _load(self) -> None:
        self.load_error = await load_initial(self.manager, self.config.labels)
        self._settled.set()
        if self.load_error is None and self.config.poll_interval_s > 0:
            self._polling = asyncio.get_running_loop().create_task(
                poll_repository(self.manager, self.config.poll_interval_s), name="recship-poll"
            )

    def health_changed(self) -> None:
        """Updates the health service from the manager (its `on_change` callback)."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if self.manager.ready
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )

        async def update() -> None:
            for service in ("", RECOMMENDER_SERVICE):
                await self.health.set(service, status)

        task = asyncio.get_running_loop().create_task(update())
        self._health_tasks.add(task)
        task.add_done_callback(self._health_tasks.discard)

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Waits until the initial load finished.

        Raises:
            RecshipError: the initial load failed (e.g. an unknown bundle was asked for).
            TimeoutError: not settled within `timeout` seconds.
        """
        await asyncio.wait_for(self._settled.wait(), timeout)
        if self.load_error is not None:
            raise self.load_error

    async def stop(self, grace: float | None = None) -> None:
        """Stops gracefully: health NOT_SERVING, no new calls, in-flight calls finish within
        `grace` seconds (default `config.grace_s`), versions drained, metrics endpoint closed.
        """
        grace = self.config.grace_s if grace is None else grace
        await self.health.enter_graceful_shutdown()
        started = time.perf_counter()
        await self.grpc_server.stop(grace)
        if self.admin_server is not None:
            await self.admin_server.stop(min(grace, 1.0))
        for task in (self._polling, self._loading):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.manager.close()
        if self._health_tasks:
            await asyncio.gather(*self._health_tasks, return_exceptions=True)
        if self._metrics_http is not None:
            await self._metrics_http.stop()
        logger.info("stopped in %.2f s", time.perf_counter() - started)


async def load_initial(
    manager: VersionManager, labels: tuple[tuple[str, str, int], ...]
) -> RecshipError | None:
    """The initial load: every bundle's versions, then the `--label`s; returns its error.

    A label whose version is not READY then is logged and skipped.
    """
    try:
        await manager.start()
        for bundle, label, version in labels:
            try:
                manager.set_label(bundle, label, version)
            except RecshipError as error:
                logger.warning("--label %s:%s=%d not set: %s", bundle, label, version, error)
    except RecshipError as error:
        logger.error("loading failed: %s", error)
        return error
    return None


async def poll_repository(manager: VersionManager, interval_s: float) -> None:
    """Re-reads the repository every `interval_s` seconds until cancelled.

    A failing scan (repository unmounted, unreadable folder) is logged and retried at the
    next tick; the versions already serving are not touched by it.
    """
    while True:
        await asyncio.sleep(interval_s)
        try:
            await manager.refresh()
        except RecshipError as error:
            logger.warning("repository poll failed: %s", error)
        except OSError as error:
            logger.warning("repository poll failed: %s: %s", type(error).__name__, error)


def build_server(config: ServerConfig) -> tuple[RecshipServer, int]:
    """Builds (but does not start) a server and binds its ports.

    Call it on the event loop that will run the server.

    Returns:
        The server and the bound gRPC (inference) port.

    Raises:
        InvalidInput: a configuration value is out of range, a TLS file or the public key is
            unusable, or a port or socket cannot be bound.
    """
    configure_threads(config.threads)
    metrics = ServerMetrics()
    health = health_aio.HealthServicer()
    holder: list[RecshipServer] = []
    store = BundleStore(
        config.repo, public_key=config.public_key, require_signature=config.require_signature
    )
    manager = VersionManager(
        store,
        ServableLoader(config.loader_config(), metrics),
        metrics,
        bundles=config.bundles,
        policies=config.policies,
        on_change=lambda: holder[0].health_changed() if holder else None,
        memory_budget_bytes=config.memory_budget_bytes,
    )
    grpc_server = inference_server(config, manager, metrics, health)
    credentials = None if config.tls is None else config.tls.credentials()
    port = bind(grpc_server, tcp_address(config.host, config.port), credentials)
    admin_server, admin_address = bind_admin(config, manager, health, metrics)
    server = RecshipServer(
        config, grpc_server, port, manager, metrics, health, admin_server, admin_address
    )
    holder.append(server)
    return server, port


def receive_limit(limits: ServiceLimits) -> int:
    """The inference listener's transport bound on a request: above `max_request_bytes`, so
    that a request over it is answered INVALID_ARGUMENT by recship, not by the transport.
    The native front end also fills its batches up to it (`--max-batch-bytes`)."""
    return 2 * limits.max_request_bytes + 1024 * 1024


def inference_server(
    config: ServerConfig,
    manager: VersionManager,
    metrics: ServerMetrics,
    health: health_aio.HealthServicer,
    *,
    reuse_port: bool = False,
) -> grpc.aio.Server:
    """The inference listener's server (not yet bound): Recommender, health and reflection.

    Args:
        reuse_port: set `SO_REUSEPORT`, so that the workers of `recship serve --workers N`
            can listen on one port and the kernel spreads connections over them.
    """
    limits = config.limits
    native = config.front_end == "native"
    grpc_server = grpc.aio.server(
        interceptors=[
            ErrorMappingInterceptor(
                metrics.observe_request,
                max_request_bytes=limits.max_request_bytes,
                unbounded=frozenset({BATCH_PLANE_RUN}) if native else frozenset(),
            )
        ],
        options=[
            # Behind the native front end a batch holds up to `receive_limit` of calls.
            ("grpc.max_receive_message_length", (2 if native else 1) * receive_limit(limits)),
            ("grpc.max_send_message_length", MAX_SEND_BYTES),
            ("grpc.so_reuseport", int(reuse_port)),
        ],
    )
    service = RecommenderService(manager, limits)
    recommender_pb2_grpc.add_RecommenderServicer_to_server(service, grpc_server)
    if native:
        batch_plane_pb2_grpc.add_BatchPlaneServicer_to_server(
            BatchPlaneService(service, limits, metrics.observe_request), grpc_server
        )
    health_pb2_grpc.add_HealthServicer_to_server(health, grpc_server)
    inference_files = (recommender_pb2.DESCRIPTOR, health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR)
    reflection.enable_server_reflection(
        (RECOMMENDER_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME),
        grpc_server,
        pool=_descriptor_pool(inference_files),
    )
    return grpc_server


def bind_admin(
    config: ServerConfig,
    manager: VersionManager,
    health: health_aio.HealthServicer,
    metrics: ServerMetrics,
) -> tuple[grpc.aio.Server | None, str | None]:
    """Builds the admin listener and binds its TCP port or Unix socket.

    Returns:
        The server and its target for clients ("host:port" or "unix:/path"), or (None, None)
        when the configuration has no admin API.
    """
    if not config.admin_enabled:
        return None, None
    server = build_admin_server(config, manager, health, metrics)
    credentials = None if config.tls is None else config.tls.credentials()
    if config.admin_socket is not None:
        address = f"unix:{Path(config.admin_socket).resolve()}"
        _prepare_socket(Path(config.admin_socket))
        with _private_umask():
            bind(server, address, credentials)
        return server, address
    admin_port = config.admin_port if config.admin_port is not None else 0
    bound = bind(server, tcp_address(config.admin_host, admin_port), credentials)
    host = f"[{config.admin_host}]" if ":" in config.admin_host else config.admin_host
    return server, f"{host}:{bound}"


def build_admin_server(
    config: ServerConfig,
    manager: VersionManager,
    health: health_aio.HealthServicer,
    metrics: ServerMetrics,
) -> grpc.aio.Server:
    """The admin listener's server: BundleAdmin, health and reflection, behind the token."""
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if config.admin_token is not None:
        interceptors.append(BearerTokenInterceptor(config.admin_token, metrics.observe_request))
    interceptors.append(ErrorMappingInterceptor(metrics.observe_request))
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", MAX_ADMIN_RECEIVE_BYTES),
            ("grpc.max_send_message_length", MAX_SEND_BYTES),
            ("grpc.so_reuseport", 0),
        ],
    )
    admin_pb2_grpc.add_BundleAdminServicer_to_server(BundleAdminService(manager), server)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (ADMIN_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME),
        server,
        pool=_descriptor_pool(
            (admin_pb2.DESCRIPTOR, health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR)
        ),
    )
    return server


def _descriptor_pool(files) -> descriptor_pool.DescriptorPool:  # type: ignore[no-untyped-def]
    """A descriptor pool holding only `files` and their imports: reflection over it describes
    the services of one listener and nothing else the process happens to have loaded."""
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file) -> None:  # type: ignore[no-untyped-def]
        if file.name in added:
            return
        for dependency in file.dependencies:
            add(dependency)
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        pool.Add(proto)
        added.add(file.name)

    for file in files:
        add(file)
    return pool


def tcp_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    try:
        if credentials is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, credentials)
    except RuntimeError as error:
        raise InvalidInput(f"cannot listen on {address}: {error}") from None


def _prepare_socket(path: Path) -> None:
    """Removes a stale socket at `path`; refuses to replace anything else."""
    if not path.parent.is_dir():
        raise InvalidInput(f"--admin-socket {path}: its folder does not exist")
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise InvalidInput(f"--admin-socket {path}: exists and is not a socket; not replaced")
    path.unlink()


@contextlib.contextmanager
def _private_umask():  # type: ignore[no-untyped-def]
    """Sockets created inside are mode 0600 (owner only) from the start."""
    previous = os.umask(0o177)
    try:
        yield
    finally:
        os.umask(previous)


def _restrict_socket(path: Path | None) -> None:
    if path is not None and Path(path).exists():
        os.chmod(path, 0o600)


class JsonFormatter(logging.Formatter):
    """One JSON object per log line: time, level, logger, message and any `extra` fields."""

    _STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in self._STANDARD:
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str = "info") -> None:
    """Structured (JSON lines) logs on stderr for the server process.

    `level` applies to recship's own loggers; libraries log warnings and errors only, so that
    e.g. fbgemm_gpu's "Successfully loaded" lines at import do not flood the server log.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(logging.WARNING, logging.getLevelName(level.upper())))
    logging.getLogger("recship").setLevel(level.upper())


async def serve(config: ServerConfig, *, announce: bool = True) -> None:
    """Runs a server until SIGTERM or SIGINT, then shuts it down gracefully.

    Args:
        config: the server.
        announce: print `listening on HOST:PORT` (and the metrics port) on stdout once bound,
            so a supervisor (or a test) that asked for port 0 learns the port.

    Raises:
        RecshipError: the initial load failed (unknown bundle, missing repository).
    """
    if config.supervised:
        from recship.runtime.fleet import serve_fleet

        await serve_fleet(config, announce=announce)
        return
    server, port = build_server(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await server.start()
    if announce:
        print(
            f"listening on {config.host}:{port} metrics {server.metrics_port} "
            f"admin {server.admin_address or '-'}",
            flush=True,
        )
    stopping = loop.create_task(stop.wait())
    settled = loop.create_task(server._settled.wait())
    await asyncio.wait({stopping, settled}, return_when=asyncio.FIRST_COMPLETED)
    if server.load_error is None and not stop.is_set():
        await stop.wait()
    stopping.cancel()
    settled.cancel()
    logger.info("stopping (grace %.1f s)", config.grace_s)
    await server.stop()
    if server.load_error is not None:
        raise server.load_error
