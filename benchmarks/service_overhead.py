"""What recship's serving path costs beyond the model work, in one process, without transport.

The serving path is a worker's: `BatchPlaneService.Run` on a `CallBatch` of Recommend calls (as
the native front end sends them), through a real `VersionManager` lease, `RecommenderService`
validation and admission, the version's batchers and executor thread, to the serialized
`OutcomeBatch`. The baseline is the TorchServe peer's handler of `torchserve_compare.py` (JSON
bodies in, recship's compute called directly on the batch, answers out), i.e. the model work
with next to no serving around it. Both run the same users in the same batch sizes, in
alternating rounds, one CPU thread for torch and FAISS; the CPU time of the whole process
(every thread) per request is compared.

The difference is what a faster front end or transport cannot win back: on a host where the
load is CPU-bound, a server is at most (serving path) / (baseline) slower than a bare handler.

Example::

    python benchmarks/service_overhead.py --repo /tmp/demo-out/repo --bundle movies
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from torchserve_compare import HANDLER, host_cpu, recommend_payloads


def handler_path(repo: Path, bundle: str, threads: int, user_key: str, retrieve_k: int,
                 top_n: int, workdir: Path):  # fmt: skip
    """The TorchServe peer's `handle(data, context)` on this bundle (loaded on first call).

    It shares the process, so the C heap setting of the serving path's `VersionManager`
    (`heap.keep_batch_memory`) holds for both.
    """
    config = dict(repo=str(repo), bundle=bundle, threads=threads, user_key=user_key,
                  retrieve_k=retrieve_k, top_n=top_n, keep_batch_memory=True)  # fmt: skip
    (workdir / "recship.json").write_text(json.dumps(config))
    context = SimpleNamespace(system_properties={"model_dir": str(workdir)})
    namespace: dict = {}
    exec(compile(HANDLER, "recship_handler.py", "exec"), namespace)
    handle = namespace["handle"]

    def run(bodies: list[bytes]) -> list[bytes]:
        answers = handle([{"body": body} for body in bodies], context)
        return [json.dumps(answer).encode() for answer in answers]

    return run


async def serving_path(repo: Path, bundle: str, threads: int):
    """A worker's `BatchPlaneService.Run` over a started `VersionManager` of `repo`."""
    from recship.bundle.store import BundleStore
    from recship.protos.v1 import batch_plane_pb2
    from recship.runtime.batch_plane import BatchPlaneService
    from recship.runtime.limits import ServiceLimits
    from recship.runtime.manager import VersionManager
    from recship.runtime.metrics import ServerMetrics
    from recship.runtime.servable import LoaderConfig, ServableLoader, configure_threads
    from recship.runtime.service import RecommenderService

    configure_threads(threads)
    manager = VersionManager(
        BundleStore(repo), ServableLoader(LoaderConfig()), ServerMetrics(), bundles=[bundle]
    )
    await manager.start()
    limits = ServiceLimits()
    plane = BatchPlaneService(RecommenderService(manager, limits), limits)

    def encode(bodies: list[bytes]) -> bytes:
        """The `CallBatch` the native front end would send (its work, not timed)."""
        batch = batch_plane_pb2.CallBatch(method="/recship.v1.Recommender/Recommend")
        for body in bodies:
            batch.calls.add(request=body, timeout_s=5.0, peer="ipv4:127.0.0.1:1")
        return batch.SerializeToString()

    async def run(encoded: bytes) -> bytes:
        reply = await plane.Run(batch_plane_pb2.CallBatch.FromString(encoded), None)
        assert all(outcome.code == 0 for outcome in reply.outcomes), reply.outcomes[0].message
        return reply.SerializeToString()

    return manager, encode, run


Sample = tuple[int, str, float, float]  # calls per batch, path, CPU s and minor faults per request


def minor_faults() -> int:
    """Page faults the process has taken without I/O: each a fresh page the kernel zeroed."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


async def measure(args: argparse.Namespace) -> list[Sample]:
    repo = args.repo.resolve()
    key, grpc_payloads, http_payloads = recommend_payloads(
        repo, args.bundle, args.users, args.seed, args.retrieve_k, args.top_n
    )
    manager, encode, serve = await serving_path(repo, args.bundle, args.threads)
    with tempfile.TemporaryDirectory(prefix="service-overhead-") as workdir:
        handle = handler_path(repo, args.bundle, args.threads, key, args.retrieve_k,
                              args.top_n, Path(workdir))  # fmt: skip

        async def handler(bodies: list[bytes]) -> list[bytes]:
            return handle(bodies)

        # Each path's input as its server hands it over: a CallBatch, or the JSON bodies.
        paths = {"serving path": (serve, encode), "TorchServe handler": (handler, list)}
        payloads = {"serving path": grpc_payloads, "TorchServe handler": http_payloads}
        sizes = [int(size) for size in args.batch_sizes.split(",")]
        for name, (run, prepare) in paths.items():  # warm-up: loads, caches, the JIT's shapes
            for size in sizes:
                for start in range(0, 8 * size, size):
                    await run(prepare(payloads[name][start : start + size]))
        samples = []
        for round_ in range(args.rounds):
            for size in sizes:
                for name, (run, prepare) in paths.items():
                    last = len(payloads[name]) - size
                    starts = [(done + round_ * 7) % last for done in range(0, args.requests, size)]
                    batches = [prepare(payloads[name][start : start + size]) for start in starts]
                    began, faults = time.process_time(), minor_faults()
                    for batch in batches:
                        await run(batch)
                    requests = len(batches) * size
                    samples.append((size, name, (time.process_time() - began) / requests,
                                    (minor_faults() - faults) / requests))  # fmt: skip
                    print(f"round {round_ + 1} batch {size} {name}: "
                          f"{1000 * samples[-1][2]:.3f} ms CPU, "
                          f"{samples[-1][3]:.1f} page faults per request", flush=True)  # fmt: skip
    await manager.close()
    return samples


PATHS = ("serving path", "TorchServe handler")


def report(samples: list[Sample]) -> None:
    print(f"\nhost {host_cpu()}")
    print("| calls per batch | serving path ms CPU/request | TorchServe handler | ratio "
          "| page faults/request, serving path | TorchServe handler |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    sizes = sorted({sample[0] for sample in samples})
    # (calls per batch, path) -> median (CPU s, page faults) per request.
    medians = {
        (size, name): [float(np.median([s[column] for s in samples if s[:2] == (size, name)]))
                       for column in (2, 3)]
        for size in sizes for name in PATHS
    }  # fmt: skip
    for size in sizes:
        serving, handler = (medians[size, name] for name in PATHS)
        ratio = serving[0] / handler[0]
        print(f"| {size} | {1000 * serving[0]:.3f} | {1000 * handler[0]:.3f} | x{ratio:.2f} "
              f"| {serving[1]:.1f} | {handler[1]:.1f} |")  # fmt: skip
    if len(sizes) < 2:
        return
    # A batch's CPU as a line in its calls, fitted over the sizes measured: what a path
    # costs once per batch (it weighs on small batches) and what each call adds.
    print("\n| path | ms CPU per batch | ms CPU per call |")
    print("|---|---|---|")
    for name in PATHS:
        batch_ms = [1000 * size * medians[size, name][0] for size in sizes]
        per_call, per_batch = np.polyfit(sizes, batch_ms, 1)
        print(f"| {name} | {per_batch:.3f} | {per_call:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, required=True)
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--batch-sizes", default="1,17,32", help="calls per batch")
    parser.add_argument("--requests", type=int, default=1024, help="requests per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--users", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="torch/FAISS threads")
    parser.add_argument("--retrieve-k", type=int, default=100)
    parser.add_argument("--top-n", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    report(asyncio.run(measure(parser.parse_args())))


if __name__ == "__main__":
    main()
