"""recship serve vs TorchServe on the same Recommend work, one load generator, interleaved.

Builds the TorchServe peer of a bundle version: a TorchServe handler that loads the version
with recship's own loader (`load_servable`) and, for each TorchServe batch of JSON requests
``{"user_id": ...}``, runs recship's compute on the whole batch (codec encode -> query tower
-> FAISS top `retrieve_k` -> item-feature join -> ranker on those rows -> top `top_n`), the
same steps `RecommenderService.Recommend` runs through its batchers. TorchServe batching is
on (`--ts-batch-size`, `--ts-max-delay-ms`).

Then the same closed-loop load (threads in a few load processes, random stored users drawn
from the bundle) runs against `recship serve --workers W` (gRPC, Recommend) and TorchServe
with W Python workers (HTTP/JSON, POST /predictions/<model>), interleaved: every round
measures every server at every concurrency in turn. The transports differ (gRPC vs HTTP):
that is unavoidable, each server is driven through its own front end. Server CPU per
request is the CPU time of the server's whole process tree (supervisor + workers; TorchServe's
Java front end + its Python workers) over the measured window, divided by answers. A few
answers are checked equal between the two before measuring.

All servers run side by side for the whole run (one TorchServe with one registered model per
worker count); idle ones cost next to nothing. On 4 or more cores the servers get half of
them and the load generator the other half (`--no-pin` to share them); below that they share
every core, which the output says. `--recship-workers 1,2,4` is the workers sweep and
`--recship-front-ends` picks `recship serve --front-end` values (native, grpcio).

Nothing is fetched at run time: TorchServe (and torch-model-archiver) must be installed, e.g.
``pip install --target /tmp/tspkgs torchserve==0.12.0 torch-model-archiver==0.12.0`` and then
``--ts-pythonpath /tmp/tspkgs``; Java 17+ must be on PATH.

Example::

    python benchmarks/torchserve_compare.py --repo /tmp/demo-out2/repo --bundle movies \\
        --ts-pythonpath /tmp/tspkgs --duration 5 --rounds 2
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import http.client
import importlib.util
import json
import multiprocessing
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np

HANDLER = r'''
"""TorchServe handler: recship's Recommend compute on each TorchServe batch."""
import json
import os

import numpy as np

_state = {}


def _setup(context):
    from pathlib import Path

    from recship.bundle.store import BundleStore
    from recship.runtime import heap
    from recship.runtime.servable import LoaderConfig, configure_threads, load_servable

    with open(os.path.join(context.system_properties["model_dir"], "recship.json")) as f:
        config = json.load(f)
    configure_threads(config["threads"])
    if config["keep_batch_memory"]:  # the heap setting recship's servers run with
        heap.keep_batch_memory()
    store = BundleStore(Path(config["repo"]))
    version = store.validate_latest(config["bundle"], checksums=False)
    servable = load_servable(version, LoaderConfig())
    _state.update(
        servable=servable, replica=servable.replicas[0], codec=servable.codec,
        key=config["user_key"], retrieve_k=config["retrieve_k"], top_n=config["top_n"],
    )


def handle(data, context):
    if not _state:
        _setup(context)
    if data is None:
        return None
    from recship.base.jagged import NO_IDS
    from recship.runtime.client import Query, query_proto
    from recship.runtime.servable import RankPart, RetrievePart
    from recship.runtime.service import _rows, _sigmoid

    codec, replica, key = _state["codec"], _state["replica"], _state["key"]
    users = []
    for row in data:
        body = row.get("body") if row.get("body") is not None else row.get("data")
        if isinstance(body, (bytes, bytearray)):
            body = json.loads(body)
        users.append(body["user_id"])
    queries = [query_proto(Query({key: user})) for user in users]
    paths = [f"queries[{i}].query" for i in range(len(queries))]
    tower, ranker, dense, cold = codec.encode_queries(queries, paths)
    ((scores, ids),) = replica.run_retrieve(
        [RetrievePart(tower, _state["retrieve_k"], (NO_IDS,) * tower.rows)]
    )
    keep = ids >= 0
    candidates = [row_ids[mask] for row_ids, mask in zip(ids, keep)]
    retrieval = [row[mask] for row, mask in zip(scores, keep)]
    row_query, starts = _rows([c.size for c in candidates])
    (logits,) = replica.run_rank([RankPart(ranker, dense, row_query, np.concatenate(candidates))])
    probabilities = _sigmoid(logits)
    answers = []
    for i, (items, retrieved) in enumerate(zip(candidates, retrieval)):
        ranked = probabilities[starts[i] : starts[i + 1]]
        best = np.argsort(-ranked, kind="stable")[: _state["top_n"]]
        answers.append({
            "cold_start": bool(cold[i]),
            "items": [
                [item, r, s]
                for item, r, s in zip(
                    codec.item_ids(items[best]), ranked[best].tolist(), retrieved[best].tolist()
                )
            ],
        })
    return answers
'''


def host_cpu() -> str:
    """The host's CPU model and core count, for the report: the ratios depend on it (the same
    code gave x1.15 at 64 on an AMD EPYC VM and x0.94-1.11 on an Intel Xeon one)."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, {os.cpu_count()} cores"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- CPU time of a process tree, from /proc ------------------------------------------------
_TICK = os.sysconf("SC_CLK_TCK")


def tree_cpu_s(root: int) -> float:
    """User + system CPU seconds of `root` and all its live descendants."""
    parent: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(entry)
        parent[pid] = int(fields[1])
        cpu[pid] = (int(fields[11]) + int(fields[12])) / _TICK
    children = collections.defaultdict(list)
    for pid, ppid in parent.items():
        children[ppid].append(pid)
    total, stack = 0.0, [root]
    while stack:
        pid = stack.pop()
        total += cpu.get(pid, 0.0)
        stack.extend(children.get(pid, ()))
    return total


# -- the load generator ----------------------------------------------------------------------
def _load_process(
    kind: str,
    target: str,
    payloads: list,
    callers: int,
    warmup_s: float,
    duration_s: float,
) -> tuple[list[float], dict[str, int]]:
    """One load process: `callers` threads in a closed loop; latencies of the measured window."""
    from recship.runtime.bench import closed_loop

    if kind == "grpc":
        import grpc

        from recship.protos.v1 import recommender_pb2, recommender_pb2_grpc

        channels = [
            grpc.insecure_channel(target, [("grpc.use_local_subchannel_pool", 1)])
            for _ in range(min(4, callers))
        ]
        stubs = [recommender_pb2_grpc.RecommenderStub(c) for c in channels]
        messages = [recommender_pb2.RecommendRequest.FromString(p) for p in payloads]
    host, _, rest = target.partition(":")
    port, _, path = rest.partition("/")

    def caller_of(caller: int) -> Callable[[int], str | None]:
        if kind == "grpc":
            method = stubs[caller % len(stubs)].Recommend

            def call_grpc(position: int) -> str | None:
                try:
                    method(messages[position % len(messages)], timeout=30)
                except grpc.RpcError as error:
                    return error.code().name
                return None

            return call_grpc
        connection = http.client.HTTPConnection(host, int(port), timeout=30)

        def call_http(position: int) -> str | None:
            nonlocal connection
            try:
                connection.request(
                    "POST", "/" + path, payloads[position % len(payloads)],
                    {"Content-Type": "application/json"},
                )  # fmt: skip
                response = connection.getresponse()
                response.read()
            except Exception as error:  # counted, not raised
                connection.close()
                connection = http.client.HTTPConnection(host, int(port), timeout=30)
                return type(error).__name__
            return None if response.status == 200 else f"HTTP {response.status}"

        return call_http

    return closed_loop(callers, warmup_s, duration_s, caller_of)


def run_load(pool, processes, kind, target, payloads, concurrency, warmup_s, duration_s, root):
    from recship.runtime.bench import merged_results

    shares = [len(p) for p in np.array_split(np.arange(concurrency), min(processes, concurrency))]
    cpu: dict[str, float] = {}
    load_pids = list(pool._processes)  # the load processes: their CPU is reported apart

    def sample(when: str) -> None:
        cpu[when] = tree_cpu_s(root)
        cpu[f"load {when}"] = sum(tree_cpu_s(pid) for pid in load_pids)

    timer = threading.Timer(warmup_s, sample, ("before",))
    timer.start()
    futures = [
        pool.submit(_load_process, kind, target, payloads, share, warmup_s, duration_s)
        for share in shares
        if share
    ]
    timer_stop = threading.Timer(warmup_s + duration_s, sample, ("after",))
    timer_stop.start()
    latencies, errors = merged_results(futures)
    timer.join()
    timer_stop.join()
    array = np.asarray(latencies)
    answered = array.size
    return {
        "qps": answered / duration_s,
        "p50": float(np.percentile(array, 50) * 1000) if answered else float("nan"),
        "p99": float(np.percentile(array, 99) * 1000) if answered else float("nan"),
        "cpu_ms": 1000 * (cpu["after"] - cpu["before"]) / answered if answered else float("nan"),
        "load_cpu_ms": (
            1000 * (cpu["load after"] - cpu["load before"]) / answered if answered else float("nan")
        ),
        "errors": dict(errors),
    }


# -- servers ------------------------------------------------------------------------------------
class RecshipServer:
    def __init__(
        self, repo: Path, bundle: str, workers: int, threads: int, front_end: str, extra: str
    ) -> None:
        from recship.runtime.bench import ServeProcess

        flags = ("--workers", str(workers), "--threads", str(threads), "--front-end", front_end,
                 *extra.split())  # fmt: skip
        self.serve = ServeProcess(repo, bundle, flags, batching=True)
        self.serve.wait_serving()
        self.pid = self.serve.process.pid
        self.target = self.serve.target

    def close(self) -> None:
        self.serve.close()


class TorchServe:
    """One TorchServe (Java front end) with one registered model per worker count."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir, self.env = workdir, env
        self.inference, self.management, self.metrics = free_port(), free_port(), free_port()
        (workdir / "store").mkdir(exist_ok=True)
        (workdir / "config.properties").write_text(
            f"inference_address=http://127.0.0.1:{self.inference}\n"
            f"management_address=http://127.0.0.1:{self.management}\n"
            f"metrics_address=http://127.0.0.1:{self.metrics}\n"
            "disable_system_metrics=true\n"
            "default_workers_per_model=1\n"
        )
        self.log = open(workdir / "torchserve.log", "w")  # noqa: SIM115 - closed in close()
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from ts.model_server import start; start()",
             "--start", "--foreground", "--ncs", "--disable-token-auth", "--enable-model-api",
             "--model-store", str(workdir / "store"),
             "--ts-config", str(workdir / "config.properties")],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=workdir,
            start_new_session=True,  # its own process group: the Java front end and workers
        )  # fmt: skip
        self.pid = self.process.pid
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.inference}/ping", timeout=5):
                    break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        "TorchServe did not start; its log ends:\n" + self.log_tail()
                    ) from None
                time.sleep(0.5)

    def archive(self, name: str, config: dict) -> None:
        extra = self.workdir / "recship.json"
        extra.write_text(json.dumps(config))
        handler = self.workdir / "recship_handler.py"
        handler.write_text(HANDLER)
        subprocess.run(
            [sys.executable, "-c",
             "from model_archiver.model_packaging import generate_model_archive as g; g()",
             "--model-name", name, "--version", "1.0", "--handler", str(handler),
             "--extra-files", str(extra), "--export-path", str(self.workdir / "store"),
             "--force"],
            check=True, env=self.env,
        )  # fmt: skip

    def register(self, name: str, workers: int, batch_size: int, delay_ms: int) -> None:
        query = (
            f"url={name}.mar&model_name={name}&batch_size={batch_size}"
            f"&max_batch_delay={delay_ms}&initial_workers={workers}&synchronous=true"
        )
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.management}/models?{query}", method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=300) as response:
                response.read()
        except urllib.error.HTTPError as error:
            raise RuntimeError(
                f"TorchServe did not register {name}: {error.read()[:500]!r}; its log ends:\n"
                + self.log_tail()
            ) from error

    def log_tail(self, lines: int = 40) -> str:
        self.log.flush()
        return "\n".join((self.workdir / "torchserve.log").read_text().splitlines()[-lines:])

    def close(self) -> None:
        # The launcher, the Java front end and its Python workers: one process group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.pid, signal.SIGKILL)
            self.process.wait()
        time.sleep(1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)  # whatever outlived its launcher
        self.log.close()


def check_torchserve(pythonpath: str | None) -> dict[str, str]:
    """The environment to run TorchServe with; exits with install instructions if absent."""
    if pythonpath:
        sys.path.insert(0, pythonpath)
    missing = [m for m in ("ts", "model_archiver") if importlib.util.find_spec(m) is None]
    if missing or shutil.which("java") is None:
        sys.exit(
            "TorchServe is not usable here: "
            + (f"missing Python modules {missing}; " if missing else "")
            + (
                "no `java` on PATH (TorchServe 0.12 needs Java 17+); "
                if not shutil.which("java")
                else ""
            )
            + "install with `pip install --target /tmp/tspkgs torchserve==0.12.0 "
            "torch-model-archiver==0.12.0` and pass --ts-pythonpath /tmp/tspkgs"
        )
    env = dict(os.environ)
    paths = [p for p in (pythonpath, env.get("PYTHONPATH")) if p]
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def users(repo: Path, bundle: str, count: int, seed: int) -> tuple[str, list]:
    from recship.bundle.store import BundleStore
    from recship.bundle.transforms import read_transforms

    version = BundleStore(repo).validate_latest(bundle, checksums=False)
    transforms = read_transforms(version.ref.path)
    keys = transforms.features[transforms.user_key].vocabulary
    drawn = np.random.default_rng(seed).integers(0, len(keys), count)
    return transforms.user_key, [keys.values[int(i)].as_py() for i in drawn]


def recommend_payloads(
    repo: Path, bundle: str, count: int, seed: int, retrieve_k: int, top_n: int
) -> tuple[str, list[bytes], list[bytes]]:
    """(user key, Recommend request bytes, TorchServe JSON bodies) of `count` drawn users."""
    from recship.protos.v1 import recommender_pb2
    from recship.runtime.client import Query, model_spec, query_proto

    key, drawn = users(repo, bundle, count, seed)
    grpc_payloads = [
        recommender_pb2.RecommendRequest(
            model=model_spec(bundle),
            queries=[recommender_pb2.RecommendQuery(query=query_proto(Query({key: user})))],
            retrieve_k=retrieve_k,
            top_n=top_n,
        ).SerializeToString()
        for user in drawn
    ]
    return key, grpc_payloads, [json.dumps({"user_id": user}).encode() for user in drawn]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, required=True)
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--recship-workers", default="1,2")
    parser.add_argument("--recship-front-ends", default="native,grpcio",
                        help="recship serve --front-end values to measure")  # fmt: skip
    parser.add_argument("--recship-serve-args", action="append", default=None,
                        help="extra `recship serve` flags, e.g. '--max-delay-ms 2'; repeat to "
                             "measure each (default: none)")  # fmt: skip
    parser.add_argument("--ts-workers", default="1,2")
    parser.add_argument("--ts-batch-size", type=int, default=32)
    parser.add_argument("--ts-max-delay-ms", type=int, default=5)
    parser.add_argument("--ts-pythonpath", default=None)
    parser.add_argument("--ts-heap", default="glibc",
                        help="TorchServe workers' C heap: `glibc` (its defaults, as shipped) "
                             "and/or `kept` (recship's `heap.keep_batch_memory`)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=1, help="torch/FAISS threads per worker")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--server-warmup", type=float, default=20.0,
                        help="seconds of unmeasured load per server at the highest concurrency "
                             "before the first round: TorchServe's Java front end took ~20 s "
                             "to settle (JIT) on a 2-vCPU host")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--processes", type=int, default=2, help="load generator processes")
    parser.add_argument("--retrieve-k", type=int, default=100)
    parser.add_argument("--top-n", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-pin", dest="pin", action="store_false",
                        help="never pin (by default, on 4+ cores the servers get half of them "
                             "and the load generator the other half)")  # fmt: skip
    args = parser.parse_args()
    ts_heaps = args.ts_heap.split(",")
    if unknown := [value for value in ts_heaps if value not in ("glibc", "kept")]:
        sys.exit(f"--ts-heap: unknown value(s) {unknown} (glibc, kept)")
    env = check_torchserve(args.ts_pythonpath)
    repo = args.repo.resolve()
    levels = [int(c) for c in args.concurrency.split(",")]

    key, grpc_payloads, http_payloads = recommend_payloads(
        repo, args.bundle, 256, args.seed, args.retrieve_k, args.top_n
    )

    cpus = sorted(os.sched_getaffinity(0))
    half = len(cpus) // 2
    pinned = args.pin and len(cpus) >= 4
    if pinned:  # what this process starts inherits its CPU set: the servers first
        print(f"pinning: servers on CPUs {cpus[half:]}, load generator on CPUs {cpus[:half]}")
        os.sched_setaffinity(0, cpus[half:])
    else:
        print(f"no CPU pinning: {len(cpus)} cores (pinning gives the servers and the load "
              "generator half each from 4 cores); they share every core")  # fmt: skip
    servers: dict[str, tuple[str, str, int]] = {}  # label -> (kind, target, pid root)
    opened: list = []
    workdir = Path(tempfile.mkdtemp(prefix="ts-compare-"))
    try:
        for extra in args.recship_serve_args or [""]:
            for front_end in args.recship_front_ends.split(","):
                for workers in [int(w) for w in args.recship_workers.split(",")]:
                    server = RecshipServer(
                        repo, args.bundle, workers, args.threads, front_end, extra
                    )
                    opened.append(server)
                    label = f"recship serve {front_end}, {workers} worker(s)"
                    label += f" {extra}" if extra else ""
                    servers[label] = ("grpc", server.target, server.pid)
        ts = TorchServe(workdir, env)
        opened.append(ts)
        config = {
            "repo": str(repo),
            "bundle": args.bundle,
            "user_key": key,
            "retrieve_k": args.retrieve_k,
            "top_n": args.top_n,
            "threads": args.threads,
        }
        for ts_heap in ts_heaps:
            for workers in [int(w) for w in args.ts_workers.split(",")]:
                name = f"{args.bundle}_w{workers}_{ts_heap}"
                ts.archive(name, {**config, "keep_batch_memory": ts_heap == "kept"})
                ts.register(name, workers, args.ts_batch_size, args.ts_max_delay_ms)
                servers[f"TorchServe, {workers} worker(s), heap {ts_heap}"] = (
                    "http", f"127.0.0.1:{ts.inference}/predictions/{name}", ts.pid,
                )  # fmt: skip
        check_answers(servers, grpc_payloads[:8], http_payloads[:8])
        if pinned:  # the load processes start from here
            os.sched_setaffinity(0, cpus[:half])
        context = multiprocessing.get_context("spawn")
        results: dict[tuple[str, int], list[dict]] = collections.defaultdict(list)
        with concurrent.futures.ProcessPoolExecutor(args.processes, mp_context=context) as pool:
            list(pool.map(abs, range(args.processes)))
            if args.server_warmup > 0:
                print(f"warming each server for {args.server_warmup:g} s at concurrency "
                      f"{max(levels)} (not measured)", flush=True)  # fmt: skip
                for kind, target, pid in servers.values():
                    payloads = grpc_payloads if kind == "grpc" else http_payloads
                    run_load(pool, args.processes, kind, target, payloads, max(levels), 0.0,
                             args.server_warmup, pid)  # fmt: skip
            for round_ in range(args.rounds):
                for level in levels:
                    for label, (kind, target, pid) in servers.items():
                        payloads = grpc_payloads if kind == "grpc" else http_payloads
                        measured = run_load(pool, args.processes, kind, target, payloads, level,
                                            args.warmup, args.duration, pid)  # fmt: skip
                        results[(label, level)].append(measured)
                        print(f"round {round_ + 1} c={level} {label}: {measured['qps']:.0f} QPS "
                              f"p99 {measured['p99']:.1f} ms cpu {measured['cpu_ms']:.2f} ms/req "
                              f"load generator {measured['load_cpu_ms']:.2f} ms/req "
                              f"errors {measured['errors'] or 0}", flush=True)  # fmt: skip
        report(results, levels, list(servers), args)
        shutil.rmtree(workdir, ignore_errors=True)  # kept (with TorchServe's log) on failure
    finally:
        for server in reversed(opened):
            server.close()


def check_answers(servers, grpc_payloads, http_payloads) -> None:
    """The first few users' answers are equal (ids in order, scores to 1e-5) on every server."""
    import grpc

    from recship.protos.v1 import recommender_pb2, recommender_pb2_grpc

    answers: dict[str, list] = {}
    for label, (kind, target, _) in servers.items():
        got = []
        if kind == "grpc":
            with grpc.insecure_channel(target) as channel:
                stub = recommender_pb2_grpc.RecommenderStub(channel)
                for payload in grpc_payloads:
                    reply = stub.Recommend(recommender_pb2.RecommendRequest.FromString(payload))
                    got.append([(i.item_id, i.rank_score, i.retrieval_score)
                                for i in reply.results[0].items])  # fmt: skip
        else:
            host, _, rest = target.partition(":")
            port, _, path = rest.partition("/")
            for payload in http_payloads:
                connection = http.client.HTTPConnection(host, int(port), timeout=60)
                connection.request("POST", "/" + path, payload,
                                   {"Content-Type": "application/json"})  # fmt: skip
                response = connection.getresponse()
                body = response.read()
                if response.status != 200:
                    raise RuntimeError(f"{label}: HTTP {response.status}: {body[:300]!r}")
                got.append([tuple(item) for item in json.loads(body)["items"]])
                connection.close()
        answers[label] = got
    reference_label, reference = next(iter(answers.items()))
    for label, got in answers.items():
        for want, have in zip(reference, got, strict=True):
            same = [w[0] for w in want] == [h[0] for h in have] and np.allclose(
                [w[1:] for w in want], [h[1:] for h in have], atol=1e-5
            )
            if not same:
                raise RuntimeError(
                    f"{label} answers differ from {reference_label}: {want} / {have}"
                )
    print(f"answers checked equal on {len(grpc_payloads)} users across {len(answers)} servers")


def report(results, levels, labels, args) -> None:
    print(
        f"\n{args.rounds} round(s) interleaved, {args.duration:g} s per run, medians; TorchServe "
        f"batch_size {args.ts_batch_size}, max_batch_delay {args.ts_max_delay_ms} ms; host "
        f"{host_cpu()}"
    )
    print(
        "| concurrency | server | QPS | p50 ms | p99 ms | server CPU ms/request "
        "| load generator CPU ms/request | errors |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for level in levels:
        for label in labels:
            runs = results[(label, level)]
            errors = sum(sum(r["errors"].values()) for r in runs)
            median = {
                m: float(np.median([r[m] for r in runs]))
                for m in ("qps", "p50", "p99", "cpu_ms", "load_cpu_ms")
            }
            print(f"| {level} | {label} | {median['qps']:,.0f} | {median['p50']:.1f} | "
                  f"{median['p99']:.1f} | {median['cpu_ms']:.2f} | {median['load_cpu_ms']:.2f} | "
                  f"{errors} |")  # fmt: skip
    print("\nratios recship / best TorchServe (by QPS at that concurrency); per round: against")
    print("the best TorchServe of the same round (the machine's drift between rounds cancels):")
    print(
        "| concurrency | recship | QPS ratio | p99 ratio | CPU ms/req ratio "
        "| QPS ratio per round (median) |"
    )
    print("|---|---|---|---|---|---|")
    for level in levels:
        med = {
            label: {m: float(np.median([r[m] for r in results[(label, level)]]))
                    for m in ("qps", "p99", "cpu_ms")}
            for label in labels
        }  # fmt: skip
        ts_labels = [label for label in labels if label.startswith("TorchServe")]
        best = max(ts_labels, key=lambda label: med[label]["qps"])
        for label in labels:
            if label.startswith("recship"):
                mine, theirs = med[label], med[best]
                paired = [
                    run["qps"] / max(results[(ts, level)][i]["qps"] for ts in ts_labels)
                    for i, run in enumerate(results[(label, level)])
                ]
                print(
                    f"| {level} | {label} vs {best} | x{mine['qps'] / theirs['qps']:.2f} | "
                    f"x{mine['p99'] / theirs['p99']:.2f} | "
                    f"x{mine['cpu_ms'] / theirs['cpu_ms']:.2f} | "
                    f"{' '.join(f'x{r:.2f}' for r in paired)} (x{np.median(paired):.2f}) |"
                )


if __name__ == "__main__":
    main()
