"""`recship serve` flag parsing: --policy, --label, --memory-budget-bytes, --max-delay-ms and
the native front end's --max-batch-calls and --max-inflight.

Good values parse into the `ServerConfig` fields; bad ones stop `recship serve` before it binds
a port or reads the repository, with one readable `error:` line and exit code 2 (InvalidInput).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from recship.base.errors import InvalidInput
from recship.cli.main import main
from recship.runtime.batcher import DEFAULT_MAX_DELAY_S
from recship.runtime.front_end import DEFAULT_FILL_WAIT_MS
from recship.runtime.policy import Latest, LatestN, Pinned
from recship.runtime.serve_cli import parse_label, parse_policies
from recship.runtime.server import ServerConfig


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """`recship serve` configures the root logger for a server process; undo it afterwards."""
    root, recship = logging.getLogger(), logging.getLogger("recship")
    handlers, level, recship_level = root.handlers[:], root.level, recship.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    recship.setLevel(recship_level)


def test_parse_policies_reads_each_form() -> None:
    assert parse_policies(("movies=latest", " ads = latest:2", "news=pinned:5,3,5")) == {
        "movies": Latest(),
        "ads": LatestN(2),
        "news": Pinned((3, 5)),
    }
    assert parse_policies(()) == {}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (("latest",), "expected NAME=latest"),
        (("=latest",), "expected NAME=latest"),
        (("movies=newest",), "bad version policy 'newest'"),
        (("movies=latest:0",), "N >= 1"),
        (("movies=pinned:",), "bad version policy"),
        (("movies=pinned:0",), "must be > 0"),
        (("movies=latest", "movies=pinned:2"), "'movies' is given twice"),
    ],
)
def test_parse_policies_rejects(values: tuple[str, ...], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        parse_policies(values)


def test_parse_label_reads_name_label_version() -> None:
    assert parse_label("movies:stable=3") == ("movies", "stable", 3)
    assert parse_label(" movies : canary-2 = 12") == ("movies", "canary-2", 12)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("movies:stable", "expected NAME:LABEL=VERSION"),
        ("stable=3", "expected NAME:LABEL=VERSION"),
        (":stable=3", "expected NAME:LABEL=VERSION"),
        ("movies:stable=three", "expected NAME:LABEL=VERSION"),
        ("movies:stable=-1", "expected NAME:LABEL=VERSION"),
        ("movies:stable=0", "the version must be > 0"),
        ("movies:st able=3", "bad label 'st able'"),
        ("movies:=3", "bad label ''"),
    ],
)
def test_parse_label_rejects(text: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        parse_label(text)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--policy", "movies=sometimes"], "bad version policy 'sometimes'"),
        (["--policy", "latest:2"], "--policy 'latest:2': expected NAME="),
        (["--label", "movies:stable"], "--label 'movies:stable': expected NAME:LABEL=VERSION"),
        (["--label", "movies:no/slash=2"], "bad label 'no/slash'"),
        (["--memory-budget-bytes", "0"], "--memory-budget-bytes must be > 0"),
        (["--max-inflight", "2"], "--max-inflight is the native front end's"),
        (["--front-end", "native", "--max-batch-calls", "0"], "--max-batch-calls must be >= 1"),
    ],
)
def test_serve_rejects_bad_flags_with_one_line_and_exit_2(
    flags: list[str],
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    restore_logging: None,
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--repo", str(tmp_path), "--port", "0", *flags])
    assert exited.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: ") and message in lines[0]
    assert "listening" not in captured.out


def test_the_fill_wait_defaults_to_whoever_waits(tmp_path: Path) -> None:
    """0 for the replicas' batchers, the front end's own default behind the native front end;
    an explicit --max-delay-ms holds for both."""
    assert ServerConfig(tmp_path).delay_ms == DEFAULT_MAX_DELAY_S * 1000.0
    native = ServerConfig(tmp_path, front_end="native")
    assert native.delay_ms == DEFAULT_FILL_WAIT_MS > 0
    # Behind the native front end the workers' batchers never wait: batches arrive whole.
    assert native.loader_config().batching.max_delay_s == 0.0
    assert ServerConfig(tmp_path, max_delay_ms=7.0).loader_config().batching.max_delay_s == 0.007
    for front_end in ("grpcio", "native"):
        assert ServerConfig(tmp_path, front_end=front_end, max_delay_ms=0.0).delay_ms == 0.0
        assert ServerConfig(tmp_path, front_end=front_end, max_delay_ms=7.0).delay_ms == 7.0
