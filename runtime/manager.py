"""VersionManager: executes the version plans of every bundle on one server.

In TF Serving's terms this is the *manager*: `BundleStore` is the source (which versions are
published), `recship.runtime.policy` is the pure policy (`decide`: which versions to load and
unload next; `plan_switch`: how a version comes in within the memory budget), a `Loader`
(`recship.runtime.loader`) loads versions, and `acquire` hands out *leases*: a request holds
its version's servable for its whole life (query tower, index and ranker of one release), and a
version that is being unloaded first stops taking new leases (DRAINING), waits for the leases
it gave out, then releases its memory (`recship.runtime.heap`).

Reconciling a bundle repeats "ask `decide`, carry out the decision" until the decision is empty:
new versions load beside the serving one, the default switches atomically once a wanted version
is READY, and only then is the old one drained and unloaded. A version that fails validation,
loading or its golden self-test is marked FAILED with the reason and never retried, and the
previous version keeps serving (`latest` falls back to the newest version that did not fail).

Before a version loads, `plan_switch` sees the memory estimates (`estimated_bytes`) of every
loaded version of every bundle, the new one's, and those of the versions it replaces
(`replaced_versions`), and the manager executes its plan:

- BESIDE: load it (after unloading replaced versions other than the default, when the plan
  says so);
- REPLICA_BY_REPLICA (the default has >= 2 replicas): one old replica is retired (its queued
  work finishes), one new replica loads and self-tests in its slot, and so on; the default flips
  to the new version as soon as it has at least as many replicas as the old one has left, the
  old one then drains and unloads, and the new one grows to its full count. Serving capacity
  dips (never below one replica) but never reaches zero, and each request, holding a lease on
  one servable, is served end to end by one version. If the new version fails before the flip,
  the old one's replicas are reloaded;
- UNLOAD_FIRST (one replica): a WARNING is logged, requests naming no version get UNAVAILABLE,
  and the window (unload + load + self-test, or + reload of the old version when the new one
  fails) is logged and recorded in `recship_switch_unavailable_seconds`.

A version that does not fit even after the versions it replaces go is FAILED with the numbers.

Threading: every method runs on the server's event loop; loading and validation (seconds of
disk and model work) run on worker threads through `asyncio.to_thread`, so the loop keeps
answering (health says NOT_SERVING meanwhile). Reconciles of one bundle are serialised by a lock.

Example::

    manager = VersionManager(BundleStore(repo), ServableLoader(LoaderConfig()), metrics)
    await manager.start()
    async with manager.acquire("movies") as servable:
        scores, ids = await servable.retrieve(block, k=10, deadline=None)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

from recship.base.errors import (
    FailedPrecondition,
    InvalidInput,
    NotFound,
    RecshipError,
    Unavailable,
    clip,
    untrusted,
)
from recship.bundle.store import BundleStore, ValidatedVersion
from recship.runtime import heap
from recship.runtime.loader import LoadedVersion, Loader
from recship.runtime.metrics import ServerMetrics
from recship.runtime.policy import (
    Latest,
    SwitchMode,
    SwitchPlan,
    VersionPolicy,
    VersionState,
    check_label,
    decide,
    estimated_bytes,
    plan_switch,
    replaced_versions,
    resolve,
)
from recship.runtime.versions import BundleEntry, BundleInfo, VersionEntry, VersionInfo

logger = logging.getLogger(__name__)

# A failure reason is cut to this many characters: it may quote what a hostile bundle holds,
# and it travels in every ListBundles answer and log line.
MAX_REASON_CHARS = 2000


class VersionManager:
    """Loads, serves, drains and unloads the versions of the bundles of one repository.

    Args:
        store: the repository (any object with `BundleStore`'s methods).
        loader: turns validated versions into servables (`recship.runtime.loader.Loader`).
        metrics: version states and default versions are recorded here, and the servables'
            batch metrics.
        bundles: the bundles to serve; empty serves every bundle in the repository.
        policies: version policy per bundle; `latest` for the others.
        on_change: called on the event loop after every state change (e.g. to update health).
        memory_budget_bytes: most memory all loaded versions may take by their manifests'
            estimates (`recship.runtime.policy.estimated_bytes`), or None for no limit.
    """

    def __init__(
        self,
        store: BundleStore,
        loader: Loader,
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
        self.loader = loader
        self.metrics = metrics
        self._requested = tuple(bundles)
        self._policies = dict(policies or {})
        self.memory_budget_bytes = memory_budget_bytes
        self._listeners: list[Callable[[], None]] = [] if on_change is None else [on_change]
        self._bundles: dict[str, BundleEntry] = {}
        self._closed = False
        heap.keep_batch_memory()

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
                self._bundles[name] = BundleEntry(name, self._policies.get(name, Latest()))
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

    def follow(self, names: Sequence[str]) -> None:
        """Registers bundles without reading the repository or loading anything.

        A worker of `recship serve --workers N` runs its manager this way: its supervisor
        decides, and the worker only carries out `load_version`, `unload_version` and
        `set_view`, so that every worker serves exactly the supervisor's versions.
        """
        for name in names:
            if name not in self._bundles:
                self._bundles[name] = BundleEntry(name, self._policies.get(name, Latest()))

    def set_view(self, name: str, default: int | None, labels: Mapping[str, int]) -> None:
        """Takes over a bundle's default and labels as decided elsewhere (a worker's supervisor).

        Versions not READY here are skipped: a label pointing at one is dropped, and a default
        that is not READY leaves the current default in place (the supervisor loads a version
        into every worker before any view names it).

        Raises:
            NotFound: unknown bundle (not followed).
        """
        bundle = self._bundle(name)
        bundle.labels = {
            label: version
            for label, version in labels.items()
            if self._is_ready(bundle, version)
        }  # fmt: skip
        if default is None or self._is_ready(bundle, default):
            self._set_default(bundle, default)
        else:
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
            entry.servable.replica_count
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
    ) -> AsyncIterator[Any]:
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
            entry.release()

    def _lease(
        self, bundle: str, version: int | None, label: str | None
    ) -> tuple[VersionEntry, Any]:
        state = self._bundles.get(bundle)
        if state is None:
            known = clip(", ".join(sorted(self._bundles)), 200) or "none"
            raise NotFound(f"unknown bundle {untrusted(bundle)} (this server serves: {known})")
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
            raise Unavailable(f"version {number} of bundle {untrusted(bundle)} is not loaded")
        entry.lease()
        return entry, entry.servable

    # -- admin --------------------------------------------------------------------------------
    def _bundle(self, name: str) -> BundleEntry:
        if name not in self._bundles:
            known = clip(", ".join(sorted(self._bundles)), 200) or "none"
            raise NotFound(f"unknown bundle {untrusted(name)} (this server serves: {known})")
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
                raise NotFound(f"bundle {untrusted(name)} has no version {version} on this server")
            if entry.state is not VersionState.READY:
                raise FailedPrecondition(
                    f"version {version} of bundle {untrusted(name)} is {entry.state.name}, "
                    "not READY"
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
                raise NotFound(f"bundle {untrusted(name)} has no label {untrusted(label)}")
        elif not self._is_ready(bundle, version):
            raise FailedPrecondition(
                f"cannot point label {untrusted(label)} at version {version} of bundle "
                f"{untrusted(name)}: it is not loaded and READY"
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
    def _bundle_info(self, bundle: BundleEntry) -> BundleInfo:
        versions = tuple(self._info(bundle, v) for v in sorted(bundle.versions, reverse=True))
        return BundleInfo(bundle.name, bundle.policy, versions)

    def _info(self, bundle: BundleEntry, version: int) -> VersionInfo:
        entry = bundle.versions[version]
        servable = entry.servable
        return VersionInfo(
            version=version,
            state=entry.state,
            failure_reason=entry.failure_reason,
            devices=servable.devices if servable else (),
            replicas=servable.replica_count if servable else 0,
            labels=tuple(sorted(k for k, v in bundle.labels.items() if v == version)),
            ready_at=entry.ready_at,
            manifest=entry.manifest,
            is_default=bundle.default == version,
        )

    def _is_ready(self, bundle: BundleEntry, version: int) -> bool:
        entry = bundle.versions.get(version)
        return entry is not None and entry.state is VersionState.READY

    def _changed(self) -> None:
        for listener in self._listeners:
            listener()

    def _set_state(self, bundle: BundleEntry, entry: VersionEntry, state: VersionState) -> None:
        entry.state = state
        self.metrics.set_version_state(bundle.name, entry.version, state)
        self._changed()

    def _set_default(self, bundle: BundleEntry, version: int | None) -> None:
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

    async def _reconcile(self, bundle: BundleEntry) -> None:
        async with bundle.lock:
            while not self._closed:
                on_disk = await asyncio.to_thread(self.store.list_versions, bundle.name)
                for number in on_disk:
                    if number not in bundle.versions:
                        bundle.versions[number] = VersionEntry(number)
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

    async def _load(
        self, bundle: BundleEntry, version: int, *, on_disk: Sequence[int] | None
    ) -> None:
        """Loads one version (READY or FAILED afterwards), within the memory budget.

        Args:
            on_disk: the published versions when a reconcile loads it: the versions the policy
                replaces may then make room for it (see the module docstring). None (an admin
                load) only loads beside the others.

        Raises:
            FailedPrecondition: `on_disk` is None and the version does not fit beside the
                loaded ones; its previous state is restored.
        """
        entry = bundle.versions.setdefault(version, VersionEntry(version))
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
            plan = self._plan(bundle, entry, validated, on_disk)
        except FailedPrecondition as error:
            if on_disk is None:  # an admin load: refused, not FAILED (a later switch may fit)
                self._set_state(bundle, entry, previous)
                raise
            self._fail(bundle, entry, str(error))
            return
        except Exception as error:
            self._load_failed(bundle, entry, error)
            return
        for number in plan.unload_before:
            logger.info(
                "bundle %s: unloading v%d before v%d loads (memory budget)",
                bundle.name,
                number,
                version,
            )
            await self._unload(bundle, number)
        old = bundle.versions[plan.swap_out] if plan.swap_out is not None else None
        if plan.mode is SwitchMode.BESIDE or old is None or old.servable is None:
            await self._load_servable(bundle, entry, validated, started)
        elif plan.mode is SwitchMode.REPLICA_BY_REPLICA:
            await self._switch_by_replica(bundle, old, old.servable, entry, validated, started)
        else:
            await self._switch_with_window(bundle, old, entry, validated, started)

    def _load_failed(self, bundle: BundleEntry, entry: VersionEntry, error: BaseException) -> None:
        if isinstance(error, RecshipError):
            self._fail(bundle, entry, str(error))
            return
        # A bug or a library failure: still never take traffic.
        logger.error(
            "bundle %s v%d: unexpected load failure", bundle.name, entry.version, exc_info=error
        )
        self._fail(bundle, entry, f"{type(error).__name__}: {str(error)[:MAX_REASON_CHARS]}")

    async def _load_servable(
        self,
        bundle: BundleEntry,
        entry: VersionEntry,
        validated: ValidatedVersion,
        started: float,
        slots: tuple[int, ...] | None = None,
    ) -> bool:
        """Loads the servable (all replicas, or `slots`) and marks the version READY or FAILED."""
        try:
            entry.servable = await asyncio.to_thread(self.loader.load, validated, slots)
        except Exception as error:
            self._load_failed(bundle, entry, error)
            return False
        heap.freeze_long_lived()
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
    def _estimate(entry: VersionEntry) -> int:
        """Estimated memory of one version as loaded now (0 when not loaded)."""
        if entry.servable is None or entry.manifest is None:
            return 0
        return estimated_bytes(entry.manifest, entry.servable.replica_count)

    def _plan(
        self,
        bundle: BundleEntry,
        entry: VersionEntry,
        validated: ValidatedVersion,
        on_disk: Sequence[int] | None,
    ) -> SwitchPlan:
        """Asks `plan_switch` how `entry` comes in, with this server's numbers.

        Args:
            on_disk: the published versions when a reconcile loads it (the versions the policy
                replaces may then make room); None for an admin load (beside the others only).

        Raises:
            FailedPrecondition: from `plan_switch`: it does not fit.
        """
        replicas = self.loader.replicas(validated.manifest)
        replaced = None
        if on_disk is not None:
            replaced = {
                number: self._estimate(bundle.versions[number])
                for number in replaced_versions(
                    on_disk, bundle.states(), bundle.policy, entry.version
                )
                if bundle.versions[number].servable is not None
            }
        default = bundle.versions.get(bundle.default) if bundle.default is not None else None
        return plan_switch(
            what=f"bundle {bundle.name} v{entry.version}",
            need_bytes=estimated_bytes(validated.manifest, replicas),
            replicas=replicas,
            loaded_bytes=sum(
                self._estimate(e)
                for b in self._bundles.values()
                for e in b.versions.values()
                if e is not entry
            ),
            budget_bytes=self.memory_budget_bytes,
            replaced=replaced,
            default=bundle.default,
            default_replicas=default.servable.swappable_replicas
            if default is not None and default.servable is not None
            else 0,
        )

    async def _switch_by_replica(
        self,
        bundle: BundleEntry,
        old: VersionEntry,
        previous: LoadedVersion,
        entry: VersionEntry,
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
            previous.replica_count,
            extra={"bundle": bundle.name, "version": entry.version},
        )
        original = previous.replica_count
        slot = await previous.retire_replica()
        self._changed()
        ok = await self._load_servable(bundle, entry, validated, started, slots=(slot,))
        new = entry.servable
        try:
            while ok and new is not None:
                free = new.free_slots
                if new.replica_count >= previous.replica_count or not free:
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
                    new.replica_count,
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

    async def _restore_replicas(self, bundle: BundleEntry, old: VersionEntry, count: int) -> None:
        """Reloads the replicas a failed replica-by-replica switch took from `old`."""
        servable = old.servable
        if servable is None:
            return
        for slot in servable.free_slots[: count - servable.replica_count]:
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
        bundle: BundleEntry,
        old: VersionEntry,
        entry: VersionEntry,
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

    def _fail(self, bundle: BundleEntry, entry: VersionEntry, reason: str) -> None:
        if len(reason) > MAX_REASON_CHARS:
            cut = len(reason) - MAX_REASON_CHARS
            reason = f"{reason[:MAX_REASON_CHARS]}... ({cut} more characters)"
        entry.failure_reason = reason
        self._set_state(bundle, entry, VersionState.FAILED)
        logger.error(
            "bundle %s v%d FAILED: %s",
            bundle.name,
            entry.version,
            reason,
            extra={"bundle": bundle.name, "version": entry.version, "state": "FAILED"},
        )

    async def _unload(self, bundle: BundleEntry, version: int) -> None:
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
            heap.reclaim(released, f"bundle {bundle.name} v{version}")
        entry.ready_at = None
        self._set_state(bundle, entry, VersionState.UNLOADED)
        logger.info(
            "bundle %s v%d unloaded",
            bundle.name,
            version,
            extra={"bundle": bundle.name, "version": version, "state": "UNLOADED"},
        )
