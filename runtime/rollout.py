"""Fleet rollout: move a list of servers to one bundle version, one server at a time.

Each server is named by its admin address (`recship serve --admin-host/--admin-port`, or a
`unix:` socket) and pinned to the target version through its `BundleAdmin` API
(`SetVersionPolicy`, which returns once the server has loaded the version beside the serving
one, self-tested it and switched its default), with the fleet's admin token and TLS settings;
the rollout then checks that the version is READY and the default and that health (served on
the admin listener too) is SERVING before it touches the next server. If any
server fails (the version FAILED there, an RPC error, not SERVING in time), the rollout stops
and re-pins every server it changed, the failing one included, to the version it served
before, so the fleet is back where it started. Servers are never changed in parallel, so at
most one is switching at any moment.

Example::

    result = rollout(["10.0.0.1:8501", "10.0.0.2:8501"], "movies", 7, token=token, tls=tls)
    if not result.ok:
        print(result.steps[-1].detail)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import click

from recship.base.errors import FailedPrecondition, InvalidInput, RecshipError
from recship.protos.v1 import admin_pb2
from recship.runtime.cli_options import (
    admin_token,
    admin_token_option,
    client_tls,
    tls_client_options,
)
from recship.runtime.security import ClientTLS

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RolloutStep:
    """What happened on one server.

    Attributes:
        server: "host:port".
        previous: the version it served by default before the rollout (None: none).
        outcome: "moved", "failed", "rolled back", "rollback failed" or "not started".
        detail: the failure reason, or "".
    """

    server: str
    previous: int | None
    outcome: str
    detail: str = ""


@dataclass(frozen=True)
class RolloutResult:
    """The rollout's outcome: `ok` when every server serves the target version by default."""

    bundle: str
    version: int
    ok: bool
    steps: tuple[RolloutStep, ...]


def _pinned(version: int) -> admin_pb2.VersionPolicy:
    return admin_pb2.VersionPolicy(pinned=admin_pb2.PinnedPolicy(versions=[version]))


def _default(status: admin_pb2.BundleStatus) -> int | None:
    return next((v.version for v in status.versions if v.is_default), None)


def _move(client, bundle: str, version: int, timeout_s: float) -> None:
    """Pins `version` on one server and checks it serves it; raises RecshipError if not."""
    status = client.set_version_policy(bundle, _pinned(version), timeout=timeout_s)
    target = next((v for v in status.versions if v.version == version), None)
    if target is None:
        raise FailedPrecondition(f"version {version} is not published in the server's repository")
    if target.state != admin_pb2.VERSION_STATE_READY or not target.is_default:
        state = admin_pb2.VersionState.Name(target.state).removeprefix("VERSION_STATE_")
        reason = f": {target.failure_reason}" if target.failure_reason else ""
        raise FailedPrecondition(f"version {version} is {state}{reason}")
    client.wait_until_serving(timeout_s)


def rollout(
    servers: Sequence[str],
    bundle: str,
    version: int,
    *,
    timeout_s: float = 300.0,
    token: str | None = None,
    tls: ClientTLS | None = None,
) -> RolloutResult:
    """Moves `servers` to `version` of `bundle` one at a time, rolling back on a failure.

    Args:
        servers: admin address ("host:port" or "unix:/path") of each server, in rollout order.
        bundle: bundle name.
        version: target version (> 0), published in every server's repository.
        timeout_s: the longest one server may take to load, self-test and switch.
        token: the servers' admin token (None for servers without one).
        tls: how to reach the servers' TLS admin listeners (None: plaintext).

    Returns:
        The per-server steps; servers after a failed one are "not started". Rolled-back
        servers stay pinned to their previous version (set the policy back to `latest`
        explicitly once the bad version is dealt with).

    Raises:
        InvalidInput: no servers, a repeated server, or `version` <= 0.
    """
    from recship.runtime.client import AdminClient

    def connect(server: str) -> AdminClient:
        return AdminClient(server, token=token, timeout=timeout_s, tls=tls)

    if not servers:
        raise InvalidInput("--servers: give at least one host:port")
    if len(set(servers)) != len(servers):
        raise InvalidInput(f"--servers: a server is listed twice: {list(servers)}")
    if version <= 0:
        raise InvalidInput(f"--version must be > 0, got {version}")
    steps: list[RolloutStep] = []
    changed: list[tuple[str, int | None]] = []
    failure: RolloutStep | None = None
    for server in servers:
        with connect(server) as client:
            previous: int | None = None
            try:
                previous = _default(client.bundle_status(bundle))
                changed.append((server, previous))
                _move(client, bundle, version, timeout_s)
            except RecshipError as error:
                logger.error("rollout: %s failed: %s", server, error)
                failure = RolloutStep(server, previous, "failed", str(error))
                break
        steps.append(RolloutStep(server, previous, "moved"))
        logger.info("rollout: %s now serves %s v%d", server, bundle, version)
    if failure is None:
        return RolloutResult(bundle, version, True, tuple(steps))

    outcomes: dict[str, RolloutStep] = {}
    for server, previous in reversed(changed):
        if previous is None:
            outcomes[server] = RolloutStep(server, None, "rollback failed", "no previous version")
            continue
        try:
            with connect(server) as client:
                _move(client, bundle, previous, timeout_s)
        except RecshipError as error:
            outcomes[server] = RolloutStep(server, previous, "rollback failed", str(error))
            continue
        outcomes[server] = RolloutStep(server, previous, "rolled back")
    result: list[RolloutStep] = []
    for server in servers:
        step = outcomes.get(server, RolloutStep(server, None, "not started"))
        if server == failure.server:
            step = RolloutStep(server, failure.previous, f"failed, {step.outcome}", failure.detail)
        result.append(step)
    return RolloutResult(bundle, version, False, tuple(result))


@click.command("rollout")
@click.option("--servers", required=True,
              help="Comma-separated admin addresses (--admin-port), in order.")  # fmt: skip
@click.option("--bundle", required=True, help="Bundle name.")
@click.option("--version", "version", type=int, required=True, help="Target version.")
@click.option("--timeout-s", type=float, default=300.0, show_default=True,
              help="Longest time one server may take to load and switch.")  # fmt: skip
@admin_token_option
@tls_client_options
def rollout_command(
    servers: str, bundle: str, version: int, timeout_s: float, **connection: object
) -> None:
    """Move servers to a bundle version one at a time; roll back all if one fails."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    tls = client_tls(connection)
    token = admin_token(connection)
    targets = [part.strip() for part in servers.split(",") if part.strip()]
    result = rollout(targets, bundle, version, timeout_s=timeout_s, token=token, tls=tls)
    table = Table("server", "previous", "outcome", "detail", title=f"{bundle} -> v{version}")
    for step in result.steps:
        previous = "-" if step.previous is None else str(step.previous)
        table.add_row(Text(step.server), previous, step.outcome, Text(step.detail))
    Console().print(table)
    if not result.ok:
        raise FailedPrecondition(f"rollout of {bundle} v{version} stopped and was rolled back")
