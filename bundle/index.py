"""items.faiss: the FAISS index of every candidate item; read, search, write.

The index maps item vectors to item ids (IVF indexes store the ids natively, Flat and HNSW are
wrapped in `IndexIDMap2`), so a search returns item ids, never row numbers. The manifest's
`IndexSpec` records its family, dimension, size and the search parameters (nprobe, efSearch)
the packager tuned; `read_index` checks the file against them and applies them. Building and
tuning are the packager's (`recship.packager.index`).

Thread-safety: a loaded CPU index may be searched from many threads at once (FAISS searches are
read-only), but changing its search parameters while others search is not safe.

Example::

    index = read_index(version_dir / "items.faiss", manifest.index)
    scores, ids = search(index, query_vectors, k=100)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import faiss
import numpy as np
import numpy.typing as npt

from recship.base.errors import EnvironmentBroken, InvalidInput, NotFound
from recship.base.files import atomic_output
from recship.protos.v1 import manifest_pb2

_IVF_TYPES = (manifest_pb2.INDEX_TYPE_IVF_FLAT, manifest_pb2.INDEX_TYPE_IVF_PQ)


def apply_search_params(index: faiss.Index, search_params: Mapping[str, int]) -> None:
    """Sets search-time parameters ("nprobe", "efSearch") on an index, through any ID map.

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
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Top-k inner-product search, optionally never returning some item ids per query.

    With exclusions, the index is asked for k plus the longest exclusion list, the excluded ids
    are dropped and each row keeps its best k; rows an approximate search left short are asked
    again with twice as many results, up to the whole index. So a query whose exclusions leave
    at least k items gets k results from an exact index, and from an approximate one as many as
    its search reaches (as without exclusions).

    Args:
        index: A built or loaded index (CPU or GPU).
        queries: float32 [Q, D] query vectors (other float types are converted).
        k: Results per query, >= 1.
        exclude: per query, int64 item ids never to return (Q arrays, any may be empty), or
            None.

    Returns:
        (scores float32 [Q, k], item ids int64 [Q, k]), best first; when the index holds fewer
        than k items (or an approximate search finds fewer), missing slots have id -1.

    Raises:
        InvalidInput: queries are not [Q, D] with the index's D, k < 1, or `exclude` does not
            have one entry per query.
    """
    checked = np.ascontiguousarray(queries, dtype=np.float32)
    if checked.ndim != 2 or checked.shape[1] != index.d:
        raise InvalidInput(f"queries must be [Q, {index.d}] vectors, got shape {checked.shape}")
    if k < 1:
        raise InvalidInput(f"k must be >= 1, got {k}")
    if exclude is None or not any(len(row) for row in exclude):
        scores, ids = index.search(checked, k)
        return scores, ids
    if len(exclude) != len(checked):
        raise InvalidInput(f"exclude has {len(exclude)} entries for {len(checked)} queries")
    fetch = min(k + max(len(row) for row in exclude), max(int(index.ntotal), k))
    scores, ids = index.search(checked, fetch)
    best_scores, best_ids = _drop_excluded(scores, ids, exclude, k)
    short = np.flatnonzero((best_ids < 0).any(axis=1))
    while short.size and fetch < index.ntotal:
        fetch = min(2 * fetch, int(index.ntotal))
        scores, ids = index.search(checked[short], fetch)
        best_scores[short], best_ids[short] = _drop_excluded(
            scores, ids, [exclude[row] for row in short], k
        )
        short = short[(best_ids[short] < 0).any(axis=1)]
    return best_scores, best_ids


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
    path: Path, spec: manifest_pb2.IndexSpec | None = None, *, mmap: bool = False
) -> faiss.Index:
    """Loads an index file and applies the spec's search parameters.

    Args:
        path: The index file.
        spec: The manifest's IndexSpec: the file is checked against its dimension, size and
            metric, and its `search_params` are applied. Without it the file's own defaults hold.
        mmap: Map the vectors from the file instead of reading them into memory (fast loads,
            pages shared between processes serving the same bundle).

    Raises:
        NotFound: the file does not exist.
        InvalidInput: the file is not a FAISS index or does not match the spec.
    """
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"{path}: no such index file")
    flags = 0
    if mmap:
        ivf = spec is None or spec.type in _IVF_TYPES
        flags = faiss.IO_FLAG_MMAP if ivf else faiss.IO_FLAG_MMAP_IFC
    try:
        index = faiss.read_index(str(path), flags)
    except RuntimeError as error:
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else "unreadable"
        raise InvalidInput(f"{path}: not a readable FAISS index: {reason}") from None
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
    """The index inside an ID map, or the index itself."""
    if isinstance(index, faiss.IndexIDMap):
        return faiss.downcast_index(index.index)
    return index


def _is_gpu_index(index: faiss.Index) -> bool:
    return gpu_count() > 0 and type(unwrap(index)).__name__.startswith("Gpu")
