"""One worker process of `recship serve --workers N`: serves what its supervisor decided.

The supervisor (`recship.runtime.fleet`) starts `python -m recship.runtime.worker`, writes the
server configuration as the first line of the worker's stdin, then sends commands, one JSON
object per line, and reads one JSON reply per command from the worker's stdout (which is
reserved for them: anything else printed goes to stderr, with the logs):

- `load {bundle, version}`: load that version beside the others (`VersionManager.load_version`)
  and reply its state (READY, or FAILED with the reason);
- `unload {bundle, version}`: drain and unload it;
- `view {bundles: {name: {default, labels}}}`: take over the supervisor's defaults and labels;
- `serve`: bind the inference port (`SO_REUSEPORT`, shared by every worker) and take calls;
  behind the native front end (`ServerConfig.backend_dir` set), its own Unix socket there
  instead (`backend_socket`), on which `recship-frontend` sends it batches of calls;
- `metrics`: reply the worker's Prometheus text, which the supervisor sums over the workers.

Commands that change what is served run one at a time, in the order they arrived (a view that
moves the default away from a version is applied before that version's unload); `metrics` is
answered at once. The worker does not read the repository by itself and has no admin API.

It stops gracefully on SIGTERM or SIGINT, and when its stdin closes (the supervisor is gone):
health NOT_SERVING, in-flight calls finish within the grace period, versions drained, exit 0.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import pickle
import signal
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio
from prometheus_client import generate_latest

from recship.base.errors import RecshipError
from recship.bundle.store import BundleStore
from recship.runtime.manager import VersionManager
from recship.runtime.metrics import ServerMetrics
from recship.runtime.servable import ServableLoader, configure_threads
from recship.runtime.server import (
    RECOMMENDER_SERVICE,
    ServerConfig,
    bind,
    configure_logging,
    inference_server,
    tcp_address,
)

# Not __name__: run with -m, that is "__main__", outside the "recship" loggers.
logger = logging.getLogger("recship.runtime.worker")

# Commands that change what is served; they run one at a time, in arrival order.
STATE_COMMANDS = frozenset({"load", "unload", "view", "serve"})


def backend_socket(backend_dir: Path, index: int) -> Path:
    """Worker `index`'s Unix socket, on which the native front end reaches it."""
    return backend_dir / f"worker-{index}.sock"


def encode_config(config: ServerConfig, index: int, log_level: str) -> bytes:
    """The first line the supervisor writes to a worker's stdin."""
    payload = pickle.dumps((config, index, log_level))
    return base64.b64encode(payload) + b"\n"


class Worker:
    """The worker's server: a directed `VersionManager` and an inference listener.

    Threading: everything runs on the worker's event loop.
    """

    def __init__(self, config: ServerConfig, index: int) -> None:
        self.config = config
        self.index = index
        configure_threads(config.threads)
        self.metrics = ServerMetrics()
        self.health = health_aio.HealthServicer()
        loader_config = replace(config.loader_config(), mmap_index=True)
        self.manager = VersionManager(
            BundleStore(
                config.repo,
                public_key=config.public_key,
                require_signature=config.require_signature,
            ),
            ServableLoader(loader_config, self.metrics),
            self.metrics,
            on_change=self._health_changed,
        )
        self.grpc_server = inference_server(
            config, self.manager, self.metrics, self.health, reuse_port=True
        )
        self._serving = False
        self._state_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._writer: asyncio.StreamWriter | None = None

    async def run(self, protocol_fd: int) -> None:
        """Answers the supervisor until told to stop, then shuts down gracefully."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        reader = asyncio.StreamReader(limit=16 << 20)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        transport, protocol = await loop.connect_write_pipe(
            asyncio.streams.FlowControlMixin, os.fdopen(protocol_fd, "wb", buffering=0)
        )
        self._writer = asyncio.StreamWriter(transport, protocol, None, loop)
        for service in ("", RECOMMENDER_SERVICE):
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        self._reply({"id": 0, "ok": True, "pid": os.getpid()})
        reading = loop.create_task(self._read(reader, stop), name="recship-worker-control")
        await stop.wait()
        reading.cancel()
        logger.info("worker %d stopping (grace %.1f s)", self.index, self.config.grace_s)
        await self.health.enter_graceful_shutdown()
        if self._serving:
            await self.grpc_server.stop(self.config.grace_s)
        for task in list(self._tasks):
            task.cancel()
        await self.manager.close()
        transport.close()

    async def _read(self, reader: asyncio.StreamReader, stop: asyncio.Event) -> None:
        while line := await reader.readline():
            message = json.loads(line)
            task = asyncio.get_running_loop().create_task(self._answer(message))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        logger.info("worker %d: the supervisor closed the control pipe", self.index)
        stop.set()

    async def _answer(self, message: dict[str, Any]) -> None:
        reply: dict[str, Any] = {"id": message["id"], "ok": True}
        try:
            if message["op"] in STATE_COMMANDS:
                async with self._state_lock:
                    reply.update(await self._apply(message))
            elif message["op"] == "metrics":
                text = await asyncio.to_thread(generate_latest, self.metrics.registry)
                reply["text"] = text.decode()
            else:
                raise ValueError(f"unknown command {message['op']!r}")
        except RecshipError as error:
            reply = {"id": message["id"], "ok": False, "kind": type(error).__name__}
            reply["error"] = str(error)
        except Exception as error:  # a bug: answer it rather than leave the supervisor waiting
            logger.error("worker %d: command %s failed", self.index, message["op"], exc_info=True)
            reply = {"id": message["id"], "ok": False, "kind": "RecshipError"}
            reply["error"] = f"{type(error).__name__}: {error}"
        self._reply(reply)

    async def _apply(self, message: dict[str, Any]) -> dict[str, Any]:
        op = message["op"]
        if op == "load":
            self.manager.follow([message["bundle"]])
            info = await self.manager.load_version(message["bundle"], message["version"])
            return {
                "state": info.state.name,
                "reason": info.failure_reason,
                "replicas": info.replicas,
                "devices": list(info.devices),
            }
        if op == "unload":
            await self.manager.unload_version(message["bundle"], message["version"])
        elif op == "view":
            for name, view in message["bundles"].items():
                self.manager.follow([name])
                labels = {label: int(v) for label, v in view["labels"].items()}
                self.manager.set_view(name, view["default"], labels)
        elif op == "serve" and not self._serving:
            if self.config.backend_dir is not None:  # behind the native front end
                socket_path = backend_socket(self.config.backend_dir, self.index)
                socket_path.unlink(missing_ok=True)  # a dead predecessor's
                address = f"unix:{socket_path}"
                bind(self.grpc_server, address, None)
            else:
                credentials = None if self.config.tls is None else self.config.tls.credentials()
                address = tcp_address(self.config.host, self.config.port)
                bind(self.grpc_server, address, credentials)
            await self.grpc_server.start()
            self._serving = True
            self._health_changed()
            logger.info("worker %d (pid %d) serving on %s", self.index, os.getpid(), address)
        return {}

    def _reply(self, reply: dict[str, Any]) -> None:
        assert self._writer is not None
        self._writer.write(json.dumps(reply).encode() + b"\n")

    def _health_changed(self) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if self._serving and self.manager.ready
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )

        async def update() -> None:
            for service in ("", RECOMMENDER_SERVICE):
                await self.health.set(service, status)

        task = asyncio.get_running_loop().create_task(update())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class _WorkerField(logging.Filter):
    """Adds `worker: N` to every log record, so the supervisor's stderr tells them apart."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.index
        return True


def main() -> None:
    """The worker's entry point (`python -m recship.runtime.worker`, started by the fleet)."""
    line = bytearray()
    while not line.endswith(b"\n"):  # unbuffered: the control reader gets every byte after it
        byte = os.read(0, 1)
        if not byte:
            sys.exit("recship worker: no configuration on stdin (started by `serve --workers`)")
        line += byte
    config, index, log_level = pickle.loads(base64.b64decode(line))
    # Replies go to the original stdout; fd 1 now points at stderr, so that nothing a library
    # prints can be read as a reply.
    protocol_fd = os.dup(1)
    os.dup2(2, 1)
    configure_logging(log_level)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_WorkerField(index))
    asyncio.run(_run(config, index, protocol_fd))


async def _run(config: ServerConfig, index: int, protocol_fd: int) -> None:
    """Builds the worker on the running loop (gRPC's aio server binds to it) and runs it."""
    await Worker(config, index).run(protocol_fd)


if __name__ == "__main__":
    main()
