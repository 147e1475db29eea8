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
    """Recommend for a few users, excluding what they already rated, and print titles."""
    from recship.protos.v1 import manifest_pb2
    from recship.runtime.client import Query

    schema = manifest.schema
    query_features = [
        f.name for f in schema.sparse_features if f.side == manifest_pb2.FEATURE_SIDE_QUERY
    ]
    rng = np.random.default_rng(7)
    users = np.sort(rng.choice(data.num_users, size=DEMO_USERS, replace=False))
    queries, exclude = [], []
    for user in users:
        sparse = {
            name: data.users.sparse[name].gather(np.array([user]))[0].tolist()
            for name in query_features
        }
        dense = data.users.dense[user, : schema.query_dense_count].tolist()
        queries.append(Query(sparse=sparse, dense=dense))
        exclude.append(np.unique(data.item_ids[data.user_ids == user]).tolist())
    response = client.recommend("movies", queries, retrieve_k=200, top_n=TOP_N, exclude=exclude)
    titles = data.item_titles
    for user, items, seen in zip(users, response.results, exclude, strict=True):
        raw = data.raw_user_ids[user] if data.raw_user_ids is not None else user
        table = Table(
            title=f"user {raw}: top {TOP_N} of 200 retrieved ({len(seen)} rated movies excluded)"
        )
        table.add_column("#", justify="right")
        table.add_column("movie")
        table.add_column("rank score", justify="right")
        table.add_column("retrieval score", justify="right")
        for position, item in enumerate(items, start=1):
            name = titles[item.item_id] if titles else f"item {item.item_id}"
            table.add_row(
                str(position), name, f"{item.rank_score:.3f}", f"{item.retrieval_score:.3f}"
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
