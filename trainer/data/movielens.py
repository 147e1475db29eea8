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
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from recship.base.errors import InvalidInput
from recship.trainer.data.builtin import movielens_spec
from recship.trainer.data.dataset import (
    ITEM_POPULARITY_FEATURE,
    USER_ACTIVITY_FEATURE,
    InteractionDataset,
)
from recship.trainer.data.schema import DatasetSchema, DenseFeatureSpec, SparseFeatureSpec
from recship.trainer.data.tables import load_tables

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

    Through the built-in feature specs (`recship.trainer.data.builtin`): the same mechanism as
    any team's own spec.

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
    return load_tables(movielens_spec(Path(path), name))


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
