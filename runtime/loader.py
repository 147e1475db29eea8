"""The contract between the version manager and what it manages: a loader and its servables.

In TF Serving's terms (`core/loader.h`): the manager decides *when*; a `Loader` turns a
validated version into a `LoadedVersion` on this host's devices. The real ones are
`recship.runtime.servable.ServableLoader` and `Servable`; the manager's unit tests use fakes
that keep the same contract and load nothing.

Contracts:

- `Loader.replicas` is a pure function of the manifest and the host: it never changes while
  the process runs, so the manager may size a switch before loading.
- `Loader.load` and `LoadedVersion.load_replica` block (seconds of disk, model and self-test
  work): the manager calls them on worker threads (`asyncio.to_thread`), never on the event
  loop. They raise `RecshipError`s for bad bundles; anything else is a bug, and the version is
  FAILED either way.
- Every other `LoadedVersion` method runs on the event loop that serves requests.
- Memory: a version's estimate is `recship.runtime.policy.estimated_bytes(manifest, replicas)`,
  an upper bound fixed by the manifest that never grows while it is loaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from recship.bundle.store import ValidatedVersion
from recship.protos.v1 import manifest_pb2


class LoadedVersion(Protocol):
    """What the manager needs of a loaded version (`recship.runtime.servable.Servable`)."""

    @property
    def replica_count(self) -> int:
        """Replicas taking new work now."""
        ...

    @property
    def devices(self) -> tuple[str, ...]:
        """Devices of every replica of the placement, replica after replica."""
        ...

    @property
    def free_slots(self) -> tuple[int, ...]:
        """Placement slots with no replica loaded, lowest first."""
        ...

    @property
    def swappable_replicas(self) -> int:
        """Replicas a switch within the memory budget can swap one at a time while this
        version serves; below 2 the switch unloads it first (`plan_switch`)."""
        ...

    @property
    def queued_rows(self) -> int:
        """Rows waiting in this version's batch queues."""
        ...

    def load_replica(self, slot: int) -> object:
        """Loads and self-tests the replica of placement slot `slot` (blocking)."""
        ...

    def add_replica(self, replica: object) -> None:
        """Puts a replica from `load_replica` into service."""
        ...

    async def retire_replica(self) -> int:
        """Takes the highest-numbered replica out of service once its queued work is done;
        returns its slot."""
        ...

    async def close(self) -> None:
        """Finishes queued work and frees every replica. Idempotent."""
        ...


class Loader(Protocol):
    """Turns validated versions into loaded ones on this host."""

    def replicas(self, manifest: manifest_pb2.BundleManifest) -> int:
        """The replicas a version gets here (its full placement)."""
        ...

    def load(self, version: ValidatedVersion, slots: Sequence[int] | None = None) -> LoadedVersion:
        """Loads the replicas `slots` of the placement (all when None) and self-tests them
        (blocking). Raises a `RecshipError` naming what is wrong with the version."""
        ...
