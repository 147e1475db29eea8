"""Loader -> Servable: one validated bundle version placed on devices, ready to compute.

In TF Serving's terms this module is the *loader* (`ServableLoader`, the manager's `Loader`)
and the *servable*. `load_servable` turns a `ValidatedVersion` (checked by `BundleStore`) into a
`Servable`:

- the FAISS index and the item feature table are read **once per version** and shared by every
  replica (FAISS searches and numpy gathers are read-only, so sharing is safe);
- the entry points (`query_tower`, `ranker`) are loaded **once per replica**, because neither a
  TorchScript module nor an AOTI package is documented as safe to call from several threads;
- each replica runs the bundle's golden self-test on its device before the servable exists,
  so a version that computes differently here than where it was packaged never takes traffic;
- each replica owns two `Batcher`s (retrieval and ranking) that share one executor thread (a
  `Lane`, so each one's wait estimate counts the other's work), so a replica runs one model
  batch at a time and the event loop never blocks.

How work is submitted (the only part of this module the service's requests touch): each
request is one `submit_split` on a `ReplicaPool` with its per-row cost (ids looked up plus
`BatchingConfig.row_cost`, see `retrieve` and `rank`), its deadline, the caller's fairness key
and cancellation signal. The batcher admits or refuses it at once, cuts it into slices of at
most one batch when it is costlier, builds each slice (`RetrievePart`, `RankPart`) only when
it runs, and stops between slices when the deadline passes or the caller cancels.

Placement (`placement`): a bundle sharded for W devices runs as floor(devices / W) replicas on
GPU hosts; on CPU, `replicas` copies (default 1) that share the process's intra-op thread pool
(`torch.set_num_threads`, see `configure_threads`).

Compute methods take and return numpy arrays (the service turns protos into those); they are
coroutines that queue rows on the least loaded replica and await the batch result.

Example::

    servable = await asyncio.to_thread(ServableLoader(LoaderConfig()).load, validated)
    scores, ids = await servable.retrieve(tower_block, k=10, deadline=None)
    await servable.close()
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from recship.base.errors import EnvironmentBroken, InvalidInput
from recship.base.jagged import NO_IDS
from recship.bundle import golden
from recship.bundle.contents import read_contents
from recship.bundle.entrypoints import (
    FORMATS_BY_MANIFEST,
    check_embedding_tables,
    load_entry_point,
)
from recship.bundle.index import search as faiss_search
from recship.bundle.layout import QUERY_TOWER, RANKER
from recship.bundle.store import ValidatedVersion
from recship.protos.v1 import manifest_pb2
from recship.runtime.batcher import (
    DEFAULT_MAX_BATCH_COST,
    DEFAULT_MAX_BATCH_ROWS,
    DEFAULT_MAX_DELAY_S,
    DEFAULT_MAX_QUEUE_COST,
    DEFAULT_MAX_QUEUE_ROWS,
    Batcher,
    Lane,
    ReplicaPool,
)
from recship.runtime.features import FeatureCodec, JaggedBlock, join_blocks
from recship.runtime.held_inputs import QueryTowerCall, RankerCall, output_of
from recship.runtime.metrics import ServerMetrics

logger = logging.getLogger(__name__)

#: Cost of one model row beyond its ids, in ids: the dense features, the interaction and the
#: MLP of a row cost about as much as this many embedding lookups. Measured with the test
#: bundle on one CPU thread: ~0.6-0.8 us per row, ~12-15 ns per id looked up.
DEFAULT_ROW_COST = 32


@dataclass(frozen=True)
class BatchingConfig:
    """How each replica coalesces requests (see `recship.runtime.batcher.Batcher`).

    A request's cost is the ids its rows make the model look up, plus `row_cost` per row (see
    `Servable.rank` and `Servable.retrieve`); rows and cost are bounded per batch and per
    queue.

    Attributes:
        max_batch_rows: most model rows per batch; bigger requests are split, not rejected.
        max_delay_s: longest wait of the oldest queued request for its batch to fill.
        max_queue_rows: most rows waiting per replica and model; beyond it RESOURCE_EXHAUSTED.
        max_batch_cost: most cost per batch: the longest slice one request holds a replica.
        max_queue_cost: most cost waiting per replica and model; beyond it RESOURCE_EXHAUSTED.
        row_cost: cost of a row beyond its ids.
        enabled: False runs every request part alone (one item per batch), for comparisons.
    """

    max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS
    max_delay_s: float = DEFAULT_MAX_DELAY_S
    max_queue_rows: int = DEFAULT_MAX_QUEUE_ROWS
    max_batch_cost: int = DEFAULT_MAX_BATCH_COST
    max_queue_cost: int = DEFAULT_MAX_QUEUE_COST
    row_cost: int = DEFAULT_ROW_COST
    enabled: bool = True


@dataclass(frozen=True)
class LoaderConfig:
    """Where and how versions are loaded.

    Attributes:
        devices: devices to place replicas on, e.g. ("cuda:0", "cuda:1"); empty means every
            visible GPU for a CUDA bundle, "cpu" for a CPU bundle.
        replicas: replicas on CPU (default 1); on GPU the count follows from the devices.
        format: entry point format to load when the bundle has several ("torchscript" or
            "aoti"); None takes the first the manifest lists.
        batching: the replicas' batchers.
        mmap_index: map the index's vectors from the bundle file instead of reading them
            (`read_index(mmap=True)`): the worker processes of `recship serve --workers N`
            then share one copy of those pages instead of holding N, and two versions side
            by side during a switch hold no private copy of either index (on by default;
            benchmarks/README, "Scale end to end").
    """

    devices: tuple[str, ...] = ()
    replicas: int | None = None
    format: str | None = None
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    mmap_index: bool = True


def configure_threads(threads: int) -> None:
    """Sets the process's intra-op thread count for torch and FAISS (process-global).

    Raises:
        InvalidInput: `threads` < 1.
    """
    if threads < 1:
        raise InvalidInput(f"--threads must be >= 1, got {threads}")
    import faiss

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)


@dataclass(frozen=True)
class Placement:
    """Devices of each replica: `replicas[r]` lists the W devices replica r spans."""

    device_type: str
    replicas: tuple[tuple[str, ...], ...]

    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(device for replica in self.replicas for device in replica)


def placement(manifest: manifest_pb2.BundleManifest, config: LoaderConfig) -> Placement:
    """Decides the replicas of a version from its sharding plan and the local devices.

    Raises:
        EnvironmentBroken: a CUDA bundle on a host without enough GPUs.
        InvalidInput: a CPU replica count < 1, or devices that do not match the bundle.
    """
    width = max(int(manifest.sharding.device_count), 1)
    device_type = manifest.sharding.device_type or "cpu"
    if device_type == "cuda":
        devices = config.devices or tuple(f"cuda:{i}" for i in range(torch.cuda.device_count()))
        if any(not d.startswith("cuda") for d in devices):
            raise InvalidInput(f"--devices {','.join(devices)}: the bundle was built for cuda")
        count = len(devices) // width
        if count < 1:
            raise EnvironmentBroken(
                f"bundle {manifest.name} v{manifest.version} spans {width} GPU(s), "
                f"this host offers {len(devices)}"
            )
        return Placement(
            "cuda", tuple(tuple(devices[r * width : (r + 1) * width]) for r in range(count))
        )
    if config.devices and any(d != "cpu" for d in config.devices):
        raise InvalidInput(
            f"--devices {','.join(config.devices)}: bundle {manifest.name} "
            f"v{manifest.version} was built for cpu"
        )
    count = 1 if config.replicas is None else config.replicas
    if count < 1:
        raise InvalidInput(f"--replicas must be >= 1, got {count}")
    return Placement("cpu", tuple(("cpu",) * width for _ in range(count)))


# -- work items (what the batchers queue) --------------------------------------------------------
@dataclass(frozen=True)
class RetrievePart:
    """Queries to embed and search: the rows of `block`, top `k` each, never `exclude[row]`."""

    block: JaggedBlock
    k: int
    exclude: tuple[np.ndarray, ...]


@dataclass(frozen=True)
class RankPart:
    """Ranking rows: row j scores item `item_ids[j]` for query `row_query[j]` of `queries`."""

    queries: JaggedBlock
    query_dense: np.ndarray
    row_query: np.ndarray
    item_ids: np.ndarray


class Replica:
    """One copy of a version's entry points on its devices, with its executor thread.

    Thread-safety: the entry points are called only from this replica's executor thread (its
    batchers share that one-thread executor), one batch at a time. They run so that the forward
    does not take the GIL mid-way and wait for the event loop's thread to yield it (ranker,
    1,600 rows, beside a Python-busy thread, 3.5-3.8 ms alone):

    - under `torch.inference_mode`, not `no_grad`: under `no_grad` fbgemm's lookup op goes
      through its Python autograd wrapper (43 ms; 21 ms under `inference_mode`);
    - TorchScript ones through `recship.runtime.held_inputs`, which returns the inputs with the
      output (8-9 ms).
    """

    def __init__(
        self,
        index: int,
        devices: tuple[str, ...],
        query_tower: Callable[..., torch.Tensor],
        ranker: Callable[..., torch.Tensor],
        assets: VersionAssets,
    ) -> None:
        self.index = index
        self.devices = devices
        self.device = torch.device(devices[0])
        self._entry_points = {
            QUERY_TOWER: output_of(query_tower, QueryTowerCall),
            RANKER: output_of(ranker, RankerCall),
        }
        self._assets = assets
        self.executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"{assets.name}-r{index}"
        )

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        return tensor if self.device.type == "cpu" else tensor.to(self.device)

    def forward(self, name: str, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Entry point `name` (`QUERY_TOWER`, `RANKER`) on tensors on the replica's device, as
        traffic and the golden self-test run it (executor thread only)."""
        with torch.inference_mode():
            return self._entry_points[name](*inputs)

    def embed(self, values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Query tower: float32 [B, D] embeddings of B queries (executor thread only)."""
        output = self.forward(QUERY_TOWER, [self._tensor(values), self._tensor(lengths)])
        return output.float().cpu().numpy()

    def score(self, dense: np.ndarray, values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Ranker: float32 [B] logits of B rows (executor thread only)."""
        inputs = [dense.astype(np.float32, copy=False), values, lengths]
        output = self.forward(RANKER, [self._tensor(array) for array in inputs])
        return output.float().cpu().numpy().reshape(-1)

    def run_retrieve(self, parts: list[RetrievePart]) -> list[tuple[np.ndarray, np.ndarray]]:
        """One retrieval batch: embed every part's queries together, search once.

        The index is searched with the largest k of the batch and each part keeps its own
        prefix; for Flat and IVF indexes the top-k is a prefix of the top-k' for k' > k. Each
        query's exclusions are applied inside the search, so it still fills its k.
        """
        values, lengths = JaggedBlock.concat([part.block for part in parts]).feature_major()
        embeddings = self.embed(values, lengths)
        k = max(part.k for part in parts)
        exclude = [row for part in parts for row in part.exclude]
        scores, ids = faiss_search(self._assets.index, embeddings, k, exclude)
        bounds = np.cumsum([part.block.rows for part in parts[:-1]])
        return [
            (part_scores[:, : part.k], part_ids[:, : part.k])
            for part, part_scores, part_ids in zip(
                parts, np.split(scores, bounds), np.split(ids, bounds), strict=True
            )
        ]

    def run_rank(self, parts: list[RankPart]) -> list[np.ndarray]:
        """One ranking batch: join item features onto every row, score all rows at once.

        The rows of all parts are assembled with one gather per feature over the whole batch
        (not one per part), so the numpy work grows with the rows, not with the requests.
        """
        query_offsets = np.cumsum([0] + [part.queries.rows for part in parts[:-1]])
        row_query = np.concatenate(
            [part.row_query + offset for part, offset in zip(parts, query_offsets, strict=True)]
        )
        queries = JaggedBlock.concat([part.queries for part in parts])
        query_dense = np.concatenate([part.query_dense for part in parts])
        items, item_dense = self._assets.codec.item_block(
            np.concatenate([part.item_ids for part in parts])
        )
        values, lengths = join_blocks(queries.take(row_query), items).feature_major()
        dense = np.concatenate([query_dense[row_query], item_dense], axis=1)
        logits = self.score(dense, values, lengths)
        return np.split(logits, np.cumsum([part.item_ids.size for part in parts[:-1]]))


@dataclass(frozen=True)
class VersionAssets:
    """What one version's replicas share: manifest, feature codec (item table), index and the
    golden record each replica's self-test reproduces."""

    name: str
    version: int
    release_id: str
    manifest: manifest_pb2.BundleManifest
    codec: FeatureCodec
    index: Any
    golden: golden.GoldenSet


def _entry_point(
    version: ValidatedVersion, name: str, wanted: str | None
) -> manifest_pb2.EntryPoint:
    entries = [e for e in version.manifest.entry_points if e.name == name]
    if wanted is not None:
        entries = [e for e in entries if FORMATS_BY_MANIFEST.get(e.format) == wanted]
    if not entries:
        raise InvalidInput(
            f"bundle {version.ref} has no {name} entry point"
            + (f" in format {wanted}" if wanted else "")
        )
    return entries[0]


def _load_entry(
    version: ValidatedVersion, entry: manifest_pb2.EntryPoint, device: str
) -> Callable[..., torch.Tensor]:
    path = version.ref.path / entry.file
    module = load_entry_point(path, FORMATS_BY_MANIFEST[entry.format], device=device)
    check_embedding_tables(module, entry, version.manifest)
    return module


def _self_test(version: ValidatedVersion, replica: Replica) -> None:
    """Runs the bundle's golden examples on the replica's device.

    Raises:
        InvalidInput: an entry point's output differs from the recording beyond the bundle's
            tolerances (the message names the entry point, the device and the difference).
    """

    def on_device(name: str) -> Callable[..., torch.Tensor]:
        return lambda *inputs: replica.forward(name, [replica._tensor(x.numpy()) for x in inputs])

    failed = golden.self_test(
        {name: on_device(name) for name in (QUERY_TOWER, RANKER)}, replica._assets.golden
    )
    if failed:
        raise InvalidInput(
            f"bundle {version.ref} failed its golden self-test on {replica.device}: "
            + "; ".join(failed)
        )


def load_servable(
    version: ValidatedVersion,
    config: LoaderConfig,
    metrics: ServerMetrics | None = None,
    *,
    slots: Sequence[int] | None = None,
) -> Servable:
    """Loads a validated version onto its devices and self-tests every replica.

    Blocking (seconds): call it from a worker thread, never on the event loop.

    Args:
        version: a version `BundleStore.validate` accepted.
        config: placement and batching.
        metrics: where batch metrics go (per model, e.g. "movies/rank"), or None.
        slots: which replicas of the placement to load (indexes into `placement(...)`), e.g.
            `(1,)` to start with one replica and grow it with `load_replica`/`add_replica`
            during a replica-by-replica switch; None loads them all.

    Returns:
        A servable whose batchers are idle; it takes traffic as soon as it is returned.

    Raises:
        InvalidInput: an entry point, the index or the item features cannot be loaded, or the
            golden self-test failed (the message names the entry point and the difference).
        EnvironmentBroken: the host lacks the devices the bundle needs.
        ValueError: `slots` is empty or names a replica the placement does not have.
    """
    manifest = version.manifest
    started = time.perf_counter()
    where = placement(manifest, config)
    wanted = tuple(range(len(where.replicas))) if slots is None else tuple(slots)
    if not wanted or any(not 0 <= slot < len(where.replicas) for slot in wanted):
        raise ValueError(f"slots {wanted} outside the {len(where.replicas)} replica(s) placed")
    # The index mapped from the file (every family; see bundle.index.read_index): its vectors
    # stay in the page cache, shared between versions and processes, not a private copy each.
    contents = read_contents(manifest, version.ref.path, mmap_index=config.mmap_index)
    assets = VersionAssets(
        manifest.name,
        int(manifest.version),
        manifest.release_id,
        manifest,
        FeatureCodec(manifest, contents),
        contents.index,
        contents.golden,
    )
    entries = (
        _entry_point(version, QUERY_TOWER, config.format),
        _entry_point(version, RANKER, config.format),
    )
    replicas: list[Replica] = []
    try:
        for slot in wanted:
            replicas.append(_load_replica(version, entries, assets, where, slot))
    except BaseException:
        for loaded in replicas:
            loaded.executor.shutdown(wait=False)
        raise
    logger.info(
        "loaded %s v%d: %d replica(s) on %s, self-test passed in %.2f s",
        manifest.name,
        manifest.version,
        len(replicas),
        ",".join(d for r in replicas for d in r.devices),
        time.perf_counter() - started,
        extra={"bundle": manifest.name, "version": int(manifest.version)},
    )
    return Servable(assets, where, replicas, config.batching, metrics, version, entries)


class ServableLoader:
    """The runtime's `recship.runtime.loader.Loader`: placement and batching from a
    `LoaderConfig`, batch metrics into `metrics`.

    Thread-safety: stateless after construction; `load` blocks and runs on worker threads.
    """

    def __init__(self, config: LoaderConfig, metrics: ServerMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics

    def replicas(self, manifest: manifest_pb2.BundleManifest) -> int:
        """Replicas of a version on this host (see `placement`)."""
        return len(placement(manifest, self.config).replicas)

    def load(self, version: ValidatedVersion, slots: Sequence[int] | None = None) -> Servable:
        """`load_servable` with this loader's configuration and metrics (blocking)."""
        return load_servable(version, self.config, self.metrics, slots=slots)


def _load_replica(
    version: ValidatedVersion,
    entries: tuple[manifest_pb2.EntryPoint, manifest_pb2.EntryPoint],
    assets: VersionAssets,
    where: Placement,
    slot: int,
) -> Replica:
    """Loads the entry points of replica `slot` on its devices and self-tests them (blocking)."""
    devices = where.replicas[slot]
    tower_entry, ranker_entry = entries
    replica = Replica(
        slot,
        devices,
        _load_entry(version, tower_entry, devices[0]),
        _load_entry(version, ranker_entry, devices[0]),
        assets,
    )
    try:
        _self_test(version, replica)
    except BaseException:
        replica.executor.shutdown(wait=False)
        raise
    return replica


def _ids_per_row(block: JaggedBlock) -> np.ndarray:
    """int64 [rows]: the ids of each row of `block` over all its features."""
    if not block.lengths:
        return np.zeros(block.rows, dtype=np.int64)
    return np.sum(np.stack(block.lengths), axis=0, dtype=np.int64)


def _ids_per_item(codec: FeatureCodec) -> np.ndarray:
    """int64 [num items]: the ids each item adds to a ranking row over its item-side features."""
    total = np.zeros(codec.num_items, dtype=np.int64)
    for name in codec.ranker_item_features:
        total += np.diff(codec.items.sparse[name].offsets)
    return total


class Servable:
    """A loaded version: shared assets, replicas and their batchers.

    The replica set can shrink (`retire_replica`) and grow (`load_replica` + `add_replica`)
    while the servable serves, which is how a version is swapped replica by replica when two
    full versions do not fit in memory; the index and item table stay loaded once throughout.

    Thread-safety: the coroutines and `add_replica` must run on one event loop (the batchers
    bind to it); `load_replica` is blocking and runs on a worker thread; `placement` and
    `assets` are immutable and readable from any thread.
    """

    def __init__(
        self,
        assets: VersionAssets,
        where: Placement,
        replicas: Sequence[Replica],
        batching: BatchingConfig,
        metrics: ServerMetrics | None,
        version: ValidatedVersion,
        entries: tuple[manifest_pb2.EntryPoint, manifest_pb2.EntryPoint],
    ) -> None:
        self.assets = assets
        self.placement = where
        self.replicas = tuple(replicas)
        self.batching = batching
        self.max_batch_rows = batching.max_batch_rows
        self._metrics = metrics
        self._version = version
        self._entries = entries
        self._batchers: dict[int, tuple[Batcher[Any, Any], Batcher[Any, Any]]] = {
            r.index: self._make_batchers(r) for r in self.replicas
        }
        self._retrieval: ReplicaPool[RetrievePart, tuple[np.ndarray, np.ndarray]] = ReplicaPool(
            [retrieve for retrieve, _ in self._batchers.values()]
        )
        self._ranking: ReplicaPool[RankPart, np.ndarray] = ReplicaPool(
            [rank for _, rank in self._batchers.values()]
        )
        self._item_ids = _ids_per_item(assets.codec)
        # The least a ranking row costs: its row weight and the fewest ids an item adds (a
        # query's features may add none: a cold-start user's key is an empty bag).
        fewest = int(self._item_ids.min()) if self._item_ids.size else 0
        self._min_rank_row_cost = max(1, batching.row_cost + fewest)

    def _make_batchers(self, replica: Replica) -> tuple[Batcher[Any, Any], Batcher[Any, Any]]:
        batching, metrics, assets = self.batching, self._metrics, self.assets
        lane = Lane()  # the two batchers share the replica's executor thread

        def batcher(model: str, run: Callable[[list[Any]], Any]) -> Batcher[Any, Any]:
            return Batcher(
                run,
                max_batch_rows=batching.max_batch_rows,
                max_delay_s=batching.max_delay_s if batching.enabled else 0.0,
                max_queue_rows=batching.max_queue_rows,
                max_batch_cost=batching.max_batch_cost,
                max_queue_cost=batching.max_queue_cost,
                max_batch_items=None if batching.enabled else 1,
                executor=replica.executor,
                name=f"{assets.name}/v{assets.version}/{model}/{replica.index}",
                observer=None
                if metrics is None
                else metrics.batch_metrics(f"{assets.name}/{model}"),
                lane=lane,
            )

        return batcher("retrieve", replica.run_retrieve), batcher("rank", replica.run_rank)

    @property
    def replica_count(self) -> int:
        """Replicas taking new work now."""
        return len(self.replicas)

    @property
    def devices(self) -> tuple[str, ...]:
        """Devices of every replica of the placement, replica after replica."""
        return self.placement.devices

    @property
    def free_slots(self) -> tuple[int, ...]:
        """Placement slots (replica indexes) with no replica loaded, lowest first."""
        used = {r.index for r in self.replicas}
        return tuple(i for i in range(len(self.placement.replicas)) if i not in used)

    @property
    def swappable_replicas(self) -> int:
        """Every replica: one process swaps them one at a time (`retire_replica`)."""
        return self.replica_count

    def load_replica(self, slot: int) -> Replica:
        """Loads and self-tests one more replica at placement slot `slot` (blocking: run it on
        a worker thread); it takes no traffic until `add_replica`.

        Raises:
            InvalidInput: the self-test failed on this replica's device.
            ValueError: `slot` is taken or outside the placement.
        """
        if slot not in self.free_slots:
            raise ValueError(f"{self.name} v{self.version}: replica slot {slot} is not free")
        return _load_replica(self._version, self._entries, self.assets, self.placement, slot)

    def add_replica(self, replica: Replica) -> None:
        """Puts a replica from `load_replica` into service (event loop only)."""
        retrieve, rank = self._make_batchers(replica)
        self._batchers[replica.index] = (retrieve, rank)
        self._retrieval.add(retrieve)
        self._ranking.add(rank)
        self.replicas = tuple(sorted((*self.replicas, replica), key=lambda r: r.index))

    async def retire_replica(self) -> int:
        """Takes the highest-numbered replica out of service and frees it.

        New work stops going to it at once (the other replicas take it); the work already
        queued on it finishes, then its executor thread stops and its entry points are
        dropped. Requests in flight keep their version: they continue on the other replicas.

        Returns:
            The freed placement slot, for the replica that replaces it.

        Raises:
            ValueError: only one replica is left (retire the whole servable with `close`).
        """
        if len(self.replicas) < 2:
            raise ValueError(f"{self.name} v{self.version}: cannot retire its last replica")
        replica = self.replicas[-1]
        retrieve, rank = self._batchers.pop(replica.index)
        self._retrieval.remove(retrieve)
        self._ranking.remove(rank)
        self.replicas = self.replicas[:-1]
        await retrieve.drain()
        await rank.drain()
        replica.executor.shutdown(wait=True)
        return replica.index

    @property
    def name(self) -> str:
        return self.assets.name

    @property
    def version(self) -> int:
        return self.assets.version

    @property
    def release_id(self) -> str:
        return self.assets.release_id

    @property
    def codec(self) -> FeatureCodec:
        return self.assets.codec

    @property
    def default_retrieve_k(self) -> int:
        """Candidates Recommend retrieves when a request leaves it to the bundle (0 if unset)."""
        return int(self.assets.manifest.serving.retrieve_k)

    def admit_retrieve(self, queries: int, deadline: float | None, *, client: str = "") -> None:
        """Refuses at once, before its features are decoded, a retrieval of `queries` queries
        that the retrieval queues would refuse whatever its features hold.

        Its cost is at least `BatchingConfig.row_cost` per query (the exact cost, its ids,
        is counted by `retrieve`). Event loop only.

        Raises:
            Overloaded, DeadlineExceeded, Unavailable, InvalidInput: as
                `ReplicaPool.check_admission`.
        """
        self._retrieval.check_admission(
            queries, queries * max(1, self.batching.row_cost), client, deadline
        )

    def admit_rank(self, rows: int, deadline: float | None, *, client: str = "") -> None:
        """Refuses at once, before its features and candidates are decoded, a ranking of
        `rows` rows (candidates) that the ranking queues would refuse whatever they hold.

        Its cost is at least the row weight plus the fewest ids any item adds, per row (the
        exact cost is counted by `rank`). Event loop only.

        Raises:
            Overloaded, DeadlineExceeded, Unavailable, InvalidInput: as
                `ReplicaPool.check_admission`.
        """
        self._ranking.check_admission(rows, rows * self._min_rank_row_cost, client, deadline)

    async def retrieve(
        self,
        block: JaggedBlock,
        k: int,
        deadline: float | None,
        exclude: Sequence[np.ndarray] | None = None,
        *,
        client: str = "",
        cancelled: Callable[[], bool] | None = None,
        admitted: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k candidates of each query of `block`, never an excluded item.

        Each query is one row; its cost is its ids over every query tower feature plus the
        configured row cost. A request costlier than a batch runs as slices, one at a time.

        Args:
            block: query tower features of n queries (`FeatureCodec.encode_queries`).
            k: candidates per query.
            deadline: absolute `time.monotonic()` after which the result is useless, or None.
            exclude: per query, validated int64 item ids never to return; None for none.
            client: the caller's fairness key (e.g. its connection, or a declared client id).
            cancelled: the caller's cancellation signal (e.g. `context.cancelled`), polled
                between slices; cancelling the awaiting task works as well.
            admitted: the caller passed `admit_retrieve` for this request (see
                `Batcher.submit_split`).

        Returns:
            (scores float32 [n, k], item ids int64 [n, k]), best first; id -1 marks a slot the
            index could not fill.

        Raises:
            Overloaded, DeadlineExceeded, Unavailable: from the batcher.
            InvalidInput: the request costs more than a queue can ever hold.
        """
        excluded = tuple(exclude) if exclude is not None else (NO_IDS,) * block.rows
        parts = await self._retrieval.submit_split(
            block.rows,
            lambda rows: RetrievePart(block.slice(rows), k, excluded[rows]),
            deadline,
            row_costs=_ids_per_row(block) + self.batching.row_cost,
            client=client,
            cancelled=cancelled,
            admitted=admitted,
        )
        return (
            np.concatenate([scores for scores, _ in parts]),
            np.concatenate([ids for _, ids in parts]),
        )

    async def rank(
        self,
        queries: JaggedBlock,
        query_dense: np.ndarray,
        row_query: np.ndarray,
        item_ids: np.ndarray,
        deadline: float | None,
        *,
        client: str = "",
        cancelled: Callable[[], bool] | None = None,
        admitted: bool = False,
    ) -> np.ndarray:
        """Ranker logits of R rows (query `row_query[j]`, item `item_ids[j]`).

        Each candidate is one row; its cost is the ids the ranker looks up for it (its
        query's ids over the query-side features plus its item's over the item-side ones)
        plus the configured row cost. A request costlier than a batch (or with more rows)
        runs as slices, one at a time, each joined and scored only when it runs.

        Args:
            queries: ranker query-side features of n queries.
            query_dense: float32 [n, query dense count].
            row_query: int64 [R] non-decreasing query index of each row.
            item_ids: int64 [R] validated item ids.
            deadline: as in `retrieve`.
            client, cancelled: as in `retrieve`.
            admitted: the caller passed `admit_rank` for this request.

        Returns:
            float32 [R] logits.

        Raises:
            Overloaded, DeadlineExceeded, Unavailable, InvalidInput: as in `retrieve`.
        """
        row_costs = (_ids_per_row(queries) + self.batching.row_cost)[row_query]
        row_costs += self._item_ids[item_ids]
        parts = await self._ranking.submit_split(
            int(item_ids.size),
            lambda rows: RankPart(queries, query_dense, row_query[rows], item_ids[rows]),
            deadline,
            row_costs=row_costs,
            client=client,
            cancelled=cancelled,
            admitted=admitted,
        )
        return np.concatenate(parts)

    @property
    def queued_rows(self) -> int:
        """Rows waiting in this version's queues."""
        return self._retrieval.queued_rows + self._ranking.queued_rows

    @property
    def queued_cost(self) -> int:
        """Cost waiting in this version's queues."""
        return self._retrieval.queued_cost + self._ranking.queued_cost

    async def close(self) -> None:
        """Finishes queued work, stops the batchers and the executor threads. Idempotent."""
        await self._retrieval.drain()
        await self._ranking.drain()
        for replica in self.replicas:
            replica.executor.shutdown(wait=True)
