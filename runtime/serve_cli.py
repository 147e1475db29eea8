"""`recship serve` and `recship query`: thin click commands over `serve` and `RecshipClient`."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING

import click

from recship.base.errors import InvalidInput
from recship.runtime.batcher import (
    DEFAULT_MAX_BATCH_ROWS,
    DEFAULT_MAX_DELAY_S,
    DEFAULT_MAX_QUEUE_ROWS,
)

if TYPE_CHECKING:
    from recship.runtime.policy import VersionPolicy


def _split(value: str | None) -> tuple[str, ...]:
    return tuple(part.strip() for part in (value or "").split(",") if part.strip())


@click.command("serve")
@click.option("--repo", type=click.Path(path_type=Path), required=True, help="Bundle repository.")
@click.option("--bundle", "bundles", multiple=True, help="Bundle to serve (repeat); default all.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=int, default=8500, show_default=True, help="gRPC port (0: any).")
@click.option("--metrics-port", type=int, default=None, help="Prometheus port (0: any).")
@click.option("--max-batch-size", type=int, default=DEFAULT_MAX_BATCH_ROWS, show_default=True,
              help="Most model rows per batch (a candidate is a row).")  # fmt: skip
@click.option("--max-delay-ms", type=float, default=DEFAULT_MAX_DELAY_S * 1000.0, show_default=True,
              help="Longest wait for a batch to fill. 0 runs a batch as soon as the replica is "
                   "free, and batches still form from what queues while it is busy (best on "
                   "CPU); raise it on GPUs, where larger batches pay.")  # fmt: skip
@click.option("--max-queue-rows", type=int, default=DEFAULT_MAX_QUEUE_ROWS, show_default=True,
              help="Queue bound per replica and model; beyond it RESOURCE_EXHAUSTED.")  # fmt: skip
@click.option("--no-batching", is_flag=True, help="Run every request alone (for comparisons).")
@click.option("--replicas", type=int, default=None, help="CPU replicas (default 1).")
@click.option("--threads", type=int, default=1, show_default=True,
              help="Intra-op threads of torch and FAISS.")  # fmt: skip
@click.option("--devices", default=None, help="Comma-separated devices, e.g. cuda:0,cuda:1.")
@click.option("--format", "entry_format", type=click.Choice(["torchscript", "aoti"]),
              default=None, help="Entry point format (default: the bundle's first).")  # fmt: skip
@click.option("--grace-s", type=float, default=10.0, show_default=True,
              help="Time in-flight calls get to finish after SIGTERM.")  # fmt: skip
@click.option("--poll-interval-s", type=float, default=5.0, show_default=True,
              help="Re-read the repository this often for new versions (0: never).")  # fmt: skip
@click.option("--policy", "policies", multiple=True,
              help="Version policy NAME=latest|latest:N|pinned:V[,V2] (repeat).")  # fmt: skip
@click.option("--label", "labels", multiple=True,
              help="Label NAME:LABEL=VERSION, set after the first load if READY.")  # fmt: skip
@click.option("--memory-budget-bytes", type=int, default=None,
              help="Most memory the loaded versions may take by their manifests' estimates "
                   "(default: unlimited). A new version that does not fit beside the old one "
                   "switches replica by replica, or with one replica through a brief, logged "
                   "unavailable window.")  # fmt: skip
@click.option("--log-level", default="info", show_default=True)
def serve_command(
    repo: Path,
    bundles: tuple[str, ...],
    host: str,
    port: int,
    metrics_port: int | None,
    max_batch_size: int,
    max_delay_ms: float,
    max_queue_rows: int,
    no_batching: bool,
    replicas: int | None,
    threads: int,
    devices: str | None,
    entry_format: str | None,
    grace_s: float,
    poll_interval_s: float,
    policies: tuple[str, ...],
    labels: tuple[str, ...],
    memory_budget_bytes: int | None,
    log_level: str,
) -> None:
    """Serve the newest valid version of each bundle in REPO over gRPC.

    Prints `listening on HOST:PORT metrics M` on stdout once bound; logs are JSON lines on
    stderr. SIGTERM or SIGINT stops it gracefully (exit 0).
    """
    from recship.runtime.server import ServerConfig, configure_logging, serve

    configure_logging(log_level)
    config = ServerConfig(
        repo=repo,
        bundles=bundles,
        host=host,
        port=port,
        metrics_port=metrics_port,
        max_batch_size=max_batch_size,
        max_delay_ms=max_delay_ms,
        max_queue_rows=max_queue_rows,
        batching=not no_batching,
        replicas=replicas,
        threads=threads,
        devices=_split(devices),
        format=entry_format,
        grace_s=grace_s,
        poll_interval_s=poll_interval_s,
        policies=parse_policies(policies),
        labels=tuple(parse_label(text) for text in labels),
        memory_budget_bytes=memory_budget_bytes,
    )
    asyncio.run(serve(config))


def parse_policies(values: tuple[str, ...]) -> dict[str, VersionPolicy]:
    """`("movies=latest:2", "ads=pinned:3")` -> {"movies": LatestN(2), "ads": Pinned((3,))}.

    Raises:
        InvalidInput: an entry is not NAME=POLICY, a policy is malformed, or a bundle repeats.
    """
    from recship.runtime.policy import parse_policy

    policies: dict[str, VersionPolicy] = {}
    for text in values:
        name, sep, policy = text.partition("=")
        if not sep or not name.strip():
            raise InvalidInput(f"--policy {text!r}: expected NAME=latest|latest:N|pinned:V[,V2]")
        if name.strip() in policies:
            raise InvalidInput(f"--policy: bundle {name.strip()!r} is given twice")
        policies[name.strip()] = parse_policy(policy)
    return policies


def parse_label(text: str) -> tuple[str, str, int]:
    """`movies:stable=3` -> ("movies", "stable", 3).

    Raises:
        InvalidInput: not NAME:LABEL=VERSION with a valid label and a version > 0.
    """
    from recship.runtime.policy import check_label

    target, sep, version = text.partition("=")
    name, colon, label = target.partition(":")
    if not sep or not colon or not name.strip() or not version.strip().isdigit():
        raise InvalidInput(f"--label {text!r}: expected NAME:LABEL=VERSION, e.g. movies:stable=3")
    number = int(version)
    if number <= 0:
        raise InvalidInput(f"--label {text!r}: the version must be > 0")
    return name.strip(), check_label(label.strip()), number


def parse_features(text: str) -> dict[str, list[int]]:
    """`user_id=3,user_age_bucket=2,genres=1|4` -> {"user_id": [3], ..., "genres": [1, 4]}.

    Raises:
        InvalidInput: a pair is not `name=id[|id...]` with integer ids.
    """
    features: dict[str, list[int]] = {}
    for pair in _split(text):
        name, sep, ids = pair.partition("=")
        try:
            if not sep or not name.strip():
                raise ValueError
            features[name.strip()] = [int(i) for i in ids.split("|") if i.strip()]
        except ValueError:
            raise InvalidInput(
                f"--user-features: {pair!r} is not name=id or name=id|id|..."
            ) from None
    return features


@click.command("query")
@click.option("--server", required=True, help="host:port of a recship server.")
@click.option("--bundle", required=True, help="Bundle name.")
@click.option("--version", "version", type=int, default=None, help="Exact version to use.")
@click.option("--label", default=None, help="Label to use (e.g. stable).")
@click.option("--user-features", required=True,
              help="Query features: name=id[,name=id|id...].")  # fmt: skip
@click.option("--dense", default="", help="Query-side dense features, comma-separated.")
@click.option("--rpc", type=click.Choice(["recommend", "retrieve"]), default="recommend",
              show_default=True)  # fmt: skip
@click.option("--retrieve-k", type=int, default=0, show_default=True,
              help="Candidates to retrieve; 0: the bundle's default (Recommend) or --top-n "
                   "(Retrieve).")  # fmt: skip
@click.option("--top-n", type=int, default=10, show_default=True)
@click.option("--exclude", default="", help="Item ids never to return, comma-separated.")
@click.option("--timeout", type=float, default=30.0, show_default=True)
def query_command(
    server: str,
    bundle: str,
    version: int | None,
    label: str | None,
    user_features: str,
    dense: str,
    rpc: str,
    retrieve_k: int,
    top_n: int,
    exclude: str,
    timeout: float,
) -> None:
    """Send one query to a running server and print the results as a table."""
    from rich.console import Console
    from rich.table import Table

    from recship.runtime.client import Query, RecshipClient

    try:
        dense_values = [float(v) for v in _split(dense)]
        excluded = [int(v) for v in _split(exclude)]
    except ValueError:
        raise InvalidInput("--dense takes floats and --exclude integers, comma-separated") from None
    query = Query(parse_features(user_features), dense_values)
    with RecshipClient(server, timeout=timeout) as client:
        if rpc == "retrieve":
            retrieved = client.retrieve(
                bundle, [query], retrieve_k or top_n, exclude=[excluded], version=version,
                label=label,
            )  # fmt: skip
            served, rows = retrieved.served_by, retrieved.results[0]
            table = Table("rank", "item_id", "retrieval score")
            for position, item in enumerate(rows, 1):
                table.add_row(str(position), str(item.item_id), f"{item.score:.4f}")
        else:
            recommended = client.recommend(
                bundle, [query], retrieve_k, top_n, exclude=[excluded], version=version,
                label=label,
            )  # fmt: skip
            served, ranked = recommended.served_by, recommended.results[0]
            table = Table("rank", "item_id", "rank score", "retrieval score")
            for position, item in enumerate(ranked, 1):
                table.add_row(
                    str(position),
                    str(item.item_id),
                    f"{item.rank_score:.4f}",
                    f"{item.retrieval_score:.4f}",
                )
    table.title = f"{served.bundle} v{served.version} ({served.release_id})"
    Console().print(table)
