"""The built-in data sets as feature specs: MovieLens in both layouts, the synthetic generator
and Criteo.

A MovieLens-format folder is read through `specs/grouplens.toml` (u.data, u.user, u.item) or
`specs/recbole.toml` (RecBole atomic files `<name>.inter/.user/.item`); the synthetic
generator's in-memory tables are encoded through `specs/synthetic.toml`, and a Criteo TSV file
is streamed through `specs/criteo.toml`. The same mechanism a team's own spec uses, so the
built-in data sets are examples of the format, not special code.

Example::

    data = load_tables(movielens_spec(Path(".cache/recship/ml-100k")))
"""

from __future__ import annotations

import tomllib
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from recship.base.errors import InvalidInput, NotFound
from recship.trainer.data.spec import DataSpec, parse_spec

GROUPLENS = "grouplens"
RECBOLE = "recbole"
SYNTHETIC = "synthetic"
CRITEO = "criteo"


def builtin_document(spec_name: str, **substitutions: str) -> dict:
    """The TOML document of a built-in spec, `{placeholders}` in it substituted."""
    text = resources.files("recship.trainer.data").joinpath(f"specs/{spec_name}.toml").read_text()
    for key, value in substitutions.items():
        text = text.replace("{" + key + "}", value)
    return tomllib.loads(text)


def movielens_layout(folder: Path) -> tuple[str, dict[str, str]]:
    """Which built-in spec reads a MovieLens-format folder, and its substitutions.

    Raises:
        NotFound: the folder is missing or holds neither layout.
        InvalidInput: several RecBole `.inter` files.
    """
    if not folder.is_dir():
        raise NotFound(f"{folder}: MovieLens directory not found")
    if (folder / "u.data").exists():
        return GROUPLENS, {}
    inter_files = sorted(folder.glob("*.inter"))
    if not inter_files:
        raise NotFound(f"{folder}: neither u.data (GroupLens) nor a *.inter file (RecBole) found")
    if len(inter_files) > 1:
        raise InvalidInput(
            f"{folder}: several .inter files ({', '.join(p.name for p in inter_files)}); "
            "keep one per directory"
        )
    return RECBOLE, {"name": inter_files[0].stem}


def movielens_spec(folder: Path, name: str | None = None) -> DataSpec:
    """The spec of a MovieLens-format folder (see the module docstring).

    A GroupLens folder with a `u.genre` file (`name|index` lines) names its genre flag
    columns; without one, u.item has ML-100K's 19.
    """
    folder = Path(folder)
    layout, substitutions = movielens_layout(folder)
    document = builtin_document(layout, **substitutions)
    document["name"] = name or folder.resolve().name
    if layout == GROUPLENS and (folder / "u.genre").exists():
        _use_genres(document, _read_genres(folder / "u.genre"))
    return parse_spec(document, folder, f"{folder} ({layout} layout)")


def _read_genres(path: Path) -> list[str]:
    """Genre names from u.genre, in index order."""
    genres: dict[int, str] = {}
    for number, line in enumerate(path.read_text(encoding="latin-1").splitlines(), start=1):
        if not line.strip():
            continue
        name, _, index = line.rpartition("|")
        if not name or not index.strip().isdigit():
            raise InvalidInput(f"{path}:{number}: expected `name|index`, got {line!r}")
        genres[int(index)] = name
    if sorted(genres) != list(range(len(genres))):
        raise InvalidInput(f"{path}: genre indexes must be 0..{len(genres) - 1}")
    return [genres[i] for i in range(len(genres))]


def _use_genres(document: dict, genres: list[str]) -> None:
    """Points the GroupLens document's genre flag columns and feature at `genres`."""
    items = document["items"]
    items["columns"] = [*items["columns"][:5], *genres]
    for feature in document["features"]:
        if feature["name"] == "item_genres":
            feature["flags"] = list(genres)
            feature["vocabulary"] = list(genres)


def synthetic_spec(genres: Sequence[str]) -> DataSpec:
    """The spec of the synthetic generator's tables (`synthetic.synthetic_tables`).

    Args:
        genres: the genre names, in id order (the fixed vocabulary of `item_genres`).

    The tables come from memory (`load_tables(spec, tables=...)`); the spec's file names are
    what messages call them.
    """
    vocabulary = ", ".join(f'"{genre}"' for genre in genres)
    document = builtin_document(SYNTHETIC, genres=vocabulary)
    return parse_spec(document, Path(SYNTHETIC), f"built-in {SYNTHETIC} spec")


def criteo_spec(path: Path, table_size: int) -> DataSpec:
    """The spec of a Criteo TSV file: a label, 13 dense and 26 hashed categorical columns.

    Args:
        path: the file (read by `criteo.CriteoSource`, streamed, never whole).
        table_size: the hash buckets of every categorical feature (its embedding table's rows).
    """
    document = builtin_document(CRITEO, table_size=str(int(table_size)))
    document["interactions"]["path"] = str(path)
    return parse_spec(document, Path(path).parent, f"built-in {CRITEO} spec")
