"""Zero-downtime upgrades under load: 16 clients call Recommend while versions come and go.

A live server (polling off, so the test decides when the repository is read) serves `movies/1`
while the test publishes v2 and v3 (each becomes the default), a v4 whose file is corrupted
after publishing (bad checksum at validation), a v5 whose golden outputs are shifted (fails
its self-test), and finally pins v2 back. Every Recommend must succeed and be served by a
version that was READY at some point during the call; p99 latency per switch window is
printed next to the steady state.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from recship.base.errors import RecshipError
from recship.protos.v1 import admin_pb2
from recship.runtime.client import Query, RecshipClient
from recship.runtime.policy import Pinned, policy_to_proto

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# tests/runtime/conftest.py, loaded by tests/integration/conftest.py under this name.
BUNDLE = "movies"
CLIENTS = 16
READY = admin_pb2.VERSION_STATE_READY
FAILED = admin_pb2.VERSION_STATE_FAILED


@dataclass
class Call:
    started: float
    ended: float
    version: int


@dataclass
class Load:
    """Closed-loop Recommend callers on threads, recording every outcome."""

    target: str
    make_user: Callable[[int], dict[str, int]]
    calls: list[Call] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, worker: int) -> None:
        with RecshipClient(self.target, timeout=30) as client:
            n = 0
            while not self.stop.is_set():
                user = Query(self.make_user((worker * 37 + n) % 300, 0.5))
                n += 1
                started = time.time()
                try:
                    response = client.recommend(BUNDLE, [user], retrieve_k=20, top_n=5)
                except RecshipError as error:
                    with self.lock:
                        self.errors.append(str(error))
                    continue
                ended = time.time()
                with self.lock:
                    self.calls.append(Call(started, ended, response.served_by.version))


@dataclass
class StatusWatch:
    """Polls ListBundles and records each version's READY intervals (wall clock)."""

    server: object  # the ServerThread
    intervals: dict[int, list[list[float]]] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        with self.server.admin(30) as client:  # type: ignore[attr-defined]
            while not self.stop.is_set():
                self.observe(client.bundle_status(BUNDLE), time.time())
                self.stop.wait(0.005)
            self.observe(client.bundle_status(BUNDLE), time.time())

    def observe(self, status: admin_pb2.BundleStatus, now: float) -> None:
        for version in status.versions:
            spans = self.intervals.setdefault(version.version, [])
            is_open = bool(spans) and spans[-1][1] == float("inf")
            if version.state == READY:
                ready_at = version.ready_at.ToNanoseconds() / 1e9
                if not is_open or spans[-1][0] != ready_at:
                    if is_open:
                        spans[-1][1] = now
                    spans.append([ready_at, float("inf")])
            elif is_open:
                spans[-1][1] = now

    def was_ready(self, version: int, started: float, ended: float) -> bool:
        return any(
            begin <= ended and started <= end for begin, end in self.intervals.get(version, [])
        )


def p99_ms(calls: list[Call]) -> float:
    if not calls:
        return float("nan")
    return float(np.percentile([(c.ended - c.started) * 1000 for c in calls], 99))


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_upgrades_under_load_never_fail_a_request(
    bundle_repo: Path, tmp_path: Path, server_factory, publish_copy, make_user
) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(bundle_repo / BUNDLE / "1", repo / BUNDLE / "1")
    server = server_factory(repo, poll_interval_s=0.0, metrics_port=None)
    threads: list[threading.Thread] = []
    load = Load(server.target, make_user)
    watch = StatusWatch(server)
    windows: list[tuple[str, float, float]] = []
    try:
        server.wait_ready()
        admin = server.admin(120)
        admin.wait_until_serving(60)
        threads = [threading.Thread(target=load.run, args=(i,)) for i in range(CLIENTS)]
        threads.append(threading.Thread(target=watch.run))
        for thread in threads:
            thread.start()

        def step(name: str, action) -> admin_pb2.BundleStatus:
            load.stop.wait(1.0)  # a steady stretch of traffic between switches
            started = time.time()
            action()
            status = admin.bundle_status(BUNDLE)
            windows.append((name, started, time.time()))
            return status

        def versions(status: admin_pb2.BundleStatus) -> dict[int, admin_pb2.VersionStatus]:
            return {v.version: v for v in status.versions}

        def default(status: admin_pb2.BundleStatus) -> int:
            return next(v.version for v in status.versions if v.is_default)

        for expected in (2, 3):
            status = step(
                f"switch to v{expected}",
                lambda: (publish_copy(repo), admin.refresh_repository()),
            )
            assert default(status) == expected
            assert versions(status)[expected - 1].state == admin_pb2.VERSION_STATE_UNLOADED

        def publish_corrupt() -> None:
            version = publish_copy(repo)
            flip_a_byte(repo / BUNDLE / str(version) / "ranker.pt")
            admin.refresh_repository()

        status = step("corrupt v4", publish_corrupt)
        assert versions(status)[4].state == FAILED
        assert "ranker.pt" in versions(status)[4].failure_reason
        assert default(status) == 3

        status = step(
            "v5 fails self-test",
            lambda: (
                publish_copy(repo, golden_offset=1.0),
                admin.refresh_repository(),
            ),
        )
        assert versions(status)[5].state == FAILED
        assert "self-test" in versions(status)[5].failure_reason
        assert default(status) == 3

        status = step(
            "pin back to v2",
            lambda: admin.set_version_policy(BUNDLE, policy_to_proto(Pinned((2,)))),
        )
        assert default(status) == 2
        assert versions(status)[3].state == admin_pb2.VERSION_STATE_UNLOADED
        load.stop.wait(1.0)
        # A failed version is not retried by later scans.
        admin.refresh_repository()
        assert versions(admin.bundle_status(BUNDLE))[5].state == FAILED
        admin.close()
    finally:
        load.stop.set()
        watch.stop.set()
        for thread in threads:
            thread.join(60)
        server.stop()

    assert load.errors == []
    assert len(load.calls) > 100
    served = {call.version for call in load.calls}
    assert served <= {1, 2, 3} and {1, 2, 3} <= served
    stale = [c for c in load.calls if not watch.was_ready(c.version, c.started, c.ended)]
    assert stale == []

    in_window = set()
    print(f"\n{'window':<22} {'calls':>6} {'p99 ms':>8}")
    for name, begin, end in windows:
        calls = [c for c in load.calls if c.ended >= begin and c.started <= end]
        in_window.update(id(c) for c in calls)
        print(f"{name:<22} {len(calls):>6} {p99_ms(calls):>8.1f}")
    steady = [c for c in load.calls if id(c) not in in_window]
    print(f"{'steady state':<22} {len(steady):>6} {p99_ms(steady):>8.1f}")
