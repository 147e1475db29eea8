"""`recship demo` (`make demo`): the whole pipeline on built-in defaults.

Fetches MovieLens-100K (synthetic data when the package index cannot be reached), trains a
two-tower and a DLRM model over 2 ranks, packages them into a bundle, starts `recship serve`
as a real process on free loopback ports (plaintext inference; the admin API on loopback
without a token, which is only allowed there), waits through the admin API until it serves,
asks it for recommendations for a few users and prints the movie titles, then stops the server
with SIGTERM and checks it exited cleanly.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import click
import numpy as np
from rich.console import Console
from rich.table import Table

from recship.base.errors import RecshipError, Unavailable

DEMO_USERS = 3
TOP_N = 10


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _data_source(console: Console) -> tuple[str, dict[str, int]]:
    """ML-100K when it can be fetched, else a synthetic data set of similar size."""
    from recship.trainer.data.fetch import fetch_movielens_100k

    try:
        path = fetch_movielens_100k()
    except Unavailable as error:
        console.print(f"[yellow]MovieLens-100K unavailable ({error}); using synthetic data[/]")
        return "synthetic", {"num_users": 1000, "num_items": 1500, "interactions_per_user": 40}
    console.print(f"data: MovieLens-100K from {path}")
    return "movielens-100k", {}


def run_demo(out: Path, console: Console) -> None:
    """Runs every stage into `out` (replaced if it exists) and prints the recommendations."""
    import shutil

    from recship.bundle.cli import print_summary
    from recship.cli.pipeline import package_runs, train_models
    from recship.runtime.client import AdminClient, RecshipClient
    from recship.trainer.data.sources import open_source

    if out.exists():
        shutil.rmtree(out)
    source, options = _data_source(console)
    console.rule(f"recship train two-tower, dlrm --data {source} --nproc 2")
    runs = train_models(out / "runs", source, options, nproc=2)
    console.rule("recship package")
    report = package_runs(runs, out / "repo", "movies", console)
    print_summary(console, report.ref, report.manifest, report.stage_seconds)

    data = open_source(source, **options)
    port, admin_port = _free_port(), _free_port()
    console.rule(f"recship serve on 127.0.0.1:{port} (admin 127.0.0.1:{admin_port})")
    server = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("recship")),
            "serve",
            "--repo",
            str(out / "repo"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--admin-port",
            str(admin_port),
        ]
    )
    try:
        with AdminClient(f"127.0.0.1:{admin_port}") as admin:
            admin.wait_until_serving(timeout=120)  # says why at once if the version FAILED
        with RecshipClient(f"127.0.0.1:{port}") as client:
            _show_recommendations(client, data, report.manifest, console)
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=60)
    if code != 0:
        raise RecshipError(f"recship serve exited with code {code} after SIGTERM")
    console.print("server stopped cleanly (exit 0)")


def _show_recommendations(client, data, manifest, console: Console) -> None:
    """Recommend for a few users by their raw MovieLens id alone, excluding what they rated.

    The client sends raw ids and gets raw ids back; the bundle holds every mapping (ids,
    vocabularies, the users' stored features). Titles come from the catalogue, keyed by the
    raw item id, as a shop's own product table would give them.
    """
    rng = np.random.default_rng(7)
    users = np.sort(rng.choice(data.num_users, size=DEMO_USERS, replace=False))
    keys = [str(data.raw_user_ids[user]) for user in users]
    user_key = manifest.schema.user_id_feature
    exclude = [
        sorted({str(data.raw_item_ids[i]) for i in data.item_ids[data.user_ids == user]})
        for user in users
    ]
    response = client.recommend(
        "movies", [{user_key: key} for key in keys], retrieve_k=0, top_n=TOP_N, exclude=exclude
    )
    depth = manifest.serving.retrieve_k
    titles = dict(zip(data.raw_item_ids.tolist(), data.item_titles or [], strict=False))
    for key, items, seen in zip(keys, response.results, exclude, strict=True):
        table = Table(
            title=f"user {key}: top {TOP_N} of {depth} retrieved ({len(seen)} rated movies "
            "excluded)"
        )
        table.add_column("#", justify="right")
        table.add_column("item id", justify="right")
        table.add_column("movie")
        table.add_column("rank score", justify="right")
        table.add_column("retrieval score", justify="right")
        for position, item in enumerate(items, start=1):
            table.add_row(
                str(position),
                item.item_id,
                titles.get(item.item_id, ""),
                f"{item.rank_score:.3f}",
                f"{item.retrieval_score:.3f}",
            )
        console.print(table)
    served = response.served_by
    console.print(f"served by {served.bundle} version {served.version} ({served.release_id})")


@click.command("demo")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path("demo-out"),
    show_default=True,
    help="Working folder for checkpoints and the bundle repository (replaced).",
)
def demo_command(out: Path) -> None:
    """Run the end-to-end pipeline on built-in defaults: data, train, package, serve, query."""
    run_demo(out, Console())
