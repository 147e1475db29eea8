"""Scale on one machine, end to end: generation, training, packaging, serving, retrieval.

Every stage goes through the project's own code and runs in a fresh process, so that its
peak RSS is its own:

1. ``generate``: the O(n) synthetic generator (`synthetic_tables`, raw tables) and `generate`
   (the same encoded through the built-in spec: what a rank trains on), wall time and peak RSS;
2. ``train``: `cli.pipeline.train_model` of the two-tower and of a DLRM on the labelled pairs,
   `--nproc` ranks, a bounded number of steps (`--max-steps`), the end-of-training evaluation
   on `--eval-users` users; steps/s of the training loop (metrics.json), the run's wall time and
   the peak RSS of its largest rank;
3. ``package``: `cli.pipeline.package_runs` (the index family `auto` picks, the default recall
   floor, a gate that does not judge model quality: the steps are bounded); wall time, stage
   times, peak RSS, bundle size;
4. ``serve``: a `VersionManager` with the runtime's loader: time to load (validate with
   checksums, map the index and tables, load the entry points, self-test) and RSS (VmRSS, of
   which anonymous and file-backed) with one version, with two side by side (a second version
   with the same files copied, as during an upgrade) and after the first is unloaded;
5. ``recommend``: `recship serve` and `recship bench`'s load generator, Recommend
   (retrieve_k 100, top_n 10) at `--concurrency` for `--duration` s: QPS, p50, p99;
6. ``retrieval``: the packaged index against exact Flat (FAISS `IndexFlatIP`) on the trained
   item vectors, `--queries` held-out users' query vectors: recall@100 and single-query QPS on
   one thread through `bundle.index.search`.

Usage (the issue's size; each stage prints one JSON line, `--json` collects them)::

    .venv/bin/python benchmarks/scale.py --work /tmp/recship-scale --users 10000000 \\
        --items 1000000 --max-steps 200

`--stages` runs some only (later stages reuse the work folder's runs and bundle).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import multiprocessing
import resource
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

BUNDLE = "scale"
STAGES = ("generate", "train", "package", "serve", "recommend", "retrieval")


def peak_rss_gib(children: bool = False) -> float:
    """Peak RSS of this process (or of its largest waited-for child) in GiB."""
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return round(resource.getrusage(who).ru_maxrss / 2**20, 2)


def memory_mib() -> dict[str, float]:
    """VmRSS, RssAnon and RssFile of this process in MiB (from /proc/self/status)."""
    wanted = {"VmRSS": "rss_mib", "RssAnon": "anon_mib", "RssFile": "file_mib"}
    found = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in wanted:
            found[wanted[key]] = round(int(line.split()[1]) / 1024, 1)
    return found


def in_child(target: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """Runs target(*args) in a fresh spawned process (in this one when the stage arguments
    say `in_process`: the tests' tiny sizes, where a process start costs more than the
    stage); returns its result."""
    if args and isinstance(args[-1], dict) and args[-1].get("in_process"):
        return target(*args)
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    # Not a Pool worker: those are daemonic and may not start training ranks of their own.
    child = context.Process(target=_child_main, args=(send, target, args))
    child.start()
    send.close()
    try:
        ok, value = receive.recv()
    except EOFError:
        ok, value = False, f"the stage's process died (exit code {child.join() or child.exitcode})"
    child.join()
    if not ok:
        raise RuntimeError(f"{target.__name__} failed: {value}")
    return value


def _child_main(send: Any, target: Callable[..., dict[str, Any]], args: tuple[Any, ...]) -> None:
    try:
        send.send((True, target(*args)))
    except BaseException as error:
        import traceback

        send.send((False, "".join(traceback.format_exception(error))))
        raise


def _data_options(args: dict[str, Any]) -> dict[str, int]:
    return {
        "num_users": args["users"],
        "num_items": args["items"],
        "interactions_per_user": args["per_user"],
        "seed": args["seed"],
    }


# -- 1. generate -------------------------------------------------------------------------------
def _generate_case(what: str, args: dict[str, Any]) -> dict[str, Any]:
    from recship.trainer.data.synthetic import generate, synthetic_tables

    options = _data_options(args)
    start = time.perf_counter()
    if what == "tables":
        rows = len(synthetic_tables(*options.values())["interactions"])
    else:
        rows = len(generate(*options.values()))
    return {
        f"{what}_s": round(time.perf_counter() - start, 1),
        f"{what}_peak_rss_gib": peak_rss_gib(),
        "interactions": rows,
    }


def stage_generate(args: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for what in ("tables", "generate"):
        result.update(in_child(_generate_case, what, args))
    return result


# -- 2. train ----------------------------------------------------------------------------------
def _train_case(model: str, args: dict[str, Any]) -> dict[str, Any]:
    from recship.cli.pipeline import train_model

    out = Path(args["work"]) / "runs" / model
    if out.exists():
        shutil.rmtree(out)
    extra: dict[str, Any] = {"examples": "labelled"} if model == "dlrm" else {}
    start = time.perf_counter()
    train_model(
        out,
        model,
        "synthetic",
        _data_options(args),
        nproc=args["nproc"],
        epochs=1,
        batch_size=args["batch_size"],
        max_steps=args["max_steps"],
        eval_users=args["eval_users"],
        **extra,
    )
    wall = time.perf_counter() - start
    metrics = json.loads((out / "metrics.json").read_text())
    train = metrics["train"]
    return {
        f"{model}_steps": train["steps_this_run"],
        f"{model}_steps_per_s": round(train["steps_this_run"] / train["wall_s"], 2),
        f"{model}_examples_per_s": round(train["examples_per_s"]),
        f"{model}_loop_s": round(train["wall_s"], 1),
        f"{model}_run_wall_s": round(wall, 1),
        # (The largest process of the run: with several ranks, the one that encoded the data.)
        f"{model}_peak_rss_gib": max(peak_rss_gib(), peak_rss_gib(children=True)),
        f"{model}_peak_rss_gib_largest_rank": train["peak_rss_gib_largest_rank"],
        f"{model}_eval": metrics["eval"],
        f"{model}_sharding": sorted({t["sharding"] for t in metrics["sharding_plan"].values()}),
        f"{model}_checkpoint_mib": round(
            sum(f.stat().st_size for f in (out / "checkpoints").rglob("*") if f.is_file()) / 2**20
        ),
    }


def stage_train(args: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for model in ("two-tower", "dlrm"):
        result.update(in_child(_train_case, model, args))
    return result


# -- 3. package --------------------------------------------------------------------------------
def _runs(args: dict[str, Any]) -> Any:
    from recship.cli.pipeline import TrainedRuns

    runs = Path(args["work"]) / "runs"
    return TrainedRuns(runs / "two-tower", runs / "dlrm")


def _package_case(args: dict[str, Any]) -> dict[str, Any]:
    from recship.cli.pipeline import package_runs
    from recship.packager.options import QualityThresholds

    repo = Path(args["work"]) / "repo"
    if repo.exists():
        shutil.rmtree(repo)
    start = time.perf_counter()
    # Bounded training: the gate's model-quality losses are not judged; the index floor is.
    thresholds = QualityThresholds(
        max_recall_loss=1.0, max_auc_loss=1.0, max_logit_diff=10.0, max_recommend_loss=1.0
    )
    report = package_runs(_runs(args), repo, BUNDLE, thresholds=thresholds)
    wall = time.perf_counter() - start
    files = [f for f in report.ref.path.rglob("*") if f.is_file()]
    index = report.manifest.index
    return {
        "package_s": round(wall, 1),
        "package_stage_s": {k: round(v, 1) for k, v in report.stage_seconds.items()},
        "package_peak_rss_gib": peak_rss_gib(),
        "bundle_mib": round(sum(f.stat().st_size for f in files) / 2**20, 1),
        "bundle_files_mib": {
            f.name: round(f.stat().st_size / 2**20, 1)
            for f in sorted(files, key=lambda f: -f.stat().st_size)[:5]
        },
        "index_factory": index.factory,
        "index_recall_at_100": round(float(index.recall_at_100_vs_exact), 4),
        "index_build_s": round(float(index.build_seconds), 1),
        "index_search_params": dict(index.search_params),
    }


def stage_package(args: dict[str, Any]) -> dict[str, Any]:
    return in_child(_package_case, args)


# -- 4. serve ----------------------------------------------------------------------------------
def publish_copy(repo: Path, source: int) -> int:
    """Publishes the files of version `source` again as the next version (a real second
    version on disk: its own files, as an upgrade has), through `BundleWriter`."""
    from recship.bundle.writer import republish

    return republish(repo, BUNDLE, source).version


async def _serve_memory(repo: Path) -> dict[str, Any]:
    from recship.bundle.store import BundleStore
    from recship.runtime.manager import VersionManager
    from recship.runtime.metrics import ServerMetrics
    from recship.runtime.policy import Pinned
    from recship.runtime.servable import LoaderConfig, ServableLoader

    store = BundleStore(repo)
    versions = store.list_versions(BUNDLE)
    if len(versions) < 2:
        publish_copy(repo, versions[0])
        versions = store.list_versions(BUNDLE)
    first, second = versions[0], versions[1]
    import torch  # noqa: F401 - the libraries' own memory is not the version's

    gc.collect()
    result: dict[str, Any] = {"before": memory_mib()}
    manager = VersionManager(
        store,
        ServableLoader(LoaderConfig()),
        ServerMetrics(),
        bundles=(BUNDLE,),
        policies={BUNDLE: Pinned((first,))},
    )
    start = time.perf_counter()
    await manager.start()
    result["load_s"] = round(time.perf_counter() - start, 2)
    gc.collect()
    result["one_version"] = memory_mib()
    start = time.perf_counter()
    await manager.set_policy(BUNDLE, Pinned((first, second)))
    result["second_load_s"] = round(time.perf_counter() - start, 2)
    gc.collect()
    result["two_versions"] = memory_mib()
    await manager.set_policy(BUNDLE, Pinned((second,)))
    gc.collect()
    result["after_unloading_the_first"] = memory_mib()
    await manager.close()
    return result


def _serve_case(args: dict[str, Any]) -> dict[str, Any]:
    found = asyncio.run(_serve_memory(Path(args["work"]) / "repo"))
    return {f"serve_{key}": value for key, value in found.items()}


def stage_serve(args: dict[str, Any]) -> dict[str, Any]:
    return in_child(_serve_case, args)


# -- 5. recommend ------------------------------------------------------------------------------
def stage_recommend(args: dict[str, Any]) -> dict[str, Any]:
    """`recship serve` (batching on, its defaults) and `recship bench`'s closed-loop load."""
    from recship.runtime.bench import BenchConfig, ServeProcess, run_load

    repo = Path(args["work"]) / "repo"
    server = ServeProcess(repo, BUNDLE, batching=True)  # `recship serve`, its defaults
    try:
        server.wait_serving()
        config = BenchConfig(
            server=server.target,
            bundle=BUNDLE,
            concurrency=args["concurrency"],
            duration_s=args["duration"],
            warmup_s=args["warmup"],
            repo=repo,
            metrics=server.metrics,
        )
        result = run_load(config, server.target, server.metrics, "batched")
    finally:
        server.close()
    return {
        "recommend_concurrency": args["concurrency"],
        "recommend_qps": round(result.qps),
        "recommend_p50_ms": round(result.percentile_ms(50), 2),
        "recommend_p99_ms": round(result.percentile_ms(99), 2),
        "recommend_errors": result.errors,
        "recommend_requests_per_batch": result.batch_requests,
    }


# -- 6. retrieval ------------------------------------------------------------------------------
def _qps(search: Callable[[Any], Any], queries: Any, seconds: float) -> float:
    """Single queries per second (one at a time, in turn, for about `seconds`)."""
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        search(queries[done % len(queries) : done % len(queries) + 1])
        done += 1
    return done / (time.perf_counter() - start)


def _retrieval_case(args: dict[str, Any]) -> dict[str, Any]:
    import faiss
    import numpy as np
    import torch

    from recship.bundle.index import read_index, search
    from recship.bundle.layout import MANIFEST_FILENAME
    from recship.bundle.manifest import read_manifest
    from recship.packager.checkpoint import load_checkpoint
    from recship.trainer.evaluate import eval_user_sample, tower_embeddings

    retrieval = load_checkpoint(_runs(args).retrieval, "two-tower")
    model, train = retrieval.model, retrieval.train
    users = eval_user_sample(retrieval.held_out, args["queries"], seed=1)
    if users is None:
        users = np.unique(retrieval.held_out.user_ids)
    with torch.no_grad():
        queries = tower_embeddings(
            model.query_tower, train.users, model.query_tower.feature_names, ids=users
        ).numpy()
        items = tower_embeddings(
            model.candidate_tower, train.items, model.candidate_tower.feature_names
        ).numpy()
    versions = (Path(args["work"]) / "repo" / BUNDLE).glob("[0-9]*")
    version = min(versions, key=lambda path: int(path.name))
    manifest = read_manifest(version / MANIFEST_FILENAME)
    index = read_index(version / manifest.index.file, manifest.index, mmap=True)
    flat = faiss.IndexFlatIP(items.shape[1])
    flat.add(np.ascontiguousarray(items, dtype=np.float32))
    k = 100
    _, exact = flat.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    _, found = search(index, queries, k, threads=1)
    recall = np.mean([np.isin(f, e).mean() for f, e in zip(found, exact, strict=True)])
    faiss.omp_set_num_threads(1)
    flat_qps = _qps(lambda q: flat.search(q, k), queries, args["qps_seconds"])
    index_qps = _qps(lambda q: search(index, q, k, threads=1), queries, args["qps_seconds"])
    return {
        "retrieval_queries": len(queries),
        "retrieval_index": manifest.index.factory,
        "retrieval_recall_at_100": round(float(recall), 4),
        "retrieval_index_qps_1_thread": round(index_qps),
        "retrieval_flat_qps_1_thread": round(flat_qps),
        "retrieval_speedup": round(index_qps / flat_qps, 1),
    }


def stage_retrieval(args: dict[str, Any]) -> dict[str, Any]:
    return in_child(_retrieval_case, args)


RUNNERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "generate": stage_generate,
    "train": stage_train,
    "package": stage_package,
    "serve": stage_serve,
    "recommend": stage_recommend,
    "retrieval": stage_retrieval,
}


def run(args: dict[str, Any], stages: tuple[str, ...] = STAGES) -> dict[str, Any]:
    """Runs the stages in order; returns every figure (also printed, a JSON line a stage)."""
    Path(args["work"]).mkdir(parents=True, exist_ok=True)
    figures: dict[str, Any] = {"sizes": {k: args[k] for k in ("users", "items", "per_user")}}
    for stage in stages:
        start = time.perf_counter()
        found = RUNNERS[stage](args)
        found[f"{stage}_stage_wall_s"] = round(time.perf_counter() - start, 1)
        print(json.dumps({"stage": stage, **found}), flush=True)
        figures.update(found)
    return figures


def parser() -> argparse.ArgumentParser:
    made = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    made.add_argument("--work", type=Path, required=True, help="work folder (runs/, repo/)")
    made.add_argument("--users", type=int, default=10_000_000)
    made.add_argument("--items", type=int, default=1_000_000)
    made.add_argument("--per-user", type=int, default=5)
    made.add_argument("--seed", type=int, default=0)
    made.add_argument("--nproc", type=int, default=2, help="training ranks")
    made.add_argument("--batch-size", type=int, default=1024, help="per rank")
    made.add_argument("--max-steps", type=int, default=200, help="training steps per model")
    made.add_argument("--eval-users", type=int, default=10_000)
    made.add_argument("--concurrency", type=int, default=16)
    made.add_argument("--duration", type=float, default=10.0, help="Recommend load seconds")
    made.add_argument("--warmup", type=float, default=2.0, help="Recommend warm-up seconds")
    made.add_argument("--queries", type=int, default=1000, help="retrieval benchmark queries")
    made.add_argument("--qps-seconds", type=float, default=5.0, help="per retrieval QPS figure")
    made.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    made.add_argument("--json", type=Path, help="also write every figure here")
    return made


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    figures = run(vars(args), tuple(args.stages))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
