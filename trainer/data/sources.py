"""Resolve a `--data SOURCE` string into a data set.

SOURCE is one of:

- "synthetic": `synthetic.generate`, sized by options such as num_users, num_items,
  interactions_per_user, seed (see its signature);
- "movielens-100k": the fetched cache (`recship data fetch movielens-100k`); option cache_dir
  overrides the cache root;
- a directory: a MovieLens-format directory (`load_movielens`);
- a `.toml` file: a feature spec (`recship.trainer.data.spec`): the team's own tables;
- another file: a Criteo TSV file (`CriteoSource`, streamed through the built-in Criteo spec);
  options table_size and shuffle_buffer.

Example::

    data = open_source("synthetic", num_users=500, num_items=200, seed=1)
    criteo = open_source("day_0.tsv", table_size=50_000)
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from recship.base.errors import InvalidInput, NotFound
from recship.trainer.data.criteo import CriteoSource
from recship.trainer.data.dataset import InteractionDataset
from recship.trainer.data.fetch import is_complete, movielens_100k_dir
from recship.trainer.data.movielens import load_movielens
from recship.trainer.data.spec import read_spec
from recship.trainer.data.synthetic import generate
from recship.trainer.data.tables import load_tables

SYNTHETIC = "synthetic"
MOVIELENS_100K = "movielens-100k"


def open_source(spec: str, **size_options: Any) -> InteractionDataset | CriteoSource:
    """Open the data source named by `spec`.

    Args:
        spec: "synthetic", "movielens-100k", or a path to a MovieLens-format directory or a
            Criteo TSV file.
        **size_options: Options of that source (see the module doc). Options whose value is None
            are ignored, so a CLI can pass all of its optional flags unconditionally.

    Raises:
        NotFound: if ML-100K has not been fetched, or the path does not exist.
        InvalidInput: on an option the source does not take, or malformed data.
    """
    options = {k: v for k, v in size_options.items() if v is not None}
    if spec == SYNTHETIC:
        _check_options(spec, options, tuple(inspect.signature(generate).parameters))
        return generate(**options)
    if spec == MOVIELENS_100K:
        _check_options(spec, options, ("cache_dir",))
        folder = movielens_100k_dir(options.get("cache_dir"))
        if not is_complete(folder):
            raise NotFound(
                f"MovieLens-100K is not in the cache ({folder}); "
                "run `recship data fetch movielens-100k` first"
            )
        return load_movielens(folder, name=MOVIELENS_100K)
    path = Path(spec).expanduser()
    if path.is_dir():
        _check_options(spec, options, ())
        return load_movielens(path)
    if path.is_file() and path.suffix == ".toml":
        _check_options(spec, options, ())
        return load_tables(read_spec(path))
    if path.is_file():
        _check_options(spec, options, ("table_size", "shuffle_buffer"))
        return CriteoSource(path, **options)
    raise NotFound(
        f"data source {spec!r}: not {SYNTHETIC!r} or {MOVIELENS_100K!r}, "
        "and no such file or directory"
    )


def _check_options(spec: str, options: dict[str, Any], accepted: tuple[str, ...]) -> None:
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        takes = ", ".join(accepted) if accepted else "no options"
        raise InvalidInput(
            f"data source {spec!r}: option(s) {', '.join(unknown)} do not apply (it takes {takes})"
        )
