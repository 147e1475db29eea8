"""Build and tune the FAISS index of candidate embeddings (the writing half of `bundle/index.py`).

Functions over plain numpy arrays, like FAISS's `contrib`: `build_index` turns item vectors and
item ids into an inner-product index whose search parameters (nprobe, k_factor_rf, efSearch)
are raised until its recall@100 against exact search reaches a floor, and describes it, with
that operating point, as the manifest's `IndexSpec`; `recship.bundle.index` writes, reads and
searches it.

Every index keeps the item ids (IVF-Flat stores them natively; Flat, HNSW and the IVF-PQ kinds,
whose refinement stage cannot take ids, are wrapped in `IndexIDMap2`), so search results are
item ids, never row numbers. Building is single-owner. Training, adding and tuning use the
calling thread's OpenMP threads (all cores unless set).

The families, their tuning and `auto`'s choice follow measurements on clustered 64-d vectors
at 10k-5M items (`benchmarks/index_families.py`, benchmarks/README.md): IVF-PQ reaches a 0.95
recall@100 floor only with its refinement stage (PQ32x8 alone plateaus at 0.875 at 1M).

Example::

    built = build_index(item_vectors, item_ids, kind="auto", min_recall=0.95)
    write_index(built.index, bundle_dir / "items.faiss")
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import faiss
import numpy as np
import numpy.typing as npt

from recship.base.errors import InvalidInput, QualityGateFailed
from recship.bundle.index import apply_search_params, search, unwrap
from recship.packager.options import INDEX_KINDS, IndexKind
from recship.protos.v1 import manifest_pb2

# Progress callback: (stage, done, total), stage one of "train", "add", "tune".
ProgressFn = Callable[[str, int, int], None]

RECALL_K = 100
# FAISS warns below 39 training points per centroid; keep k-means (IVF lists, PQ codebooks) above.
_MIN_POINTS_PER_CENTROID = 39
_ADD_CHUNK = 65_536

_TYPES = {
    "flat": manifest_pb2.INDEX_TYPE_FLAT,
    "ivfflat": manifest_pb2.INDEX_TYPE_IVF_FLAT,
    "ivfpq": manifest_pb2.INDEX_TYPE_IVF_PQ_REFINE,
    "ivfpqfs": manifest_pb2.INDEX_TYPE_IVF_PQ_FASTSCAN_REFINE,
    "hnsw": manifest_pb2.INDEX_TYPE_HNSW,
}
_IVF_KINDS = ("ivfflat", "ivfpq", "ivfpqfs")
# What `auto` builds instead when a kind misses the recall floor: the next slower but surer
# family (IVF-Flat passes wherever its IVF does; Flat is exact).
_AUTO_FALLBACK: dict[str, IndexKind] = {"ivfpqfs": "ivfflat", "ivfflat": "flat"}
_FAST_SCAN_BITS = 4

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IndexParams:
    """How to build an index; `None` means a default derived from the data.

    Attributes:
        nlist: IVF inverted lists. Default ~4*sqrt(N), capped so that every list gets at least
            39 training points.
        pq_m: IVF-PQ sub-quantizers; must divide the dimension D. Default for "ivfpq": the
            largest divisor of D not above D/2 (2 dimensions per 8-bit code: D=64 -> 32 bytes
            per vector); for "ivfpqfs": D (one dimension per 4-bit code, also 32 bytes at
            D=64; D/2 needed k_factor 32 at 1M items).
        pq_bits: Bits per PQ code of "ivfpq", at most 16. Lowered automatically when the
            training sample is too small to fill 2**bits centroids with 39 points each.
            ("ivfpqfs" codes are 4 bits.)
        hnsw_m: HNSW graph degree.
        ef_construction: HNSW build-time beam width.
        max_train_points: Largest sample used to train IVF centroids and PQ codebooks.
        eval_queries: Queries sampled from the items when no query vectors are given.
        exact_below: `auto` builds an exact Flat index below this many items: at 10k items
            Flat answers ~17.7k single queries/s, within 1.6x of the best approximate index.
        pq_from: `auto` builds fast-scan IVF-PQ with refinement ("ivfpqfs") from this many
            items and IVF-Flat between `exact_below` and here: at 1M items fast-scan ran 2.2x
            IVF-Flat's single-query QPS (36.9x against 16.8x Flat's), at 100k the two were
            within noise (6.9x, 5.9x) and fast-scan kept less margin above 0.95 (0.961).
        refine_k_factor: The k_factor_rf fixed while nprobe is tuned, large enough that the
            PQ codes do not limit recall (refinement indexes then track IVF-Flat's recall).
        max_k_factor: Largest k_factor_rf tried when even every IVF list at
            `refine_k_factor` misses the floor.
        max_ef_search: Highest HNSW efSearch tried while tuning.
    """

    nlist: int | None = None
    pq_m: int | None = None
    pq_bits: int = 8
    hnsw_m: int = 32
    ef_construction: int = 200
    max_train_points: int = 200_000
    eval_queries: int = 1000
    exact_below: int = 50_000
    pq_from: int = 1_000_000
    refine_k_factor: int = 16
    max_k_factor: int = 64
    max_ef_search: int = 4096


@dataclass(frozen=True)
class BuiltIndex:
    """A built, tuned index and its manifest description.

    Attributes:
        index: The FAISS index, search parameters already applied.
        spec: Its IndexSpec (type, factory, metric, dim, num_vectors, search_params, recall,
            build time, faiss version). `spec.file` is empty: the caller names the file.
        recall_at_100: Measured recall@100 against exact search (1.0 for Flat).
        kind: The concrete kind built: what `auto` resolved to, after any fallback.
        fallbacks: For `auto`, one line per family built first and rejected because it missed
            the recall floor (oldest first); empty when the first choice passed.
    """

    index: faiss.Index
    spec: manifest_pb2.IndexSpec
    recall_at_100: float
    kind: IndexKind
    fallbacks: tuple[str, ...] = ()


def resolve_kind(kind: IndexKind, num_vectors: int, params: IndexParams) -> IndexKind:
    """The concrete kind `auto` first tries at this corpus size (other kinds are returned as is).

    Exact Flat below `params.exact_below` items (search cost is small and recall perfect),
    IVF-Flat up to `params.pq_from`, fast-scan IVF-PQ with refinement from there (the fastest
    family measured at 1M and 5M items). HNSW is never chosen: at 1M items it took 5-7x the
    IVF build time and twice the memory for single-query QPS between IVF-Flat's and
    fast-scan's. See `build_index` for the fallback when the first choice misses the floor.
    """
    if kind != "auto":
        return kind
    if num_vectors < params.exact_below:
        return "flat"
    return "ivfflat" if num_vectors < params.pq_from else "ivfpqfs"


def build_index(
    vectors: npt.ArrayLike,
    ids: npt.ArrayLike,
    kind: IndexKind = "auto",
    params: IndexParams | None = None,
    *,
    queries: npt.ArrayLike | None = None,
    min_recall: float = 0.95,
    seed: int = 0,
    progress: ProgressFn | None = None,
) -> BuiltIndex:
    """Builds an inner-product index over item vectors, keeping the item ids.

    Approximate kinds are tuned: their search parameters (IVF nprobe, refinement k_factor_rf,
    HNSW efSearch) are raised step by step, on doubling values, until recall@100 against exact
    search reaches `min_recall` on the evaluation queries, and the cheapest such point is
    recorded in the spec. `auto` that misses the floor with its first choice builds the next
    surer family (fast-scan IVF-PQ -> IVF-Flat -> Flat) instead of failing, logs a warning
    and lists the rejected attempts in `BuiltIndex.fallbacks`.

    Args:
        vectors: float32 [N, D] item embeddings (other float types are converted).
        ids: int64 [N] unique item ids, row i being the id of vectors[i].
        kind: "flat", "ivfflat", "ivfpq" (IVF-PQ + exact refinement), "ivfpqfs" (4-bit
            fast-scan IVF-PQ + exact refinement), "hnsw", or "auto" (see `resolve_kind`).
        params: Build parameters; defaults derive from N and D.
        queries: float32 [Q, D] query vectors to measure recall on (e.g. query-tower outputs);
            default: `params.eval_queries` item vectors sampled with `seed`.
        min_recall: Recall@100 the index must reach against exact search.
        seed: Seed of the training and query samples.
        progress: Called with (stage, done, total) while training, adding and tuning.

    Returns:
        The tuned index with its spec and measured recall.

    Raises:
        InvalidInput: bad shapes, dtypes, non-finite values, duplicate ids, unknown kind or
            impossible parameters; the message names the argument.
        QualityGateFailed: an explicit kind reaches no search parameters with `min_recall`
            with these build parameters (`auto` falls back instead).
    """
    params = params or IndexParams()
    data, item_ids = _check_items(vectors, ids)
    if kind not in INDEX_KINDS:
        raise InvalidInput(f"unknown index kind {kind!r}; choose one of {', '.join(INDEX_KINDS)}")
    if not 0.0 < min_recall <= 1.0:
        raise InvalidInput(f"min_recall must be in (0, 1], got {min_recall}")
    if not 1 <= params.refine_k_factor <= params.max_k_factor:
        raise InvalidInput(
            f"refine_k_factor must be between 1 and max_k_factor ({params.max_k_factor}), got "
            f"{params.refine_k_factor}"
        )
    concrete = resolve_kind(kind, len(data), params)
    rng = np.random.default_rng(seed)
    eval_queries = _eval_queries(queries, data, params.eval_queries, rng)
    rejected: list[str] = []
    while True:
        try:
            built = _build_and_tune(
                concrete, data, item_ids, eval_queries, params, min_recall, rng, progress
            )
        except QualityGateFailed as error:
            fallback = _AUTO_FALLBACK.get(concrete) if kind == "auto" else None
            if fallback is None:
                raise
            rejected.append(f"{concrete}: {error}")
            _log.warning("auto index: %s; building %s instead", error, fallback)
            concrete = fallback
            continue
        return replace(built, fallbacks=tuple(rejected))


def _build_and_tune(
    kind: IndexKind,
    data: npt.NDArray[np.float32],
    item_ids: npt.NDArray[np.int64],
    eval_queries: npt.NDArray[np.float32],
    params: IndexParams,
    min_recall: float,
    rng: np.random.Generator,
    progress: ProgressFn | None,
) -> BuiltIndex:
    """One concrete kind: build, tune to `min_recall`, describe."""
    started = time.perf_counter()
    index, factory = _build(kind, data, item_ids, params, rng, progress)
    build_seconds = time.perf_counter() - started
    spec = manifest_pb2.IndexSpec(
        type=_TYPES[kind],
        factory=factory,
        metric="inner_product",
        dim=data.shape[1],
        num_vectors=len(data),
        build_seconds=build_seconds,
        faiss_version=faiss.__version__,
    )
    if kind == "flat":
        recall = 1.0
    else:
        recall = _tune(index, kind, spec, data, item_ids, eval_queries, min_recall, params)
        if progress is not None:
            progress("tune", 1, 1)
    spec.recall_at_100_vs_exact = recall
    return BuiltIndex(index=index, spec=spec, recall_at_100=recall, kind=kind)


def _check_items(
    vectors: npt.ArrayLike, ids: npt.ArrayLike
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    data = np.ascontiguousarray(vectors, dtype=np.float32)
    if data.ndim != 2 or data.shape[0] == 0 or data.shape[1] == 0:
        raise InvalidInput(f"vectors must be a non-empty [N, D] array, got shape {data.shape}")
    if not np.isfinite(data).all():
        row = int(np.flatnonzero(~np.isfinite(data).all(axis=1))[0])
        raise InvalidInput(f"vectors[{row}] holds a NaN or infinite value")
    raw_ids = np.asarray(ids)
    if raw_ids.shape != (data.shape[0],) or not np.issubdtype(raw_ids.dtype, np.integer):
        raise InvalidInput(
            f"ids must be {data.shape[0]} integers (one per vector), got {raw_ids.dtype} "
            f"array of shape {raw_ids.shape}"
        )
    item_ids = np.ascontiguousarray(raw_ids, dtype=np.int64)
    unique, counts = np.unique(item_ids, return_counts=True)
    if len(unique) != len(item_ids):
        raise InvalidInput(f"ids must be unique; id {int(unique[counts > 1][0])} repeats")
    if item_ids.min() < 0:
        raise InvalidInput(
            f"ids must be >= 0 (FAISS uses -1 for 'no result'), got {item_ids.min()}"
        )
    return data, item_ids


def _build(
    kind: IndexKind,
    data: npt.NDArray[np.float32],
    item_ids: npt.NDArray[np.int64],
    params: IndexParams,
    rng: np.random.Generator,
    progress: ProgressFn | None,
) -> tuple[faiss.Index, str]:
    count, dim = data.shape
    train = data
    if kind in _IVF_KINDS:
        if count > params.max_train_points:
            train = data[np.sort(rng.choice(count, params.max_train_points, replace=False))]
        nlist = _nlist(params, count, len(train))
        if kind == "ivfflat":
            factory = f"IVF{nlist},Flat"
        elif kind == "ivfpq":
            m = _pq_m(params, dim, dim // 2)
            factory = f"IDMap2,IVF{nlist},PQ{m}x{_pq_bits(params, len(train))},RFlat"
        else:
            if len(train) < 2**_FAST_SCAN_BITS:
                raise InvalidInput(
                    f"ivfpqfs needs at least {2**_FAST_SCAN_BITS} training vectors for its "
                    f"4-bit codes, got {len(train)}"
                )
            factory = f"IDMap2,IVF{nlist},PQ{_pq_m(params, dim, dim)}x4fs,RFlat"
    elif kind == "hnsw":
        if params.hnsw_m < 2:
            raise InvalidInput(f"hnsw_m must be >= 2, got {params.hnsw_m}")
        factory = f"IDMap2,HNSW{params.hnsw_m}"
    else:
        factory = "IDMap2,Flat"
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    if kind == "ivfpq":
        # Polysemous training (Hamming-distance codes for a search mode we do not use) is on by
        # default and multiplies training time by ~4-10. It must be switched off on the IVF-PQ
        # itself: inside IDMap2 and the refinement stage, setting it on the outer index (or on
        # the plain IndexIVF that try_extract_index_ivf returns) is silently ignored.
        ivfpq = faiss.downcast_index(faiss.extract_index_ivf(index))
        ivfpq.do_polysemous_training = False  # type: ignore[attr-defined]
    if kind == "hnsw":
        _hnsw(index).efConstruction = params.ef_construction
    if not index.is_trained:
        if progress is not None:
            progress("train", 0, len(train))
        index.train(train)
        if progress is not None:
            progress("train", len(train), len(train))
    for start in range(0, count, _ADD_CHUNK):
        stop = min(start + _ADD_CHUNK, count)
        index.add_with_ids(data[start:stop], item_ids[start:stop])
        if progress is not None:
            progress("add", stop, count)
    return index, factory


def _nlist(params: IndexParams, count: int, train_count: int) -> int:
    if params.nlist is not None:
        if not 1 <= params.nlist <= train_count:
            raise InvalidInput(
                f"nlist must be between 1 and the {train_count} training vectors, got "
                f"{params.nlist}"
            )
        return params.nlist
    return max(1, min(round(4 * math.sqrt(count)), train_count // _MIN_POINTS_PER_CENTROID))


def _pq_m(params: IndexParams, dim: int, most: int) -> int:
    """`params.pq_m`, or the largest divisor of `dim` not above `most`."""
    if params.pq_m is not None:
        if params.pq_m < 1 or dim % params.pq_m:
            raise InvalidInput(f"pq_m must divide the vector dimension {dim}, got {params.pq_m}")
        return params.pq_m
    return max(m for m in range(1, max(1, most) + 1) if dim % m == 0)


def _pq_bits(params: IndexParams, train_count: int) -> int:
    if not 1 <= params.pq_bits <= 16:
        raise InvalidInput(f"pq_bits must be between 1 and 16, got {params.pq_bits}")
    fits = int(math.log2(max(2, train_count // _MIN_POINTS_PER_CENTROID)))
    return max(1, min(params.pq_bits, fits))


def _hnsw(index: faiss.Index) -> faiss.HNSW:
    """The HNSW graph inside an `IDMap2,HNSW` index."""
    return unwrap(index).hnsw  # type: ignore[attr-defined]


def _eval_queries(
    queries: npt.ArrayLike | None,
    data: npt.NDArray[np.float32],
    count: int,
    rng: np.random.Generator,
) -> npt.NDArray[np.float32]:
    if queries is None:
        rows = rng.choice(len(data), min(count, len(data)), replace=False)
        return data[np.sort(rows)]
    checked = np.ascontiguousarray(queries, dtype=np.float32)
    if checked.ndim != 2 or checked.shape[0] == 0 or checked.shape[1] != data.shape[1]:
        raise InvalidInput(
            f"queries must be a non-empty [Q, {data.shape[1]}] array, got shape {checked.shape}"
        )
    if not np.isfinite(checked).all():
        raise InvalidInput("queries hold a NaN or infinite value")
    return checked


def recall_at_k(found: npt.NDArray[np.int64], expected: npt.NDArray[np.int64]) -> float:
    """Mean over queries of |found ∩ expected| / |expected|, ignoring -1 (missing) results.

    Args:
        found: int64 [Q, k] ids returned by the index under test.
        expected: int64 [Q, k] ids of the exact top-k.
    """
    hits = 0
    for got, want in zip(found, expected, strict=True):
        hits += len(np.intersect1d(got[got >= 0], want[want >= 0], assume_unique=True))
    return hits / max(1, int((expected >= 0).sum()))


def _tune(
    index: faiss.Index,
    kind: IndexKind,
    spec: manifest_pb2.IndexSpec,
    data: npt.NDArray[np.float32],
    item_ids: npt.NDArray[np.int64],
    queries: npt.NDArray[np.float32],
    min_recall: float,
    params: IndexParams,
) -> float:
    """Raises the search parameters until recall@100 reaches `min_recall`; records them in spec.

    Only doubling values are tried: the smallest passing value found by bisection passed the
    tuning queries by a hair and missed the floor on held-out queries at 100k-5M items
    (0.945-0.9497), while doubling points kept their margin.

    Raises:
        QualityGateFailed: no tried value reaches `min_recall`; the index keeps the last tried.
    """
    k = min(RECALL_K, len(data))
    exact = faiss.IndexFlatIP(data.shape[1])
    exact.add(data)
    _, rows = exact.search(queries, k)
    expected = np.where(rows >= 0, item_ids[rows], -1)

    def measure(values: Mapping[str, int]) -> float:
        apply_search_params(index, values)
        _, found = search(index, queries, k, threads=None)
        return recall_at_k(found, expected)

    if kind in ("ivfpq", "ivfpqfs"):
        chosen, recall = _tune_refine(index, measure, min_recall, params)
    else:
        if kind == "hnsw":
            name = "efSearch"
            # Searches use a beam of at least k (FAISS does not raise efSearch to k itself, see
            # `recship.bundle.index.search`): start at k so that the recorded value is the one
            # used.
            candidates = _doublings(k, max(k, params.max_ef_search))
        else:
            name = "nprobe"
            candidates = _doublings(1, faiss.extract_index_ivf(index).nlist)
        chosen, recall = _first_passing(measure, name, candidates, {}, min_recall)
    if recall < min_recall:
        advice = {
            "ivfpq": "more PQ sub-quantizers or bits (pq_m, pq_bits), a larger max_k_factor, "
            "or ivfflat",
            "ivfpqfs": "more PQ sub-quantizers (pq_m), a larger max_k_factor, or ivfflat",
            "ivfflat": "ivfflat at its largest nprobe is exhaustive: check for duplicate vectors",
            "hnsw": "a larger hnsw_m, ef_construction or max_ef_search",
        }[kind]
        at = ", ".join(f"{name}={value}" for name, value in chosen.items())
        raise QualityGateFailed(
            f"{spec.factory} index reaches recall@100 {recall:.4f} against exact search, below "
            f"the required {min_recall}, even at {at}; try {advice}, or a lower minimum index "
            "recall"
        )
    apply_search_params(index, chosen)
    spec.search_params.update(chosen)
    return recall


def _first_passing(
    measure: Callable[[Mapping[str, int]], float],
    name: str,
    candidates: list[int],
    fixed: Mapping[str, int],
    min_recall: float,
) -> tuple[dict[str, int], float]:
    """The first of `candidates` for `name` (others `fixed`) reaching `min_recall`, and its
    recall; or the best recall seen with the last candidate when none does."""
    best = 0.0
    for value in candidates:
        values = {**fixed, name: value}
        recall = measure(values)
        if recall >= min_recall:
            return values, recall
        best = max(best, recall)
    return {**fixed, name: candidates[-1]}, best


def _tune_refine(
    index: faiss.Index,
    measure: Callable[[Mapping[str, int]], float],
    min_recall: float,
    params: IndexParams,
) -> tuple[dict[str, int], float]:
    """nprobe and k_factor_rf of an IVF-PQ with refinement.

    Recall is about the lower of what the IVF lists probed hold (nprobe) and what the PQ
    shortlist keeps (k_factor_rf). So nprobe is found first with a k_factor large enough not to
    limit it, then the smallest doubling k_factor that still passes at that nprobe (a smaller
    k_factor is faster: 1,925 vs 1,176 QPS for 2 vs 16 at 1M). Raising nprobe at a too-small
    k_factor instead would climb to every list on a plateau (0.875 at k_factor 1) and fail.
    """
    nlist = faiss.extract_index_ivf(index).nlist
    high = params.refine_k_factor
    chosen, recall = _first_passing(
        measure, "nprobe", _doublings(1, nlist), {"k_factor_rf": high}, min_recall
    )
    if recall < min_recall and high < params.max_k_factor:
        # Every list probed and still short: the codes limit recall, raise the shortlist.
        chosen, recall = _first_passing(
            measure,
            "k_factor_rf",
            _doublings(2 * high, params.max_k_factor),
            {"nprobe": nlist},
            min_recall,
        )
    if recall < min_recall:
        return chosen, recall
    high, nprobe = chosen["k_factor_rf"], chosen["nprobe"]
    if high > 1:
        lower, lower_recall = _first_passing(
            measure, "k_factor_rf", _doublings(1, high // 2), {"nprobe": nprobe}, min_recall
        )
        if lower_recall >= min_recall:
            return lower, lower_recall
    return chosen, recall


def _doublings(start: int, stop: int) -> list[int]:
    """start, 2*start, 4*start, ... below stop, then stop itself."""
    values = []
    value = start
    while value < stop:
        values.append(value)
        value *= 2
    values.append(stop)
    return values
