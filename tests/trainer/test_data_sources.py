"""`open_source` resolution and the `recship data` commands on generated data."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from recship.base.errors import InvalidInput, NotFound
from recship.cli.main import main
from recship.trainer.data.criteo import CriteoSource
from recship.trainer.data.dataset import InteractionDataset
from recship.trainer.data.movielens import write_movielens
from recship.trainer.data.sources import open_source
from recship.trainer.data.synthetic import generate
from recship.trainer.data_cli import data_command, describe


def test_synthetic_takes_generator_options_and_ignores_none() -> None:
    data = open_source("synthetic", num_users=30, num_items=20, seed=3, table_size=None)
    assert isinstance(data, InteractionDataset)
    assert (data.num_users, data.num_items) == (30, 20)
    with pytest.raises(InvalidInput, match="option\\(s\\) table_size do not apply"):
        open_source("synthetic", table_size=10)


def test_movielens_100k_comes_from_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RECSHIP_CACHE", str(tmp_path))
    with pytest.raises(NotFound) as caught:
        open_source("movielens-100k")
    assert str(caught.value) == (
        f"MovieLens-100K is not in the cache ({tmp_path / 'ml-100k'}); "
        "run `recship data fetch movielens-100k` first"
    )
    small = generate(num_users=40, num_items=30, interactions_per_user=4, seed=0)
    write_movielens(small, tmp_path / "ml-100k", layout="atomic")
    data = open_source("movielens-100k")
    assert isinstance(data, InteractionDataset)
    assert data.schema.name == "movielens-100k" and len(data) == 160


def test_paths_pick_movielens_directories_and_criteo_files(tmp_path: Path) -> None:
    small = generate(num_users=40, num_items=30, interactions_per_user=4, seed=0)
    folder = write_movielens(small, tmp_path / "mine")
    data = open_source(str(folder))
    assert isinstance(data, InteractionDataset) and data.schema.name == "mine"
    tsv = tmp_path / "day.tsv"
    tsv.write_text("\t".join(["1", *[""] * 13, *["a"] * 26]) + "\n")
    criteo = open_source(str(tsv), table_size=64)
    assert criteo == CriteoSource(tsv, 64)
    with pytest.raises(InvalidInput, match="do not apply \\(it takes no options\\)"):
        open_source(str(folder), num_users=3)
    with pytest.raises(NotFound, match="not 'synthetic' or 'movielens-100k', and no such file"):
        open_source(str(tmp_path / "absent"))


def test_describe_and_stats_command(tmp_path: Path) -> None:
    rows = dict(describe("synthetic"))
    assert rows["users"] == "2000" and rows["interactions"] == "40000"
    assert rows["sparse item item_genres"].endswith("(multi-valued)")
    tsv = tmp_path / "day.tsv"
    line = "\t".join(["1", *["3"] * 13, *["a"] * 26])
    tsv.write_text(f"{line}\n{line.replace('1', '0', 1)}\n")
    assert dict(describe(str(tsv), table_size=8))["positive rate"] == "0.5000"
    result = CliRunner().invoke(data_command, ["stats", str(tsv), "--table-size", "8"])
    assert result.exit_code == 0, result.output
    assert "examples" in result.output


def test_root_cli_reports_one_line_and_exit_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["data", "stats", str(tmp_path / "absent")])
    assert exited.value.code == NotFound.exit_code
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: data source") and "\n" not in err
