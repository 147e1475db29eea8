"""`recship query` prints a table from a live server; bad flags are one readable error."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from recship.base.errors import InvalidInput
from recship.runtime.serve_cli import parse_features, query_command

pytestmark = pytest.mark.integration

FEATURES = "user_id=3,user_age_bucket=2,user_gender=1,user_occupation=4,user_zip_prefix=5"


def test_query_prints_recommendations_and_retrievals(live_server, client) -> None:
    runner = CliRunner()
    args = ["--server", live_server.target, "--bundle", "movies", "--user-features", FEATURES,
            "--dense", "0.5", "--retrieve-k", "20", "--top-n", "4", "--exclude", "1,2"]  # fmt: skip
    result = runner.invoke(query_command, args)
    assert result.exit_code == 0, result.output
    assert "movies v1" in result.output and "rank score" in result.output
    retrieved = runner.invoke(query_command, [*args, "--rpc", "retrieve"])
    assert retrieved.exit_code == 0, retrieved.output
    assert "retrieval score" in retrieved.output


def test_parse_features() -> None:
    assert parse_features("user_id=3, genres=1|4") == {"user_id": [3], "genres": [1, 4]}
    with pytest.raises(InvalidInput, match="'user_id' is not name=id"):
        parse_features("user_id")
