"""MovieLens readers on generated GroupLens and RecBole directories, and their error messages.

The licensed ML-100K files are never committed: fixtures are generated here (hand-written rows,
or synthetic data written with `write_movielens`). One test reads the fetched cache when present.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from recship.base.errors import InvalidInput, NotFound
from recship.trainer.data.fetch import is_complete, movielens_100k_dir
from recship.trainer.data.movielens import (
    ITEM_GENRES,
    ITEM_YEAR_BUCKET,
    USER_AGE_BUCKET,
    USER_ZIP_PREFIX,
    load_movielens,
    write_movielens,
    year_bucket,
)
from recship.trainer.data.synthetic import generate

GENRES_19 = "|".join(["0"] * 19)


def _flags(*on: int) -> str:
    flags = ["0"] * 19
    for i in on:
        flags[i] = "1"
    return "|".join(flags)


def _grouplens(directory: Path) -> Path:
    """A three-user, three-item GroupLens directory in ML-100K's exact layout (Latin-1 u.item)."""
    directory.mkdir()
    (directory / "u.user").write_text(
        "1|24|M|technician|85711\n2|53|F|other|94043\n10|16|M|student|T8H1N\n"
    )
    (directory / "u.item").write_bytes(
        (
            f"1|Toy Story (1995)|01-Jan-1995||http://x|{_flags(3, 4, 5)}\n"
            f"2|Misérables, Les (1995)|01-Jan-1995||http://x|{_flags(8, 12)}\n"
            f"3|unknown||||{_flags(0)}\n"
        ).encode("latin-1")
    )
    (directory / "u.data").write_text(
        "1\t1\t5\t881250949\n1\t2\t3\t881250950\n2\t1\t4\t891717742\n10\t3\t1\t878887116\n"
        "10\t1\t2\t878887117\n"
    )
    return directory


def _atomic(directory: Path) -> Path:
    """The same data as `_grouplens`, as RecBole atomic files (UTF-8)."""
    directory.mkdir()
    (directory / "ml.user").write_text(
        "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
        "1\t24\tM\ttechnician\t85711\n2\t53\tF\tother\t94043\n10\t16\tM\tstudent\tT8H1N\n"
    )
    (directory / "ml.item").write_text(
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        "1\tToy Story\t1995\tAnimation Children's Comedy\n"
        "2\tMisérables, Les\t1995\tDrama Musical\n"
        "3\tunkonwn\tunkonwn\tunknown\n",
        encoding="utf-8",
    )
    (directory / "ml.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        "1\t1\t5\t881250949\n1\t2\t3\t881250950\n2\t1\t4\t891717742\n10\t3\t1\t878887116\n"
        "10\t1\t2\t878887117\n"
    )
    return directory


@pytest.mark.parametrize("layout", ["grouplens", "atomic"])
def test_reads_both_layouts(tmp_path: Path, layout: str) -> None:
    folder = (_grouplens if layout == "grouplens" else _atomic)(tmp_path / "ml")
    data = load_movielens(folder)
    assert data.schema.name == "ml"
    assert (data.num_users, data.num_items, len(data)) == (3, 3, 5)
    # Raw ids are remapped in numeric order: "10" is the last user.
    assert data.raw_user_ids.tolist() == ["1", "2", "10"]
    assert data.user_ids.tolist() == [0, 0, 1, 2, 2]
    assert data.item_ids.tolist() == [0, 1, 0, 2, 0]
    assert data.labels.tolist() == [1, 0, 1, 0, 0]
    assert data.ratings.tolist() == [5, 3, 4, 1, 2]
    assert data.timestamps[0] == 881250949
    assert data.item_titles[1].startswith("Misérables")
    users = data.users.sparse
    assert users[USER_AGE_BUCKET].values.tolist() == [1, 5, 0]
    assert users[USER_ZIP_PREFIX].values.tolist() == [8, 9, 10]
    assert data.vocabularies["user_gender"] == ["F", "M"]
    assert users["user_gender"].values.tolist() == [1, 0, 1]
    genres = data.items.sparse[ITEM_GENRES]
    names = data.vocabularies[ITEM_GENRES]
    bags = [
        sorted(names[g] for g in genres.values[genres.offsets[i] : genres.offsets[i + 1]])
        for i in range(3)
    ]
    assert bags == [["Animation", "Children's", "Comedy"], ["Drama", "Musical"], ["unknown"]]
    assert data.items.sparse[ITEM_YEAR_BUCKET].values.tolist() == [
        year_bucket(1995),
        year_bucket(1995),
        0,
    ]
    # Dense activity features: log1p(count) on all interactions.
    np.testing.assert_allclose(data.users.dense[:, 0], np.log1p([2, 1, 2]), rtol=1e-6)
    np.testing.assert_allclose(data.items.dense[:, 0], np.log1p([3, 1, 1]), rtol=1e-6)


@pytest.mark.parametrize("layout", ["grouplens", "atomic"])
def test_synthetic_data_round_trips_through_files(tmp_path: Path, layout: str) -> None:
    data = generate(num_users=400, num_items=200, interactions_per_user=6, seed=2)
    back = load_movielens(write_movielens(data, tmp_path / "synth", layout=layout))
    assert back.schema.sparse == data.schema.sparse
    for name in ("user_ids", "item_ids", "labels", "timestamps"):
        np.testing.assert_array_equal(getattr(back, name), getattr(data, name))
    for table, original in ((back.users, data.users), (back.items, data.items)):
        for name, column in original.sparse.items():
            np.testing.assert_array_equal(table.sparse[name].values, column.values, err_msg=name)
            np.testing.assert_array_equal(table.sparse[name].offsets, column.offsets)
        np.testing.assert_allclose(table.dense, original.dense)


def _error(folder: Path) -> str:
    with pytest.raises((InvalidInput, NotFound)) as caught:
        load_movielens(folder)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_grouplens_errors_name_file_line_and_problem(tmp_path: Path) -> None:
    folder = _grouplens(tmp_path / "g")
    data = folder / "u.data"
    original = data.read_text()

    data.write_text(original + "1\t3\t4\n")
    assert _error(folder) == f"{data}:6: expected 4 tab-separated columns, got 3"
    data.write_text(original.replace("2\t1\t4", "x2\t1\t4"))
    assert _error(folder) == f"{data}:3: user_id 'x2' is not an integer"
    data.write_text(original.replace("\t5\t", "\tfive\t"))
    assert _error(folder) == f"{data}:1: rating 'five' is not a number"
    data.write_text(original + "99\t1\t4\t0\n")
    assert _error(folder) == f"{data}:6: user_id '99' is not in the users table"
    data.write_text(original + "1\t77\t4\t0\n")
    assert _error(folder) == f"{data}:6: item_id '77' is not in the items table"
    data.write_text(original)

    users = folder / "u.user"
    original_users = users.read_text()
    users.write_text("1|24|M|technician|85711\n1|30|F|other|12345\n")
    assert _error(folder) == f"{users}:2: duplicate user_id '1' (first on line 1)"
    users.write_text("1|old|M|technician|85711\n")
    assert _error(folder) == f"{users}:1: age 'old' is not an integer"
    users.write_text(original_users)

    items = folder / "u.item"
    items.write_text(f"1|Toy Story|01-Jan-1995||x|{GENRES_19}|0\n")
    assert _error(folder) == f"{items}:1: expected 24 '|'-separated columns, got 25"
    items.unlink()
    assert _error(folder) == f"{items}: file not found"


def test_atomic_errors_name_file_line_and_problem(tmp_path: Path) -> None:
    folder = _atomic(tmp_path / "a")
    inter = folder / "ml.inter"
    original = inter.read_text()
    inter.write_text(original.replace("rating:float", "score:float"))
    assert _error(folder) == f"{inter}: no column 'rating' (has user_id, item_id, score, timestamp)"
    inter.write_text(original + "1\t2\n")
    assert _error(folder) == f"{inter}:7: expected 4 tab-separated columns, got 2"
    inter.write_text(original + "1\t2\t4.5\tnoon\n")
    assert _error(folder) == f"{inter}:7: timestamp 'noon' is not a number"
    inter.write_text(original.splitlines()[0] + "\n")
    assert _error(folder) == f"{inter}: no interactions"
    inter.write_text(original)
    (folder / "ml.item").unlink()
    assert _error(folder) == f"{folder / 'ml.item'}: file not found"
    (folder / "other.inter").write_text(original)
    assert "several .inter files" in _error(folder)


def test_missing_or_unrecognised_directory(tmp_path: Path) -> None:
    assert _error(tmp_path / "absent") == f"{tmp_path / 'absent'}: MovieLens directory not found"
    (tmp_path / "empty").mkdir()
    assert "neither u.data (GroupLens) nor a *.inter file" in _error(tmp_path / "empty")


@pytest.mark.skipif(
    not is_complete(movielens_100k_dir()),
    reason="ML-100K not fetched here (run `recship data fetch movielens-100k`)",
)
def test_real_movielens_100k_from_the_cache() -> None:
    data = load_movielens(movielens_100k_dir(), name="movielens-100k")
    assert (data.num_users, data.num_items, len(data)) == (943, 1682, 100_000)
    assert data.labels.mean() == pytest.approx(0.55375)
    assert data.item_titles[0] == "Toy Story"
    assert len(data.vocabularies[ITEM_GENRES]) == 19
    assert np.bincount(data.user_ids).min() >= 20
