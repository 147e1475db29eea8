"""Version policy: *which* versions of a bundle to serve, and *how* to switch to a new one.

Everything here is a pure function of plain values (versions on disk, their states, the
policy, byte estimates): no threads, no disk, no clock. The `VersionManager` executes what
these functions return and asks again after every change.

- Which (TF Serving's aspired versions): `decide` says what to load and unload next after
  every repository scan and state change; requests ask `resolve` which loaded version serves
  them. Like TF Serving's `AvailabilityPreservingPolicy`, a new version loads beside the old
  one and the old one is unloaded only once a wanted version is READY, so a bundle that serves
  keeps serving through upgrades, failed loads, pin changes and removals from disk.
- How (in the spirit of TF Serving's `ResourcePreservingPolicy`): `plan_switch` decides, from
  the manifests' memory estimates (`estimated_bytes`) and a budget, whether a version loads
  beside the loaded ones, after the versions it replaces are unloaded, replica by replica
  against the serving default, or after the default is unloaded first (a bounded window).

Example::

    policy = parse_policy("latest")
    decision = decide([1, 2], {1: VersionState.READY}, policy)
    # Decision(to_load=(2,), to_unload=(), default_version=1, held=(1,), missing=())
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from recship.base.errors import (
    FailedPrecondition,
    InvalidInput,
    NotFound,
    Unavailable,
    untrusted,
)
from recship.protos.v1 import admin_pb2, manifest_pb2


class VersionState(enum.Enum):
    """Lifecycle of one bundle version on a server; values equal admin.proto's `VersionState`."""

    NEW = admin_pb2.VERSION_STATE_NEW
    LOADING = admin_pb2.VERSION_STATE_LOADING
    READY = admin_pb2.VERSION_STATE_READY
    DRAINING = admin_pb2.VERSION_STATE_DRAINING
    UNLOADED = admin_pb2.VERSION_STATE_UNLOADED
    FAILED = admin_pb2.VERSION_STATE_FAILED


# States from which a version may be (re)loaded: never seen, seen, or released earlier.
# FAILED is absent on purpose: a failed version is never retried automatically.
_LOADABLE = frozenset({VersionState.NEW, VersionState.UNLOADED})


@dataclass(frozen=True)
class Latest:
    """Serve the newest valid (not FAILED) version on disk."""

    def __str__(self) -> str:
        return "latest"


@dataclass(frozen=True)
class LatestN:
    """Keep the newest `count` valid versions loaded; requests may name any of them."""

    count: int

    def __post_init__(self) -> None:
        if self.count < 1:
            raise InvalidInput(f"version policy latest:N needs N >= 1, got {self.count}")

    def __str__(self) -> str:
        return f"latest:{self.count}"


@dataclass(frozen=True)
class Pinned:
    """Serve exactly these versions (sorted, distinct, > 0), the highest by default."""

    versions: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.versions:
            raise InvalidInput("version policy pinned needs at least one version")
        bad = [v for v in self.versions if v <= 0]
        if bad:
            raise InvalidInput(f"version policy pinned: versions must be > 0, got {bad}")
        if list(self.versions) != sorted(set(self.versions)):
            raise InvalidInput(
                f"version policy pinned: versions must be sorted and distinct, got "
                f"{list(self.versions)} (parse_policy and from_proto sort them for you)"
            )

    def __str__(self) -> str:
        return "pinned:" + ",".join(str(v) for v in self.versions)


VersionPolicy = Latest | LatestN | Pinned

_POLICY_HELP = "expected 'latest', 'latest:N' (N >= 1) or 'pinned:V[,V2...]' (each V > 0)"


def parse_policy(text: str) -> VersionPolicy:
    """Parses a policy written as on the command line.

    Args:
        text: `latest`, `latest:N` or `pinned:V[,V2...]`; surrounding spaces are ignored.

    Returns:
        The policy; pinned versions come out sorted and without duplicates.

    Raises:
        InvalidInput: the text is not one of those forms; the message quotes it.
    """
    kind, sep, arg = text.strip().partition(":")
    kind = kind.strip().lower()
    arg = arg.strip()
    if kind == "latest" and not sep:
        return Latest()
    if kind == "latest" and re.fullmatch(r"[0-9]+", arg):
        return LatestN(int(arg))
    if kind == "pinned" and re.fullmatch(r"[0-9]+( *, *[0-9]+)*", arg):
        return Pinned(tuple(sorted({int(v) for v in arg.split(",")})))
    raise InvalidInput(f"bad version policy {untrusted(text)}: {_POLICY_HELP}")


def policy_to_proto(policy: VersionPolicy) -> admin_pb2.VersionPolicy:
    """The admin.proto form of `policy`."""
    match policy:
        case Latest():
            return admin_pb2.VersionPolicy(latest=admin_pb2.LatestPolicy())
        case LatestN(count):
            return admin_pb2.VersionPolicy(latest_n=admin_pb2.LatestNPolicy(count=count))
        case Pinned(versions):
            return admin_pb2.VersionPolicy(pinned=admin_pb2.PinnedPolicy(versions=versions))


def policy_from_proto(message: admin_pb2.VersionPolicy) -> VersionPolicy:
    """Reads an admin.proto `VersionPolicy`; an unset oneof is `Latest` (the default).

    Raises:
        InvalidInput: `latest_n.count` is 0 or a pinned list is empty or has a version <= 0.
    """
    match message.WhichOneof("policy"):
        case "latest_n":
            return LatestN(message.latest_n.count)
        case "pinned":
            versions = list(message.pinned.versions)
            if any(v <= 0 for v in versions):
                raise InvalidInput(f"policy.pinned.versions must all be > 0, got {versions}")
            return Pinned(tuple(sorted(set(versions))))
        case _:
            return Latest()


@dataclass(frozen=True)
class Decision:
    """What the manager should do next for one bundle.

    Attributes:
        to_load: versions to load now (beside those serving), newest first.
        to_unload: READY versions to drain and unload now, oldest first; a version is listed
            only when a wanted version is READY to take its traffic.
        default_version: the version serving requests that name no version or label: the
            newest READY wanted version, else the newest READY held one; None if none is READY.
        held: READY versions the policy no longer wants but that keep serving until a wanted
            version is READY (a new version still loading, failed, or missing on disk).
        missing: pinned versions that are neither on disk nor loaded; reported, not fatal.
    """

    to_load: tuple[int, ...]
    to_unload: tuple[int, ...]
    default_version: int | None
    held: tuple[int, ...] = ()
    missing: tuple[int, ...] = ()


def wanted_versions(
    available_on_disk: Sequence[int],
    states: Mapping[int, VersionState],
    policy: VersionPolicy,
) -> tuple[int, ...]:
    """The versions `policy` asks to serve, newest first (TF Serving's "aspired" versions).

    `latest` and `latest:N` take the newest 1 or N versions on disk that are not FAILED, so a
    failed version lets the next older one stand in and is never retried. `pinned` takes its
    versions as written, FAILED or missing ones included (they are reported, never loaded).
    """
    if isinstance(policy, Pinned):
        return tuple(sorted(policy.versions, reverse=True))
    count = policy.count if isinstance(policy, LatestN) else 1
    valid = sorted(
        {v for v in available_on_disk if states.get(v) is not VersionState.FAILED}, reverse=True
    )
    return tuple(valid[:count])


def decide(
    available_on_disk: Sequence[int],
    states: Mapping[int, VersionState],
    policy: VersionPolicy,
) -> Decision:
    """Decides the next load/unload actions for one bundle, preserving availability.

    Rules, in the spirit of TF Serving's `AvailabilityPreservingPolicy`:

    - load every wanted version that is on disk and NEW, UNLOADED or never seen (absent from
      `states`), beside whatever serves now; FAILED versions are never retried, LOADING and
      DRAINING ones are left to finish;
    - unload READY versions the policy no longer wants only once some wanted version is READY;
      until then keep the newest of them serving (`held`) and unload the older ones;
    - unlike TF Serving, a policy that wants nothing loadable (every version removed from
      disk, a pin to versions that do not exist) never unloads the last READY version: it is
      held and the problem is reported (`missing`), because a mistyped pin or an emptied
      directory must not take a serving bundle offline. Operators unload explicitly.

    Args:
        available_on_disk: fully published version numbers in the repository, any order.
        states: the state of every version the manager has seen; absent means never seen.
        policy: the bundle's version policy.

    Returns:
        The `Decision`; applying it and calling `decide` again converges (an empty decision).
    """
    on_disk = set(available_on_disk)
    wanted = wanted_versions(available_on_disk, states, policy)
    wanted_set = set(wanted)

    def state(v: int) -> VersionState:
        return states.get(v, VersionState.NEW)

    to_load = tuple(v for v in wanted if v in on_disk and state(v) in _LOADABLE)
    wanted_ready = [v for v in wanted if state(v) is VersionState.READY]
    unwanted_ready = sorted(
        v for v, s in states.items() if s is VersionState.READY and v not in wanted_set
    )
    if wanted_ready:
        to_unload, held = tuple(unwanted_ready), ()
    else:
        to_unload, held = tuple(unwanted_ready[:-1]), tuple(unwanted_ready[-1:])

    if wanted_ready:
        default_version: int | None = max(wanted_ready)
    else:
        default_version = held[0] if held else None

    missing: tuple[int, ...] = ()
    if isinstance(policy, Pinned):
        present = {VersionState.LOADING, VersionState.READY, VersionState.DRAINING}
        missing = tuple(
            v for v in policy.versions if v not in on_disk and states.get(v) not in present
        )
    return Decision(
        to_load=to_load,
        to_unload=to_unload,
        default_version=default_version,
        held=held,
        missing=missing,
    )


_LABEL = re.compile(r"[A-Za-z0-9_-]{1,64}")


def check_label(label: str) -> str:
    """Returns `label` if it is a valid label name (admin.proto: [A-Za-z0-9_-]{1,64}).

    Raises:
        InvalidInput: the name is empty, too long or has other characters.
    """
    if not _LABEL.fullmatch(label):
        raise InvalidInput(
            f"bad label {untrusted(label)}: use letters, digits, '-' and '_', 1 to 64 characters"
        )
    return label


def resolve(
    bundle: str,
    *,
    version: int | None,
    label: str | None,
    labels: Mapping[str, int],
    states: Mapping[int, VersionState],
    default: int | None,
) -> int:
    """Picks the version that serves one request (the request's `ModelSpec`).

    Args:
        bundle: bundle name, for messages.
        version: the exact version the request names, or None.
        label: the label the request names (e.g. "stable"), or None.
        labels: the bundle's labels, label -> version.
        states: the state of every version the server has seen.
        default: the bundle's default version (`Decision.default_version`), or None.

    Returns:
        A version whose state is READY.

    Raises:
        InvalidInput: both `version` and `label` are given, or `version` <= 0.
        NotFound: the version was never seen, is FAILED, DRAINING or UNLOADED, or the label
            does not exist.
        Unavailable: the version is still NEW or LOADING, or no version is ready yet.
    """
    if version is not None and label is not None:
        raise InvalidInput("model: give either a version or a label, not both")
    if label is not None:
        if label not in labels:
            raise NotFound(f"bundle {untrusted(bundle)} has no label {untrusted(label)}")
        version = labels[label]
        where = f"version {version} of bundle {untrusted(bundle)} (label {untrusted(label)})"
    elif version is not None:
        if version <= 0:
            raise InvalidInput(f"model.version must be > 0, got {version}")
        where = f"version {version} of bundle {untrusted(bundle)}"
    else:
        if default is None:
            raise Unavailable(f"bundle {untrusted(bundle)} has no version ready yet")
        return default

    current = states.get(version)
    if current is VersionState.READY:
        return version
    if current is None:
        raise NotFound(f"{where} does not exist on this server")
    if current in (VersionState.NEW, VersionState.LOADING):
        raise Unavailable(f"{where} is {current.name}, not ready yet")
    raise NotFound(f"{where} is {current.name}, not serving")


# -- how to switch: memory estimates and switch plans -----------------------------------------
def estimated_bytes(manifest: manifest_pb2.BundleManifest, replicas: int) -> int:
    """The memory a version needs with `replicas` replicas, from its manifest's estimate.

    Counted: `resources.host_bytes` once (every file of the version: index, item features,
    entry points, golden record; the assets replicas share) plus `sum(resources.device_bytes)`
    (the quantized tables of one replica over all its devices) per replica. Host and device
    memory are added into one number, a conservative bound compared with one budget: on CPU
    both live in the process; on GPUs it over-counts the host side, never the devices. The
    estimate is an upper bound fixed by the manifest: it never grows while a version is loaded.
    """
    resources = manifest.resources
    return int(resources.host_bytes) + replicas * sum(int(b) for b in resources.device_bytes)


def replaced_versions(
    available_on_disk: Sequence[int],
    states: Mapping[int, VersionState],
    policy: VersionPolicy,
    candidate: int,
) -> tuple[int, ...]:
    """The READY versions `policy` will unload once `candidate` is READY: what it replaces.

    Asks `decide` about the state the bundle will be in when the candidate, still loading, has
    loaded; the versions that decision unloads (the candidate aside) are the ones whose memory
    the candidate may take.
    """
    when_ready = {**states, candidate: VersionState.READY}
    return tuple(
        v for v in decide(available_on_disk, when_ready, policy).to_unload if v != candidate
    )


class SwitchMode(enum.Enum):
    """How a version comes in (see `plan_switch`)."""

    BESIDE = "beside"
    """Load next to the loaded versions (after `SwitchPlan.unload_before`, if any)."""
    REPLICA_BY_REPLICA = "replica_by_replica"
    """Retire one replica of the default version, load one of the new one, and so on."""
    UNLOAD_FIRST = "unload_first"
    """Unload the default version (one replica), then load: a bounded unavailable window."""


@dataclass(frozen=True)
class SwitchPlan:
    """What the manager does to bring a version in within the memory budget.

    Attributes:
        mode: how the version loads.
        unload_before: replaced versions other than the default, to unload before it loads,
            oldest first.
        swap_out: the default version the new one takes the place of (REPLICA_BY_REPLICA and
            UNLOAD_FIRST), else None.
    """

    mode: SwitchMode
    unload_before: tuple[int, ...] = ()
    swap_out: int | None = None


def plan_switch(
    *,
    what: str,
    need_bytes: int,
    replicas: int,
    loaded_bytes: int,
    budget_bytes: int | None,
    replaced: Mapping[int, int] | None,
    default: int | None,
    default_replicas: int,
) -> SwitchPlan:
    """Decides how a version comes in without the estimates of everything loaded passing the
    budget; prefers what keeps the most serving capacity.

    1. Everything fits beside what is loaded (or there is no budget): BESIDE.
    2. Else the versions it replaces make room: those other than the default are unloaded
       first; if it then fits, BESIDE. Otherwise the default is swapped: REPLICA_BY_REPLICA
       when it has >= 2 replicas (capacity dips but never reaches zero), UNLOAD_FIRST with one.

    Args:
        what: names the version in messages, e.g. "bundle movies v3".
        need_bytes: its estimate (`estimated_bytes`) with `replicas` replicas.
        replicas: the replicas it would load.
        loaded_bytes: the estimates of every loaded version of every bundle.
        budget_bytes: the budget, or None for no limit.
        replaced: loaded versions it replaces -> their estimates, or None for an operator's
            explicit load, which only ever loads beside the others.
        default: the bundle's default version, or None.
        default_replicas: the default version's replicas now.

    Raises:
        FailedPrecondition: it does not fit beside the loaded versions (explicit load), or not
            even once the versions it replaces are gone.
    """
    if budget_bytes is None or loaded_bytes + need_bytes <= budget_bytes:
        return SwitchPlan(SwitchMode.BESIDE)
    where = (
        f"{what} needs ~{need_bytes} bytes ({replicas} replica(s), manifest estimate) beside "
        f"{loaded_bytes} bytes loaded; memory budget {budget_bytes} bytes"
    )
    if replaced is None:
        raise FailedPrecondition(where + "; unload a version first")
    if loaded_bytes - sum(replaced.values()) + need_bytes > budget_bytes:
        raise FailedPrecondition(
            f"{where}; it does not fit even after unloading the version(s) it replaces "
            f"({', '.join(str(v) for v in replaced) or 'none'})"
        )
    others = tuple(v for v in replaced if v != default)
    remaining = loaded_bytes - sum(replaced[v] for v in others)
    if default not in replaced or remaining + need_bytes <= budget_bytes:
        return SwitchPlan(SwitchMode.BESIDE, unload_before=others)
    mode = SwitchMode.REPLICA_BY_REPLICA if default_replicas >= 2 else SwitchMode.UNLOAD_FIRST
    return SwitchPlan(mode, unload_before=others, swap_out=default)
