"""Version switches under a memory budget (`ServerConfig.memory_budget_bytes`).

The session bundle's manifest estimates ~0.37 MB per version (`estimated_bytes`: host bytes
once plus device bytes per replica). With a budget that holds two versions the switch loads
the new one beside the old; with a budget that holds one, a 2-replica server swaps replica by
replica without a failed request, and a 1-replica server goes through a short unavailable
window that is logged, measured and ends (with the old version back) even when the new
version fails its self-test. Clients call Recommend throughout.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from recship.base.errors import RecshipError, Unavailable
from recship.bundle.manifest import read_manifest
from recship.runtime.client import Query, RecshipClient
from recship.runtime.policy import VersionState, estimated_bytes

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# tests/runtime/conftest.py, loaded by tests/integration/conftest.py under this name.
BUNDLE = "movies"
CLIENTS = 4


@dataclass
class Load:
    """Closed-loop Recommend callers; counts answers by version and errors by type."""

    target: str
    make_user: Callable[[int], dict[str, int]]
    served: dict[int, int] = field(default_factory=dict)
    errors: list[RecshipError] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(CLIENTS)]
        for thread in self.threads:
            thread.start()

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)

    def _run(self, worker: int) -> None:
        with RecshipClient(self.target, timeout=30) as client:
            n = 0
            while not self.stop.is_set():
                query = Query(self.make_user((worker * 37 + n) % 300, 0.5))
                n += 1
                try:
                    response = client.recommend(BUNDLE, [query], retrieve_k=20, top_n=5)
                except RecshipError as error:
                    with self.lock:
                        self.errors.append(error)
                    continue
                with self.lock:
                    version = response.served_by.version
                    self.served[version] = self.served.get(version, 0) + 1


@dataclass
class Watch:
    """Records, at every manager change, the serving replicas and the loaded versions."""

    serving: list[int] = field(default_factory=list)
    loaded: list[tuple[int, ...]] = field(default_factory=list)
    replicas: list[int] = field(default_factory=list)

    def until_now(self) -> Watch:
        """A copy of what was recorded so far (server shutdown unloads everything later)."""
        return Watch(list(self.serving), list(self.loaded), list(self.replicas))


def start_server(server_factory: Any, repo: Path, **config: Any) -> tuple[Any, Watch]:
    server = server_factory(repo, poll_interval_s=0.0, **config)
    server.wait_ready()
    manager = server.server.manager
    watch = Watch()

    def record() -> None:
        watch.serving.append(manager.serving_replicas(BUNDLE))
        (bundle,) = manager.status(BUNDLE)
        watch.loaded.append(tuple(v.version for v in bundle.versions if v.replicas > 0))
        watch.replicas.append(sum(v.replicas for v in bundle.versions))

    async def install() -> None:
        manager.add_listener(record)

    server.call(install())
    return server, watch


def one_version_bytes(repo: Path, replicas: int) -> int:
    manifest = read_manifest(repo / BUNDLE / "1" / "MANIFEST.json")
    return estimated_bytes(manifest, replicas)


def default_version(client) -> int:
    return next(v.version for v in client.bundle_status(BUNDLE).versions if v.is_default)


def copy_repo(bundle_repo: Path, tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    shutil.copytree(bundle_repo / BUNDLE / "1", repo / BUNDLE / "1")
    return repo


def test_budget_for_two_versions_loads_beside(
    bundle_repo: Path, tmp_path: Path, server_factory, publish_copy
) -> None:
    repo = copy_repo(bundle_repo, tmp_path)
    budget = 2 * one_version_bytes(repo, 1) + 1
    server, watch = start_server(
        server_factory, repo, memory_budget_bytes=budget, metrics_port=None
    )
    try:
        with server.admin(120) as admin:
            publish_copy(repo)
            admin.refresh_repository()
            assert default_version(admin) == 2
            watch = watch.until_now()
    finally:
        server.stop()
    assert (1, 2) in {tuple(sorted(loaded)) for loaded in watch.loaded}
    assert min(watch.serving) >= 1


def test_budget_for_one_version_switches_replica_by_replica(
    bundle_repo: Path, tmp_path: Path, server_factory, publish_copy, make_user
) -> None:
    repo = copy_repo(bundle_repo, tmp_path)
    budget = one_version_bytes(repo, 2) + 1  # two full versions do not fit
    server, watch = start_server(
        server_factory, repo, memory_budget_bytes=budget, replicas=2, metrics_port=None
    )
    load = Load(server.target, make_user)
    try:
        with server.admin(120) as admin:
            admin.wait_until_serving(60)
            load.start()
            load.stop.wait(0.5)
            publish_copy(repo)
            admin.refresh_repository()
            load.stop.wait(0.5)
            status = {v.version: v for v in admin.bundle_status(BUNDLE).versions}
            watch = watch.until_now()
    finally:
        load.finish()
        server.stop()
    print(f"\n2 replicas: answers by version {load.served}, serving replicas {watch.serving}")
    assert load.errors == []
    assert load.served.get(1, 0) > 0 and load.served.get(2, 0) > 0
    assert status[2].is_default and status[2].replicas == 2
    assert status[1].state == VersionState.UNLOADED.value
    # Both versions were loaded at once, but never more than 2 replicas in all; never zero
    # replicas serving.
    assert (1, 2) in {tuple(sorted(loaded)) for loaded in watch.loaded}
    assert max(watch.replicas) <= 2
    assert watch.serving and min(watch.serving) >= 1
    assert 1 in watch.serving  # capacity did degrade to one replica during the swap


def test_one_replica_switch_has_a_bounded_reported_window(
    bundle_repo: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    server_factory,
    publish_copy,
    make_user,
) -> None:
    repo = copy_repo(bundle_repo, tmp_path)
    budget = one_version_bytes(repo, 1) + 1
    server, watch = start_server(server_factory, repo, memory_budget_bytes=budget)
    load = Load(server.target, make_user)
    caplog.set_level(logging.INFO, logger="recship.runtime.manager")
    try:
        with server.admin(120) as admin:
            admin.wait_until_serving(60)
            load.start()
            load.stop.wait(0.3)
            publish_copy(repo)
            started = time.perf_counter()
            admin.refresh_repository()
            first_switch_s = time.perf_counter() - started
            assert default_version(admin) == 2
            load.stop.wait(0.3)
            # v3 fails its self-test during the window: v2 is reloaded and serves again.
            publish_copy(repo, golden_offset=1.0)
            admin.refresh_repository()
            status = {v.version: v for v in admin.bundle_status(BUNDLE).versions}
            load.stop.wait(0.3)
            url = f"http://127.0.0.1:{server.metrics_port}/metrics"
            with urllib.request.urlopen(url, timeout=10) as page:
                metrics = page.read().decode()
            watch = watch.until_now()
    finally:
        load.finish()
        server.stop()
    lengths = [round(r.unavailable_s, 3) for r in caplog.records if hasattr(r, "unavailable_s")]
    print(
        f"\n1 replica: answers by version {load.served}, UNAVAILABLE {len(load.errors)}, "
        f"windows {lengths} s"
    )
    assert status[3].state == VersionState.FAILED.value
    assert "self-test" in status[3].failure_reason
    assert status[2].is_default and status[2].state == VersionState.READY.value
    assert all(isinstance(error, Unavailable) for error in load.errors), load.errors[:3]
    assert load.served.get(1, 0) > 0 and load.served.get(2, 0) > 0
    assert set(load.served) <= {1, 2}
    assert all(len(loaded) <= 1 for loaded in watch.loaded)  # never two versions at once

    windows = [r for r in caplog.records if "unavailable for" in r.getMessage()]
    assert len(windows) == 2
    assert all(r.levelno == logging.WARNING for r in windows)
    assert 0 < windows[0].unavailable_s <= first_switch_s  # type: ignore[attr-defined]
    warned = [r for r in caplog.records if "unloading it first" in r.getMessage()]
    assert len(warned) == 2
    line = next(
        m for m in metrics.splitlines() if m.startswith("recship_switch_unavailable_seconds_count")
    )
    assert line.endswith(" 2.0")
