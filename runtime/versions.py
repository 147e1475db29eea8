"""The version manager's bookkeeping: one entry per bundle and version, and their snapshots.

`VersionEntry` and `BundleEntry` are mutable and live on the event loop (the manager is their
only writer); `VersionInfo` and `BundleInfo` are frozen snapshots for the admin API, the CLI
and tests. A lease (`VersionEntry.lease` / `release`) marks a request in flight on a version;
draining waits for `idle`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from recship.protos.v1 import manifest_pb2
from recship.runtime.policy import VersionPolicy, VersionState


@dataclass
class VersionEntry:
    """Mutable bookkeeping of one version (event loop only).

    Attributes:
        servable: the loaded version (`recship.runtime.loader.LoadedVersion`) while loaded.
        leases: requests holding it now; `idle` is set when there are none.
    """

    version: int
    state: VersionState = VersionState.NEW
    servable: Any = None
    manifest: manifest_pb2.BundleManifest | None = None
    failure_reason: str = ""
    ready_at: float | None = None
    leases: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.idle.set()

    def lease(self) -> None:
        """One more request holds this version."""
        self.leases += 1
        self.idle.clear()

    def release(self) -> None:
        """A request that held this version finished."""
        self.leases -= 1
        if self.leases == 0:
            self.idle.set()


@dataclass
class BundleEntry:
    """Mutable bookkeeping of one bundle: its policy, versions, labels and default."""

    name: str
    policy: VersionPolicy
    versions: dict[int, VersionEntry] = field(default_factory=dict)
    labels: dict[str, int] = field(default_factory=dict)
    default: int | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def states(self) -> dict[int, VersionState]:
        return {number: entry.state for number, entry in self.versions.items()}


@dataclass(frozen=True)
class VersionInfo:
    """A snapshot of one version's status (what `BundleAdmin.ListBundles` reports).

    Attributes:
        version: version number.
        state: lifecycle state.
        failure_reason: why it is FAILED ("" otherwise).
        devices: devices its replicas run on (empty unless loaded).
        replicas: replicas serving it (0 unless loaded).
        labels: labels pointing at it.
        ready_at: wall-clock time (seconds since the epoch) it became READY, or None.
        manifest: its manifest when it could be read, else None.
        is_default: whether requests naming no version or label go to it.
    """

    version: int
    state: VersionState
    failure_reason: str
    devices: tuple[str, ...]
    replicas: int
    labels: tuple[str, ...]
    ready_at: float | None
    manifest: manifest_pb2.BundleManifest | None
    is_default: bool


@dataclass(frozen=True)
class BundleInfo:
    """A snapshot of one bundle: its policy and every version seen, newest first."""

    name: str
    policy: VersionPolicy
    versions: tuple[VersionInfo, ...]
