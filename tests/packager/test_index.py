"""FAISS index building against a numpy exact reference on small seeded clustered sets."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import faiss
import numpy as np
import numpy.typing as npt
import pytest

from recship.base.errors import InvalidInput, NotFound, QualityGateFailed
from recship.bundle.index import (
    apply_search_params,
    gpu_count,
    read_index,
    search,
    to_gpu,
    unwrap,
    write_index,
)
from recship.packager import index as packager_index
from recship.packager.index import (
    BuiltIndex,
    IndexParams,
    build_index,
    recall_at_k,
    resolve_kind,
)
from recship.packager.options import IndexKind
from recship.protos.v1 import manifest_pb2

N_ITEMS, DIM, CLUSTERS, N_QUERIES, K = 5000, 32, 50, 200, 100
REFINE: list[IndexKind] = ["ivfpq", "ivfpqfs"]
APPROXIMATE: list[IndexKind] = ["ivfflat", *REFINE, "hnsw"]
EXPECTED_TYPES = {
    "flat": manifest_pb2.INDEX_TYPE_FLAT,
    "ivfflat": manifest_pb2.INDEX_TYPE_IVF_FLAT,
    "ivfpq": manifest_pb2.INDEX_TYPE_IVF_PQ_REFINE,
    "ivfpqfs": manifest_pb2.INDEX_TYPE_IVF_PQ_FASTSCAN_REFINE,
    "hnsw": manifest_pb2.INDEX_TYPE_HNSW,
}
SEARCH_PARAMS = {
    "ivfflat": {"nprobe"},
    "ivfpq": {"nprobe", "k_factor_rf"},
    "ivfpqfs": {"nprobe", "k_factor_rf"},
    "hnsw": {"efSearch"},
}


@pytest.fixture(autouse=True, scope="module")
def one_openmp_thread() -> Iterator[None]:
    """Builds on one OpenMP thread: the suite shares two cores, and OpenMP's spinning threads
    on a loaded machine made PQ training ~10x slower (0.7 s -> 7 s for 5000 vectors)."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


class Corpus:
    """Clustered item vectors (like trained item embeddings), sparse item ids, and queries."""

    def __init__(self) -> None:
        rng = np.random.default_rng(1234)
        centers = rng.normal(size=(CLUSTERS, DIM))
        members = rng.integers(0, CLUSTERS, N_ITEMS)
        self.vectors = (centers[members] + 0.3 * rng.normal(size=(N_ITEMS, DIM))).astype("f4")
        # Ids are not row numbers: a shuffled, gappy range, as item ids after filtering.
        self.ids = (rng.permutation(N_ITEMS) * 3 + 17).astype(np.int64)
        picks = rng.choice(N_ITEMS, N_QUERIES, replace=False)
        noise = 0.2 * rng.normal(size=(N_QUERIES, DIM))
        self.queries = (self.vectors[picks] + noise).astype(np.float32)

    def exact(
        self, queries: npt.NDArray[np.float32], k: int
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
        """The reference: every inner product in float64, sorted (scores, ids)."""
        scores = queries.astype(np.float64) @ self.vectors.astype(np.float64).T
        rows = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, rows, axis=1), self.ids[rows]


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return Corpus()


@pytest.fixture(scope="module")
def built(corpus: Corpus) -> dict[str, BuiltIndex]:
    """Each kind built once, tuned on the corpus queries to recall@100 >= 0.95."""
    return {
        kind: build_index(corpus.vectors, corpus.ids, kind, queries=corpus.queries, seed=0)
        for kind in ("flat", *APPROXIMATE)
    }


class RefineCorpus:
    """Unit vectors around 200 Zipf-popular directions, queries off the item manifold (like
    query-tower outputs): unlike `Corpus`, IVF needs many lists (nprobe 32 of 102) and the PQ
    shortlist alone misses the floor, so refinement and both tuning steps are exercised."""

    def __init__(self, count: int = 4000, dim: int = 32, clusters: int = 200) -> None:
        rng = np.random.default_rng(5)
        centers = _unit(rng.normal(size=(clusters, dim)))
        popularity = 1 / np.arange(1, clusters + 1) ** 0.9
        popularity /= popularity.sum()
        members = rng.choice(clusters, count, p=popularity)
        noise = 0.7 * rng.normal(size=(count, dim)) / np.sqrt(dim)
        self.vectors = _unit(centers[members] + noise).astype(np.float32)
        self.ids = (np.arange(count) * 3 + 5).astype(np.int64)
        picks = rng.choice(clusters, 300, p=popularity)
        noise = 0.77 * rng.normal(size=(300, dim)) / np.sqrt(dim)
        queries = _unit(centers[picks] + noise).astype(np.float32)
        # Half tune the index, the other half (never seen by tuning) check it.
        self.tuning, self.held_out = queries[:150], queries[150:]

    def exact_ids(self, queries: npt.NDArray[np.float32], k: int) -> npt.NDArray[np.int64]:
        """The reference: the ids of every inner product's top k in float64."""
        scores = queries.astype(np.float64) @ self.vectors.astype(np.float64).T
        return self.ids[np.argsort(-scores, axis=1, kind="stable")[:, :k]]


def _unit(rows: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def refine_corpus() -> RefineCorpus:
    return RefineCorpus()


@pytest.fixture(scope="module")
def refined(refine_corpus: RefineCorpus) -> dict[str, BuiltIndex]:
    """Each refinement kind built once on the harder corpus, tuned on its tuning queries."""
    return {
        kind: build_index(
            refine_corpus.vectors, refine_corpus.ids, kind, queries=refine_corpus.tuning
        )
        for kind in REFINE
    }


def test_flat_matches_the_numpy_reference_exactly(corpus: Corpus, built: dict) -> None:
    scores, ids = search(built["flat"].index, corpus.queries, K)
    ref_scores, ref_ids = corpus.exact(corpus.queries, K)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-4)
    assert recall_at_k(ids, ref_ids) >= 0.999  # only float ties may reorder
    assert (ids[:, 0] == ref_ids[:, 0]).all()
    assert built["flat"].recall_at_100 == 1.0
    assert dict(built["flat"].spec.search_params) == {}


@pytest.mark.parametrize("kind", APPROXIMATE)
def test_approximate_kinds_reach_the_recall_floor_against_numpy(
    corpus: Corpus, built: dict, kind: str
) -> None:
    result = built[kind]
    _, ids = search(result.index, corpus.queries, K)
    _, ref_ids = corpus.exact(corpus.queries, K)
    recall = recall_at_k(ids, ref_ids)
    assert recall >= 0.95, f"{kind} recall@100 {recall:.4f}"
    # The recorded recall is what an independent exact reference measures too.
    assert recall == pytest.approx(result.recall_at_100, abs=0.005)
    assert set(np.unique(ids[ids >= 0])) <= set(corpus.ids.tolist())


@pytest.mark.parametrize("kind", ["flat", *APPROXIMATE])
def test_spec_describes_the_index(corpus: Corpus, built: dict, kind: str) -> None:
    spec = built[kind].spec
    assert spec.type == EXPECTED_TYPES[kind]
    assert spec.metric == "inner_product"
    assert (spec.dim, spec.num_vectors) == (DIM, N_ITEMS)
    assert spec.recall_at_100_vs_exact == built[kind].recall_at_100
    assert spec.build_seconds > 0
    assert spec.faiss_version
    assert spec.file == ""
    assert set(spec.search_params) == SEARCH_PARAMS.get(kind, set())


def test_default_build_parameters(built: dict) -> None:
    # nlist ~ 4*sqrt(5000) = 283, capped at 5000 / 39 = 128 training points per list;
    # pq_m = D/2; 5000 points fill 2**7 PQ centroids with 39 points each, not 2**8.
    assert built["ivfflat"].spec.factory == "IVF128,Flat"
    assert built["ivfpq"].spec.factory == "IDMap2,IVF128,PQ16x7,RFlat"
    # Fast-scan: one dimension per 4-bit code.
    assert built["ivfpqfs"].spec.factory == "IDMap2,IVF128,PQ32x4fs,RFlat"
    assert built["hnsw"].spec.factory == "IDMap2,HNSW32"
    assert built["flat"].spec.factory == "IDMap2,Flat"
    # efSearch is tuned from k upwards, so the recorded value holds for any k <= 100.
    assert built["hnsw"].spec.search_params["efSearch"] >= K


@pytest.mark.parametrize("kind", ["flat", *APPROXIMATE])
@pytest.mark.parametrize("mmap", [False, True])
def test_save_and_load_keep_ids_and_search_params(
    tmp_path: Path, corpus: Corpus, built: dict, kind: str, mmap: bool
) -> None:
    path = tmp_path / "items.faiss"
    write_index(built[kind].index, path)
    assert [p.name for p in tmp_path.iterdir()] == ["items.faiss"]
    loaded = read_index(path, built[kind].spec, mmap=mmap)
    before_scores, before_ids = search(built[kind].index, corpus.queries, K)
    after_scores, after_ids = search(loaded, corpus.queries, K)
    np.testing.assert_array_equal(after_ids, before_ids)
    np.testing.assert_allclose(after_scores, before_scores, rtol=1e-6)


def test_spec_search_params_override_the_file(tmp_path: Path, corpus: Corpus, built: dict) -> None:
    path = tmp_path / "items.faiss"
    write_index(built["ivfflat"].index, path)
    spec = manifest_pb2.IndexSpec()
    spec.CopyFrom(built["ivfflat"].spec)
    spec.search_params["nprobe"] = 128  # every list: IVF-Flat becomes exhaustive
    _, ids = search(read_index(path, spec), corpus.queries, K)
    _, ref_ids = corpus.exact(corpus.queries, K)
    assert recall_at_k(ids, ref_ids) >= 0.999
    assert recall_at_k(ids, ref_ids) > built["ivfflat"].recall_at_100


def test_read_index_errors(tmp_path: Path, built: dict) -> None:
    with pytest.raises(NotFound, match="no such index file"):
        read_index(tmp_path / "absent.faiss")
    garbage = tmp_path / "garbage.faiss"
    garbage.write_bytes(b"definitely not faiss")
    with pytest.raises(InvalidInput, match=rf"{garbage}: not a readable FAISS index"):
        read_index(garbage)
    path = tmp_path / "items.faiss"
    write_index(built["flat"].index, path)
    spec = manifest_pb2.IndexSpec()
    spec.CopyFrom(built["flat"].spec)
    spec.dim, spec.num_vectors = 64, 10
    with pytest.raises(InvalidInput, match="dimension 32, the manifest says 64; 5000 vectors"):
        read_index(path, spec)
    spec.CopyFrom(built["flat"].spec)
    spec.search_params["nprobe"] = 8
    with pytest.raises(InvalidInput, match="search parameter 'nprobe' does not apply"):
        read_index(path, spec)


def test_item_queries_find_their_own_id(corpus: Corpus, built: dict) -> None:
    for kind in ("flat", "hnsw"):
        _, ids = search(built[kind].index, corpus.vectors[:50] * 10, 1)
        # A long copy of an item scores highest with the item itself in a tight cluster.
        ref_ids = corpus.exact(corpus.vectors[:50] * 10, 1)[1]
        assert (ids[:, 0] == ref_ids[:, 0]).mean() >= 0.98


def test_search_pads_missing_results_and_validates(built: dict, corpus: Corpus) -> None:
    small = build_index(corpus.vectors[:10], corpus.ids[:10], "flat")
    scores, ids = search(small.index, corpus.queries[:2], 15)
    assert ids.shape == (2, 15) and ids.dtype == np.int64 and scores.dtype == np.float32
    assert (ids[:, 10:] == -1).all() and set(ids[0, :10]) == set(corpus.ids[:10])
    with pytest.raises(InvalidInput, match=r"queries must be \[Q, 32\] vectors"):
        search(built["flat"].index, np.zeros((2, 8), np.float32), 5)
    with pytest.raises(InvalidInput, match="k must be >= 1"):
        search(built["flat"].index, corpus.queries, 0)


@pytest.mark.parametrize(
    ("count", "params", "expected"),
    [
        (49_999, IndexParams(), "flat"),
        (50_000, IndexParams(), "ivfflat"),
        (999_999, IndexParams(), "ivfflat"),
        (1_000_000, IndexParams(), "ivfpqfs"),
        (5_000_000, IndexParams(), "ivfpqfs"),
        (5000, IndexParams(exact_below=1000), "ivfflat"),
        (5000, IndexParams(exact_below=1000, pq_from=4000), "ivfpqfs"),
    ],
)
def test_auto_picks_by_corpus_size(count: int, params: IndexParams, expected: str) -> None:
    assert resolve_kind("auto", count, params) == expected
    assert resolve_kind("hnsw", count, params) == "hnsw"


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (IndexParams(), manifest_pb2.INDEX_TYPE_FLAT),
        (IndexParams(exact_below=1000), manifest_pb2.INDEX_TYPE_IVF_FLAT),
        (
            IndexParams(exact_below=1000, pq_from=2000),
            manifest_pb2.INDEX_TYPE_IVF_PQ_FASTSCAN_REFINE,
        ),
    ],
)
def test_auto_builds_the_family_of_its_size_band_and_passes_the_floor(
    refine_corpus: RefineCorpus, params: IndexParams, expected: int
) -> None:
    built = build_index(
        refine_corpus.vectors, refine_corpus.ids, params=params, queries=refine_corpus.tuning
    )
    assert built.spec.type == expected and built.fallbacks == ()
    assert EXPECTED_TYPES[built.kind] == expected
    _, ids = search(built.index, refine_corpus.held_out, K)
    assert recall_at_k(ids, refine_corpus.exact_ids(refine_corpus.held_out, K)) >= 0.95


def test_auto_falls_back_when_fast_scan_misses_the_floor(
    refine_corpus: RefineCorpus, caplog: pytest.LogCaptureFixture
) -> None:
    # Two 4-bit codes per vector and no room to refine: fast-scan cannot reach 0.95.
    params = IndexParams(exact_below=1000, pq_from=2000, pq_m=2, refine_k_factor=1, max_k_factor=1)
    with caplog.at_level(logging.WARNING, logger="recship.packager.index"):
        built = build_index(
            refine_corpus.vectors, refine_corpus.ids, params=params, queries=refine_corpus.tuning
        )
    assert built.spec.type == manifest_pb2.INDEX_TYPE_IVF_FLAT and built.kind == "ivfflat"
    assert built.recall_at_100 >= 0.95
    (line,) = built.fallbacks
    assert line.startswith("ivfpqfs: IDMap2,IVF102,PQ2x4fs,RFlat index reaches recall@100 0.")
    assert "building ivfflat instead" in caplog.text
    # An explicit kind still fails the package.
    with pytest.raises(QualityGateFailed, match="PQ2x4fs"):
        build_index(refine_corpus.vectors, refine_corpus.ids, "ivfpqfs", params)


def test_auto_falls_back_to_exact_when_every_approximate_family_misses(
    corpus: Corpus, monkeypatch: pytest.MonkeyPatch
) -> None:
    def never_passes(index, kind, spec, *args, **kwargs) -> float:
        raise QualityGateFailed(f"{spec.factory} index reaches recall@100 0.5 (stub)")

    monkeypatch.setattr(packager_index, "_tune", never_passes)
    params = IndexParams(exact_below=1000, pq_from=2000)
    built = build_index(corpus.vectors, corpus.ids, params=params)
    assert built.spec.type == manifest_pb2.INDEX_TYPE_FLAT and built.recall_at_100 == 1.0
    assert [line.split(":")[0] for line in built.fallbacks] == ["ivfpqfs", "ivfflat"]


def test_unreachable_recall_is_a_clear_error() -> None:
    rng = np.random.default_rng(7)
    vectors = rng.normal(size=(2000, 16)).astype(np.float32)  # no structure for PQ to exploit
    params = IndexParams(pq_m=2, pq_bits=4, refine_k_factor=1, max_k_factor=1)
    with pytest.raises(QualityGateFailed) as caught:
        build_index(vectors, np.arange(2000), "ivfpq", params, min_recall=0.95)
    message = str(caught.value)
    assert message.startswith("IDMap2,IVF51,PQ2x4,RFlat index reaches recall@100 0.")
    assert "below the required 0.95, even at k_factor_rf=1, nprobe=51" in message


@pytest.mark.parametrize("kind", REFINE)
def test_refinement_meets_the_floor_where_the_pq_shortlist_alone_does_not(
    refine_corpus: RefineCorpus, refined: dict, kind: str
) -> None:
    index = refined[kind].index
    expected = refine_corpus.exact_ids(refine_corpus.held_out, K)
    _, ids = search(index, refine_corpus.held_out, K)
    recall = recall_at_k(ids, expected)
    assert recall >= 0.95, f"{kind} held-out recall@100 {recall:.4f}"
    assert recall == pytest.approx(refined[kind].recall_at_100, abs=0.02)
    tuned = dict(refined[kind].spec.search_params)
    # k_factor 1 re-ranks only the PQ top 100: the codes alone miss the floor.
    apply_search_params(index, {"k_factor_rf": 1})
    _, pq_only = search(index, refine_corpus.held_out, K)
    apply_search_params(index, tuned)
    assert recall_at_k(pq_only, expected) < 0.93


@pytest.mark.parametrize("kind", REFINE)
def test_refinement_tuning_records_the_cheapest_doubling_point(
    refine_corpus: RefineCorpus, refined: dict, kind: str
) -> None:
    # nprobe is the first doubling that passes with a large k_factor (16), then k_factor the
    # first doubling that still passes at that nprobe: halving either one misses the floor.
    tuned = dict(refined[kind].spec.search_params)
    index = refined[kind].index
    expected = refine_corpus.exact_ids(refine_corpus.tuning, K)

    def recall_with(values: dict[str, int]) -> float:
        apply_search_params(index, values)
        return recall_at_k(search(index, refine_corpus.tuning, K)[1], expected)

    try:
        assert recall_with(tuned) >= 0.95
        assert tuned["nprobe"] > 1 and tuned["k_factor_rf"] > 1  # both steps did something
        assert recall_with({"k_factor_rf": 16, "nprobe": tuned["nprobe"] // 2}) < 0.95
        assert recall_with({**tuned, "k_factor_rf": tuned["k_factor_rf"] // 2}) < 0.95
    finally:
        apply_search_params(index, tuned)


def test_ivfpq_trains_without_polysemous_codes(built: dict) -> None:
    # Set on the IVF-PQ itself, not on the IDMap2 / refinement wrappers that ignore it.
    ivfpq = faiss.downcast_index(faiss.extract_index_ivf(built["ivfpq"].index))
    assert isinstance(ivfpq, faiss.IndexIVFPQ)
    assert ivfpq.do_polysemous_training is False


def test_fast_scan_needs_enough_training_vectors(corpus: Corpus) -> None:
    with pytest.raises(InvalidInput, match="ivfpqfs needs at least 16 training vectors"):
        build_index(corpus.vectors[:12], corpus.ids[:12], "ivfpqfs")


def test_progress_reports_each_stage(corpus: Corpus) -> None:
    calls: list[tuple[str, int, int]] = []
    build_index(corpus.vectors, corpus.ids, "ivfflat", progress=lambda *call: calls.append(call))
    assert calls[0] == ("train", 0, N_ITEMS) and ("train", N_ITEMS, N_ITEMS) in calls
    assert ("add", N_ITEMS, N_ITEMS) in calls and calls[-1] == ("tune", 1, 1)


def test_default_eval_queries_are_sampled_items_with_the_seed(corpus: Corpus) -> None:
    first = build_index(corpus.vectors, corpus.ids, "hnsw", seed=3)
    second = build_index(corpus.vectors, corpus.ids, "hnsw", seed=3)
    assert first.recall_at_100 == second.recall_at_100 >= 0.95
    assert first.spec.search_params == second.spec.search_params


BAD_INPUTS = [
    (lambda c: (c.vectors[:, :0], c.ids), "vectors must be a non-empty"),
    (
        lambda c: (np.where(np.arange(N_ITEMS)[:, None] == 9, np.nan, c.vectors), c.ids),
        r"vectors\[9\] holds a NaN",
    ),
    (lambda c: (c.vectors, c.ids[:-1]), "ids must be 5000 integers"),
    (lambda c: (c.vectors, c.ids.astype(np.float64)), "ids must be 5000 integers"),
    (lambda c: (c.vectors, np.concatenate([c.ids[:-1], c.ids[:1]])), "ids must be unique"),
    (lambda c: (c.vectors, c.ids - 100), "ids must be >= 0"),
]


@pytest.mark.parametrize(("make", "message"), BAD_INPUTS)
def test_bad_items_are_invalid_input(corpus: Corpus, make, message: str) -> None:
    vectors, ids = make(corpus)
    with pytest.raises(InvalidInput, match=message):
        build_index(vectors, ids, "flat")


@pytest.mark.parametrize(
    ("kind", "params", "message"),
    [
        ("annoy", IndexParams(), "unknown index kind 'annoy'"),
        ("ivfpq", IndexParams(pq_m=5), "pq_m must divide the vector dimension 32"),
        ("ivfflat", IndexParams(nlist=6000), "nlist must be between 1 and the 5000"),
        ("ivfpq", IndexParams(pq_bits=17), "pq_bits must be between 1 and 16"),
        ("ivfpqfs", IndexParams(pq_m=3), "pq_m must divide the vector dimension 32"),
        (
            "ivfpq",
            IndexParams(refine_k_factor=128),
            r"refine_k_factor must be between 1 and max_k_factor \(64\)",
        ),
    ],
)
def test_bad_parameters_are_invalid_input(
    corpus: Corpus, kind: IndexKind, params: IndexParams, message: str
) -> None:
    with pytest.raises(InvalidInput, match=message):
        build_index(corpus.vectors, corpus.ids, kind, params)


def test_bad_queries_and_recall_floor_are_invalid_input(corpus: Corpus) -> None:
    with pytest.raises(InvalidInput, match=r"queries must be a non-empty \[Q, 32\] array"):
        build_index(corpus.vectors, corpus.ids, "hnsw", queries=np.zeros((3, 4)))
    with pytest.raises(InvalidInput, match=r"min_recall must be in \(0, 1\]"):
        build_index(corpus.vectors, corpus.ids, "hnsw", min_recall=1.5)


@pytest.mark.gpu
@pytest.mark.skipif(gpu_count() == 0, reason="this faiss build has no GPU support or sees no GPU")
@pytest.mark.parametrize("kind", ["flat", "ivfflat", "ivfpq"])
def test_gpu_copy_matches_cpu(corpus: Corpus, built: dict, kind: str, tmp_path: Path) -> None:
    gpu_index = to_gpu(built[kind].index, 0)
    _, cpu_ids = search(built[kind].index, corpus.queries, K)
    _, gpu_ids = search(gpu_index, corpus.queries, K)
    assert recall_at_k(gpu_ids, cpu_ids) >= 0.98
    write_index(gpu_index, tmp_path / "items.faiss")  # written back as a CPU index
    _, reloaded_ids = search(read_index(tmp_path / "items.faiss"), corpus.queries, K)
    assert reloaded_ids.shape == cpu_ids.shape


def test_to_gpu_without_gpu_support_is_a_clear_error(built: dict) -> None:
    if gpu_count() > 0:
        pytest.skip("this host has GPU faiss; the error path is for CPU-only hosts")
    from recship.base.errors import EnvironmentBroken

    with pytest.raises(EnvironmentBroken, match="install faiss-gpu on a GPU host"):
        to_gpu(built["flat"].index, 0)


def _selector_search(index, queries, k: int, exclude) -> np.ndarray:
    """The reference for exclusions: FAISS's own ID selector, one query at a time, with the
    search widened as much as `search` widens its first try (HNSW beam >= K + E, IVF lists
    times ceil((K + E) / K)).

    A refinement index ignores a selector in its own parameters and applies one in its base
    index's to row numbers: the selector goes to the base, translated from item ids."""
    rows = []
    for query, banned in zip(queries, exclude, strict=True):
        fetch = k + len(banned)
        inner = unwrap(index)
        selector = faiss.IDSelectorNot(faiss.IDSelectorBatch(banned))
        if isinstance(inner, faiss.IndexRefine):
            ivf = faiss.extract_index_ivf(inner)
            base = faiss.SearchParametersIVF(sel=faiss.IDSelectorTranslated(index.id_map, selector))
            base.nprobe = min(ivf.nprobe * -(-fetch // k), ivf.nlist)
            params = faiss.IndexRefineSearchParameters(k_factor=inner.k_factor)
            params.base_index_params = base
        elif isinstance(inner, faiss.IndexHNSW):
            params = faiss.SearchParametersHNSW(sel=selector)
            params.efSearch = max(inner.hnsw.efSearch * -(-fetch // k), fetch)
        elif isinstance(inner, faiss.IndexIVF):
            params = faiss.SearchParametersIVF(sel=selector)
            params.nprobe = min(inner.nprobe * -(-fetch // k), inner.nlist)
        else:
            params = faiss.SearchParameters(sel=selector)
        _, ids = index.search(query[None, :], k, params=params)
        rows.append(ids[0])
    return np.stack(rows)


@pytest.mark.parametrize("kind", ["flat", *APPROXIMATE])
@pytest.mark.parametrize("excluded", [0, 50, 500])
def test_exclusions_are_never_returned_and_rows_stay_full(
    corpus: Corpus, built: dict, kind: str, excluded: int
) -> None:
    # Each query excludes its own `excluded` nearest items (the hard case: the index's best
    # answers are all banned), so the result must come from further away.
    queries = corpus.queries[:40]
    _, nearest = corpus.exact(queries, excluded + K)
    exclude = [row[:excluded] for row in nearest]
    index = built[kind].index
    _, ids = search(index, queries, K, exclude)
    assert (ids >= 0).all(), f"{kind}: rows left short"
    for row, banned in zip(ids, exclude, strict=True):
        assert not set(row.tolist()) & set(banned.tolist())
    # Against the exact top K of the items not excluded: exact for Flat; for approximate kinds
    # at least what FAISS's ID selectors reach with the same widening (which may leave rows
    # short, where `search` does not).
    expected = np.stack([row[excluded:] for row in nearest])
    recall = recall_at_k(ids, expected)
    if kind == "flat":
        assert recall == 1.0
    else:
        reference = recall_at_k(_selector_search(index, queries, K, exclude), expected)
        assert recall >= reference - 0.01, (kind, recall, reference)


@pytest.mark.parametrize("kind", ["flat", *APPROXIMATE])
def test_excluding_all_but_a_few_items_returns_exactly_those(
    corpus: Corpus, built: dict, kind: str
) -> None:
    keep = corpus.ids[:7]
    exclude = [corpus.ids[7:]]
    _, ids = search(built[kind].index, corpus.queries[:1], 20, exclude)
    assert sorted(ids[0][ids[0] >= 0].tolist()) == sorted(keep.tolist())
    assert (ids[0][7:] == -1).all()


def test_a_search_beyond_the_hnsw_beam_still_fills_k(corpus: Corpus, built: dict) -> None:
    # efSearch was tuned for k = 100; FAISS would pad a search for 600 with -1.
    _, ids = search(built["hnsw"].index, corpus.queries[:5], 600)
    assert (ids >= 0).all()


@pytest.mark.parametrize("kind", REFINE)
@pytest.mark.parametrize("excluded", [50, 500])
def test_exclusions_on_the_refine_corpus_keep_the_floor(
    refine_corpus: RefineCorpus, refined: dict, kind: str, excluded: int
) -> None:
    # Exclusions widen the search (IVF lists and the refined shortlist grow with k + E), so
    # the rest of the neighbourhood is found as well as the unexcluded top k is.
    queries = refine_corpus.held_out[:40]
    nearest = refine_corpus.exact_ids(queries, excluded + K)
    exclude = [row[:excluded] for row in nearest]
    _, ids = search(refined[kind].index, queries, K, exclude)
    assert (ids >= 0).all()
    assert not any(
        set(row.tolist()) & set(banned.tolist()) for row, banned in zip(ids, exclude, strict=True)
    )
    assert recall_at_k(ids, np.stack([row[excluded:] for row in nearest])) >= 0.95


@pytest.mark.parametrize("kind", ["flat", *APPROXIMATE])
def test_mmap_loads_map_every_type_and_answer_like_normal_loads(
    tmp_path: Path, corpus: Corpus, built: dict, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "items.faiss"
    write_index(built[kind].index, path)
    flags: list[int] = []
    original = faiss.read_index

    def recording(name: str, io_flags: int = 0) -> faiss.Index:
        flags.append(io_flags)
        return original(name, io_flags)

    monkeypatch.setattr(faiss, "read_index", recording)
    mapped = read_index(path, built[kind].spec, mmap=True)
    loaded = read_index(path, built[kind].spec)
    # IO_FLAG_MMAP would map only IVF lists and copy a refinement stage's vectors.
    assert flags == [faiss.IO_FLAG_MMAP_IFC, 0]
    exclude = [corpus.ids[:50]] * len(corpus.queries)
    for args in ((), (exclude,)):
        mapped_scores, mapped_ids = search(mapped, corpus.queries, K, *args)
        loaded_scores, loaded_ids = search(loaded, corpus.queries, K, *args)
        np.testing.assert_array_equal(mapped_ids, loaded_ids)
        np.testing.assert_array_equal(mapped_scores, loaded_scores)


def test_read_index_applies_every_tuned_parameter(
    tmp_path: Path, refine_corpus: RefineCorpus, refined: dict
) -> None:
    built = refined["ivfpqfs"]
    path = tmp_path / "items.faiss"
    write_index(built.index, path)
    spec = manifest_pb2.IndexSpec()
    spec.CopyFrom(built.spec)
    spec.search_params["k_factor_rf"] = 1  # the manifest, not the file, holds
    loaded = read_index(path, spec)
    assert faiss.downcast_index(loaded.index).k_factor == 1
    assert faiss.extract_index_ivf(loaded).nprobe == spec.search_params["nprobe"]


@pytest.mark.parametrize("kind", ["flat", "ivfpqfs", "hnsw"])
def test_threads_change_speed_not_results_and_stay_on_the_calling_thread(
    corpus: Corpus, built: dict, kind: str
) -> None:
    index = built[kind].index
    one = search(index, corpus.queries, K, threads=1)
    two = search(index, corpus.queries, K, threads=2)
    np.testing.assert_array_equal(one[1], two[1])
    faiss.omp_set_num_threads(2)
    try:
        search(index, corpus.queries[:1], K)  # one thread by default, restored afterwards
        assert faiss.omp_get_max_threads() == 2
        search(index, corpus.queries[:1], K, threads=None)
        assert faiss.omp_get_max_threads() == 2
    finally:
        faiss.omp_set_num_threads(1)
    with pytest.raises(InvalidInput, match="threads must be >= 1 or None, got 0"):
        search(index, corpus.queries, K, threads=0)
