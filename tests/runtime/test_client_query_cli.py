"""`recship query` prints a table from a live server; bad flags are one readable error."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from recship.base.errors import InvalidInput
from recship.runtime.serve_cli import parse_features, query_command

pytestmark = pytest.mark.integration

FEATURES = "user_id=3,user_age_bucket=30,user_gender=gender_1,user_log_activity=0.5"


def test_query_prints_recommendations_and_retrievals(live_server, client) -> None:
    runner = CliRunner()
    args = ["--server", live_server.target, "--bundle", "movies", "--user-features", FEATURES,
            "--retrieve-k", "20", "--top-n", "4", "--exclude", "1,2"]  # fmt: skip
    result = runner.invoke(query_command, args)
    assert result.exit_code == 0, result.output
    assert "movies v1" in result.output and "rank score" in result.output
    retrieved = runner.invoke(query_command, [*args, "--rpc", "retrieve"])
    assert retrieved.exit_code == 0, retrieved.output
    assert "retrieval score" in retrieved.output


def test_query_by_the_user_key_alone(live_server) -> None:
    result = CliRunner().invoke(
        query_command,
        [
            "--server",
            live_server.target,
            "--bundle",
            "movies",
            "--user-features",
            "user_id=196",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "rank score" in result.output and "cold start" not in result.output


def test_parse_features() -> None:
    assert parse_features('user_id=3, tags=a|b, score=0.5, zip="01234"') == {
        "user_id": 3,
        "tags": ["a", "b"],
        "score": 0.5,
        "zip": "01234",
    }
    with pytest.raises(InvalidInput, match="'user_id' is not name=value"):
        parse_features("user_id")
