"""Exclusions inside retrieval: recship's over-fetch against FAISS ID selectors.

Issue 11 item 4 asks whether a query's excluded items (a user's watched items) should be
kept out of the results by FAISS itself, with an ID selector in the search parameters, or, as
`recship.bundle.index.search` does, by over-fetching: asking the index for k plus the longest
exclusion list (IVF probing that many times more lists, HNSW a beam of at least k + E),
dropping the excluded ids and re-searching wider any row left short. This measures which is
faster on Flat, IVF-Flat and HNSW, and whether both return the same results.

Seeded clustered unit vectors (100 "genre" directions, 1000 Zipf-popular clusters around them)
are indexed by `recship.packager.index.build_index` for each kind, tuned to recall@100 >= 0.95
on tuning queries. Then, for each exclusion count E, every held-out query excludes E ids drawn
at random from its own exact top (k + E), so that the exclusions really hit the results (like
watched items near the top); its exact answer is the remaining k of that top (k + E).
Each query is searched alone on one OpenMP thread, as a server answers a request, by:

(a) over-fetch: `search(index, q, k, [excluded], threads=1)`;
(b) selector: `index.search(q, k, params=...)` with
    `sel=IDSelectorNot(IDSelectorBatch(excluded))` built per query (a server builds one per
    request, so its cost is timed), in the parameter class of the index inside any ID map
    (`SearchParametersIVF` with the tuned nprobe, `SearchParametersHNSW` with the tuned
    efSearch, raised to k as `search` does without exclusions). `IndexIDMap` translates the
    selector to its stored ids itself, so the parameters go to the outer index.

Reported per (index, E): single-query QPS of each method (medians of `--rounds` rounds, each
timing every cell in turn, so that background load hits them alike), the ratio selector /
over-fetch, the share of queries where both return identical id sets and their mean overlap,
each method's recall@k against the exact excluded answer, and any selector rows that came
back short of k. Every excluded id is checked absent from both methods' results.

Usage::

    .venv/bin/python benchmarks/exclusions.py
    .venv/bin/python benchmarks/exclusions.py --items 50000 --exclusions 10,100 --queries 200
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import faiss
import numpy as np
import numpy.typing as npt
from rich.console import Console
from rich.table import Table

from recship.bundle.index import search, unwrap
from recship.packager.index import build_index
from recship.packager.options import IndexKind

KINDS: tuple[IndexKind, ...] = ("flat", "ivfflat", "hnsw")
GENRES, CLUSTERS = 100, 1000


def _unit(rows: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    return rows


def clustered(
    count: int, dim: int, seed: int, queries: int
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Seeded (items, tuning queries, held-out queries): unit vectors of a two-level mixture."""
    rng = np.random.default_rng(seed)
    genres = _unit(rng.standard_normal((GENRES, dim)).astype(np.float32))
    noise = 0.8 * rng.standard_normal((CLUSTERS, dim)).astype(np.float32) / math.sqrt(dim)
    centers = _unit(genres[rng.integers(0, GENRES, CLUSTERS)] + noise)
    popularity = 1.0 / np.arange(1, CLUSTERS + 1) ** 0.9
    popularity = popularity[rng.permutation(CLUSTERS)] / popularity.sum()
    spread = rng.uniform(0.6, 1.2, CLUSTERS).astype(np.float32)

    def draw(n: int, scale: float) -> npt.NDArray[np.float32]:
        picks = rng.choice(CLUSTERS, n, p=popularity)
        jitter = rng.standard_normal((n, dim)).astype(np.float32) / math.sqrt(dim)
        return _unit(centers[picks] + scale * spread[picks, None] * jitter)

    return draw(count, 1.0), draw(1000, 1.1), draw(queries, 1.1)


def exact_top(
    items: npt.NDArray[np.float32], ids: npt.NDArray[np.int64], queries: np.ndarray, depth: int
) -> npt.NDArray[np.int64]:
    """Item ids of each query's exact top `depth` by inner product, best first."""
    out = np.empty((len(queries), depth), dtype=np.int64)
    for start in range(0, len(queries), 100):
        scores = queries[start : start + 100] @ items.T
        part = np.argpartition(-scores, depth - 1, axis=1)[:, :depth]
        order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
        out[start : start + 100] = ids[np.take_along_axis(part, order, axis=1)]
    return out


def selector_params(
    index: faiss.Index, sel: faiss.IDSelector, k: int, excluded: int, wide: bool
) -> faiss.SearchParameters:
    """Search parameters carrying `sel`, of the class the (unwrapped) index expects, with its
    tuned nprobe / efSearch (a fresh parameter object would start from FAISS's defaults).

    `wide`: searched as widely as recship's over-fetch searches for k + `excluded` (nprobe
    times ceil((k + E) / k), efSearch at least k + E), so that only the filtering differs.
    """
    inner = unwrap(index)
    depth = -(-(k + excluded) // k) if wide else 1
    if isinstance(inner, faiss.IndexHNSW):
        beam = max(inner.hnsw.efSearch * depth, k + excluded if wide else k)
        return faiss.SearchParametersHNSW(sel=sel, efSearch=beam)
    ivf = faiss.try_extract_index_ivf(inner)
    if ivf is not None:
        if not isinstance(inner, faiss.IndexIVF):  # e.g. IndexRefine over an IVF
            raise TypeError(f"a selector benchmark for {type(inner).__name__} is not written")
        return faiss.SearchParametersIVF(sel=sel, nprobe=min(ivf.nprobe * depth, ivf.nlist))
    if isinstance(inner, faiss.IndexFlat):
        return faiss.SearchParameters(sel=sel)
    raise TypeError(f"a selector benchmark for {type(inner).__name__} is not written")


def selector_search(
    index: faiss.Index,
    query: np.ndarray,
    k: int,
    excluded: npt.NDArray[np.int64],
    wide: bool = False,
) -> npt.NDArray[np.int64]:
    """Top-k ids of one query through a FAISS ID selector that rejects `excluded`."""
    batch = faiss.IDSelectorBatch(excluded)
    sel = faiss.IDSelectorNot(batch)
    params = selector_params(index, sel, k, len(excluded), wide)
    _, found = index.search(query, k, params=params)
    del batch, sel  # alive until here: the parameters hold raw pointers to them
    return found


def wide_selector_search(
    index: faiss.Index, query: np.ndarray, k: int, excluded: npt.NDArray[np.int64]
) -> npt.NDArray[np.int64]:
    """`selector_search` as wide as the over-fetch's first search."""
    return selector_search(index, query, k, excluded, wide=True)


def overfetch_search(
    index: faiss.Index, query: np.ndarray, k: int, excluded: npt.NDArray[np.int64]
) -> npt.NDArray[np.int64]:
    """Top-k ids of one query through recship's over-fetch."""
    return search(index, query, k, [excluded], threads=1)[1]


METHODS: dict[str, Callable[[faiss.Index, np.ndarray, int, npt.NDArray[np.int64]], np.ndarray]]
METHODS = {"over": overfetch_search, "sel": selector_search, "wide": wide_selector_search}


@dataclass
class Cell:
    """One (index kind, exclusion count): per method, QPS samples and answer quality."""

    kind: str
    detail: str
    excluded: int
    qps: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in METHODS})
    recall: dict[str, float] = field(default_factory=dict)
    short: dict[str, int] = field(default_factory=dict)
    identical: dict[str, float] = field(default_factory=dict)  # vs over-fetch
    overlap: dict[str, float] = field(default_factory=dict)  # vs over-fetch

    def median(self, method: str) -> float:
        return statistics.median(self.qps[method])


def run_all(
    method: Callable[[faiss.Index, np.ndarray, int, npt.NDArray[np.int64]], np.ndarray],
    index: faiss.Index,
    queries: np.ndarray,
    k: int,
    excluded: list[npt.NDArray[np.int64]],
) -> tuple[float, npt.NDArray[np.int64]]:
    """(QPS, ids [Q, k]) of one method over every query, one at a time."""
    for row in range(min(5, len(queries))):  # warm-up
        method(index, queries[row : row + 1], k, excluded[row])
    found = np.empty((len(queries), k), dtype=np.int64)
    started = time.perf_counter()
    for row in range(len(queries)):
        found[row] = method(index, queries[row : row + 1], k, excluded[row])[0]
    return len(queries) / (time.perf_counter() - started), found


def compare(
    cell: Cell,
    answers: dict[str, np.ndarray],
    excluded: list[npt.NDArray[np.int64]],
    truth: list[set[int]],
) -> None:
    """Checks every answer (no excluded id) and sets the cell's agreement and recall."""
    k = answers["over"].shape[1]
    sets = {}
    for name, found in answers.items():
        for row in range(len(found)):
            if np.isin(found[row], excluded[row]).any():
                raise AssertionError(f"{cell.kind} E={cell.excluded}: {name} returned excluded ids")
        sets[name] = [set(row[row >= 0].tolist()) for row in found]
        hits = sum(len(a & b) for a, b in zip(sets[name], truth, strict=True))
        cell.recall[name] = hits / (k * len(found))
        cell.short[name] = int((found < 0).any(axis=1).sum())
    for name in ("sel", "wide"):
        pairs = list(zip(sets[name], sets["over"], strict=True))
        cell.identical[name] = sum(a == b for a, b in pairs) / len(pairs)
        cell.overlap[name] = sum(len(a & b) for a, b in pairs) / (k * len(pairs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--queries", type=int, default=500, help="held-out queries timed")
    parser.add_argument("--exclusions", default="10,100,1000", help="exclusion counts E")
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds (QPS medians)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    counts = [int(part) for part in args.exclusions.split(",")]
    console = Console(width=200)

    items, tuning, held_out = clustered(args.items, args.dim, args.seed, args.queries)
    ids = np.arange(args.items, dtype=np.int64) * 3 + 1_000_003  # never row numbers
    top = exact_top(items, ids, held_out, args.k + max(counts))
    rng = np.random.default_rng(args.seed + 7)
    excluded: dict[int, list[npt.NDArray[np.int64]]] = {}
    truth: dict[int, list[set[int]]] = {}
    for count in counts:
        excluded[count], truth[count] = [], []
        for row in top:
            near = row[: args.k + count]
            drop = rng.choice(near, count, replace=False)
            excluded[count].append(np.sort(drop))
            truth[count].append(set(near.tolist()) - set(drop.tolist()))

    indexes: dict[str, faiss.Index] = {}
    cells: list[Cell] = []
    details: dict[str, str] = {}
    for kind in KINDS:
        started = time.perf_counter()
        built = build_index(items, ids, kind, queries=tuning, min_recall=0.95, seed=args.seed)
        params = dict(sorted(built.spec.search_params.items()))
        detail = " ".join([built.spec.factory, *(f"{n} {v}" for n, v in params.items())])
        console.print(
            f"built {kind}: {detail} ({type(built.index).__name__} over "
            f"{type(unwrap(built.index)).__name__}), {time.perf_counter() - started:.1f} s"
        )
        indexes[kind], details[kind] = built.index, detail
        cells += [Cell(kind, detail, count) for count in counts]

    faiss.omp_set_num_threads(1)
    answers: dict[tuple[str, int], dict[str, np.ndarray]] = {}
    for round_number in range(args.rounds):
        for cell in cells:
            index, exclude = indexes[cell.kind], excluded[cell.excluded]
            found = {}
            for name, method in METHODS.items():
                qps, found[name] = run_all(method, index, held_out, args.k, exclude)
                cell.qps[name].append(qps)
            answers[cell.kind, cell.excluded] = found
        console.print(f"timing round {round_number + 1}/{args.rounds} done")
    for cell in cells:
        compare(
            cell, answers[cell.kind, cell.excluded], excluded[cell.excluded], truth[cell.excluded]
        )

    table = Table(
        title=f"Exclusions at {args.items:,} items, d={args.dim}, k={args.k}, "
        f"{args.queries} single queries on 1 thread; QPS medians of {args.rounds} rounds",
        caption="; ".join(f"{kind}: {detail}" for kind, detail in details.items()),
    )
    columns = (
        "index",
        "E",
        "QPS over-fetch",
        "QPS selector",
        "QPS wide selector",
        "selector / over",
        "wide / over",
        "recall@k over / sel / wide",
        "same set as over (sel / wide)",
        "overlap with over (sel / wide)",
        "short rows",
    )
    for name in columns:
        table.add_column(name, justify="left" if name == "index" else "right")
    ratios: dict[str, list[tuple[float, float]]] = {}
    for cell in cells:
        over, sel, wide = (cell.median(m) for m in METHODS)
        ratios.setdefault(cell.kind, []).append((sel / over, wide / over))
        table.add_row(
            cell.kind,
            str(cell.excluded),
            f"{over:,.0f}",
            f"{sel:,.0f}",
            f"{wide:,.0f}",
            f"{sel / over:.2f}x",
            f"{wide / over:.2f}x",
            " / ".join(f"{cell.recall[m]:.4f}" for m in METHODS),
            " / ".join(f"{cell.identical[m]:.0%}" for m in ("sel", "wide")),
            " / ".join(f"{cell.overlap[m]:.4f}" for m in ("sel", "wide")),
            " / ".join(str(cell.short[m]) for m in METHODS),
        )
    console.print(table)
    verdict = []
    for kind, pairs in ratios.items():
        group = [cell for cell in cells if cell.kind == kind]
        same = "same sets" if all(c.identical["wide"] == 1.0 for c in group) else "other sets"
        wide = [b for _, b in pairs]
        tuned = [a for a, _ in pairs]
        verdict.append(
            f"{kind}: at over-fetch's width the selector returns {same} at "
            f"{min(wide):.2f}-{max(wide):.2f}x its QPS; at the tuned width "
            f"{min(tuned):.2f}-{max(tuned):.2f}x, recall@k down to "
            f"{min(cell.recall['sel'] for cell in group):.4f}"
        )
    console.print("Conclusion: " + "; ".join(verdict))


if __name__ == "__main__":
    main()
