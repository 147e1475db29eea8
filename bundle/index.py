"""items.faiss: the FAISS index of every candidate item; read, search, write.

The index maps item vectors to item ids (IVF-Flat indexes store the ids natively; Flat, HNSW
and the IVF-PQ indexes with a refinement stage are wrapped in `IndexIDMap2`), so a search
returns item ids, never row numbers. The manifest's `IndexSpec` records its family, dimension,
size and the search parameters the packager tuned (`nprobe`, `k_factor_rf`, `efSearch`);
`read_index` checks the file against them and applies them. Building and tuning are the
packager's (`recship.packager.index`).

Thread-safety: a loaded CPU index may be searched from many threads at once (FAISS searches are
read-only), but changing its search parameters while others search is not safe. A search's
OpenMP thread count (`search(threads=...)`) is a setting of the calling thread only.

Example::

    index = read_index(version_dir / "items.faiss", manifest.index)
    scores, ids = search(index, query_vectors, k=100)
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import faiss
import numpy as np
import numpy.typing as npt

from recship.base.errors import EnvironmentBroken, InvalidInput, NotFound, clip, untrusted
from recship.base.files import NotARegularFile, atomic_output, open_regular
from recship.base.jagged import NO_IDS
from recship.protos.v1 import manifest_pb2

# The header every FAISS index file starts with (faiss/impl/index_write.cpp,
# write_index_header): fourcc, d (int32), ntotal (int64), two dummies (int64), is_trained
# (uint8), metric_type (int32).
_HEADER = struct.Struct("<4siqqqBi")
# faiss's deserialization limits are process-wide: one read at a time sets them.
_READ_LOCK = threading.Lock()
# Limits are never set below this, so that tiny legitimate files keep their headroom.
_MIN_READ_LIMIT = 1 << 16
# An IVF-PQ index precomputes a table of nlist x M x ksub floats when it loads: derived from
# what the file holds, it exceeds the file's size by at most about ksub / dsub (256 at most
# for 8-bit codes), so such an index may allocate this much more than its size.
_IVF_PQ_GROWTH = 256
# The index types holding an 8-bit IVF-PQ, alone or under a refinement stage (fast-scan IVF-PQ
# files loaded within their own size in tests/packager/test_index.py).
_IVF_PQ_TYPES = (manifest_pb2.INDEX_TYPE_IVF_PQ, manifest_pb2.INDEX_TYPE_IVF_PQ_REFINE)


def check_index_header(path: Path, spec: manifest_pb2.IndexSpec) -> None:
    """Compares the header of an index file with the manifest's IndexSpec, reading 37 bytes.

    Cheap enough for every validation: it catches an index whose dimension, vector count or
    metric differs from what the manifest declares before FAISS reads (and allocates) anything.

    Raises:
        InvalidInput: not a FAISS index file, or its header disagrees with `spec`.
    """
    path = Path(path)
    try:
        descriptor, _ = open_regular(path)
        with open(descriptor, "rb") as handle:
            header = handle.read(_HEADER.size)
    except (OSError, NotARegularFile) as error:
        raise InvalidInput(f"{path}: cannot read the index: {error}") from None
    if len(header) < _HEADER.size:
        raise InvalidInput(f"{path}: too short to be a FAISS index ({len(header)} bytes)")
    fourcc, dim, ntotal, _, _, _, metric = _HEADER.unpack(header)
    if not fourcc.isalnum():
        raise InvalidInput(f"{path}: not a FAISS index (header {untrusted(fourcc)})")
    problems = []
    if dim != spec.dim:
        problems.append(f"dimension {dim}, the manifest says {spec.dim}")
    if ntotal != spec.num_vectors:
        problems.append(f"{ntotal} vectors, the manifest says {spec.num_vectors}")
    if spec.metric == "inner_product" and metric != faiss.METRIC_INNER_PRODUCT:
        problems.append("metric is not inner product")
    if problems:
        raise InvalidInput(f"{path}: index does not match its manifest: {'; '.join(problems)}")


def _read_bounded(path: Path, flags: int, growth: int = 1) -> faiss.Index:
    """`faiss.read_index` that allocates no vector larger than `growth` times the file.

    FAISS sizes each vector it reads from a count in the file and allocates it before reading
    the data, so a 1 KB file declaring a billion floats would cost gigabytes; with the
    deserialization limits set to the file's size, such a count fails at once. `growth` is
    above 1 only for IVF-PQ, whose precomputed table is derived, not read (`_IVF_PQ_GROWTH`).
    """
    size = max(path.stat().st_size * growth, _MIN_READ_LIMIT)
    with _READ_LOCK:
        old_bytes = faiss.get_deserialization_vector_byte_limit()
        old_loops = faiss.get_deserialization_loop_limit()
        faiss.set_deserialization_vector_byte_limit(size)
        faiss.set_deserialization_loop_limit(size)
        try:
            return faiss.read_index(str(path), flags)
        finally:
            faiss.set_deserialization_vector_byte_limit(old_bytes)
            faiss.set_deserialization_loop_limit(old_loops)


def index_ids(index: faiss.Index) -> npt.NDArray[np.int64]:
    """Every id an index can return, in storage order: the ID map's, the inverted lists', or
    0..ntotal-1 for an index that stores none."""
    if isinstance(index, faiss.IndexIDMap | faiss.IndexIDMap2):
        return faiss.vector_to_array(index.id_map).astype(np.int64, copy=False)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        lists = ivf.invlists
        parts = []
        for number in range(ivf.nlist):
            size = lists.list_size(number)
            if size:
                parts.append(faiss.rev_swig_ptr(lists.get_ids(number), size).copy())
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
    return np.arange(index.ntotal, dtype=np.int64)


def apply_search_params(index: faiss.Index, search_params: Mapping[str, int]) -> None:
    """Sets search-time parameters on an index, through any ID map or refinement stage.

    The names are FAISS `ParameterSpace` names: "nprobe" (IVF lists probed), "k_factor_rf"
    (a refinement stage re-ranks k * k_factor_rf candidates exactly), "efSearch" (HNSW beam).

    Raises:
        InvalidInput: the index has no such parameter (e.g. "nprobe" on an HNSW index).
    """
    space = faiss.ParameterSpace()
    for name, value in search_params.items():
        try:
            space.set_index_parameter(index, name, float(value))
        except RuntimeError:
            raise InvalidInput(
                f"search parameter {name!r} does not apply to a {type(index).__name__} index"
            ) from None


def search(
    index: faiss.Index,
    queries: npt.ArrayLike,
    k: int,
    exclude: Sequence[npt.NDArray[np.int64]] | None = None,
    *,
    threads: int | None = 1,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Top-k inner-product search, optionally never returning some item ids per query.

    With exclusions, the index is asked for k plus the longest exclusion list, the excluded ids
    are dropped and each row keeps its best k. Rows left short (by exclusions, or by IVF lists
    holding fewer than k items) are searched again, wider (more lists, a larger HNSW beam)
    and for more results, until full or the index has nothing more: a query gets k results
    whenever the index holds k items it may return.

    Args:
        index: A built or loaded index (CPU or GPU).
        queries: float32 [Q, D] query vectors (other float types are converted).
        k: Results per query, >= 1.
        exclude: per query, int64 item ids never to return (Q arrays, any may be empty), or
            None.
        threads: OpenMP threads FAISS may use for this call, or None to keep the calling
            thread's setting. One by default: a server answers requests in parallel, and more
            threads make a single query slower (measured at 1M items: Flat 115 -> 26 QPS on 2
            threads). Batch callers (tuning, the quality gate) may ask for more. The setting
            is the calling thread's own (OpenMP keeps it per thread) and restored on return.

    Returns:
        (scores float32 [Q, k], item ids int64 [Q, k]), best first; when the index holds fewer
        than k items (or an approximate search finds fewer), missing slots have id -1.

    Raises:
        InvalidInput: queries are not [Q, D] with the index's D, k < 1, `exclude` does not
            have one entry per query, or `threads` < 1.
    """
    if threads is not None and threads < 1:
        raise InvalidInput(f"threads must be >= 1 or None, got {threads}")
    checked = np.ascontiguousarray(queries, dtype=np.float32)
    if checked.ndim != 2 or checked.shape[1] != index.d:
        raise InvalidInput(f"queries must be [Q, {index.d}] vectors, got shape {checked.shape}")
    if k < 1:
        raise InvalidInput(f"k must be >= 1, got {k}")
    if exclude is None:
        exclude = [NO_IDS] * len(checked)
    elif len(exclude) != len(checked):
        raise InvalidInput(f"exclude has {len(exclude)} entries for {len(checked)} queries")
    with _omp_threads(threads):
        return _search(index, checked, k, exclude)


def _search(
    index: faiss.Index,
    checked: npt.NDArray[np.float32],
    k: int,
    exclude: Sequence[npt.NDArray[np.int64]],
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """`search` after its checks, on the calling thread's OpenMP setting."""
    total = int(index.ntotal)
    most = max((len(row) for row in exclude), default=0)
    fetch = min(k + most, max(total, k))
    # An IVF index tuned for the top k reaches the top k + most only with as many more lists.
    depth = -(-fetch // k)
    scores, ids = index.search(checked, fetch, params=_search_params(index, fetch, depth))
    if most:
        scores, ids = _drop_excluded(scores, ids, exclude, k)
    # Rows left short (exclusions, or IVF lists holding fewer than k items): ask again for more
    # results from a wider search (more IVF lists, a larger HNSW beam), doubling until the row
    # is full or the index holds nothing more to find.
    short = np.flatnonzero((ids[:, : min(k, total)] < 0).any(axis=1))
    widen = depth
    while short.size and (fetch < total or _can_widen(index, widen)):
        fetch, widen = min(2 * fetch, max(total, k)), 2 * widen
        found_scores, found_ids = index.search(
            checked[short], fetch, params=_search_params(index, fetch, widen)
        )
        scores[short], ids[short] = _drop_excluded(
            found_scores, found_ids, [exclude[row] for row in short], k
        )
        short = short[(ids[short, : min(k, total)] < 0).any(axis=1)]
    return scores, ids


@contextmanager
def _omp_threads(threads: int | None) -> Iterator[None]:
    """Runs the block with `threads` OpenMP threads on this thread (None: unchanged)."""
    if threads is None:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _search_params(index: faiss.Index, k: int, widen: int) -> faiss.SearchParameters | None:
    """Per-call search parameters: the tuned ones, widened `widen` times, able to return k.

    Widening multiplies the IVF lists probed and the HNSW beam by `widen`; a refinement stage
    keeps its k_factor (it re-ranks k_factor times the k asked for, which grows with k).

    FAISS's HNSW does not raise efSearch to k by itself (faiss 1.15: with efSearch 100 a
    search for 600 returns ~590 results), so the beam is at least k. A fresh parameter object
    starts from FAISS defaults (nprobe 1, efSearch 16, k_factor 1 with its base at nprobe 1),
    so the tuned values are copied in.
    """
    inner = unwrap(index)
    if isinstance(inner, faiss.IndexHNSW):
        params = faiss.SearchParametersHNSW()
        params.efSearch = max(inner.hnsw.efSearch * widen, k)
        return params
    ivf = faiss.try_extract_index_ivf(inner)
    if ivf is None or widen == 1:
        return None
    ivf_params = faiss.SearchParametersIVF()
    ivf_params.nprobe = min(ivf.nprobe * widen, ivf.nlist)
    if isinstance(inner, faiss.IndexRefine):
        # Top-level IVF parameters on a refinement index raise; they go to its base index.
        refine_params = faiss.IndexRefineSearchParameters()
        refine_params.k_factor = inner.k_factor
        refine_params.base_index_params = ivf_params  # faiss keeps the Python object alive
        return refine_params
    return ivf_params


def _can_widen(index: faiss.Index, widen: int) -> bool:
    """Whether `_search_params(index, ., 2 * widen)` searches more than `widen` does."""
    inner = unwrap(index)
    if isinstance(inner, faiss.IndexHNSW):
        return inner.hnsw.efSearch * widen < index.ntotal
    ivf = faiss.try_extract_index_ivf(inner)
    return ivf is not None and ivf.nprobe * widen < ivf.nlist


def _drop_excluded(
    scores: npt.NDArray[np.float32],
    ids: npt.NDArray[np.int64],
    exclude: Sequence[npt.NDArray[np.int64]],
    k: int,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """The best k results of each row that are neither missing (-1) nor excluded, in order."""
    rows = len(ids)
    banned_ids = np.concatenate([np.asarray(row, dtype=np.int64) for row in exclude])
    banned_rows = np.repeat(np.arange(rows, dtype=np.int64), [len(row) for row in exclude])
    # One key per (row, id): ids are >= -1, so row * span + id never collides across rows.
    span = int(max(ids.max(initial=0), banned_ids.max(initial=0))) + 2
    keys = np.arange(rows, dtype=np.int64)[:, None] * span + ids
    keep = (ids >= 0) & ~np.isin(keys, banned_rows * span + banned_ids)
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    kept = np.take_along_axis(keep, order, axis=1)
    best_ids = np.where(kept, np.take_along_axis(ids, order, axis=1), -1)
    best_scores = np.where(kept, np.take_along_axis(scores, order, axis=1), -np.inf)
    if best_ids.shape[1] < k:  # the index holds fewer than k items
        pad = k - best_ids.shape[1]
        best_ids = np.pad(best_ids, ((0, 0), (0, pad)), constant_values=-1)
        best_scores = np.pad(best_scores, ((0, 0), (0, pad)), constant_values=-np.inf)
    return best_scores.astype(np.float32), best_ids.astype(np.int64)


def write_index(index: faiss.Index, path: Path) -> None:
    """Writes an index atomically: temp file in the same folder, fsync, os.replace.

    GPU indexes are copied to CPU first, so the file is always a CPU index.
    """
    path = Path(path)
    if _is_gpu_index(index):
        index = faiss.index_gpu_to_cpu(index)
    with atomic_output(path) as temp:
        faiss.write_index(index, str(temp))


def read_index(
    path: Path,
    spec: manifest_pb2.IndexSpec | None = None,
    *,
    mmap: bool = False,
    num_items: int | None = None,
) -> faiss.Index:
    """Loads an index file, checks it against the manifest and applies the search parameters.

    No vector FAISS reads may be larger than the file (`_read_bounded`), and with a spec the
    header is compared first (`check_index_header`), so a hostile file costs at most about its
    own size in memory.

    Args:
        path: The index file.
        spec: The manifest's IndexSpec: the file is checked against its dimension, size and
            metric, and its `search_params` are applied. Without it the file's own defaults hold.
        mmap: Map the vectors from the file instead of reading them into memory (fast loads,
            pages shared between processes serving the same bundle), for every index type.
            What stays private: IDMap2's id table and reverse map (~48 MiB per million ids)
            and fast-scan PQ codes (32 bytes per item at 4 bits x 64). The file must not
            change while the index is loaded (versions are immutable once published).
        num_items: The catalogue size (`schema.num_items`): every id of the index must then be
            a distinct item id in [0, num_items), so a search never returns an id the item
            table lacks.

    Raises:
        NotFound: the file does not exist.
        InvalidInput: the file is not a FAISS index or does not match the spec or the items.
    """
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"{path}: no such index file")
    if spec is not None:
        check_index_header(path, spec)
    # IO_FLAG_MMAP_IFC maps every flat code array (Flat vectors, the HNSW storage and graph, a
    # refinement stage's vectors) and the IVF inverted lists. IO_FLAG_MMAP maps only the IVF
    # lists: it copies the refinement vectors of an IVF-PQ + RFlat file into private memory
    # (294 of 291 MiB at 1M items, against 50 MiB with IO_FLAG_MMAP_IFC).
    flags = faiss.IO_FLAG_MMAP_IFC if mmap else 0
    # Without a spec nothing says what the file holds (a caller that trusts it, e.g. the
    # packager reading back its own index): allow the IVF-PQ growth.
    ivf_pq = spec is None or spec.type in _IVF_PQ_TYPES
    try:
        index = _read_bounded(path, flags, _IVF_PQ_GROWTH if ivf_pq else 1)
    except (RuntimeError, MemoryError) as error:
        text = str(error).strip()
        reason = text.splitlines()[-1] if text else type(error).__name__
        raise InvalidInput(f"{path}: not a readable FAISS index: {clip(reason, 200)}") from None
    if num_items is not None:
        _check_ids(path, index, num_items)
    if spec is not None:
        problems = []
        if index.d != spec.dim:
            problems.append(f"dimension {index.d}, the manifest says {spec.dim}")
        if index.ntotal != spec.num_vectors:
            problems.append(f"{index.ntotal} vectors, the manifest says {spec.num_vectors}")
        if spec.metric == "inner_product" and index.metric_type != faiss.METRIC_INNER_PRODUCT:
            problems.append("metric is not inner product")
        if problems:
            raise InvalidInput(f"{path}: index does not match its manifest: {'; '.join(problems)}")
        apply_search_params(index, dict(spec.search_params))
    return index


def _check_ids(path: Path, index: faiss.Index, num_items: int) -> None:
    ids = index_ids(index)
    if ids.size != index.ntotal:
        raise InvalidInput(f"{path}: {ids.size} ids for {index.ntotal} vectors")
    if ids.size and (ids.min() < 0 or ids.max() >= num_items):
        raise InvalidInput(
            f"{path}: index ids span [{ids.min()}, {ids.max()}], outside the items [0, {num_items})"
        )
    if np.unique(ids).size != ids.size:
        raise InvalidInput(f"{path}: an item id appears twice in the index")


def gpu_count() -> int:
    """GPUs FAISS can use here: 0 with a CPU-only FAISS build."""
    return int(faiss.get_num_gpus())


def to_gpu(index: faiss.Index, device: int = 0) -> faiss.Index:
    """A copy of a CPU index on GPU `device` (Flat and IVF; FAISS has no GPU HNSW).

    The returned index keeps its GPU resources alive for as long as it lives.

    Raises:
        EnvironmentBroken: this FAISS build has no GPU support or sees no such GPU.
        InvalidInput: the index type has no GPU implementation.
    """
    if not 0 <= device < gpu_count():
        raise EnvironmentBroken(
            f"faiss cannot place an index on GPU {device}: it sees {gpu_count()} GPUs "
            "(install faiss-gpu on a GPU host)"
        )
    if isinstance(unwrap(index), faiss.IndexHNSW):
        raise InvalidInput("HNSW indexes have no GPU implementation in faiss; search them on CPU")
    resources = faiss.StandardGpuResources()
    gpu_index = faiss.index_cpu_to_gpu(resources, device, index)
    gpu_index.referenced_objects = [resources]  # type: ignore[attr-defined]
    return gpu_index


def unwrap(index: faiss.Index) -> faiss.Index:
    """The index inside an ID map (e.g. an `IndexRefineFlat`, `IndexHNSWFlat`), or the index."""
    if isinstance(index, faiss.IndexIDMap):
        return faiss.downcast_index(index.index)
    return index


def _is_gpu_index(index: faiss.Index) -> bool:
    return gpu_count() > 0 and type(unwrap(index)).__name__.startswith("Gpu")
