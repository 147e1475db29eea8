"""`recship bench`: closed-loop load against a recship server, batched vs unbatched.

`concurrency` callers, spread over several worker processes (so the load generator is not one
GIL), each send one request, wait for the answer and send the next, for `duration_s` seconds
after a warm-up. Reported: QPS, latency percentiles, errors by status code, and from the
server's Prometheus endpoint its mean batch size (rows and requests per batch) and its process
CPU time per answered RPC (comparable across machines where QPS is not). With
`compare_unbatched` the same load also runs against a second server with batching off
(`recship serve --no-batching`, started here from the same repository unless one is given),
and the throughput and p99 ratios are printed.

Example::

    recship bench --server 127.0.0.1:8500 --metrics 127.0.0.1:9090 --repo repo \\
        --bundle movies --concurrency 64 --duration 10 --compare-unbatched
"""

from __future__ import annotations

import collections
import concurrent.futures
import multiprocessing
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np

from recship.base.errors import InvalidInput, Unavailable
from recship.runtime.cli_options import (
    admin_token,
    admin_token_option,
    client_tls,
    tls_client_options,
)
from recship.runtime.security import ClientTLS


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark run. CLI flags map one to one onto these fields.

    Attributes:
        server: host:port of the (batched) server.
        bundle: bundle to query.
        concurrency: callers in flight at any time (closed loop).
        duration_s: measured seconds per server.
        warmup_s: unmeasured seconds before.
        rpc: "recommend" or "retrieve".
        retrieve_k: candidates retrieved per query.
        top_n: items returned per Recommend query.
        repo: bundle repository; random valid queries come from its manifest, and an unbatched
            server is started from it for `compare_unbatched`.
        user_features: a fixed query (name=id,...) when no repository is given.
        metrics: host:port of the server's Prometheus endpoint, for batch sizes.
        compare_unbatched: also measure a server with batching off.
        unbatched_server: use this server as the unbatched one instead of starting one.
        unbatched_metrics: its Prometheus endpoint.
        unbatched_serve_args: more `recship serve` options for the unbatched server this
            command starts, to match the server under test (e.g. ("--threads", "2")).
        processes: load generator processes (default: min(concurrency, CPU count)).
        channels: connections per load process, taken by its callers in turn: a server with
            several worker processes (`serve --workers N`) balances by connection.
        seed: seeds the random queries.
        tls: how to reach TLS servers (both the one under test and the unbatched one).
        admin_token: the admin token of the unbatched server this command starts, when its
            serve args give it one (it is asked why it fails to serve, if it does).
    """

    server: str
    bundle: str
    concurrency: int = 16
    duration_s: float = 10.0
    warmup_s: float = 2.0
    rpc: str = "recommend"
    retrieve_k: int = 100
    top_n: int = 10
    repo: Path | None = None
    user_features: str = ""
    metrics: str | None = None
    compare_unbatched: bool = False
    unbatched_server: str | None = None
    unbatched_metrics: str | None = None
    unbatched_serve_args: tuple[str, ...] = ()
    processes: int | None = None
    channels: int = 4
    seed: int = 0
    tls: ClientTLS | None = None
    admin_token: str | None = field(default=None, repr=False)


@dataclass
class LoadResult:
    """What one load run measured."""

    label: str
    seconds: float
    latencies_s: np.ndarray
    errors: dict[str, int] = field(default_factory=dict)
    batch_rows: float | None = None
    batch_requests: float | None = None
    server_cpu_ms: float | None = None  # server process CPU time per answered RPC

    @property
    def qps(self) -> float:
        return self.latencies_s.size / self.seconds if self.seconds else 0.0

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_s, q) * 1000) if self.latencies_s.size else 0.0


def _queries(config: BenchConfig, count: int) -> list[bytes]:
    """Serialized requests for random stored users (from the bundle) or the fixed query."""
    from recship.bundle.transforms import read_transforms
    from recship.protos.v1 import recommender_pb2
    from recship.runtime.client import Query, model_spec, query_proto
    from recship.runtime.serve_cli import parse_features

    rng = np.random.default_rng(config.seed)
    if config.repo is not None:
        from recship.bundle.store import BundleStore

        store = BundleStore(Path(config.repo))
        validated = store.validate_latest(config.bundle, checksums=False)
        transforms = read_transforms(validated.ref.path)
        if transforms.user_key is None:
            raise InvalidInput(f"{validated.ref}: has no user key to draw queries from")
        keys = transforms.features[transforms.user_key].vocabulary
        assert keys is not None
        drawn = rng.integers(0, len(keys), count)
        # Random stored users by key alone: the server fills their features from the bundle.
        queries = [Query({transforms.user_key: keys.values[int(i)].as_py()}) for i in drawn]
    elif config.user_features:
        queries = [Query(parse_features(config.user_features))] * count
    else:
        raise InvalidInput("give --repo (random queries from the manifest) or --user-features")
    spec = model_spec(config.bundle)
    requests = []
    for query in queries:
        if config.rpc == "retrieve":
            message = recommender_pb2.RetrieveRequest(
                model=spec,
                queries=[recommender_pb2.RetrieveQuery(query=query_proto(query))],
                top_k=config.retrieve_k,
            )
        else:
            message = recommender_pb2.RecommendRequest(
                model=spec,
                queries=[recommender_pb2.RecommendQuery(query=query_proto(query))],
                retrieve_k=config.retrieve_k,
                top_n=config.top_n,
            )
        requests.append(message.SerializeToString())
    return requests


def closed_loop(
    callers: int,
    warmup_s: float,
    duration_s: float,
    caller_of: Callable[[int], Callable[[int], str | None]],
) -> tuple[list[float], dict[str, int]]:
    """`callers` threads, each calling its `caller_of(caller)(position)` back to back (positions
    caller, caller + callers, ...), until `warmup_s + duration_s` have passed.

    A call returns None when answered, else its error's name. Returns the latencies of the
    answered calls that started after the warm-up, and the count of each error among those.
    """
    start = time.monotonic() + warmup_s
    stop = start + duration_s
    latencies: list[list[float]] = [[] for _ in range(callers)]
    errors: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()

    def loop(caller: int) -> None:
        call = caller_of(caller)
        position = caller
        while (now := time.monotonic()) < stop:
            code = call(position)
            finished = time.monotonic()
            if now >= start:
                if code is None:
                    latencies[caller].append(finished - now)
                else:
                    with lock:
                        errors[code] += 1
            position += callers

    threads = [threading.Thread(target=loop, args=(c,)) for c in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [x for caller in latencies for x in caller], dict(errors)


def merged_results(
    futures: list[concurrent.futures.Future[tuple[list[float], dict[str, int]]]],
) -> tuple[list[float], collections.Counter[str]]:
    """The latencies and error counts of load processes (`closed_loop`'s results), merged."""
    latencies: list[float] = []
    errors: collections.Counter[str] = collections.Counter()
    for future in futures:
        got, failed = future.result()
        latencies.extend(got)
        errors.update(failed)
    return latencies, errors


def _worker(
    target: str,
    rpc: str,
    requests: list[bytes],
    callers: int,
    warmup_s: float,
    duration_s: float,
    tls: ClientTLS | None = None,
    channels: int = 1,
) -> tuple[list[float], dict[str, int]]:
    """One load process: `callers` threads in a closed loop over `channels` connections;
    latencies of the measured window."""
    import grpc

    from recship.protos.v1 import recommender_pb2, recommender_pb2_grpc
    from recship.runtime.security import open_channel

    # A local subchannel pool each: channels to one target would share a connection otherwise.
    options = [("grpc.use_local_subchannel_pool", 1)]
    opened = [open_channel(target, tls, options) for _ in range(channels)]
    stubs = [recommender_pb2_grpc.RecommenderStub(channel) for channel in opened]
    methods = [stub.Retrieve if rpc == "retrieve" else stub.Recommend for stub in stubs]
    parse = (
        recommender_pb2.RetrieveRequest.FromString
        if rpc == "retrieve"
        else recommender_pb2.RecommendRequest.FromString
    )
    messages = [parse(r) for r in requests]

    def caller_of(caller: int) -> Callable[[int], str | None]:
        method = methods[caller % len(methods)]

        def call(position: int) -> str | None:
            try:
                method(messages[position % len(messages)], timeout=30)
            except grpc.RpcError as error:
                return error.code().name  # type: ignore[attr-defined]
            return None

        return call

    measured = closed_loop(callers, warmup_s, duration_s, caller_of)
    for channel in opened:
        channel.close()
    return measured


_SCRAPED = (
    "recship_batch_rows_",
    "recship_batch_requests_",
    "recship_request_latency_seconds_count",
    "process_cpu_seconds_total",
)


def _scrape(metrics: str | None) -> dict[str, float]:
    """Batch size sums and counts, RPCs answered and process CPU seconds of a server, or {}.

    Each sample name is summed over its labels (all models, all methods).
    """
    if not metrics:
        return {}
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=10) as response:
        text = response.read().decode()
    totals: dict[str, float] = collections.defaultdict(float)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith(_SCRAPED):
                totals[sample.name] += sample.value
    return dict(totals)


def run_load(config: BenchConfig, target: str, metrics: str | None, label: str) -> LoadResult:
    """Drives the closed-loop load against one server and measures it."""
    if config.concurrency < 1 or config.duration_s <= 0 or config.channels < 1:
        raise InvalidInput("--concurrency and --channels must be >= 1 and --duration > 0")
    processes = config.processes or min(config.concurrency, os.cpu_count() or 1)
    shares = [len(part) for part in np.array_split(np.arange(config.concurrency), processes)]
    requests = _queries(config, 256)
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(len(shares), mp_context=context) as pool:
        # Start the workers first so that spawn time is not part of the warm-up.
        list(pool.map(abs, range(len(shares))))
        before: dict[str, float] = {}
        timer = threading.Timer(config.warmup_s, lambda: before.update(_scrape(metrics)))
        timer.start()
        futures = [
            pool.submit(
                _worker,
                target,
                config.rpc,
                requests,
                share,
                config.warmup_s,
                config.duration_s,
                config.tls,
                min(config.channels, share),
            )
            for share in shares
            if share
        ]
        latencies, errors = merged_results(futures)
        timer.join()
    after = _scrape(metrics)
    result = LoadResult(label, config.duration_s, np.asarray(latencies), dict(errors))
    if before and after:

        def delta(name: str) -> float:
            return after.get(name, 0.0) - before.get(name, 0.0)

        def mean(name: str) -> float | None:
            count = delta(f"{name}_count")
            return delta(f"{name}_sum") / count if count else None

        result.batch_rows = mean("recship_batch_rows")
        result.batch_requests = mean("recship_batch_requests")
        answered = delta("recship_request_latency_seconds_count")
        if answered and "process_cpu_seconds_total" in after:
            result.server_cpu_ms = 1000 * delta("process_cpu_seconds_total") / answered
    return result


class ServeProcess:
    """`recship serve --no-batching` on free ports, for the comparison (or, with `batching`,
    a server with its defaults, for benchmarks); stopped by `close`.

    `serve_args` come first, so the ports and `--no-batching` given here override any in them.
    Its log goes to a temporary file (a pipe nobody reads would fill and stall the server);
    the last line is quoted if it does not start.
    """

    def __init__(
        self,
        repo: Path,
        bundle: str,
        serve_args: tuple[str, ...] = (),
        *,
        tls: ClientTLS | None = None,
        token: str | None = None,
        batching: bool = False,
    ) -> None:
        executable = Path(sys.executable).parent / "recship"
        batching_flag = [] if batching else ["--no-batching"]
        self._log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - open until close()
        self._tls, self._token = tls, token
        self.process = subprocess.Popen(
            [str(executable), "serve", *serve_args, "--repo", str(repo), "--bundle", bundle,
             "--port", "0", "--metrics-port", "0", "--admin-port", "0", *batching_flag],
            stdout=subprocess.PIPE, stderr=self._log, text=True,
        )  # fmt: skip
        if self.process.stdout is None:
            raise Unavailable("the unbatched comparison server has no stdout")
        line = self.process.stdout.readline().split()
        if len(line) < 7 or line[0] != "listening":
            self._stop()
            self._log.seek(0)
            said = [text.strip() for text in self._log.read().splitlines() if text.strip()]
            self._log.close()
            which = "the unbatched comparison server" if not batching else "recship serve"
            raise Unavailable(f"{which} did not start" + (f": {said[-1]}" if said else ""))
        self.target = line[2]
        self.metrics = f"127.0.0.1:{line[4]}"
        self.admin = line[6]

    def wait_serving(self) -> None:
        from recship.runtime.client import AdminClient

        with AdminClient(self.admin, token=self._token, tls=self._tls) as admin:
            admin.wait_until_serving(120)

    def close(self) -> None:
        self._stop()
        self._log.close()

    def _stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


def bench(config: BenchConfig) -> list[LoadResult]:
    """Runs the benchmark: the batched server, then (optionally) the unbatched one.

    Raises:
        InvalidInput: a bad option, or --compare-unbatched without --repo or --unbatched-server.
    """
    results = [run_load(config, config.server, config.metrics, "batched")]
    if config.compare_unbatched:
        if config.unbatched_server:
            results.append(
                run_load(config, config.unbatched_server, config.unbatched_metrics, "unbatched")
            )
        elif config.repo is None:
            raise InvalidInput("--compare-unbatched needs --repo (or --unbatched-server)")
        else:
            server = ServeProcess(
                config.repo,
                config.bundle,
                config.unbatched_serve_args,
                tls=config.tls,
                token=config.admin_token,
            )
            try:
                server.wait_serving()
                results.append(run_load(config, server.target, server.metrics, "unbatched"))
            finally:
                server.close()
    return results


def _print(config: BenchConfig, results: list[LoadResult]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"recship bench: {config.rpc} on {config.bundle}, concurrency {config.concurrency}, "
        f"{config.duration_s:g} s"
    )
    for column in ("server", "QPS", "p50 ms", "p90 ms", "p99 ms", "errors", "rows/batch",
                   "requests/batch", "server CPU ms/req"):  # fmt: skip
        table.add_column(column, justify="right")
    for result in results:
        table.add_row(
            result.label,
            f"{result.qps:.0f}",
            f"{result.percentile_ms(50):.2f}",
            f"{result.percentile_ms(90):.2f}",
            f"{result.percentile_ms(99):.2f}",
            ", ".join(f"{k} {v}" for k, v in sorted(result.errors.items())) or "0",
            "-" if result.batch_rows is None else f"{result.batch_rows:.1f}",
            "-" if result.batch_requests is None else f"{result.batch_requests:.1f}",
            "-" if result.server_cpu_ms is None else f"{result.server_cpu_ms:.2f}",
        )
    console = Console()
    if not console.is_terminal:
        console = Console(width=120)  # a log or a pipe: no terminal to fit, keep every column whole
    console.print(table)
    if len(results) == 2 and results[1].qps:
        batched, unbatched = results
        p99 = unbatched.percentile_ms(99)
        console.print(
            f"batched / unbatched: throughput x{batched.qps / unbatched.qps:.2f}, "
            f"p99 x{batched.percentile_ms(99) / p99 if p99 else float('nan'):.2f}"
        )


@click.command("bench")
@click.option("--server", required=True, help="host:port of the server under test.")
@click.option("--bundle", required=True)
@click.option("--concurrency", type=int, default=16, show_default=True)
@click.option("--duration", "duration_s", type=float, default=10.0, show_default=True)
@click.option("--warmup", "warmup_s", type=float, default=2.0, show_default=True)
@click.option("--rpc", type=click.Choice(["recommend", "retrieve"]), default="recommend",
              show_default=True)  # fmt: skip
@click.option("--retrieve-k", type=int, default=100, show_default=True)
@click.option("--top-n", type=int, default=10, show_default=True)
@click.option("--repo", type=click.Path(path_type=Path), default=None,
              help="Repository: random queries; bundles of the unbatched server.")  # fmt: skip
@click.option("--user-features", default="", help="A fixed query when no --repo is given.")
@click.option("--metrics", default=None, help="host:port of the server's metrics endpoint.")
@click.option("--compare-unbatched", is_flag=True,
              help="Also measure a server with batching off and print the ratio.")  # fmt: skip
@click.option("--unbatched-server", default=None, help="Use this unbatched server instead.")
@click.option("--unbatched-metrics", default=None, help="Its metrics endpoint.")
@click.option("--unbatched-serve-args", default="",
              help='Options for the unbatched server started here, to match the server under '
                   'test, e.g. "--threads 2 --replicas 2".')  # fmt: skip
@click.option("--processes", type=int, default=None, help="Load generator processes.")
@click.option("--channels", type=int, default=4, show_default=True,
              help="Connections per load process (a server's workers balance by "
                   "connection).")  # fmt: skip
@admin_token_option
@tls_client_options
def bench_command(unbatched_serve_args: str, **options: object) -> None:
    """Closed-loop load against a server: QPS, p50/p90/p99, errors, batch size, CPU/request."""
    tls = client_tls(options)
    token = admin_token(options)
    config = BenchConfig(
        unbatched_serve_args=tuple(shlex.split(unbatched_serve_args)),
        tls=tls,
        admin_token=token,
        **options,  # type: ignore[arg-type]
    )
    _print(config, bench(config))
