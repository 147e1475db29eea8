"""Index families at size: what each builds, what it costs and how well and fast it searches.

For each corpus size, seeded clustered 64-d unit vectors (like trained item embeddings: 100
"genre" directions, 1000 clusters around them with Zipf(0.9) popularity and a per-cluster
spread) are indexed by every family through the project's `build_index`, tuned to the recall
floor on 1000 tuning queries. The table reports, per family: the factory string, the tuned
search parameters, build (train + add) and tuning seconds, file size, recall@100 against exact
search on 1000 *held-out* queries (never seen by tuning), single-query QPS on one thread
through `recship.bundle.index.search`, its ratio to Flat's, and batch-64 QPS on 1 and 2
threads. `auto` is built as its own row and shows the family it chose (and any fallback).
QPS are medians of 3 rounds, each timing every index of the size in turn, so that background
load on a shared machine hits them all alike.

Every figure is measured by this run; builds and recall use the process's OpenMP threads (all
cores, or `--build-threads`), QPS the thread counts stated. Results depend on the data: the
tuned values are what carries over, not the figures.

Usage::

    .venv/bin/python benchmarks/index_families.py                    # 10k, 100k, 1M
    .venv/bin/python benchmarks/index_families.py --sizes 10k,100k --families flat,ivfpqfs
    .venv/bin/python benchmarks/index_families.py --with-5m          # adds 5M (~1.3 GB of data)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np
import numpy.typing as npt

from recship.bundle.index import search, write_index
from recship.packager.index import IndexParams, build_index, recall_at_k, resolve_kind
from recship.packager.options import IndexKind

DIM = 64
GENRES, CLUSTERS = 100, 1000
QUERIES = 1000
K = 100
SIZES = {"10k": 10_000, "100k": 100_000, "1M": 1_000_000, "5M": 5_000_000}
FAMILIES: tuple[IndexKind, ...] = ("flat", "ivfflat", "ivfpq", "ivfpqfs", "hnsw", "auto")


def _unit(rows: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    return rows


class ClusteredItems:
    """Seeded two-level mixture; `items(n)` of a larger n extends a smaller one (prefixes)."""

    def __init__(self, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        genres = _unit(rng.standard_normal((GENRES, DIM)).astype(np.float32))
        parent = rng.integers(0, GENRES, CLUSTERS)
        noise = 0.8 * rng.standard_normal((CLUSTERS, DIM)).astype(np.float32) / math.sqrt(DIM)
        self.centers = _unit(genres[parent] + noise)
        popularity = 1.0 / np.arange(1, CLUSTERS + 1) ** 0.9
        self.popularity = popularity[rng.permutation(CLUSTERS)] / popularity.sum()
        self.spread = rng.uniform(0.6, 1.2, CLUSTERS).astype(np.float32)
        self.seed = seed

    def _draw(self, count: int, stream: int, scale: float, chunk: int = 500_000) -> np.ndarray:
        rng = np.random.default_rng(self.seed + stream)
        out = np.empty((count, DIM), dtype=np.float32)
        for start in range(0, count, chunk):
            stop = min(count, start + chunk)
            picks = rng.choice(CLUSTERS, stop - start, p=self.popularity)
            noise = rng.standard_normal((stop - start, DIM)).astype(np.float32) / math.sqrt(DIM)
            out[start:stop] = self.centers[picks] + scale * self.spread[picks, None] * noise
        return _unit(out)

    def items(self, count: int) -> npt.NDArray[np.float32]:
        """float32 [count, 64] unit item vectors."""
        return self._draw(count, stream=1, scale=1.0)

    def queries(self, held_out: bool) -> npt.NDArray[np.float32]:
        """1000 query vectors near popular clusters, a little further out than items."""
        return self._draw(QUERIES, stream=3 if held_out else 2, scale=1.1)


def item_ids(count: int) -> npt.NDArray[np.int64]:
    """Item ids that are never row numbers, so id handling is exercised."""
    return np.arange(count, dtype=np.int64) * 3 + 1_000_003


@dataclass
class Row:
    """One family at one size (QPS: medians over the interleaved timing rounds)."""

    size: str
    family: str
    factory: str
    search_params: dict[str, int]
    build_s: float
    tune_s: float
    file_bytes: int
    tuning_recall: float
    held_out_recall: float
    fallbacks: list[str]
    qps_single_1t: float = 0.0
    qps_batch64_1t: float = 0.0
    qps_batch64_2t: float = 0.0
    x_flat: float | None = None


def _rate(run: Callable[[np.ndarray], object], batches: list[np.ndarray], seconds: float) -> float:
    """Queries per second over `batches` (warmed up), for `seconds` or one pass."""
    for batch in batches[:5]:
        run(batch)
    done, started = 0, time.perf_counter()
    for batch in batches:
        run(batch)
        done += len(batch)
        if time.perf_counter() - started >= seconds:
            break
    return done / (time.perf_counter() - started)


def build_one(
    size: str,
    family: IndexKind,
    vectors: np.ndarray,
    ids: np.ndarray,
    tuning: np.ndarray,
    held_out: np.ndarray,
    expected: np.ndarray,
    floor: float,
) -> tuple[Row, faiss.Index]:
    """Builds one family with `build_index`; measures its build, file size and recall."""
    started = time.perf_counter()
    built = build_index(vectors, ids, family, queries=tuning, min_recall=floor)
    wall = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "items.faiss"
        write_index(built.index, path)
        file_bytes = path.stat().st_size
    _, found = search(built.index, held_out, K, threads=None)
    name = f"auto -> {built.kind}" if family == "auto" else family
    row = Row(
        size=size,
        family=name,
        factory=built.spec.factory,
        search_params=dict(sorted(built.spec.search_params.items())),
        build_s=built.spec.build_seconds,
        tune_s=wall - built.spec.build_seconds,
        file_bytes=file_bytes,
        tuning_recall=built.recall_at_100,
        held_out_recall=recall_at_k(found, expected),
        fallbacks=list(built.fallbacks),
    )
    return row, built.index


def time_interleaved(
    built: list[tuple[Row, faiss.Index]], queries: np.ndarray, seconds: float, rounds: int = 3
) -> None:
    """Sets each row's QPS to its median over `rounds`; every round times every index in turn,
    so background load on a shared machine hits all of them alike."""
    singles = [queries[row : row + 1] for row in range(len(queries))]
    batches = [queries[start : start + 64] for start in range(0, len(queries) - 63, 64)]
    samples: dict[int, list[tuple[float, float, float]]] = {i: [] for i in range(len(built))}
    for _ in range(rounds):
        for position, (_, index) in enumerate(built):

            def one_thread(q: np.ndarray, index: faiss.Index = index) -> object:
                return search(index, q, K, threads=1)

            def two_threads(q: np.ndarray, index: faiss.Index = index) -> object:
                return search(index, q, K, threads=2)

            samples[position].append(
                (
                    _rate(one_thread, singles, seconds),
                    _rate(one_thread, batches, seconds),
                    _rate(two_threads, batches, seconds),
                )
            )
    flat = None
    for position, (row, _) in enumerate(built):
        single, batch_1t, batch_2t = (
            statistics.median(m) for m in zip(*samples[position], strict=True)
        )
        row.qps_single_1t, row.qps_batch64_1t, row.qps_batch64_2t = single, batch_1t, batch_2t
        if row.family == "flat":
            flat = single
    for row, _ in built:
        row.x_flat = row.qps_single_1t / flat if flat else None


def _size(count: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} B"


def table(rows: list[Row]) -> str:
    """The rows as a markdown table."""
    lines = [
        "| N | family | factory | search params | build s | tune s | file | recall@100 "
        "held-out (tuning) | 1-query QPS, 1 thr | x Flat | batch-64 QPS 1 thr / 2 thr |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        params = ", ".join(f"{k} {v}" for k, v in row.search_params.items()) or "-"
        ratio = f"{row.x_flat:.1f}" if row.x_flat is not None else "-"
        family = row.family + (" (fell back)" if row.fallbacks else "")
        lines.append(
            f"| {row.size} | {family} | `{row.factory}` | {params} | {row.build_s:.1f} | "
            f"{row.tune_s:.1f} | {_size(row.file_bytes)} | {row.held_out_recall:.4f} "
            f"({row.tuning_recall:.4f}) | {row.qps_single_1t:,.0f} | {ratio} | "
            f"{row.qps_batch64_1t:,.0f} / {row.qps_batch64_2t:,.0f} |"
        )
    return "\n".join(lines)


def run(
    sizes: list[str],
    families: list[IndexKind],
    floor: float = 0.95,
    seconds: float = 1.5,
    max_hnsw_items: int = 1_000_000,
    log: Callable[[str], None] = print,
) -> list[Row]:
    """Builds every family at every size, then times the families of a size interleaved."""
    data = ClusteredItems()
    largest = max(SIZES[size] for size in sizes)
    items = data.items(largest)
    tuning, held_out = data.queries(held_out=False), data.queries(held_out=True)
    rows: list[Row] = []
    for size in sizes:
        count = SIZES[size]
        vectors, ids = items[:count], item_ids(count)
        exact = faiss.IndexFlatIP(DIM)
        exact.add(vectors)
        _, nearest = exact.search(held_out, K)
        expected = ids[nearest]
        del exact
        built = []
        for family in families:
            if family == "hnsw" and count > max_hnsw_items:
                log(f"{size} hnsw: skipped (above --max-hnsw-items {max_hnsw_items})")
                continue
            if family == "auto":
                log(f"{size} auto: resolves to {resolve_kind('auto', count, IndexParams())}")
            built.append(build_one(size, family, vectors, ids, tuning, held_out, expected, floor))
            log(f"{time.strftime('%H:%M:%S')} built {json.dumps(asdict(built[-1][0]))}")
        time_interleaved(built, held_out, seconds)
        for row, _ in built:
            log(f"{time.strftime('%H:%M:%S')} timed {json.dumps(asdict(row))}")
            rows.append(row)
        del built
    return rows


def main() -> None:
    """Parses the command line, runs, prints the table (and writes JSON lines if asked)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10k,100k,1M", help="comma-separated: 10k,100k,1M,5M")
    parser.add_argument("--with-5m", action="store_true", help="add the 5M size")
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--floor", type=float, default=0.95, help="recall@100 floor to tune to")
    parser.add_argument("--seconds", type=float, default=1.5, help="length of one timed repeat")
    parser.add_argument(
        "--max-hnsw-items",
        type=int,
        default=1_000_000,
        help="skip HNSW above this size (its 1M build took ~6 min on 2 cores)",
    )
    parser.add_argument(
        "--build-threads",
        type=int,
        help="OpenMP threads for building, tuning and recall (default: FAISS's, all cores)",
    )
    parser.add_argument("--json", type=Path, help="also write the rows as JSON lines here")
    args = parser.parse_args()
    if args.build_threads:
        faiss.omp_set_num_threads(args.build_threads)
    sizes = [size for size in args.sizes.split(",") if size]
    if args.with_5m and "5M" not in sizes:
        sizes.append("5M")
    unknown = sorted(set(sizes) - set(SIZES)) + sorted(
        set(args.families.split(",")) - set(FAMILIES)
    )
    if unknown:
        parser.error(f"unknown size or family: {', '.join(unknown)}")
    print(
        f"faiss {faiss.__version__}, {os.cpu_count()} cpus, OpenMP threads "
        f"{faiss.omp_get_max_threads()}, load average {os.getloadavg()[0]:.2f}"
    )
    rows = run(sizes, args.families.split(","), args.floor, args.seconds, args.max_hnsw_items)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    print(table(rows))
    if args.json:
        args.json.write_text("".join(json.dumps(asdict(row)) + "\n" for row in rows))


if __name__ == "__main__":
    main()
