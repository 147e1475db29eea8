"""`recship rollout` over two live servers: a good version moves both, a bad one rolls back.

Each server reads its own copy of the repository (as hosts with replicated storage would), so
version 3 can be good on the first and fail its golden self-test on the second.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from recship.runtime.client import AdminClient
from recship.runtime.policy import Pinned
from recship.runtime.rollout import rollout, rollout_command

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BUNDLE = "movies"


def default_version(server) -> int:
    with server.admin() as admin:
        status = admin.bundle_status(BUNDLE)
    return next(v.version for v in status.versions if v.is_default)


def test_rollout_moves_both_then_rolls_back_a_bad_version(
    bundle_repo: Path, tmp_path: Path, server_factory, publish_copy
):
    repos = [tmp_path / "a", tmp_path / "b"]
    for repo in repos:
        shutil.copytree(bundle_repo / BUNDLE / "1", repo / BUNDLE / "1")
        assert publish_copy(repo) == 2
    servers = [
        server_factory(
            repo, poll_interval_s=0.0, metrics_port=None, policies={BUNDLE: Pinned((1,))}
        )
        for repo in repos
    ]
    try:
        for server in servers:
            server.wait_ready()
        targets = [server.admin_target for server in servers]
        token = servers[0].admin_token
        assert [default_version(s) for s in servers] == [1, 1]

        refused = CliRunner().invoke(
            rollout_command, ["--servers", ",".join(targets), "--bundle", BUNDLE, "--version", "2"],
            env={"RECSHIP_ADMIN_TOKEN": ""},
        )  # fmt: skip
        assert refused.exit_code != 0 and "UNAUTHENTICATED" in refused.output, refused.output
        assert [default_version(s) for s in servers] == [1, 1]

        moved = CliRunner().invoke(
            rollout_command, ["--servers", ",".join(targets), "--bundle", BUNDLE, "--version", "2"],
            env={"RECSHIP_ADMIN_TOKEN": token},
        )  # fmt: skip
        assert moved.exit_code == 0, moved.output
        assert moved.output.count("moved") == 2
        assert [default_version(s) for s in servers] == [2, 2]

        assert publish_copy(repos[0]) == 3
        assert publish_copy(repos[1], golden_offset=1.0) == 3
        result = rollout(targets, BUNDLE, 3, timeout_s=120, token=token)
        assert not result.ok
        first, second = result.steps
        assert (first.server, first.previous, first.outcome) == (targets[0], 2, "rolled back")
        assert second.outcome == "failed, rolled back"
        assert "self-test" in second.detail
        assert [default_version(s) for s in servers] == [2, 2]
        with AdminClient(targets[0], token=token) as client:
            states = {v.version: v.state for v in client.bundle_status(BUNDLE).versions}
        assert states[3] == 5  # VERSION_STATE_UNLOADED: it served, then was rolled back
    finally:
        for server in servers:
            server.stop()
