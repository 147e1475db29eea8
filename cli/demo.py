"""`recship demo` (`make demo`): the whole pipeline on built-in defaults.

Fetches MovieLens-100K (synthetic data when the package index cannot be reached), trains a
two-tower and a DLRM model over 2 ranks, packages them into a bundle, starts `recship serve`
as a real process on free loopback ports (plaintext inference; the admin API on loopback
without a token, which is only allowed there), waits through the admin API until it serves,
asks it for recommendations for a few users and prints the movie titles, measures over gRPC
what Retrieve and Recommend give the validation users (popularity as the floor), then stops
the server with SIGTERM and checks it exited cleanly.
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
from recship.protos.v1.manifest_pb2 import BundleManifest
from recship.runtime.client import RecshipClient

DEMO_USERS = 3
TOP_N = 10
# Validation users per request of the served-quality table.
QUALITY_BATCH = 64
# Recommend depths measured over gRPC besides the bundle's default (0).
SERVED_RETRIEVE_KS = (0, 100, 200, 500)


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
    from recship.runtime.client import AdminClient
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
            console.print(served_quality(client, "movies", runs.retrieval, report.manifest))
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


def served_quality(
    client: RecshipClient, bundle: str, retrieval_run: Path, manifest: BundleManifest
) -> Table:
    """Top-N quality of what the server answers the validation users (the retrieval run's
    held-out split), their training items excluded, every held-out item relevant: popularity
    (training counts), Retrieve alone and Recommend at the bundle's default retrieve_k and
    at `SERVED_RETRIEVE_KS`. Users are sent by raw key and answers read as raw ids.
    """
    from recship.packager.checkpoint import reopen_split
    from recship.trainer.config import read_model_config
    from recship.trainer.evaluate import popularity_lists, positives_by_user, top_n_metrics

    _, payload = read_model_config(retrieval_run)
    train, held_out = reopen_split(payload, retrieval_run)
    targets = positives_by_user(held_out.user_ids, held_out.item_ids)
    seen = positives_by_user(train.user_ids, train.item_ids)
    users = np.array(sorted(targets), dtype=np.int64)
    item_index = {str(raw): index for index, raw in enumerate(train.raw_item_ids)}
    user_key = manifest.schema.user_id_feature
    default_k = manifest.serving.retrieve_k
    depths = sorted({k for k in SERVED_RETRIEVE_KS if k <= train.num_items})  # 0 first

    def served(call) -> np.ndarray:
        rows = []
        for start in range(0, users.size, QUALITY_BATCH):
            block = users[start : start + QUALITY_BATCH]
            queries = [{user_key: str(train.raw_user_ids[u])} for u in block]
            exclude = [[str(train.raw_item_ids[i]) for i in seen.get(int(u), ())] for u in block]
            for items in call(queries, exclude).results:
                ids = [item_index[item.item_id] for item in items][:TOP_N]
                rows.append(ids + [-1] * (TOP_N - len(ids)))
        return np.array(rows, dtype=np.int64)

    relevant = [targets[int(u)] for u in users]
    popular = popularity_lists(train, users, TOP_N)
    rows = [("popularity", *top_n_metrics(popular, relevant, TOP_N))]
    retrieve = served(lambda q, x: client.retrieve(bundle, q, TOP_N, exclude=x))
    rows.append(("Retrieve", *top_n_metrics(retrieve, relevant, TOP_N)))
    for k in depths:
        answers = served(lambda q, x, k=k: client.recommend(bundle, q, k, TOP_N, exclude=x))
        name = f"Recommend, retrieve_k {k or default_k}" + (" (default)" if k == 0 else "")
        rows.append((name, *top_n_metrics(answers, relevant, TOP_N)))
    table = Table(
        title=f"served over gRPC: top {TOP_N} for {users.size} validation users "
        "(training items excluded, every held-out item relevant)"
    )
    for column in ("pipeline", f"recall@{TOP_N}", f"NDCG@{TOP_N}", "vs Retrieve"):
        table.add_column(column, justify="left" if column == "pipeline" else "right")
    base_recall, base_ndcg = rows[1][1], rows[1][2]
    for name, recall, ndcg in rows:
        versus = (
            f"{recall / base_recall - 1:+.1%} / {ndcg / base_ndcg - 1:+.1%}"
            if name != "Retrieve" and base_recall > 0 and base_ndcg > 0
            else ""
        )
        table.add_row(name, f"{recall:.4f}", f"{ndcg:.4f}", versus)
    return table


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
