"""MovieLens-format directories: the GroupLens ML-100K layout and RecBole atomic files.

Two layouts are read into the same `InteractionDataset` and schema:

- GroupLens (`u.data`, `u.user`, `u.item`, optional `u.genre`): `u.data` is tab-separated
  `user item rating timestamp`; `u.user` is `id|age|gender|occupation|zip`; `u.item` is
  `id|title|release date|video date|url|<one 0/1 flag per genre>`; ids are integers.
- RecBole atomic files (`<name>.inter`, `<name>.user`, `<name>.item`): tab-separated with a
  `name:type` header, e.g. `user_id:token  item_id:token  rating:float  timestamp:float`,
  `user_id:token  age:token  gender:token  occupation:token  zip_code:token`,
  `item_id:token  movie_title:token_seq  release_year:token  class:token_seq` (genres are the
  space-separated tokens of `class`).

Raw ids are remapped to dense ids 0..n-1 (numeric order when every id is an integer, text order
otherwise); `raw_user_ids`, `raw_item_ids` and `item_titles` keep the way back. Features:

- user: user_id, age bucket (7 buckets: <18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+), gender and
  occupation (vocabularies of the values present), zip prefix (first digit; one extra bucket for
  non-numeric codes such as Canadian ones), dense log1p(number of interactions);
- item: item_id, genres (multi-valued), release-year bucket (5-year buckets from 1930, one for
  earlier years, one for unknown years), dense log1p(number of interactions).

The DLRM label is rating >= 4; two-tower positives are all interactions. Every problem in the
files raises one line naming the file, the line and the problem.

Example::

    data = load_movielens(Path(".cache/recship/ml-100k"))
    train, held_out = data.split(eval_fraction=0.1, seed=0)
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from recship.base.errors import InvalidInput, NotFound
from recship.base.jagged import EntityTable, JaggedColumn
from recship.trainer.data.dataset import (
    ITEM_POPULARITY_FEATURE,
    USER_ACTIVITY_FEATURE,
    InteractionDataset,
)
from recship.trainer.data.schema import DatasetSchema, DenseFeatureSpec, SparseFeatureSpec

USER_ID = "user_id"
USER_AGE_BUCKET = "user_age_bucket"
USER_GENDER = "user_gender"
USER_OCCUPATION = "user_occupation"
USER_ZIP_PREFIX = "user_zip_prefix"
ITEM_ID = "item_id"
ITEM_GENRES = "item_genres"
ITEM_YEAR_BUCKET = "item_year_bucket"

#: (label, first age not in the bucket) of each age bucket, in bucket-id order.
AGE_BUCKETS: tuple[tuple[str, float], ...] = (
    ("<18", 18),
    ("18-24", 25),
    ("25-34", 35),
    ("35-44", 45),
    ("45-49", 50),
    ("50-55", 56),
    ("56+", math.inf),
)
#: Zip prefix labels: the first digit, then "other" for codes not starting with a digit.
ZIP_PREFIXES: tuple[str, ...] = (*(str(d) for d in range(10)), "other")
YEAR_FIRST = 1930
YEAR_STEP = 5
YEAR_LAST = 2029
#: Year bucket labels: "unknown", "<1930", "1930-1934", ..., "2025-2029", ">=2030".
YEAR_BUCKETS: tuple[str, ...] = (
    "unknown",
    f"<{YEAR_FIRST}",
    *(f"{y}-{y + YEAR_STEP - 1}" for y in range(YEAR_FIRST, YEAR_LAST, YEAR_STEP)),
    f">={YEAR_LAST + 1}",
)
#: The genre columns of ML-100K's u.item, used when the directory has no u.genre file.
GROUPLENS_GENRES: tuple[str, ...] = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)
#: The DLRM label: ratings at or above this are positives.
POSITIVE_RATING = 4.0


def age_bucket(age: int) -> int:
    """Bucket id of an age in years (see AGE_BUCKETS)."""
    return next(i for i, (_, end) in enumerate(AGE_BUCKETS) if age < end)


def zip_prefix(zip_code: str) -> int:
    """Bucket id of a zip code: its first digit, or 10 when it does not start with a digit."""
    first = zip_code.strip()[:1]
    return int(first) if first.isascii() and first.isdigit() else len(ZIP_PREFIXES) - 1


def year_bucket(year: int | None) -> int:
    """Bucket id of a release year (see YEAR_BUCKETS); None means unknown."""
    if year is None:
        return 0
    if year < YEAR_FIRST:
        return 1
    if year > YEAR_LAST:
        return len(YEAR_BUCKETS) - 1
    return 2 + (year - YEAR_FIRST) // YEAR_STEP


def movielens_schema(
    name: str,
    num_users: int,
    num_items: int,
    num_genders: int,
    num_occupations: int,
    num_genres: int,
) -> DatasetSchema:
    """The schema shared by MovieLens-format and synthetic data sets (same feature names)."""
    return DatasetSchema(
        name=name,
        sparse=(
            SparseFeatureSpec(USER_ID, num_users, "user", description="user id (dense)"),
            SparseFeatureSpec(
                USER_AGE_BUCKET, len(AGE_BUCKETS), "user", description="age bucket (7 buckets)"
            ),
            SparseFeatureSpec(USER_GENDER, num_genders, "user", description="gender"),
            SparseFeatureSpec(USER_OCCUPATION, num_occupations, "user", description="occupation"),
            SparseFeatureSpec(
                USER_ZIP_PREFIX,
                len(ZIP_PREFIXES),
                "user",
                description="first digit of the zip code, 10 = non-numeric",
            ),
            SparseFeatureSpec(ITEM_ID, num_items, "item", description="item id (dense)"),
            SparseFeatureSpec(
                ITEM_GENRES, num_genres, "item", multi_valued=True, description="genres"
            ),
            SparseFeatureSpec(
                ITEM_YEAR_BUCKET,
                len(YEAR_BUCKETS),
                "item",
                description="release year in 5-year buckets, 0 = unknown",
            ),
        ),
        dense=(
            DenseFeatureSpec(
                USER_ACTIVITY_FEATURE, "user", "log1p(number of the user's training interactions)"
            ),
            DenseFeatureSpec(
                ITEM_POPULARITY_FEATURE, "item", "log1p(number of the item's training interactions)"
            ),
        ),
        user_id_feature=USER_ID,
        item_id_feature=ITEM_ID,
    )


@dataclass
class _Users:
    ids: list[str]
    ages: list[int]
    genders: list[str]
    occupations: list[str]
    zips: list[str]


@dataclass
class _Items:
    ids: list[str]
    titles: list[str]
    years: list[int | None]
    genres: list[list[str]]
    genre_vocab: list[str]


@dataclass
class _Interactions:
    path: Path
    line_numbers: list[int]
    users: list[str]
    items: list[str]
    ratings: list[float]
    timestamps: list[int]


def load_movielens(path: Path, name: str | None = None) -> InteractionDataset:
    """Read a MovieLens-format directory (GroupLens `u.*` or RecBole atomic files).

    Args:
        path: The directory. GroupLens is used when it has `u.data`, otherwise the single
            `*.inter` file and its `.user` / `.item` siblings.
        name: Schema name; defaults to the directory name.

    Returns:
        Every user and item of the feature files, every interaction, with activity features
        computed on all interactions (`split` recomputes them on its train part).

    Raises:
        NotFound: if the directory or a required file is missing.
        InvalidInput: on a malformed file, naming the file, line and problem.
    """
    path = Path(path)
    if not path.is_dir():
        raise NotFound(f"{path}: MovieLens directory not found")
    if (path / "u.data").exists():
        users = _read_grouplens_users(path / "u.user")
        items = _read_grouplens_items(path / "u.item", _grouplens_genres(path / "u.genre"))
        interactions = _read_grouplens_interactions(path / "u.data")
    else:
        inter_files = sorted(path.glob("*.inter"))
        if not inter_files:
            raise NotFound(f"{path}: neither u.data (GroupLens) nor a *.inter file (RecBole) found")
        if len(inter_files) > 1:
            raise InvalidInput(
                f"{path}: several .inter files ({', '.join(p.name for p in inter_files)}); "
                "keep one per directory"
            )
        inter = inter_files[0]
        users = _read_atomic_users(inter.with_suffix(".user"))
        items = _read_atomic_items(inter.with_suffix(".item"))
        interactions = _read_atomic_interactions(inter)
    return _build(name or path.resolve().name, users, items, interactions)


def _build(
    name: str, users: _Users, items: _Items, interactions: _Interactions
) -> InteractionDataset:
    if not interactions.users:
        raise InvalidInput(f"{interactions.path}: no interactions")
    user_order = _dense_order(users.ids)
    item_order = _dense_order(items.ids)
    user_index = {users.ids[row]: dense for dense, row in enumerate(user_order)}
    item_index = {items.ids[row]: dense for dense, row in enumerate(item_order)}
    genders = sorted(set(users.genders))
    occupations = sorted(set(users.occupations))
    gender_id = {g: i for i, g in enumerate(genders)}
    occupation_id = {o: i for i, o in enumerate(occupations)}
    genre_id = {g: i for i, g in enumerate(items.genre_vocab)}

    def user_column(value: Callable[[int], int]) -> JaggedColumn:
        return JaggedColumn.single(np.array([value(row) for row in user_order], dtype=np.int64))

    user_table = EntityTable(
        num_rows=len(user_order),
        sparse={
            USER_ID: JaggedColumn.single(np.arange(len(user_order))),
            USER_AGE_BUCKET: user_column(lambda r: age_bucket(users.ages[r])),
            USER_GENDER: user_column(lambda r: gender_id[users.genders[r]]),
            USER_OCCUPATION: user_column(lambda r: occupation_id[users.occupations[r]]),
            USER_ZIP_PREFIX: user_column(lambda r: zip_prefix(users.zips[r])),
        },
        dense=np.zeros((len(user_order), 1), dtype=np.float32),
    )
    item_table = EntityTable(
        num_rows=len(item_order),
        sparse={
            ITEM_ID: JaggedColumn.single(np.arange(len(item_order))),
            ITEM_GENRES: JaggedColumn.from_bags(
                [[genre_id[g] for g in items.genres[row]] for row in item_order]
            ),
            ITEM_YEAR_BUCKET: JaggedColumn.single(
                np.array([year_bucket(items.years[row]) for row in item_order], dtype=np.int64)
            ),
        },
        dense=np.zeros((len(item_order), 1), dtype=np.float32),
    )
    user_ids = np.empty(len(interactions.users), dtype=np.int64)
    item_ids = np.empty(len(interactions.items), dtype=np.int64)
    for k, (user, item) in enumerate(zip(interactions.users, interactions.items, strict=True)):
        where = f"{interactions.path}:{interactions.line_numbers[k]}"
        if user not in user_index:
            raise InvalidInput(f"{where}: user id {user!r} is not in the user file")
        if item not in item_index:
            raise InvalidInput(f"{where}: item id {item!r} is not in the item file")
        user_ids[k] = user_index[user]
        item_ids[k] = item_index[item]
    ratings = np.array(interactions.ratings, dtype=np.float32)
    data = InteractionDataset(
        schema=movielens_schema(
            name,
            num_users=max(len(user_order), 1),
            num_items=max(len(item_order), 1),
            num_genders=max(len(genders), 1),
            num_occupations=max(len(occupations), 1),
            num_genres=max(len(items.genre_vocab), 1),
        ),
        users=user_table,
        items=item_table,
        user_ids=user_ids,
        item_ids=item_ids,
        labels=(ratings >= POSITIVE_RATING).astype(np.float32),
        timestamps=np.array(interactions.timestamps, dtype=np.int64),
        ratings=ratings,
        raw_user_ids=np.array([users.ids[row] for row in user_order], dtype=str),
        raw_item_ids=np.array([items.ids[row] for row in item_order], dtype=str),
        item_titles=[items.titles[row] for row in item_order],
        vocabularies={
            USER_AGE_BUCKET: [label for label, _ in AGE_BUCKETS],
            USER_GENDER: genders,
            USER_OCCUPATION: occupations,
            USER_ZIP_PREFIX: list(ZIP_PREFIXES),
            ITEM_GENRES: list(items.genre_vocab),
            ITEM_YEAR_BUCKET: list(YEAR_BUCKETS),
        },
    )
    return data.with_activity_features()


def _dense_order(raw_ids: list[str]) -> list[int]:
    """Row order of the dense ids: numeric order of the raw ids if all are integers, else text."""
    try:
        keys: list[int] | list[str] = [int(i) for i in raw_ids]
    except ValueError:
        keys = raw_ids
    return sorted(range(len(raw_ids)), key=keys.__getitem__)


# --- text files ---------------------------------------------------------------------------------


def _lines(path: Path) -> list[tuple[int, str]]:
    """(1-based line number, text) of every non-blank line; UTF-8, falling back to Latin-1.

    ML-100K's u.item is Latin-1 while RecBole's files are UTF-8. Lines are split on "\\n" only
    (str.splitlines would also split titles at Latin-1 control characters).
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise NotFound(f"{path}: file not found") from None
    except IsADirectoryError:
        raise InvalidInput(f"{path}: is a directory, expected a file") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    return [
        (number, line.rstrip("\r"))
        for number, line in enumerate(text.split("\n"), start=1)
        if line.strip()
    ]


def _fields(path: Path, number: int, line: str, separator: str, expected: int) -> list[str]:
    fields = line.split(separator)
    if len(fields) != expected:
        shown = "tab" if separator == "\t" else repr(separator)
        raise InvalidInput(
            f"{path}:{number}: expected {expected} {shown}-separated columns, got {len(fields)}"
        )
    return fields


def _integer(path: Path, number: int, what: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise InvalidInput(f"{path}:{number}: {what} {text!r} is not an integer") from None


def _number(path: Path, number: int, what: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise InvalidInput(f"{path}:{number}: {what} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise InvalidInput(f"{path}:{number}: {what} {text!r} is not a finite number")
    return value


def _year(text: str) -> int | None:
    """A release year from "1995" or "01-Jan-1995"; None when there is none (e.g. "unknown")."""
    tail = text.strip()[-4:]
    return int(tail) if len(tail) == 4 and tail.isascii() and tail.isdigit() else None


def _check_unique(path: Path, what: str, ids: list[str], numbers: list[int]) -> None:
    seen: dict[str, int] = {}
    for raw_id, number in zip(ids, numbers, strict=True):
        if not raw_id:
            raise InvalidInput(f"{path}:{number}: empty {what} id")
        if raw_id in seen:
            raise InvalidInput(
                f"{path}:{number}: duplicate {what} id {raw_id!r} (first on line {seen[raw_id]})"
            )
        seen[raw_id] = number


# --- GroupLens u.* -----------------------------------------------------------------------------


def _grouplens_genres(path: Path) -> list[str]:
    """Genre names from u.genre (`name|index`), or the ML-100K list when there is no u.genre."""
    if not path.exists():
        return list(GROUPLENS_GENRES)
    genres: dict[int, str] = {}
    for number, line in _lines(path):
        genre, index = _fields(path, number, line, "|", 2)
        genres[_integer(path, number, "genre index", index)] = genre
    if sorted(genres) != list(range(len(genres))):
        raise InvalidInput(f"{path}: genre indexes must be 0..{len(genres) - 1}")
    return [genres[i] for i in range(len(genres))]


def _read_grouplens_users(path: Path) -> _Users:
    users = _Users([], [], [], [], [])
    numbers = []
    for number, line in _lines(path):
        user_id, age, gender, occupation, zip_code = _fields(path, number, line, "|", 5)
        users.ids.append(str(_integer(path, number, "user id", user_id)))
        users.ages.append(_integer(path, number, "age", age))
        users.genders.append(gender.strip())
        users.occupations.append(occupation.strip())
        users.zips.append(zip_code)
        numbers.append(number)
    _check_unique(path, "user", users.ids, numbers)
    return users


def _read_grouplens_items(path: Path, genre_names: list[str]) -> _Items:
    items = _Items([], [], [], [], genre_names)
    numbers = []
    for number, line in _lines(path):
        fields = _fields(path, number, line, "|", 5 + len(genre_names))
        items.ids.append(str(_integer(path, number, "item id", fields[0])))
        items.titles.append(fields[1])
        items.years.append(_year(fields[2]))
        genres = []
        for genre, flag in zip(genre_names, fields[5:], strict=True):
            if flag not in ("0", "1"):
                raise InvalidInput(f"{path}:{number}: genre flag {flag!r} of {genre} is not 0 or 1")
            if flag == "1":
                genres.append(genre)
        items.genres.append(genres)
        numbers.append(number)
    _check_unique(path, "item", items.ids, numbers)
    return items


def _read_grouplens_interactions(path: Path) -> _Interactions:
    result = _Interactions(path, [], [], [], [], [])
    for number, line in _lines(path):
        user_id, item_id, rating, timestamp = _fields(path, number, line, "\t", 4)
        result.line_numbers.append(number)
        result.users.append(str(_integer(path, number, "user id", user_id)))
        result.items.append(str(_integer(path, number, "item id", item_id)))
        result.ratings.append(_number(path, number, "rating", rating))
        result.timestamps.append(_integer(path, number, "timestamp", timestamp))
    return result


# --- RecBole atomic files ----------------------------------------------------------------------


def _atomic_rows(
    path: Path, required: tuple[str, ...], optional: tuple[str, ...] = ()
) -> tuple[list[int], dict[str, list[str]]]:
    """Line numbers and columns (by field name, without `:type`) of a RecBole atomic file."""
    lines = _lines(path)
    if not lines:
        raise InvalidInput(f"{path}:1: empty file, expected a `name:type` header")
    header_number, header = lines[0]
    names = [field.split(":", 1)[0].strip() for field in header.split("\t")]
    missing = [n for n in required if n not in names]
    if missing:
        raise InvalidInput(
            f"{path}:{header_number}: header lacks column(s) {', '.join(missing)} "
            f"(has {', '.join(names)})"
        )
    wanted = [n for n in (*required, *optional) if n in names]
    columns: dict[str, list[str]] = {n: [] for n in wanted}
    positions = [(n, names.index(n)) for n in wanted]
    numbers = []
    for number, line in lines[1:]:
        fields = _fields(path, number, line, "\t", len(names))
        for n, position in positions:
            columns[n].append(fields[position].strip())
        numbers.append(number)
    return numbers, columns


def _read_atomic_users(path: Path) -> _Users:
    numbers, c = _atomic_rows(path, ("user_id", "age", "gender", "occupation", "zip_code"))
    ages = [_integer(path, n, "age", a) for n, a in zip(numbers, c["age"], strict=True)]
    _check_unique(path, "user", c["user_id"], numbers)
    return _Users(c["user_id"], ages, c["gender"], c["occupation"], c["zip_code"])


def _read_atomic_items(path: Path) -> _Items:
    numbers, c = _atomic_rows(path, ("item_id", "release_year", "class"), ("movie_title",))
    _check_unique(path, "item", c["item_id"], numbers)
    genres = [tokens.split() for tokens in c["class"]]
    return _Items(
        ids=c["item_id"],
        titles=c.get("movie_title", c["item_id"]),
        years=[_year(y) for y in c["release_year"]],
        genres=genres,
        genre_vocab=sorted({g for bag in genres for g in bag}),
    )


def _read_atomic_interactions(path: Path) -> _Interactions:
    numbers, c = _atomic_rows(path, ("user_id", "item_id", "rating"), ("timestamp",))
    timestamps = c.get("timestamp")
    return _Interactions(
        path=path,
        line_numbers=numbers,
        users=c["user_id"],
        items=c["item_id"],
        ratings=[_number(path, n, "rating", r) for n, r in zip(numbers, c["rating"], strict=True)],
        timestamps=[0] * len(numbers)
        if timestamps is None
        else [
            int(_number(path, n, "timestamp", t)) for n, t in zip(numbers, timestamps, strict=True)
        ],
    )


# --- writing -----------------------------------------------------------------------------------

#: A representative age of each age bucket (written by `write_movielens`).
_BUCKET_AGES = (15, 21, 30, 40, 47, 52, 60)


def write_movielens(
    data: InteractionDataset, directory: Path, layout: Literal["grouplens", "atomic"] = "grouplens"
) -> Path:
    """Write a data set with the MovieLens schema (e.g. synthetic data) as a MovieLens directory.

    Features are written as representative raw values (an age inside the age bucket, a zip code
    starting with the prefix digit, a year inside the year bucket, vocabulary names), so
    `load_movielens` on the result gives the same ids wherever every vocabulary value occurs and
    vocabulary names sort in id order (true for synthetic data of a few hundred users). Raw ids
    are the dense ids + 1. Ratings are the data's ratings, or 5 for positives and 2 for negatives.
    Each file is written to a temporary name and renamed into place.

    Args:
        data: A data set with the MovieLens feature names.
        directory: Created if missing.
        layout: "grouplens" (u.data, u.user, u.item, u.genre) or "atomic" (RecBole files named
            after the directory).

    Returns:
        The directory.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = data.vocabularies
    users, items = data.users.sparse, data.items.sparse
    genders = vocab.get(USER_GENDER) or [f"gender_{i}" for i in range(_card(data, USER_GENDER))]
    occupations = vocab.get(USER_OCCUPATION) or [
        f"occupation_{i:03d}" for i in range(_card(data, USER_OCCUPATION))
    ]
    genre_names = vocab.get(ITEM_GENRES) or [
        f"genre_{i:03d}" for i in range(_card(data, ITEM_GENRES))
    ]
    titles = data.item_titles or [f"Item {i + 1}" for i in range(data.num_items)]
    user_rows = [
        (
            str(u + 1),
            str(_BUCKET_AGES[users[USER_AGE_BUCKET].values[u]]),
            genders[users[USER_GENDER].values[u]],
            occupations[users[USER_OCCUPATION].values[u]],
            _zip_code(int(users[USER_ZIP_PREFIX].values[u])),
        )
        for u in range(data.num_users)
    ]
    genre_bags = [
        items[ITEM_GENRES].values[items[ITEM_GENRES].offsets[i] : items[ITEM_GENRES].offsets[i + 1]]
        for i in range(data.num_items)
    ]
    years = [_bucket_year(int(b)) for b in items[ITEM_YEAR_BUCKET].values]
    ratings = (
        data.ratings if data.ratings is not None else np.where(data.labels > 0, 5.0, 2.0)
    ).tolist()
    inter_rows = [
        (str(u + 1), str(i + 1), f"{r:g}", str(t))
        for u, i, r, t in zip(
            data.user_ids.tolist(),
            data.item_ids.tolist(),
            ratings,
            data.timestamps.tolist(),
            strict=True,
        )
    ]
    if layout == "grouplens":
        _write(directory / "u.user", ["|".join(row) for row in user_rows])
        _write(directory / "u.genre", [f"{g}|{i}" for i, g in enumerate(genre_names)])
        item_lines = []
        for i in range(data.num_items):
            flags = ["0"] * len(genre_names)
            for g in genre_bags[i]:
                flags[g] = "1"
            date = "" if years[i] is None else f"01-Jan-{years[i]}"
            item_lines.append("|".join([str(i + 1), titles[i], date, "", "", *flags]))
        _write(directory / "u.item", item_lines)
        _write(directory / "u.data", ["\t".join(row) for row in inter_rows])
    elif layout == "atomic":
        stem = directory / directory.resolve().name
        _write(
            stem.with_suffix(".user"),
            [
                "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token",
                *("\t".join(row) for row in user_rows),
            ],
        )
        _write(
            stem.with_suffix(".item"),
            [
                "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq",
                *(
                    "\t".join(
                        [
                            str(i + 1),
                            titles[i],
                            "unknown" if years[i] is None else str(years[i]),
                            " ".join(genre_names[g] for g in genre_bags[i]),
                        ]
                    )
                    for i in range(data.num_items)
                ),
            ],
        )
        _write(
            stem.with_suffix(".inter"),
            [
                "user_id:token\titem_id:token\trating:float\ttimestamp:float",
                *("\t".join(row) for row in inter_rows),
            ],
        )
    else:
        raise InvalidInput(f"layout must be 'grouplens' or 'atomic', got {layout!r}")
    return directory


def _card(data: InteractionDataset, feature: str) -> int:
    return data.schema.sparse_feature(feature).cardinality


def _zip_code(prefix: int) -> str:
    return f"{prefix}0000" if prefix < 10 else "X0X0X"


def _bucket_year(bucket: int) -> int | None:
    if bucket == 0:
        return None
    if bucket == 1:
        return YEAR_FIRST - 10
    return YEAR_FIRST + YEAR_STEP * (bucket - 2)


def _write(path: Path, lines: list[str]) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    os.replace(temporary, path)
