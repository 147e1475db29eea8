"""VersionManager executing its plans over a fake store and loader: no training, no disk.

Leases and draining, FAILED versions that never serve, latest falling back, labels, the memory
budget's switch modes (replica by replica, unload first) and their failure paths. Tests wait on
the manager's own change notifications, never on sleeps.

The fakes (like TF Serving's `test_util/fake_loader.h`): `FakeStore` publishes versions in
memory (a manifest with a resource estimate, optionally corrupt); `FakeLoader` loads
`FakeServable`s that keep `recship.runtime.loader`'s contract: loads block (on worker threads)
and may be held on an event or made to fail. Nothing is trained, written or computed.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from recship.base.errors import FailedPrecondition, InvalidInput, NotFound, Unavailable
from recship.bundle.layout import BundleRef
from recship.bundle.store import ValidatedVersion
from recship.protos.v1 import manifest_pb2
from recship.runtime.manager import VersionManager
from recship.runtime.metrics import ServerMetrics
from recship.runtime.policy import LatestN, Pinned, VersionState


@dataclass
class FakeStore:
    """An in-memory repository: `publish` versions, `corrupt` some."""

    repo: Path = Path("/fake-repo")
    versions: dict[str, dict[int, manifest_pb2.BundleManifest]] = field(default_factory=dict)
    corrupt: set[tuple[str, int]] = field(default_factory=set)

    def publish(
        self, name: str, version: int, *, host_bytes: int = 100, device_bytes: int = 50
    ) -> None:
        manifest = manifest_pb2.BundleManifest(name=name, version=version)
        manifest.resources.host_bytes = host_bytes
        manifest.resources.device_bytes.append(device_bytes)
        self.versions.setdefault(name, {})[version] = manifest

    def list_bundles(self) -> list[str]:
        return sorted(self.versions)

    def list_versions(self, name: str) -> list[int]:
        if name not in self.versions:
            raise NotFound(f"no bundle {name!r} in repository {self.repo}")
        return sorted(self.versions[name])

    def ref(self, name: str, version: int) -> BundleRef:
        if version not in self.list_versions(name):
            raise NotFound(f"bundle {name!r} has no published version {version}")
        return BundleRef(name, version, self.repo / name / str(version))

    def validate(self, name: str, version: int, *, checksums: bool = True) -> ValidatedVersion:
        ref = self.ref(name, version)
        if (name, version) in self.corrupt:
            raise InvalidInput(f"bundle {ref} failed its file check: items.faiss: sha256 differs")
        return ValidatedVersion(ref=ref, manifest=self.versions[name][version])


class FakeServable:
    """A loaded version: replicas are slot numbers, work is counted, nothing is computed."""

    def __init__(self, loader: FakeLoader, ref: BundleRef, slots: Sequence[int]) -> None:
        self.loader = loader
        self.name = ref.name
        self.version = ref.version
        self.release_id = f"{ref.name}-{ref.version}"
        self.slots = sorted(slots)
        self.closed = False
        self.queued_rows = 0

    @property
    def replica_count(self) -> int:
        return len(self.slots)

    @property
    def devices(self) -> tuple[str, ...]:
        return ("cpu",) * self.loader.replica_slots

    @property
    def free_slots(self) -> tuple[int, ...]:
        return tuple(s for s in range(self.loader.replica_slots) if s not in self.slots)

    @property
    def swappable_replicas(self) -> int:
        return self.replica_count

    def load_replica(self, slot: int) -> int:
        self.loader._loading(self.version, replica=True)
        if slot not in self.free_slots:
            raise ValueError(f"slot {slot} is not free")
        return slot

    def add_replica(self, replica: object) -> None:
        assert isinstance(replica, int)
        self.slots = sorted([*self.slots, replica])

    async def retire_replica(self) -> int:
        if len(self.slots) < 2:
            raise ValueError("cannot retire the last replica")
        return self.slots.pop()

    async def close(self) -> None:
        self.closed = True
        self.slots = []


@dataclass
class FakeLoader:
    """Loads `FakeServable`s with `replica_slots` replicas each.

    Attributes:
        fail: versions whose load (or any replica load) fails like a failing self-test.
        fail_replicas: versions whose *additional* replica loads fail (the first one loads).
        hold: when set for a version, its loads block until the event is set (a slow load).
        loads: every (version, slots) loaded, in order.
    """

    replica_slots: int = 1
    fail: set[int] = field(default_factory=set)
    fail_replicas: set[int] = field(default_factory=set)
    hold: dict[int, threading.Event] = field(default_factory=dict)
    loads: list[tuple[int, tuple[int, ...]]] = field(default_factory=list)

    def replicas(self, manifest: manifest_pb2.BundleManifest) -> int:
        return self.replica_slots

    def _loading(self, version: int, *, replica: bool = False) -> None:
        if version in self.hold:
            self.hold[version].wait(timeout=30)
        if version in self.fail or (replica and version in self.fail_replicas):
            raise InvalidInput(f"version {version} failed its golden self-test on cpu")

    def load(self, version: ValidatedVersion, slots: Sequence[int] | None = None) -> FakeServable:
        chosen = tuple(range(self.replica_slots)) if slots is None else tuple(slots)
        self._loading(version.ref.version)
        self.loads.append((version.ref.version, chosen))
        return FakeServable(self, version.ref, chosen)


READY, FAILED, UNLOADED, DRAINING, LOADING = (
    VersionState.READY,
    VersionState.FAILED,
    VersionState.UNLOADED,
    VersionState.DRAINING,
    VersionState.LOADING,
)
BUNDLE = "movies"


def run(coroutine: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coroutine, timeout=30))


class Recorder:
    """Snapshots (states, default, serving replicas) after every manager change."""

    def __init__(self, manager: VersionManager) -> None:
        self.manager = manager
        self.history: list[tuple[dict[int, VersionState], int | None, int]] = []
        self.changed = asyncio.Event()
        manager.add_listener(self._record)

    def _record(self) -> None:
        if BUNDLE not in self.manager.bundle_names():
            return
        info = self.manager.status(BUNDLE)[0]
        states = {v.version: v.state for v in info.versions}
        default = next((v.version for v in info.versions if v.is_default), None)
        self.history.append((states, default, self.manager.serving_replicas(BUNDLE)))
        self.changed.set()

    async def until(self, predicate: Any) -> None:
        while not predicate():
            self.changed.clear()
            await self.changed.wait()


def states(manager: VersionManager) -> dict[int, VersionState]:
    return {v.version: v.state for v in manager.status(BUNDLE)[0].versions}


def default(manager: VersionManager) -> int | None:
    return next((v.version for v in manager.status(BUNDLE)[0].versions if v.is_default), None)


def make(
    versions: tuple[int, ...] = (1,),
    *,
    replicas: int = 1,
    budget: int | None = None,
    policy: Any = None,
) -> tuple[FakeStore, FakeLoader, VersionManager]:
    store = FakeStore()
    for version in versions:
        store.publish(BUNDLE, version)
    loader = FakeLoader(replica_slots=replicas)
    manager = VersionManager(
        store,  # type: ignore[arg-type]
        loader,
        ServerMetrics(),
        policies={BUNDLE: policy} if policy else None,
        memory_budget_bytes=budget,
    )
    return store, loader, manager


def test_start_loads_the_newest_and_leases_it() -> None:
    async def main() -> None:
        _, loader, manager = make((1, 2))
        await manager.start()
        assert states(manager) == {1: VersionState.NEW, 2: READY}
        assert manager.ready and default(manager) == 2
        async with manager.acquire(BUNDLE) as servable:
            assert servable.version == 2
        assert loader.loads == [(2, (0,))]
        with pytest.raises(NotFound, match="unknown bundle 'books'"):
            async with manager.acquire("books"):
                pass
        await manager.close()
        assert states(manager)[2] is UNLOADED

    run(main())


def test_new_version_switches_and_the_old_drains_after_its_leases() -> None:
    async def main() -> None:
        store, _, manager = make((1,))
        await manager.start()
        recorder = Recorder(manager)
        async with manager.acquire(BUNDLE) as held:
            store.publish(BUNDLE, 2)
            refresh = asyncio.create_task(manager.refresh())
            await recorder.until(lambda: states(manager).get(1) is DRAINING)
            # The old version waits for the lease; new requests already get the new one.
            assert default(manager) == 2
            async with manager.acquire(BUNDLE) as fresh:
                assert fresh.version == 2
            with pytest.raises(NotFound, match="DRAINING"):
                async with manager.acquire(BUNDLE, version=1):
                    pass
            assert not refresh.done() and not held.closed
        await refresh
        assert states(manager) == {1: UNLOADED, 2: READY}
        assert held.closed
        # Availability never dropped: some version was default at every recorded step.
        assert all(step_default is not None for _, step_default, _ in recorder.history)
        await manager.close()

    run(main())


def test_a_version_still_loading_is_unavailable_by_number_old_one_serves() -> None:
    async def main() -> None:
        store, loader, manager = make((1,))
        await manager.start()
        recorder = Recorder(manager)
        loader.hold[2] = threading.Event()
        store.publish(BUNDLE, 2)
        refresh = asyncio.create_task(manager.refresh())
        await recorder.until(lambda: states(manager).get(2) is LOADING)
        with pytest.raises(Unavailable, match="LOADING"):
            async with manager.acquire(BUNDLE, version=2):
                pass
        async with manager.acquire(BUNDLE) as servable:
            assert servable.version == 1
        loader.hold[2].set()
        await refresh
        assert default(manager) == 2
        await manager.close()

    run(main())


@pytest.mark.parametrize("how", ["corrupt files", "failing self-test"])
def test_failed_version_never_serves_and_latest_falls_back(how: str) -> None:
    async def main() -> None:
        store, loader, manager = make((1,))
        await manager.start()
        store.publish(BUNDLE, 2)
        if how == "corrupt files":
            store.corrupt.add((BUNDLE, 2))
        else:
            loader.fail.add(2)
        await manager.refresh()
        info = {v.version: v for v in manager.status(BUNDLE)[0].versions}
        assert info[2].state is FAILED and info[1].state is READY
        assert ("sha256" if how == "corrupt files" else "self-test") in info[2].failure_reason
        assert default(manager) == 1
        # Never retried: another refresh leaves it FAILED and loads nothing new.
        loads = list(loader.loads)
        await manager.refresh()
        assert states(manager)[2] is FAILED and loader.loads == loads
        # A newer good version still takes over.
        store.publish(BUNDLE, 3)
        await manager.refresh()
        assert states(manager) == {1: UNLOADED, 2: FAILED, 3: READY}
        await manager.close()

    run(main())


def test_latest_n_pins_and_labels() -> None:
    async def main() -> None:
        _, _, manager = make((1, 2, 3), policy=LatestN(2))
        await manager.start()
        assert states(manager) == {1: VersionState.NEW, 2: READY, 3: READY}
        manager.set_label(BUNDLE, "stable", 2)
        async with manager.acquire(BUNDLE, label="stable") as servable:
            assert servable.version == 2
        with pytest.raises(FailedPrecondition, match="not loaded"):
            manager.set_label(BUNDLE, "old", 1)
        await manager.set_policy(BUNDLE, Pinned((3,)))
        assert states(manager)[2] is UNLOADED
        with pytest.raises(NotFound, match="no label 'stable'"):
            async with manager.acquire(BUNDLE, label="stable"):
                pass
        await manager.close()

    run(main())


def test_budget_for_one_version_switches_replica_by_replica() -> None:
    async def main() -> None:
        # Each version: 100 host + 2 x 50 device = 200 bytes; the budget holds one and a bit.
        store, loader, manager = make((1,), replicas=2, budget=300)
        await manager.start()
        recorder = Recorder(manager)
        store.publish(BUNDLE, 2)
        await manager.refresh()
        assert states(manager) == {1: UNLOADED, 2: READY}
        info = manager.status(BUNDLE)[0].versions[0]
        assert (info.version, info.replicas) == (2, 2)
        # Capacity dipped but never reached zero, and the new version loaded slot by slot.
        assert min(serving for _, _, serving in recorder.history) == 1
        assert [slots for version, slots in loader.loads if version == 2] == [(1,)]
        await manager.close()

    run(main())


def test_replica_by_replica_switch_that_fails_restores_the_old_version() -> None:
    async def main() -> None:
        store, loader, manager = make((1,), replicas=2, budget=300)
        await manager.start()
        loader.fail.add(2)
        store.publish(BUNDLE, 2)
        await manager.refresh()
        assert states(manager) == {1: READY, 2: FAILED}
        assert manager.serving_replicas(BUNDLE) == 2
        async with manager.acquire(BUNDLE) as servable:
            assert servable.version == 1
        await manager.close()

    run(main())


def test_budget_with_one_replica_unloads_first_within_a_measured_window() -> None:
    async def main() -> None:
        store, _, manager = make((1,), replicas=1, budget=200)
        await manager.start()
        recorder = Recorder(manager)
        store.publish(BUNDLE, 2)
        await manager.refresh()
        assert states(manager) == {1: UNLOADED, 2: READY}
        assert default(manager) == 2
        # The window: at some step no version was default (requests got UNAVAILABLE).
        assert any(step_default is None for _, step_default, _ in recorder.history)
        window = manager.metrics.registry.get_sample_value(
            "recship_switch_unavailable_seconds_count", {"bundle": BUNDLE}
        )
        assert window == 1
        await manager.close()

    run(main())


def test_unload_first_switch_that_fails_reloads_the_old_version() -> None:
    async def main() -> None:
        store, loader, manager = make((1,), replicas=1, budget=200)
        await manager.start()
        loader.fail.add(2)
        store.publish(BUNDLE, 2)
        await manager.refresh()
        assert states(manager) == {1: READY, 2: FAILED}
        assert default(manager) == 1
        assert [version for version, _ in loader.loads] == [1, 1]
        await manager.close()

    run(main())


def test_a_version_that_cannot_fit_fails_and_an_admin_load_is_refused() -> None:
    async def main() -> None:
        store, _, manager = make((1,), replicas=1, budget=200)
        await manager.start()
        store.publish(BUNDLE, 2, host_bytes=1000)
        await manager.refresh()
        info = {v.version: v for v in manager.status(BUNDLE)[0].versions}
        assert info[2].state is FAILED
        assert "does not fit even after unloading" in info[2].failure_reason
        assert info[1].state is READY
        # An operator's explicit load of another version goes beside or not at all.
        store.publish(BUNDLE, 3)
        with pytest.raises(FailedPrecondition, match="unload a version first"):
            await manager.load_version(BUNDLE, 3)
        assert states(manager)[3] is VersionState.NEW
        await manager.close()

    run(main())
