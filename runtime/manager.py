"""VersionManager: owns the lifecycle of every bundle version on one server.

In TF Serving's terms this is the *manager*: `BundleStore` is the source (which versions are
published), `recship.runtime.policy.decide` is the pure policy (what to load and unload next),
`load_servable` is the loader, and `acquire` hands out *leases*: a request holds its version's
servable for its whole life (query tower, index and ranker of one release), and a version that
is being unloaded first stops taking new leases (DRAINING), waits for the leases it gave out,
then releases its memory.

Reconciling a bundle repeats "ask `decide`, carry out the decision" until the decision is empty:
new versions load beside the serving one, the default switches atomically once a wanted version
is READY, and only then is the old one drained and unloaded. A version that fails validation,
loading or its golden self-test is marked FAILED with the reason and never retried, and the
previous version keeps serving (`latest` falls back to the newest version that did not fail).

Memory budget (`memory_budget_bytes`, None = unlimited): before a version loads, the manifests'
estimates (`estimated_bytes`: host bytes once plus device bytes per replica) of every loaded
version of every bundle plus the new one are compared with the budget. When they do not fit,
the versions the new one replaces (those the policy unloads once it is READY) make room:
replaced versions other than the default are unloaded first; then the default is swapped

- replica by replica when it has >= 2 replicas: one old replica is retired (its queued work
  finishes), one new replica loads and self-tests in its slot, and so on; the default flips to
  the new version as soon as it has at least as many replicas as the old one has left, the old
  one then drains and unloads, and the new one grows to its full count. Serving capacity dips
  (never below one replica) but never reaches zero, and each request, holding a lease on one
  servable, is served end to end by one version. If the new version fails before the flip,
  the old one's replicas are reloaded;
- with one replica, by unloading the old version first: a WARNING is logged, requests naming
  no version get UNAVAILABLE, and the window (unload + load + self-test, or + reload of the
  old version when the new one fails) is logged and recorded in
  `recship_switch_unavailable_seconds`.

A version that does not fit even after the versions it replaces go is FAILED with the numbers.

Threading: every method runs on the server's event loop; loading and validation (seconds of
disk and model work) run on worker threads through `asyncio.to_thread`, so the loop keeps
answering (health says NOT_SERVING meanwhile). Reconciles of one bundle are serialised by a lock.

Example::

    manager = VersionManager(BundleStore(repo), LoaderConfig(), metrics)
    await manager.start()
    async with manager.acquire("movies") as servable:
        scores, ids = await servable.retrieve(block, k=10, deadline=None)
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import time
import weakref
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field

from recship.base.errors import (
    FailedPrecondition,
    InvalidInput,
    NotFound,
    RecshipError,
    Unavailable,
)
from recship.bundle.store import BundleStore, ValidatedVersion
from recship.protos.v1 import manifest_pb2
from recship.runtime.metrics import ServerMetrics
from recship.runtime.policy import (
    Latest,
    VersionPolicy,
    VersionState,
    check_label,
    decide,
    resolve,
)
from recship.runtime.servable import (
    LoaderConfig,
    Servable,
    estimated_bytes,
    load_servable,
    placement,
)

logger = logging.getLogger(__name__)


def _release_free_heap() -> None:
    """Returns the C heap's free pages to the OS (glibc `malloc_trim`), a no-op elsewhere.

    Freed tensors, FAISS arrays and the executor thread's arena otherwise stay in the process's
    resident set, so RSS would not show that an unloaded version's memory was released.
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 - glibc only; musl and macOS lack it
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _load_libc()


def _freeze_long_lived() -> None:
    """Collects garbage, then moves every live object out of the cycle collector's reach.

    A loaded version (and torch itself) leaves hundreds of thousands of long-lived objects in
    the oldest generation, and every full collection walks all of them: ~80-95 ms pauses of
    the event loop, about one a second under load, measured as the whole p99 tail of
    `recship bench`. Frozen, they are skipped; garbage made by requests is still collected.
    The collection before freezing walks only what is not frozen yet (~0.1 s the first time).
    """
    gc.collect()
    gc.freeze()


@dataclass
class _Version:
    """Mutable bookkeeping of one version (event loop only)."""

    version: int
    state: VersionState = VersionState.NEW
    servable: Servable | None = None
    manifest: manifest_pb2.BundleManifest | None = None
    failure_reason: str = ""
    ready_at: float | None = None
    leases: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.idle.set()


@dataclass
class _Bundle:
    name: str
    policy: VersionPolicy
    versions: dict[int, _Version] = field(default_factory=dict)
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


class VersionManager:
    """Loads, serves, drains and unloads the versions of the bundles of one repository.

    Args:
        store: the repository.
        config: placement and batching of every servable.
        metrics: version states and default versions are recorded here, and the servables'
            batch metrics.
        bundles: the bundles to serve; empty serves every bundle in the repository.
        policies: version policy per bundle; `latest` for the others.
        on_change: called on the event loop after every state change (e.g. to update health).
        memory_budget_bytes: most memory all loaded versions may take by their manifests'
            estimates (`recship.runtime.servable.estimated_bytes`), or None for no limit.
    """

    def __init__(
        self,
        store: BundleStore,
        config: LoaderConfig,
        metrics: ServerMetrics,
        *,
        bundles: Sequence[str] = (),
        policies: Mapping[str, VersionPolicy] | None = None,
        on_change: Callable[[], None] | None = None,
        memory_budget_bytes: int | None = None,
    ) -> None:
        if memory_budget_bytes is not None and memory_budget_bytes <= 0:
            raise InvalidInput(f"memory_budget_bytes must be > 0, got {memory_budget_bytes}")
        self.store = store
        self.config = config
        self.metrics = metrics
        self._requested = tuple(bundles)
        self._policies = dict(policies or {})
        self.memory_budget_bytes = memory_budget_bytes
        self._listeners: list[Callable[[], None]] = [] if on_change is None else [on_change]
        self._bundles: dict[str, _Bundle] = {}
        self._closed = False

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        """Discovers the bundles and loads the version each policy wants (newest by default).

        Raises:
            NotFound: the repository, or a bundle named in `bundles`, does not exist.
        """
        if self._requested:
            for name in self._requested:
                await asyncio.to_thread(self.store.list_versions, name)
        await self.refresh()

    async def refresh(self) -> None:
        """Re-reads the repository and reconciles every bundle with its policy."""
        names = self._requested or tuple(await asyncio.to_thread(self.store.list_bundles))
        if not names:
            logger.warning("no bundles in repository %s; nothing to serve", self.store.repo)
        for name in names:
            if name not in self._bundles:
                self._bundles[name] = _Bundle(name, self._policies.get(name, Latest()))
            await self._reconcile(self._bundles[name])

    async def close(self) -> None:
        """Drains and unloads every loaded version (server shutdown)."""
        self._closed = True
        for bundle in self._bundles.values():
            async with bundle.lock:
                bundle.default = None
                for number, entry in sorted(bundle.versions.items()):
                    if entry.state is VersionState.READY:
                        await self._unload(bundle, number)
        self._changed()

    @property
    def ready(self) -> bool:
        """True when every served bundle has a default version READY."""
        return bool(self._bundles) and all(b.default is not None for b in self._bundles.values())

    def queued_rows(self, name: str) -> int:
        """Rows waiting in the batch queues of every loaded version of bundle `name`."""
        return sum(
            entry.servable.queued_rows
            for entry in self._bundle(name).versions.values()
            if entry.servable is not None
        )

    def serving_replicas(self, name: str) -> int:
        """Replicas of bundle `name` that take new requests (those of its READY versions)."""
        return sum(
            len(entry.servable.replicas)
            for entry in self._bundle(name).versions.values()
            if entry.state is VersionState.READY and entry.servable is not None
        )

    def add_listener(self, callback: Callable[[], None]) -> None:
        """Calls `callback` on the event loop after every state, default or replica change."""
        self._listeners.append(callback)

    def bundle_names(self) -> list[str]:
        """The bundles this server knows, sorted."""
        return sorted(self._bundles)

    # -- leases -------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def acquire(
        self, bundle: str, version: int | None = None, label: str | None = None
    ) -> AsyncIterator[Servable]:
        """Leases the servable that serves a request, for the duration of the block.

        The version is resolved and leased without awaiting, so it cannot be unloaded between
        the two; a version being drained waits for this lease before it is unloaded.

        Raises:
            NotFound: unknown bundle, version or label (or a version not serving).
            Unavailable: nothing ready yet, or the version is still loading.
            InvalidInput: both a version and a label, or a version <= 0.
        """
        entry, servable = self._lease(bundle, version, label)
        try:
            yield servable
        finally:
            entry.leases -= 1
            if entry.leases == 0:
                entry.idle.set()

    def _lease(
        self, bundle: str, version: int | None, label: str | None
    ) -> tuple[_Version, Servable]:
        state = self._bundles.get(bundle)
        if state is None:
            known = ", ".join(sorted(self._bundles)) or "none"
            raise NotFound(f"unknown bundle {bundle!r} (this server serves: {known})")
        number = resolve(
            bundle,
            version=version,
            label=label,
            labels=state.labels,
            states=state.states(),
            default=state.default,
        )
        entry = state.versions[number]
        if entry.servable is None:  # READY always has one; kept as a typed check
            raise Unavailable(f"version {number} of bundle {bundle!r} is not loaded")
        entry.leases += 1
        entry.idle.clear()
        return entry, entry.servable

    # -- admin --------------------------------------------------------------------------------
    def _bundle(self, name: str) -> _Bundle:
        if name not in self._bundles:
            known = ", ".join(sorted(self._bundles)) or "none"
            raise NotFound(f"unknown bundle {name!r} (this server serves: {known})")
        return self._bundles[name]

    async def load_version(self, name: str, version: int) -> VersionInfo:
        """Loads one published version beside those loaded and waits until READY or FAILED.

        Raises:
            NotFound: unknown bundle, or the version is not published.
            FailedPrecondition: it does not fit the memory budget beside the loaded versions
                (its state is left as it was; nothing is unloaded to make room).
        """
        bundle = self._bundle(name)
        await asyncio.to_thread(self.store.ref, name, version)
        async with bundle.lock:
            entry = bundle.versions.get(version)
            if entry is None or entry.state in (VersionState.NEW, VersionState.UNLOADED):
                await self._load(bundle, version, on_disk=None)
            if bundle.default is None:
                self._set_default(bundle, version if self._is_ready(bundle, version) else None)
        return self._info(bundle, version)

    async def unload_version(self, name: str, version: int) -> VersionInfo:
        """Drains and unloads one version; requests naming no version move to another one.

        Raises:
            NotFound: unknown bundle or version.
            FailedPrecondition: the version is not READY.
        """
        bundle = self._bundle(name)
        async with bundle.lock:
            entry = bundle.versions.get(version)
            if entry is None:
                raise NotFound(f"bundle {name!r} has no version {version} on this server")
            if entry.state is not VersionState.READY:
                raise FailedPrecondition(
                    f"version {version} of bundle {name!r} is {entry.state.name}, not READY"
                )
            if bundle.default == version:
                others = [
                    v for v, e in bundle.versions.items()
                    if e.state is VersionState.READY and v != version
                ]  # fmt: skip
                self._set_default(bundle, max(others) if others else None)
            await self._unload(bundle, version)
        return self._info(bundle, version)

    async def set_policy(self, name: str, policy: VersionPolicy) -> BundleInfo:
        """Replaces a bundle's policy and reconciles it now."""
        bundle = self._bundle(name)
        bundle.policy = policy
        await self._reconcile(bundle)
        return self.status(name)[0]

    def set_label(self, name: str, label: str, version: int) -> BundleInfo:
        """Points `label` at a READY version, or removes it when `version` is 0.

        Raises:
            InvalidInput: a malformed label.
            NotFound: unknown bundle, or removing a label that does not exist.
            FailedPrecondition: the version is not READY.
        """
        bundle = self._bundle(name)
        check_label(label)
        if version == 0:
            if bundle.labels.pop(label, None) is None:
                raise NotFound(f"bundle {name!r} has no label {label!r}")
        elif not self._is_ready(bundle, version):
            raise FailedPrecondition(
                f"cannot point label {label!r} at version {version} of bundle {name!r}: "
                "it is not loaded and READY"
            )
        else:
            bundle.labels[label] = version
        self._changed()
        return self.status(name)[0]

    def status(self, name: str = "") -> list[BundleInfo]:
        """Snapshots of one bundle (or all, sorted by name) and their versions.

        Raises:
            NotFound: `name` is given and unknown.
        """
        names = [name] if name else sorted(self._bundles)
        return [self._bundle_info(self._bundle(n)) for n in names]

    # -- internals ----------------------------------------------------------------------------
    def _bundle_info(self, bundle: _Bundle) -> BundleInfo:
        versions = tuple(self._info(bundle, v) for v in sorted(bundle.versions, reverse=True))
        return BundleInfo(bundle.name, bundle.policy, versions)

    def _info(self, bundle: _Bundle, version: int) -> VersionInfo:
        entry = bundle.versions[version]
        servable = entry.servable
        return VersionInfo(
            version=version,
            state=entry.state,
            failure_reason=entry.failure_reason,
            devices=servable.placement.devices if servable else (),
            replicas=len(servable.replicas) if servable else 0,
            labels=tuple(sorted(k for k, v in bundle.labels.items() if v == version)),
            ready_at=entry.ready_at,
            manifest=entry.manifest,
            is_default=bundle.default == version,
        )

    def _is_ready(self, bundle: _Bundle, version: int) -> bool:
        entry = bundle.versions.get(version)
        return entry is not None and entry.state is VersionState.READY

    def _changed(self) -> None:
        for listener in self._listeners:
            listener()

    def _set_state(self, bundle: _Bundle, entry: _Version, state: VersionState) -> None:
        entry.state = state
        self.metrics.set_version_state(bundle.name, entry.version, state)
        self._changed()

    def _set_default(self, bundle: _Bundle, version: int | None) -> None:
        if bundle.default != version:
            logger.info(
                "bundle %s: default version %s -> %s",
                bundle.name,
                bundle.default,
                version,
                extra={"bundle": bundle.name, "version": version},
            )
        bundle.default = version
        self.metrics.set_default_version(bundle.name, version)
        self._changed()

    async def _reconcile(self, bundle: _Bundle) -> None:
        async with bundle.lock:
            while not self._closed:
                on_disk = await asyncio.to_thread(self.store.list_versions, bundle.name)
                for number in on_disk:
                    if number not in bundle.versions:
                        bundle.versions[number] = _Version(number)
                        self._set_state(bundle, bundle.versions[number], VersionState.NEW)
                decision = decide(on_disk, bundle.states(), bundle.policy)
                self._set_default(bundle, decision.default_version)
                for label, number in list(bundle.labels.items()):
                    if not self._is_ready(bundle, number):
                        del bundle.labels[label]
                if decision.missing:
                    logger.warning(
                        "bundle %s: pinned version(s) %s are not published",
                        bundle.name,
                        ", ".join(map(str, decision.missing)),
                    )
                if not decision.to_load and not decision.to_unload:
                    return
                for number in decision.to_load:
                    await self._load(bundle, number, on_disk=on_disk)
                if decision.to_load:
                    continue  # decide again: the default may move before anything unloads
                for number in decision.to_unload:
                    await self._unload(bundle, number)

    async def _load(self, bundle: _Bundle, version: int, *, on_disk: Sequence[int] | None) -> None:
        """Loads one version (READY or FAILED afterwards), within the memory budget.

        Args:
            on_disk: the published versions when a reconcile loads it: the versions the policy
                replaces may then make room for it (see the module docstring). None (an admin
                load) only loads beside the others.

        Raises:
            FailedPrecondition: `on_disk` is None and the version does not fit beside the
                loaded ones; its previous state is restored.
        """
        entry = bundle.versions.setdefault(version, _Version(version))
        previous = entry.state
        self._set_state(bundle, entry, VersionState.LOADING)
        started = time.perf_counter()
        try:
            validated = await asyncio.to_thread(self.store.validate, bundle.name, version)
            entry.manifest = validated.manifest
            for warning in validated.warnings:
                logger.warning("bundle %s v%d: %s", bundle.name, version, warning)
        except Exception as error:
            self._load_failed(bundle, entry, error)
            return
        try:
            old = await self._make_room(bundle, entry, validated, on_disk)
        except FailedPrecondition as error:
            if on_disk is None:  # an admin load: refused, not FAILED (a later switch may fit)
                self._set_state(bundle, entry, previous)
                raise
            self._fail(bundle, entry, str(error))
            return
        except Exception as error:
            self._load_failed(bundle, entry, error)
            return
        if old is None:
            await self._load_servable(bundle, entry, validated, started)
        elif old.servable is not None and len(old.servable.replicas) >= 2:
            await self._switch_by_replica(bundle, old, old.servable, entry, validated, started)
        else:
            await self._switch_with_window(bundle, old, entry, validated, started)

    def _load_failed(self, bundle: _Bundle, entry: _Version, error: BaseException) -> None:
        if isinstance(error, RecshipError):
            self._fail(bundle, entry, str(error))
            return
        # A bug or a library failure: still never take traffic.
        logger.error(
            "bundle %s v%d: unexpected load failure", bundle.name, entry.version, exc_info=error
        )
        self._fail(bundle, entry, f"{type(error).__name__}: {error}")

    async def _load_servable(
        self,
        bundle: _Bundle,
        entry: _Version,
        validated: ValidatedVersion,
        started: float,
        slots: tuple[int, ...] | None = None,
    ) -> bool:
        """Loads the servable (all replicas, or `slots`) and marks the version READY or FAILED."""
        try:
            entry.servable = await asyncio.to_thread(
                load_servable, validated, self.config, self.metrics, slots=slots
            )
        except Exception as error:
            self._load_failed(bundle, entry, error)
            return False
        _freeze_long_lived()
        entry.ready_at = time.time()
        entry.failure_reason = ""
        self._set_state(bundle, entry, VersionState.READY)
        logger.info(
            "bundle %s v%d READY in %.2f s",
            bundle.name,
            entry.version,
            time.perf_counter() - started,
            extra={"bundle": bundle.name, "version": entry.version, "state": "READY"},
        )
        return True

    # -- memory budget ------------------------------------------------------------------------
    @staticmethod
    def _estimate(entry: _Version) -> int:
        """Estimated memory of one version as loaded now (0 when not loaded)."""
        if entry.servable is None or entry.manifest is None:
            return 0
        return estimated_bytes(entry.manifest, len(entry.servable.replicas))

    def _loaded_bytes(self, exclude: _Version) -> int:
        """Estimated memory of every loaded version of every bundle except `exclude`."""
        return sum(
            self._estimate(e)
            for b in self._bundles.values()
            for e in b.versions.values()
            if e is not exclude
        )

    async def _make_room(
        self,
        bundle: _Bundle,
        entry: _Version,
        validated: ValidatedVersion,
        on_disk: Sequence[int] | None,
    ) -> _Version | None:
        """Checks the budget before `entry` loads; frees what may go before it is READY.

        Returns:
            None when the new version loads beside the others; otherwise the bundle's default
            version, which has to be swapped out while the new one loads.

        Raises:
            FailedPrecondition: it does not fit, even once the versions it replaces are gone
                (or, for an admin load, beside the loaded ones).
        """
        budget = self.memory_budget_bytes
        if budget is None:
            return None
        replicas = len(placement(validated.manifest, self.config).replicas)
        need = estimated_bytes(validated.manifest, replicas)
        loaded = self._loaded_bytes(entry)
        if loaded + need <= budget:
            return None
        where = (
            f"bundle {bundle.name} v{entry.version} needs ~{need} bytes ({replicas} "
            f"replica(s), manifest estimate) beside {loaded} bytes loaded; memory budget "
            f"{budget} bytes"
        )
        if on_disk is None:
            raise FailedPrecondition(where + "; unload a version first")
        states = bundle.states()
        states[entry.version] = VersionState.READY
        replaced = [
            bundle.versions[v]
            for v in decide(on_disk, states, bundle.policy).to_unload
            if v != entry.version and bundle.versions[v].servable is not None
        ]
        freed = sum(self._estimate(r) for r in replaced)
        if loaded - freed + need > budget:
            raise FailedPrecondition(
                f"{where}; it does not fit even after unloading the version(s) it replaces "
                f"({', '.join(str(r.version) for r in replaced) or 'none'})"
            )
        default = bundle.versions.get(bundle.default) if bundle.default is not None else None
        for old in replaced:
            if old is not default:
                logger.info(
                    "bundle %s: unloading v%d before v%d loads (memory budget)",
                    bundle.name,
                    old.version,
                    entry.version,
                )
                await self._unload(bundle, old.version)
        if default in replaced and self._loaded_bytes(entry) + need > budget:
            return default
        return None

    async def _switch_by_replica(
        self,
        bundle: _Bundle,
        old: _Version,
        previous: Servable,
        entry: _Version,
        validated: ValidatedVersion,
        started: float,
    ) -> None:
        """Swaps the default version `old` (servable `previous`) for `entry` one replica at a
        time (see the module docstring)."""
        logger.info(
            "bundle %s: v%d does not fit beside v%d in the memory budget; switching replica by "
            "replica (%d replicas)",
            bundle.name,
            entry.version,
            old.version,
            len(previous.replicas),
            extra={"bundle": bundle.name, "version": entry.version},
        )
        original = len(previous.replicas)
        slot = await previous.retire_replica()
        self._changed()
        ok = await self._load_servable(bundle, entry, validated, started, slots=(slot,))
        new = entry.servable
        try:
            while ok and new is not None:
                free = new.free_slots
                if len(new.replicas) >= len(previous.replicas) or not free:
                    break
                slot = await previous.retire_replica()
                self._changed()
                replica = await asyncio.to_thread(
                    new.load_replica, slot if slot in free else free[0]
                )
                new.add_replica(replica)
                self._changed()
        except Exception as error:
            await self._unload(bundle, entry.version)
            self._load_failed(bundle, entry, error)
            ok = False
        if not ok or new is None:
            await self._restore_replicas(bundle, old, original)
            return
        self._set_default(bundle, entry.version)
        await self._unload(bundle, old.version)
        for slot in new.free_slots:
            try:
                replica = await asyncio.to_thread(new.load_replica, slot)
            except Exception as error:
                logger.error(
                    "bundle %s v%d: replica %d failed to load after the switch; serving with "
                    "%d replica(s): %s",
                    bundle.name,
                    entry.version,
                    slot,
                    len(new.replicas),
                    error,
                )
                break
            new.add_replica(replica)
            self._changed()
        logger.info(
            "bundle %s: switched v%d -> v%d replica by replica in %.2f s",
            bundle.name,
            old.version,
            entry.version,
            time.perf_counter() - started,
            extra={"bundle": bundle.name, "version": entry.version},
        )

    async def _restore_replicas(self, bundle: _Bundle, old: _Version, count: int) -> None:
        """Reloads the replicas a failed replica-by-replica switch took from `old`."""
        servable = old.servable
        if servable is None:
            return
        for slot in servable.free_slots[: count - len(servable.replicas)]:
            try:
                replica = await asyncio.to_thread(servable.load_replica, slot)
            except Exception as error:
                logger.error(
                    "bundle %s v%d: could not reload replica %d: %s",
                    bundle.name,
                    old.version,
                    slot,
                    error,
                )
                return
            servable.add_replica(replica)
            self._changed()

    async def _switch_with_window(
        self,
        bundle: _Bundle,
        old: _Version,
        entry: _Version,
        validated: ValidatedVersion,
        started: float,
    ) -> None:
        """Unloads `old` (one replica) before `entry` loads; the gap is bounded and reported."""
        logger.warning(
            "bundle %s: v%d does not fit beside v%d in the memory budget and v%d has one "
            "replica: unloading it first; requests naming no version get UNAVAILABLE until "
            "the switch ends",
            bundle.name,
            entry.version,
            old.version,
            old.version,
            extra={"bundle": bundle.name, "version": entry.version},
        )
        window = time.perf_counter()
        self._set_default(bundle, None)
        await self._unload(bundle, old.version)
        if await self._load_servable(bundle, entry, validated, started):
            self._set_default(bundle, entry.version)
        else:
            logger.warning(
                "bundle %s: v%d failed; reloading v%d", bundle.name, entry.version, old.version
            )
            try:
                await self._load(bundle, old.version, on_disk=None)
            except FailedPrecondition as error:
                logger.error("bundle %s: v%d not reloaded: %s", bundle.name, old.version, error)
            if self._is_ready(bundle, old.version):
                self._set_default(bundle, old.version)
        seconds = time.perf_counter() - window
        self.metrics.observe_unavailable_window(bundle.name, seconds)
        logger.warning(
            "bundle %s: unavailable for %.3f s while switching v%d -> v%d (now serving %s)",
            bundle.name,
            seconds,
            old.version,
            entry.version,
            bundle.default,
            extra={"bundle": bundle.name, "unavailable_s": seconds},
        )

    def _fail(self, bundle: _Bundle, entry: _Version, reason: str) -> None:
        entry.failure_reason = reason
        self._set_state(bundle, entry, VersionState.FAILED)
        logger.error(
            "bundle %s v%d FAILED: %s",
            bundle.name,
            entry.version,
            reason,
            extra={"bundle": bundle.name, "version": entry.version, "state": "FAILED"},
        )

    async def _unload(self, bundle: _Bundle, version: int) -> None:
        entry = bundle.versions[version]
        self._set_state(bundle, entry, VersionState.DRAINING)
        for label in [k for k, v in bundle.labels.items() if v == version]:
            del bundle.labels[label]
        await entry.idle.wait()
        servable, entry.servable = entry.servable, None
        if servable is not None:
            await servable.close()
            released = weakref.ref(servable)
            del servable
            if released() is not None:
                # Reference cycles (batcher tasks, futures) keep it: collect them now so its
                # modules, index and item table are freed before the next version loads.
                # They may be frozen (`_freeze_long_lived`), so this thaws everything first: a
                # full collection that blocks the event loop (~0.2 s with torch loaded), so it
                # runs only when reference counting alone did not free the servable.
                gc.unfreeze()
                _freeze_long_lived()
            if released() is not None:
                logger.warning(
                    "bundle %s v%d: unloaded but still referenced; its memory is not freed",
                    bundle.name,
                    version,
                )
            _release_free_heap()
        entry.ready_at = None
        self._set_state(bundle, entry, VersionState.UNLOADED)
        logger.info(
            "bundle %s v%d unloaded",
            bundle.name,
            version,
            extra={"bundle": bundle.name, "version": version, "state": "UNLOADED"},
        )
