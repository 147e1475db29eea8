"""Data at size on one machine: synthetic generation time and memory, Criteo reading speed.

Two measurements, each in a fresh process (so that peak RSS is its own):

- ``synthetic``: `synthetic_tables` (the raw tables, the O(n) generator itself) and
  `generate` (those tables encoded through the built-in spec by `load_tables`, the data set a
  model trains on), wall time and peak RSS, e.g. 10M users x 1M items;
- ``criteo``: lines/s of the Criteo reader on one generated file, before (the line-by-line
  Python reader of an earlier commit, read from git) and after (this checkout's, in file order,
  shuffled, and as one rank of two), best of `--repeat` runs over the same file.

Usage::

    .venv/bin/python benchmarks/data_generation.py synthetic --users 10000000 --items 1000000 \\
        --per-user 5
    .venv/bin/python benchmarks/data_generation.py criteo --lines 1000000 --before 1bf4426
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def peak_rss_gib() -> float:
    """This process's peak resident set size (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _in_child(target: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """Runs target(*args) in a fresh spawned process; returns its result dict."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return pool.apply(target, args)


# -- synthetic ---------------------------------------------------------------------------------
def _synthetic_case(what: str, users: int, items: int, per_user: int, seed: int) -> dict:
    from recship.trainer.data.synthetic import generate, synthetic_tables

    start = time.perf_counter()
    if what == "tables":
        tables = synthetic_tables(users, items, per_user, seed)
        rows = len(tables["interactions"])
        size = sum(t.nbytes for t in tables.values())
    else:
        data = generate(users, items, per_user, seed)
        rows = len(data)
        size = sum(a.nbytes for a in (data.user_ids, data.item_ids, data.labels, data.timestamps))
    return {
        "what": what,
        "users": users,
        "items": items,
        "interactions": rows,
        "seconds": round(time.perf_counter() - start, 1),
        "peak_rss_gib": round(peak_rss_gib(), 2),
        "result_gib": round(size / 2**30, 2),
    }


def synthetic(args: argparse.Namespace) -> list[dict]:
    """`synthetic_tables`, then `generate`, each in its own process."""
    results = []
    for what in args.what:
        result = _in_child(_synthetic_case, what, args.users, args.items, args.per_user, args.seed)
        print(json.dumps(result), flush=True)
        results.append(result)
    return results


# -- criteo ------------------------------------------------------------------------------------
def write_criteo_file(path: Path, lines: int, seed: int = 0) -> Path:
    """Criteo-like lines: 30 % positives, integers in [-2, 1000), 8-digit hex categories from
    a few thousand values per column, 20 % of every column but the label missing."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    rng = np.random.default_rng(seed)
    with open(path, "w", encoding="utf-8") as out:
        for start in range(0, lines, 200_000):
            count = min(200_000, lines - start)
            columns = [pa.array((rng.random(count) < 0.3).astype(np.int64)).cast(pa.string())]
            for _ in range(13):
                values = pa.array(rng.integers(-2, 1000, count)).cast(pa.string())
                columns.append(pc.if_else(pa.array(rng.random(count) < 0.2), "", values))
            for _ in range(26):
                codes = rng.integers(0, 5000, count) * 2654435761 % 2**32
                values = pc.utf8_lpad(
                    pa.array([f"{c:x}" for c in codes.tolist()], pa.string()), 8, "0"
                )
                columns.append(pc.if_else(pa.array(rng.random(count) < 0.2), "", values))
            joined = pc.binary_join_element_wise(*columns, "\t")
            out.write("\n".join(joined.to_pylist()) + "\n")
    return path


def _old_reader(revision: str) -> Any:
    """The Criteo reader of `revision` (trainer/data/criteo.py read from git) as a module."""
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{revision}:trainer/data/criteo.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    folder = Path(tempfile.mkdtemp())
    (folder / "criteo_before.py").write_text(source)
    spec = importlib.util.spec_from_file_location("criteo_before", folder / "criteo_before.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _lines_per_second(batches: Iterator[Any], limit: int) -> tuple[float, float]:
    """(lines per wall second, lines per CPU second of the process, all its threads) of one
    pass reading up to `limit` examples. CPU seconds do not count time other processes of a
    busy machine took, so they compare readers fairly when wall time cannot."""
    start, cpu, seen = time.perf_counter(), time.process_time(), 0
    for batch in batches:
        seen += len(batch.labels)
        if seen >= limit:
            break
    return seen / (time.perf_counter() - start), seen / (time.process_time() - cpu)


def _same_batches(before: Iterator[Any], after: Iterator[Any], count: int = 20) -> int:
    """Batches (of the first `count`) on which both readers give the same labels and dense
    values and the same 26 features, one id each; raises on the first that differs.

    The ids themselves differ by design: the earlier reader took int(hex) mod (table_size - 1)
    (+1, 0 for missing), this one hashes the text with the spec's fnv1a_64 (what a served
    bundle computes from the raw value)."""
    import numpy as np

    compared = 0
    for a, b in zip(before, after, strict=False):
        if compared == count:
            break
        same = (
            np.array_equal(a.labels.numpy(), b.labels.numpy())
            and np.allclose(a.dense_features.numpy(), b.dense_features.numpy())
            and a.sparse_features.keys() == b.sparse_features.keys()
            and np.array_equal(a.sparse_features.lengths(), b.sparse_features.lengths())
        )
        if not same:
            raise AssertionError(f"the readers differ on batch {compared}")
        compared += 1
    return compared


def _criteo_case(path: str, before: str | None, repeat: int, before_lines: int) -> dict:
    """Best lines/s of each reader over `repeat` rounds, the readers taking turns in each round
    (so that a busy moment of the machine does not favour one)."""
    from recship.trainer.data import criteo

    file = Path(path)
    lines = criteo.count_examples(file, eval_fraction=0.0, seed=0, split="train")
    old = _old_reader(before) if before else None
    readers: dict[str, Callable[[], Iterator[Any]]] = {
        "after": lambda: criteo.criteo_batches(file, 512),
        "after_shuffled": lambda: criteo.criteo_batches(file, 512, epoch=1),
        # One rank of two parses every line and encodes half: the file's lines per second.
        "after_one_rank_of_two": lambda: criteo.criteo_batches(
            file, 256, rank=0, world_size=2, epoch=1
        ),
    }
    if old is not None:
        readers = {"before": lambda: old.criteo_batches(file, 512), **readers}
    if old is not None:
        result_same = _same_batches(old.criteo_batches(file, 512), criteo.criteo_batches(file, 512))
    best = dict.fromkeys(readers, 0.0)
    best_cpu = dict.fromkeys(readers, 0.0)
    for _ in range(repeat):
        for name, make in readers.items():
            limit = before_lines if name == "before" else lines
            scale = 2 if name == "after_one_rank_of_two" else 1
            wall, cpu = _lines_per_second(make(), limit // scale)
            best[name] = max(best[name], scale * wall)
            best_cpu[name] = max(best_cpu[name], scale * cpu)
    result: dict[str, Any] = {"lines": lines, "batch_size": 512}
    if old is not None:
        result["same_labels_dense_features_first_batches"] = result_same
    result.update({name: round(value) for name, value in best.items()})
    result.update({f"{name}_per_cpu_s": round(value) for name, value in best_cpu.items()})
    start = time.perf_counter()
    criteo.count_examples(file, eval_fraction=0.1, seed=0, split="eval")
    result["count_examples"] = round(lines / (time.perf_counter() - start))
    if old is not None:
        result["speedup"] = round(best["after"] / best["before"], 1)
        result["speedup_per_cpu_s"] = round(best_cpu["after"] / best_cpu["before"], 1)
    result["peak_rss_gib"] = round(peak_rss_gib(), 2)
    return result


def criteo_speed(args: argparse.Namespace) -> dict:
    """lines/s before and after on one generated file."""
    folder = Path(args.folder or tempfile.mkdtemp(prefix="recship-criteo-"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"criteo_{args.lines}.tsv"
    if not path.is_file():
        start = time.perf_counter()
        write_criteo_file(path, args.lines)
        print(f"wrote {path} ({path.stat().st_size / 2**20:.0f} MiB) in "
              f"{time.perf_counter() - start:.0f} s", flush=True)  # fmt: skip
    result = _in_child(_criteo_case, str(path), args.before, args.repeat, args.before_lines)
    print(json.dumps(result), flush=True)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    synthetic_parser = commands.add_parser("synthetic", help="generation time and memory")
    synthetic_parser.add_argument("--users", type=int, default=10_000_000)
    synthetic_parser.add_argument("--items", type=int, default=1_000_000)
    synthetic_parser.add_argument("--per-user", type=int, default=5)
    synthetic_parser.add_argument("--seed", type=int, default=0)
    synthetic_parser.add_argument(
        "--what", nargs="+", choices=("tables", "generate"), default=["tables", "generate"]
    )
    criteo_parser = commands.add_parser("criteo", help="reader lines/s before and after")
    criteo_parser.add_argument("--lines", type=int, default=1_000_000)
    criteo_parser.add_argument("--folder", help="where the generated file is kept (reused)")
    criteo_parser.add_argument("--before", help="git revision of the reader to compare with")
    criteo_parser.add_argument("--before-lines", type=int, default=200_000,
                               help="lines the (slow) earlier reader reads per pass")  # fmt: skip
    criteo_parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    if args.command == "synthetic":
        synthetic(args)
    else:
        criteo_speed(args)


if __name__ == "__main__":
    main()
