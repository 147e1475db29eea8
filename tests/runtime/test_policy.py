"""Version policy as tables: (versions on disk, states, policy) -> expected decision."""

from __future__ import annotations

import pytest

from recship.base.errors import FailedPrecondition, InvalidInput, NotFound, Unavailable
from recship.protos.v1 import admin_pb2, manifest_pb2
from recship.runtime.policy import (
    Decision,
    Latest,
    LatestN,
    Pinned,
    SwitchMode,
    SwitchPlan,
    VersionState,
    check_label,
    decide,
    estimated_bytes,
    parse_policy,
    plan_switch,
    policy_from_proto,
    policy_to_proto,
    replaced_versions,
    resolve,
)

NEW = VersionState.NEW
LOADING = VersionState.LOADING
READY = VersionState.READY
DRAINING = VersionState.DRAINING
UNLOADED = VersionState.UNLOADED
FAILED = VersionState.FAILED


def test_states_match_admin_proto() -> None:
    proto_names = {
        name.removeprefix("VERSION_STATE_"): number
        for name, number in admin_pb2.VersionState.items()
        if name != "VERSION_STATE_UNSPECIFIED"
    }
    assert {s.name: s.value for s in VersionState} == proto_names


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("latest", Latest()),
        ("  LATEST ", Latest()),
        ("latest:1", LatestN(1)),
        ("latest:3", LatestN(3)),
        ("pinned:7", Pinned((7,))),
        ("pinned:3,1,3", Pinned((1, 3))),
        ("pinned: 2 , 5", Pinned((2, 5))),
    ],
)
def test_parse_policy(text: str, expected: object) -> None:
    policy = parse_policy(text)
    assert policy == expected
    assert parse_policy(str(policy)) == policy
    assert policy_from_proto(policy_to_proto(policy)) == policy


@pytest.mark.parametrize(
    "text",
    ["", "latest:", "latest:0", "latest:-1", "latest:x", "newest", "pinned", "pinned:",
     "pinned:0", "pinned:1,", "pinned:a", "pinned:-2", "latest:2:3"],
)  # fmt: skip
def test_parse_policy_rejects(text: str) -> None:
    with pytest.raises(InvalidInput, match="version policy"):
        parse_policy(text)


def test_policy_from_proto_defaults_and_errors() -> None:
    assert policy_from_proto(admin_pb2.VersionPolicy()) == Latest()
    with pytest.raises(InvalidInput):
        policy_from_proto(admin_pb2.VersionPolicy(latest_n=admin_pb2.LatestNPolicy(count=0)))
    with pytest.raises(InvalidInput):
        policy_from_proto(admin_pb2.VersionPolicy(pinned=admin_pb2.PinnedPolicy()))
    with pytest.raises(InvalidInput, match="> 0"):
        policy_from_proto(admin_pb2.VersionPolicy(pinned=admin_pb2.PinnedPolicy(versions=[-1])))


# (case, versions on disk, states, policy, expected decision)
DECIDE_TABLE = [
    ("first start: nothing seen yet",
     [1], {}, Latest(), Decision((1,), (), None)),
    ("first start: only the newest of several loads",
     [1, 2, 3], {}, Latest(), Decision((3,), (), None)),
    ("first start: loading",
     [1], {1: LOADING}, Latest(), Decision((), (), None)),
    ("first start: ready is steady",
     [1], {1: READY}, Latest(), Decision((), (), 1)),
    ("first start: the only version fails, nothing to serve, no retry",
     [1], {1: FAILED}, Latest(), Decision((), (), None)),
    ("empty repository",
     [], {}, Latest(), Decision((), (), None)),
    ("new version appears: load it beside the old, old keeps serving",
     [1, 2], {1: READY}, Latest(), Decision((2,), (), 1, held=(1,))),
    ("new version seen as NEW: load it",
     [1, 2], {1: READY, 2: NEW}, Latest(), Decision((2,), (), 1, held=(1,))),
    ("new version loads while old serves: old is not unloaded yet",
     [1, 2], {1: READY, 2: LOADING}, Latest(), Decision((), (), 1, held=(1,))),
    ("unload only after READY: new ready -> old unloaded, default switches",
     [1, 2], {1: READY, 2: READY}, Latest(), Decision((), (1,), 2)),
    ("old draining: new serves, nothing to do",
     [1, 2], {1: DRAINING, 2: READY}, Latest(), Decision((), (), 2)),
    ("switch done",
     [1, 2], {1: UNLOADED, 2: READY}, Latest(), Decision((), (), 2)),
    ("new version fails: previous keeps serving and is wanted again",
     [1, 2], {1: READY, 2: FAILED}, Latest(), Decision((), (), 1)),
    ("FAILED never retried, even after the old one was unloaded",
     [1, 2], {1: UNLOADED, 2: FAILED}, Latest(), Decision((1,), (), None)),
    ("newer version after a failed one loads",
     [1, 2, 3], {1: READY, 2: FAILED}, Latest(), Decision((3,), (), 1, held=(1,))),
    ("two new versions while one loads: newest wanted, loading one left to finish",
     [1, 2, 3], {1: READY, 2: LOADING}, Latest(), Decision((3,), (), 1, held=(1,))),
    ("intermediate version became ready before the newest: hold the newest ready",
     [1, 2, 3], {1: READY, 2: READY, 3: LOADING}, Latest(), Decision((), (1,), 2, held=(2,))),
    ("latest:2 window on first start",
     [1, 2, 3], {}, LatestN(2), Decision((3, 2), (), None)),
    ("latest:2 steady",
     [1, 2], {1: READY, 2: READY}, LatestN(2), Decision((), (), 2)),
    ("latest:2 window slides: v1 leaves once v2 (wanted) is ready",
     [1, 2, 3], {1: READY, 2: READY}, LatestN(2), Decision((3,), (1,), 2)),
    ("latest:2 window skips a FAILED version",
     [1, 2, 3], {1: READY, 2: READY, 3: FAILED}, LatestN(2), Decision((), (), 2)),
    ("latest:2 with fewer versions than N",
     [4], {4: READY}, LatestN(2), Decision((), (), 4)),
    ("latest:1 behaves as latest",
     [1, 2], {1: READY, 2: READY}, LatestN(1), Decision((), (1,), 2)),
    ("pin back to older version: reload it, newer keeps serving meanwhile",
     [1, 2, 3], {2: UNLOADED, 3: READY}, Pinned((2,)), Decision((2,), (), 3, held=(3,))),
    ("pin back: older one loading",
     [1, 2, 3], {2: LOADING, 3: READY}, Pinned((2,)), Decision((), (), 3, held=(3,))),
    ("pin back: older one ready, newer unloaded",
     [1, 2, 3], {2: READY, 3: READY}, Pinned((2,)), Decision((), (3,), 2)),
    ("pin back while the pinned one is still draining: wait for it to unload",
     [1, 2, 3], {2: DRAINING, 3: READY}, Pinned((2,)), Decision((), (), 3, held=(3,))),
    ("pinned to two versions, highest is default",
     [1, 2, 3], {1: READY, 2: READY, 3: READY}, Pinned((1, 3)), Decision((), (2,), 3)),
    ("pinned missing on disk: reported, current one keeps serving",
     [1, 2], {2: READY}, Pinned((9,)), Decision((), (), 2, held=(2,), missing=(9,))),
    ("pinned partly missing: load the present one",
     [1, 2], {2: READY}, Pinned((1, 9)), Decision((1,), (), 2, held=(2,), missing=(9,))),
    ("pinned FAILED: not retried, previous keeps serving",
     [1, 2], {1: READY, 2: FAILED}, Pinned((2,)), Decision((), (), 1, held=(1,))),
    ("pinned version removed from disk while loaded: keeps serving, not missing",
     [1], {2: READY}, Pinned((2,)), Decision((), (), 2)),
    ("version removed from disk while loaded: older one reloads, removed one held",
     [1], {1: UNLOADED, 2: READY}, Latest(), Decision((1,), (), 2, held=(2,))),
    ("version removed from disk, replacement ready: removed one unloads",
     [1], {1: READY, 2: READY}, Latest(), Decision((), (2,), 1)),
    ("the only version removed from disk: held, never dropped to zero",
     [], {1: READY}, Latest(), Decision((), (), 1, held=(1,))),
    ("several unwanted ready, nothing wanted ready: keep only the newest",
     [1, 2, 3, 4], {1: READY, 2: READY, 3: READY, 4: LOADING}, Latest(),
     Decision((), (1, 2), 3, held=(3,))),
]  # fmt: skip


@pytest.mark.parametrize(
    ("on_disk", "states", "policy", "expected"),
    [case[1:] for case in DECIDE_TABLE],
    ids=[case[0] for case in DECIDE_TABLE],
)
def test_decide(
    on_disk: list[int],
    states: dict[int, VersionState],
    policy: Latest | LatestN | Pinned,
    expected: Decision,
) -> None:
    assert decide(on_disk, states, policy) == expected


@pytest.mark.parametrize(
    ("on_disk", "policy", "fail"),
    [
        ([1, 2], Latest(), set()),
        ([1, 2, 3], LatestN(2), set()),
        ([1, 2, 3], Latest(), {3}),
        ([1, 2, 3], Pinned((1,)), set()),
        ([1, 2, 3], LatestN(2), {2, 3}),
    ],
)
def test_decide_converges_without_losing_availability(
    on_disk: list[int], policy: Latest | LatestN | Pinned, fail: set[int]
) -> None:
    # Start with v1 serving; apply each decision (loads finish as READY or FAILED, unloads go
    # through DRAINING to UNLOADED) and check that some version is READY at every step.
    states: dict[int, VersionState] = {1: READY}
    for _ in range(10):
        decision = decide(on_disk, states, policy)
        assert decision.default_version is not None
        assert states[decision.default_version] is READY
        if not decision.to_load and not decision.to_unload:
            break
        for v in decision.to_load:
            states[v] = FAILED if v in fail else READY
        for v in decision.to_unload:
            states[v] = UNLOADED
    else:
        pytest.fail(f"no convergence: {states}")
    assert decide(on_disk, states, policy) == decision


@pytest.mark.parametrize("label", ["stable", "canary-2", "A_b", "x" * 64])
def test_check_label_accepts(label: str) -> None:
    assert check_label(label) == label


@pytest.mark.parametrize("label", ["", "x" * 65, "has space", "dot.ted", "ü"])
def test_check_label_rejects(label: str) -> None:
    with pytest.raises(InvalidInput, match="label"):
        check_label(label)


LABELS = {"stable": 2, "canary": 3, "old": 1, "next": 4}
STATES = {1: UNLOADED, 2: READY, 3: READY, 4: LOADING, 5: FAILED, 6: DRAINING}


@pytest.mark.parametrize(
    ("version", "label", "default", "expected"),
    [
        (None, None, 3, 3),
        (2, None, 3, 2),
        (None, "stable", 3, 2),
        (None, "canary", 2, 3),
        (None, None, None, Unavailable),
        (7, None, 3, NotFound),
        (1, None, 3, NotFound),
        (5, None, 3, NotFound),
        (6, None, 3, NotFound),
        (4, None, 3, Unavailable),
        (None, "next", 3, Unavailable),
        (None, "old", 3, NotFound),
        (None, "nope", 3, NotFound),
        (0, None, 3, InvalidInput),
        (2, "stable", 3, InvalidInput),
    ],
)
def test_resolve(
    version: int | None, label: str | None, default: int | None, expected: int | type
) -> None:
    def call() -> int:
        return resolve(
            "movies", version=version, label=label, labels=LABELS, states=STATES, default=default
        )

    if isinstance(expected, int):
        assert call() == expected
    else:
        with pytest.raises(expected, match=r"movies|version|model"):
            call()


# -- how to switch --------------------------------------------------------------------------
BESIDE, BY_REPLICA, UNLOAD_FIRST = (
    SwitchMode.BESIDE,
    SwitchMode.REPLICA_BY_REPLICA,
    SwitchMode.UNLOAD_FIRST,
)

# (case, need, loaded, budget, replaced {version: bytes} or None, default, default replicas,
#  expected plan or the error's message fragment)
SWITCH_TABLE = [
    ("no budget: always beside",
     100, 10_000, None, {1: 100}, 1, 1, SwitchPlan(BESIDE)),
    ("fits beside everything loaded",
     100, 100, 250, {1: 100}, 1, 1, SwitchPlan(BESIDE)),
    ("fits exactly",
     100, 150, 250, {1: 100}, 1, 1, SwitchPlan(BESIDE)),
    ("replaced non-default versions make room: unload them, then beside",
     100, 300, 300, {1: 100, 2: 100}, 3, 2, SwitchPlan(BESIDE, unload_before=(1, 2))),
    ("only the default makes room, it has 2 replicas: replica by replica",
     100, 200, 250, {3: 200}, 3, 2, SwitchPlan(BY_REPLICA, swap_out=3)),
    ("only the default makes room, one replica: unload it first",
     100, 100, 150, {3: 100}, 3, 1, SwitchPlan(UNLOAD_FIRST, swap_out=3)),
    ("older ones go first, then the default is still needed",
     100, 300, 250, {1: 100, 3: 200}, 3, 2, SwitchPlan(BY_REPLICA, (1,), swap_out=3)),
    ("older ones going is enough: default keeps serving beside",
     100, 300, 250, {1: 150, 3: 150}, 3, 2, SwitchPlan(BESIDE, unload_before=(1,))),
    ("does not fit even after the replaced ones go",
     500, 100, 250, {1: 100}, 1, 1, "even after unloading the version(s) it replaces (1)"),
    ("nothing replaced and no room",
     100, 200, 250, {}, 1, 1, "replaces (none)"),
    ("an operator's load only goes beside",
     100, 200, 250, None, 1, 2, "unload a version first"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("need", "loaded", "budget", "replaced", "default", "replicas", "expected"),
    [case[1:] for case in SWITCH_TABLE],
    ids=[case[0] for case in SWITCH_TABLE],
)
def test_plan_switch(
    need: int,
    loaded: int,
    budget: int | None,
    replaced: dict[int, int] | None,
    default: int | None,
    replicas: int,
    expected: SwitchPlan | str,
) -> None:
    def call() -> SwitchPlan:
        return plan_switch(
            what="bundle movies v9",
            need_bytes=need,
            replicas=2,
            loaded_bytes=loaded,
            budget_bytes=budget,
            replaced=replaced,
            default=default,
            default_replicas=replicas,
        )

    if isinstance(expected, SwitchPlan):
        assert call() == expected
    else:
        with pytest.raises(FailedPrecondition, match="bundle movies v9 needs ~") as caught:
            call()
        assert expected in str(caught.value)


@pytest.mark.parametrize(
    ("on_disk", "states", "policy", "candidate", "expected"),
    [
        ([1, 2], {1: READY, 2: LOADING}, Latest(), 2, (1,)),
        ([1, 2, 3], {1: READY, 2: READY, 3: LOADING}, Latest(), 3, (1, 2)),
        ([1, 2, 3], {2: READY, 3: LOADING}, LatestN(2), 3, ()),
        ([1, 2, 3], {1: READY, 2: READY, 3: LOADING}, LatestN(2), 3, (1,)),
        ([1, 2, 3], {3: READY, 1: LOADING}, Pinned((1,)), 1, (3,)),
        ([1, 2], {1: READY, 2: READY}, Pinned((1, 2)), 2, ()),
    ],
)
def test_replaced_versions(
    on_disk: list[int],
    states: dict[int, VersionState],
    policy: Latest | LatestN | Pinned,
    candidate: int,
    expected: tuple[int, ...],
) -> None:
    assert replaced_versions(on_disk, states, policy, candidate) == expected


def test_estimated_bytes_counts_host_once_and_devices_per_replica() -> None:
    manifest = manifest_pb2.BundleManifest(
        resources=manifest_pb2.ResourceEstimate(host_bytes=1000, device_bytes=[30, 20])
    )
    assert estimated_bytes(manifest, 1) == 1050
    assert estimated_bytes(manifest, 3) == 1150
