"""`recship serve`, `query` and `status`: thin click commands over `serve` and the clients."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from recship.base.errors import InvalidInput
from recship.runtime.batcher import (
    DEFAULT_MAX_BATCH_ROWS,
    DEFAULT_MAX_DELAY_S,
    DEFAULT_MAX_QUEUE_ROWS,
)
from recship.runtime.cli_options import (
    admin_token,
    admin_token_option,
    client_tls,
    tls_client_options,
)
from recship.runtime.front_end import (
    DEFAULT_BATCH_CALLS,
    DEFAULT_FILL_WAIT_MS,
    DEFAULT_INFLIGHT,
    FRONT_ENDS,
)
from recship.runtime.limits import ServiceLimits

if TYPE_CHECKING:
    from recship.runtime.policy import VersionPolicy


def _split(value: str | None) -> tuple[str, ...]:
    return tuple(part.strip() for part in (value or "").split(",") if part.strip())


def _limit_option(field: str, help: str) -> Callable[[Any], Any]:
    """`--max-...` for the `ServiceLimits` field `field`: a positive integer, its default."""
    return click.option(
        f"--{field.replace('_', '-')}",
        type=click.IntRange(min=1),
        default=getattr(ServiceLimits, field),
        show_default=True,
        help=help,
    )


@click.command("serve")
@click.option("--repo", type=click.Path(path_type=Path), required=True, help="Bundle repository.")
@click.option("--bundle", "bundles", multiple=True, help="Bundle to serve (repeat); default all.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address of the inference listener.")  # fmt: skip
@click.option("--port", type=int, default=8500, show_default=True, help="gRPC port (0: any).")
@click.option("--metrics-port", type=int, default=None, help="Prometheus port (0: any).")
@click.option("--metrics-host", default="127.0.0.1", show_default=True,
              help="Address of the Prometheus endpoint.")  # fmt: skip
@click.option("--admin-host", default="127.0.0.1", show_default=True,
              help="Address of the admin listener; a non-loopback one needs a token.")  # fmt: skip
@click.option("--admin-port", type=int, default=8501, show_default=True,
              help="Admin API port (0: any).")  # fmt: skip
@click.option("--admin-socket", type=click.Path(path_type=Path), default=None,
              help="Serve the admin API on this Unix socket (mode 0600), not TCP.")  # fmt: skip
@click.option("--no-admin", is_flag=True, help="Serve no admin API.")
@click.option("--admin-token-file", type=click.Path(path_type=Path, dir_okay=False),
              default=None, help="File holding the bearer token admin calls must carry "
                                 "[default: $RECSHIP_ADMIN_TOKEN; none: local only].")  # fmt: skip
@click.option("--tls-cert", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="PEM certificate chain: TLS on the inference and admin listeners.")  # fmt: skip
@click.option("--tls-key", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="PEM private key of --tls-cert.")  # fmt: skip
@click.option("--tls-client-ca", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="PEM CA: clients must present a certificate it signed (mTLS).")  # fmt: skip
@click.option("--public-key", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="PEM public key that verifies versions' MANIFEST.sig.")  # fmt: skip
@click.option("--require-signature", is_flag=True,
              help="Load only versions whose MANIFEST.sig verifies with --public-key.")  # fmt: skip
@click.option("--max-batch-size", type=int, default=DEFAULT_MAX_BATCH_ROWS, show_default=True,
              help="Most model rows per batch (a candidate is a row).")  # fmt: skip
@click.option("--max-delay-ms", type=float, default=None,
              help="Longest wait for a batch to fill. Default "
                   f"{DEFAULT_MAX_DELAY_S * 1000.0:g}: a batch runs as soon as the replica is "
                   "free, and batches still form from what queues while it is busy; raise it "
                   "where larger batches pay (GPUs). With --front-end native it is the front "
                   f"end's wait (default {DEFAULT_FILL_WAIT_MS:g}), held only while more calls "
                   "are due, so a lone client never waits.")  # fmt: skip
@click.option("--max-queue-rows", type=int, default=DEFAULT_MAX_QUEUE_ROWS, show_default=True,
              help="Queue bound per replica and model; beyond it RESOURCE_EXHAUSTED.")  # fmt: skip
@_limit_option("max_queries", "Most queries in one request.")
@_limit_option("max_candidates", "Most candidate item ids of one Rank query.")
@_limit_option("max_exclusions", "Most item ids one Retrieve or Recommend query may exclude.")
@_limit_option("max_request_bytes", "Largest serialized request; larger ones are INVALID_ARGUMENT.")
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
                   "unavailable window. With --workers, the budget is the host's, and a switch "
                   "that does not fit goes through that window.")  # fmt: skip
@click.option("--workers", type=int, default=1, show_default=True,
              help="Serving processes on the one port (SO_REUSEPORT); a supervisor decides "
                   "their versions and serves the admin API and the summed metrics. Clients "
                   "balance by opening several channels.")  # fmt: skip
@click.option("--front-end", "front_end", type=click.Choice(FRONT_ENDS), default=FRONT_ENDS[0],
              show_default=True,
              help="Who answers the inference port: each worker's grpc.aio server, or native: "
                   "recship-frontend (C++ gRPC, built on first use; needs g++ and gRPC C++), "
                   "which sends the workers whole batches of calls. Reflection is not served "
                   "on its port.")  # fmt: skip
@click.option("--max-batch-calls", type=int, default=None,
              help="With --front-end native: most calls in one batch to a worker "
                   f"[default: {DEFAULT_BATCH_CALLS}].")  # fmt: skip
@click.option("--max-inflight", type=int, default=None,
              help="With --front-end native: batches one worker runs at once [default: "
                   f"{DEFAULT_INFLIGHT}; 2 can pay where the model runs on a GPU].")  # fmt: skip
@click.option("--log-level", default="info", show_default=True)
def serve_command(
    repo: Path,
    bundles: tuple[str, ...],
    host: str,
    port: int,
    metrics_port: int | None,
    metrics_host: str,
    admin_host: str,
    admin_port: int,
    admin_socket: Path | None,
    no_admin: bool,
    admin_token_file: Path | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    tls_client_ca: Path | None,
    public_key: Path | None,
    require_signature: bool,
    max_batch_size: int,
    max_delay_ms: float | None,
    max_queue_rows: int,
    max_queries: int,
    max_candidates: int,
    max_exclusions: int,
    max_request_bytes: int,
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
    workers: int,
    front_end: str,
    max_batch_calls: int | None,
    max_inflight: int | None,
    log_level: str,
) -> None:
    """Serve the newest valid version of each bundle in REPO over gRPC.

    Prints `listening on HOST:PORT metrics M admin ADDRESS` on stdout once bound; logs are
    JSON lines on stderr. SIGTERM or SIGINT stops it gracefully (exit 0). The admin API
    (BundleAdmin) has its own listener, loopback by default; see README, Securing recship.
    """
    from recship.runtime.security import ServerTLS, load_token
    from recship.runtime.server import ServerConfig, configure_logging, serve

    configure_logging(log_level)
    if (tls_cert is None) != (tls_key is None):
        raise InvalidInput("--tls-cert and --tls-key go together")
    if tls_client_ca is not None and tls_cert is None:
        raise InvalidInput("--tls-client-ca needs --tls-cert and --tls-key")
    tls = (
        None if tls_cert is None or tls_key is None else ServerTLS(tls_cert, tls_key, tls_client_ca)
    )
    config = ServerConfig(
        repo=repo,
        bundles=bundles,
        host=host,
        port=port,
        metrics_port=metrics_port,
        metrics_host=metrics_host,
        admin_host=admin_host,
        admin_port=None if no_admin else admin_port,
        admin_socket=None if no_admin else admin_socket,
        admin_token=load_token(admin_token_file),
        tls=tls,
        public_key=public_key,
        require_signature=require_signature,
        max_batch_size=max_batch_size,
        max_delay_ms=max_delay_ms,
        max_queue_rows=max_queue_rows,
        limits=ServiceLimits(
            max_queries=max_queries,
            max_candidates=max_candidates,
            max_exclusions=max_exclusions,
            max_request_bytes=max_request_bytes,
        ),
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
        workers=workers,
        front_end=front_end,
        max_batch_calls=max_batch_calls,
        max_inflight=max_inflight,
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


def parse_features(text: str) -> dict[str, Any]:
    """`user_id=196,tags=a|b,score=0.5,zip="01234"` -> raw values by feature name.

    A value is an integer or a number when it reads as one, else text ("..." keeps it text);
    `|` separates the values of a multi-valued feature.

    Raises:
        InvalidInput: a pair is not `name=value`.
    """
    features: dict[str, Any] = {}
    for pair in _split(text):
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise InvalidInput(f"--user-features: {pair!r} is not name=value or name=v1|v2|...")
        parts = [_raw_value(part) for part in value.split("|")]
        features[name.strip()] = parts if "|" in value else parts[0]
    return features


def _raw_value(text: str) -> str | int | float:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return text[1:-1]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text


@click.command("query")
@click.option("--server", required=True, help="host:port of a recship server.")
@click.option("--bundle", required=True, help="Bundle name.")
@click.option("--version", "version", type=int, default=None, help="Exact version to use.")
@click.option("--label", default=None, help="Label to use (e.g. stable).")
@click.option("--user-features", required=True,
              help='Raw feature values: name=value[,name=v1|v2...]; the user key alone '
                   'is enough for a user the bundle stores (user_id=196).')  # fmt: skip
@click.option("--rpc", type=click.Choice(["recommend", "retrieve"]), default="recommend",
              show_default=True)  # fmt: skip
@click.option("--retrieve-k", type=int, default=0, show_default=True,
              help="Candidates to retrieve; 0: the bundle's default (Recommend) or --top-n "
                   "(Retrieve).")  # fmt: skip
@click.option("--top-n", type=int, default=10, show_default=True)
@click.option("--exclude", default="", help="Item ids never to return, comma-separated.")
@click.option("--timeout", type=float, default=30.0, show_default=True)
@click.option("--channels", type=int, default=1, show_default=True,
              help="Connections to open, taken in turn (see serve --workers).")  # fmt: skip
@tls_client_options
def query_command(
    server: str,
    bundle: str,
    version: int | None,
    label: str | None,
    user_features: str,
    rpc: str,
    retrieve_k: int,
    top_n: int,
    exclude: str,
    timeout: float,
    channels: int,
    **connection: object,
) -> None:
    """Send one query to a running server and print the results as a table.

    Recommend and Retrieve need no token (the inference API is not authenticated; put it
    behind mTLS with `serve --tls-client-ca` to restrict who may call it).
    """
    from rich.console import Console
    from rich.table import Table

    from recship.runtime.client import Query, RecshipClient

    excluded = list(_split(exclude))
    query = Query(parse_features(user_features))
    tls = client_tls(connection)
    with RecshipClient(server, timeout=timeout, tls=tls, channels=channels) as client:
        if rpc == "retrieve":
            retrieved = client.retrieve(
                bundle, [query], retrieve_k or top_n, exclude=[excluded], version=version,
                label=label,
            )  # fmt: skip
            served, rows = retrieved.served_by, retrieved.results[0]
            cold = retrieved.cold_start[0]
            table = Table("rank", "item_id", "retrieval score")
            for position, item in enumerate(rows, 1):
                table.add_row(str(position), item.item_id, f"{item.score:.4f}")
        else:
            recommended = client.recommend(
                bundle, [query], retrieve_k, top_n, exclude=[excluded], version=version,
                label=label,
            )  # fmt: skip
            served, ranked = recommended.served_by, recommended.results[0]
            cold = recommended.cold_start[0]
            table = Table("rank", "item_id", "rank score", "retrieval score")
            for position, item in enumerate(ranked, 1):
                table.add_row(
                    str(position),
                    item.item_id,
                    f"{item.rank_score:.4f}",
                    f"{item.retrieval_score:.4f}",
                )
    table.title = f"{served.bundle} v{served.version} ({served.release_id})" + (
        ", cold start: unknown user, defaults used" if cold else ""
    )
    Console().print(table)


_STATE_STYLE = {"READY": "green", "FAILED": "red", "LOADING": "yellow", "DRAINING": "yellow"}


@click.command("status")
@click.option("--server", required=True, help="Admin address of a server: host:port or unix:/path.")
@click.option("--bundle", default="", help="Only this bundle.")
@click.option("--timeout", type=float, default=30.0, show_default=True)
@admin_token_option
@tls_client_options
def status_command(server: str, bundle: str, timeout: float, **connection: object) -> None:
    """Show a server's bundles and versions: state, default, labels, replicas, reasons."""
    from rich.console import Console

    from recship.runtime.client import AdminClient

    tls = client_tls(connection)
    token = admin_token(connection)
    with AdminClient(server, token=token, timeout=timeout, tls=tls) as admin:
        health = admin.health()
        listing = admin.list_bundles(bundle)
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    console.print(status_table(server, health, listing))


def status_table(server: str, health: str, listing):  # type: ignore[no-untyped-def]
    """The rich table `recship status` prints for a `ListBundlesResponse`.

    Every string from the server is shown as text, never as rich markup.
    """
    from rich.table import Table
    from rich.text import Text

    from recship.protos.v1 import admin_pb2

    table = Table(title=Text(f"{server}: {health}"))
    for column in ("bundle", "version", "state", "default", "labels", "replicas", "devices",
                   "ready at", "reason"):  # fmt: skip
        table.add_column(column, overflow="fold")
    for status in listing.bundles:
        for version in status.versions:
            state = admin_pb2.VersionState.Name(version.state).removeprefix("VERSION_STATE_")
            ready = (
                version.ready_at.ToDatetime().strftime("%Y-%m-%d %H:%M:%S")
                if version.HasField("ready_at")
                else ""
            )
            table.add_row(
                Text(status.name),
                str(version.version),
                Text(state, style=_STATE_STYLE.get(state, "")),
                "yes" if version.is_default else "",
                Text(", ".join(version.labels)),
                str(version.replicas),
                Text(", ".join(version.devices)),
                ready,
                Text(version.failure_reason),
            )
    return table
