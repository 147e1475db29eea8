"""`package(options) -> PackageReport`: two training outputs in, one verified bundle version out.

Stages (each timed and shown as progress):

1. load     both checkpoints into unsharded fp32 models, reopen their held-out splits, and check
            that retrieval candidates are items the ranker knows;
2. quantize the query tower and the ranker (int8 by default) and shard them table-wise for W
            devices;
3. export   them as plain-tensor entry points (TorchScript and/or AOTInductor) and reload what
            was written;
4. index    every item's fp32 candidate-tower embedding into FAISS, tuned to the recall floor;
5. verify   the exported entry points against the fp32 models on golden inputs, and the packaged
            pipeline (quantized query tower -> ANN) against fp32 exact retrieval and the fp32
            ranker on the held-out split;
6. publish  atomically as the next version, MANIFEST.json last; nothing is published when any
            stage or check fails.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from recship.base.errors import InvalidInput, QualityGateFailed
from recship.bundle import golden
from recship.bundle.entrypoints import (
    MANIFEST_FORMATS,
    REQUIRED_LIBRARIES,
    ExportFormat,
    entry_point_file,
    load_entry_point,
)
from recship.bundle.index import search, write_index
from recship.bundle.item_features import write_item_features
from recship.bundle.layout import (
    GOLDEN_FILE,
    INDEX_FILE,
    ITEM_FEATURES_FILE,
    QUERY_TOWER,
    RANKER,
    TRANSFORMS_FILE,
    USER_FEATURES_FILE,
    BundleRef,
)
from recship.bundle.raw_queries import record_raw_queries
from recship.bundle.transforms import write_transforms
from recship.bundle.writer import BundleWriter
from recship.packager import export
from recship.packager.checkpoint import LoadedCheckpoint, check_pair, load_checkpoint
from recship.packager.entrypoints import QueryTowerEntry, RankerEntry, jagged_inputs
from recship.packager.evaluation import EvalSplit, held_out_split, read_eval_data
from recship.packager.index import IndexParams, build_index
from recship.packager.options import PackageOptions
from recship.packager.quantize import (
    QuantizedModel,
    embedding_tables,
    quantize_for_inference,
    table_quant_types,
)
from recship.packager.verify import (
    Check,
    EndToEnd,
    QualityResult,
    auc,
    exact_search,
    measure_end_to_end,
    quality_gate,
    ranked_recall,
    retrieve_k_sweep,
)
from recship.protos.v1 import manifest_pb2
from recship.trainer.data.batches import pair_batch, ranking_batch
from recship.trainer.data.dataset import InteractionDataset
from recship.trainer.evaluate import DEFAULT_RETRIEVE_K, positives_by_user, tower_embeddings

# The runtime's self-test recomputes the exported entry points on the golden inputs; only
# thread-count dependent float summation order may differ.
GOLDEN_ATOL = 1e-4
GOLDEN_RTOL = 1e-4
# Exported (quantized) entry points against the fp32 eager models on the golden inputs.
MIN_QUERY_COSINE = 0.99
# Reloaded exported files against the eager quantized module they were exported from.
MAX_EXPORT_DIFF = 1e-4
# (user, item) pairs per call of the packaged ranker in the gate.
SCORE_BATCH = 16384

_QUANT_DTYPES = {
    "int8": manifest_pb2.QUANT_DTYPE_INT8,
    "int4": manifest_pb2.QUANT_DTYPE_INT4,
    "fp16": manifest_pb2.QUANT_DTYPE_FP16,
    "fp32": manifest_pb2.QUANT_DTYPE_FP32,
}
_EXPORTERS = {
    ExportFormat.TORCHSCRIPT: export.export_torchscript,
    ExportFormat.AOTI: export.export_aoti,
}
_ROLES = {
    QUERY_TOWER: manifest_pb2.MODEL_ROLE_RETRIEVAL,
    RANKER: manifest_pb2.MODEL_ROLE_RANKING,
}


@dataclass
class StageTimer:
    """Times named stages and shows each one as it runs (a spinner, then a check mark)."""

    console: Console
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str, description: str) -> Iterator[None]:
        started = time.perf_counter()
        with self.console.status(f"[bold]{name}[/bold]: {description}"):
            yield
        self.seconds[name] = time.perf_counter() - started
        self.console.print(f"[green]✓[/green] {name:<9} {description} ({self.seconds[name]:.1f} s)")


@dataclass(frozen=True)
class PackageReport:
    """What `package` published and measured.

    Attributes:
        ref: the published version.
        manifest: its manifest.
        quality: the quality gate's metrics and checks.
        stage_seconds: wall time per stage.
    """

    ref: BundleRef
    manifest: manifest_pb2.BundleManifest
    quality: QualityResult
    stage_seconds: dict[str, float]


@dataclass(frozen=True)
class _EntryPoint:
    """One entry point through the pipeline: fp32 module, quantized module, golden inputs."""

    name: str
    fp32: torch.nn.Module
    quantized: QuantizedModel
    golden_inputs: tuple[torch.Tensor, ...]
    feature_order: tuple[str, ...]


def _query_inputs(data: InteractionDataset, users: np.ndarray, features: list[str]):
    return jagged_inputs(data.users, users, features)


def _ranker_inputs(
    data: InteractionDataset, rows: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ranker entry-point inputs (dense, values, lengths) of the interactions `rows`."""
    batch = ranking_batch(data, rows)
    return batch.dense_features, batch.sparse_features.values(), batch.sparse_features.lengths()


def _sample(rng: np.random.Generator, population: int, count: int) -> np.ndarray:
    """`count` distinct indices below `population` (all of them when fewer), sorted."""
    if population == 0:
        raise InvalidInput("no examples to record golden inputs from")
    return np.sort(rng.choice(population, size=min(count, population), replace=False))


def _golden_source(checkpoint: LoadedCheckpoint) -> InteractionDataset:
    """The split golden inputs come from: held-out when there is one, else training."""
    return checkpoint.held_out if len(checkpoint.held_out) else checkpoint.train


def _batched(
    function: Callable[..., torch.Tensor],
    make_inputs: Callable[[np.ndarray], tuple[torch.Tensor, ...]],
    rows: np.ndarray,
    batch: int = 1024,
) -> np.ndarray:
    """Runs `function` over `rows` in batches and concatenates the outputs."""
    outputs = []
    with torch.no_grad():
        for start in range(0, rows.size, batch):
            outputs.append(function(*make_inputs(rows[start : start + batch])).numpy())
    return np.concatenate(outputs)


def index_params(values: dict[str, int]) -> IndexParams:
    """IndexParams from NAME=INT options; unknown names are an error naming the valid ones."""
    known = {field.name for field in dataclasses.fields(IndexParams)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise InvalidInput(
            f"unknown index parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    return IndexParams(**values)


class _Packager:
    """The state of one `package` run; `run()` returns the report or raises."""

    def __init__(self, options: PackageOptions, console: Console) -> None:
        self.options = options
        self.timer = StageTimer(console)
        self.console = console
        self.rng = np.random.default_rng(options.seed)
        self.device_type = options.device_type or ("cuda" if torch.cuda.is_available() else "cpu")

    # -- stage 1 ----------------------------------------------------------------------------
    def load(self) -> None:
        options = self.options
        self.retrieval = load_checkpoint(options.retrieval, "two-tower", options.retrieval_step)
        self.ranking = load_checkpoint(
            options.ranking, "dlrm", options.ranking_step, same_data=self.retrieval
        )
        check_pair(self.retrieval, self.ranking)
        tower = self.retrieval.model.query_tower  # type: ignore[union-attr]
        self.query_features = list(tower.feature_names)
        ranking_schema = self.ranking.config.schema
        # Schema order is user side, then item side: the order `ranking_batch` lays out.
        self.ranker_features = [f.name for f in ranking_schema.sparse]
        self.ranker_query_features = [f.name for f in ranking_schema.user_sparse()]
        for checkpoint in (self.retrieval, self.ranking):
            if checkpoint.train.transforms is None:
                raise InvalidInput(
                    f"{checkpoint.path}: its data source has no feature transforms to serve "
                    "raw values with (only data read through a feature spec can be packaged)"
                )
        self.ranker_item_features = [f.name for f in ranking_schema.item_sparse()]
        self.query_fp32 = QueryTowerEntry(tower, self.query_features).eval()
        self.ranker_fp32 = RankerEntry(self.ranking.model, self.ranker_features).eval()
        self.evaluation = self._evaluation_split()

    def _evaluation_split(self) -> EvalSplit | None:
        """The validation users the gate measures; None when ungated.

        Raises:
            InvalidInput: the gate is on and there is nothing but training data to measure.
        """
        options = self.options
        if not options.quality_gate:
            if options.eval_data is not None:
                raise InvalidInput("--eval-data and --no-quality-gate exclude each other")
            return None
        if options.eval_data is not None:
            split = read_eval_data(options.eval_data, self.retrieval.train)
            if split.dropped:
                self.console.print(
                    f"[yellow]--eval-data: {split.dropped} rows dropped (unknown user or item "
                    "key, or a training interaction)[/yellow]"
                )
            return split
        split = held_out_split(self.retrieval.held_out, self.retrieval.path)
        if split is None:
            raise InvalidInput(
                f"{self.retrieval.path} was trained without held-out data (--eval-fraction 0): "
                "give --eval-data <table of user and item keys> to gate on, or "
                "--no-quality-gate to publish it UNGATED"
            )
        return split

    # -- stage 2 ----------------------------------------------------------------------------
    def quantize(self) -> None:
        options = self.options
        query_source = _golden_source(self.retrieval)
        users = np.unique(query_source.user_ids)
        golden_users = users[_sample(self.rng, users.size, options.golden_examples)]
        self.golden_count = int(golden_users.size)
        query_inputs = _query_inputs(query_source, golden_users, self.query_features)
        ranking_source = _golden_source(self.ranking)
        rows = _sample(self.rng, len(ranking_source), options.golden_examples)
        ranker_inputs = _ranker_inputs(ranking_source, rows)
        self.entries: list[_EntryPoint] = []
        for name, module, inputs, order in (
            (QUERY_TOWER, self.query_fp32, query_inputs, self.query_features),
            (RANKER, self.ranker_fp32, ranker_inputs, self.ranker_features),
        ):
            tables = [table for table, _, _ in embedding_tables(module)]
            overrides = {t: q for t, q in options.table_quant.items() if t in tables}
            quant = table_quant_types(tables, options.quant, overrides)
            quantized = quantize_for_inference(
                module, inputs, quant, options.devices, self.device_type
            )
            self.entries.append(_EntryPoint(name, module, quantized, inputs, tuple(order)))
        all_tables = {t for entry in self.entries for t, _, _ in embedding_tables(entry.fp32)}
        unknown = sorted(set(options.table_quant) - all_tables)
        if unknown:
            raise InvalidInput(
                f"--table-quant names unknown table(s) {', '.join(unknown)}; tables are "
                + ", ".join(sorted(all_tables))
            )

    # -- stage 3 ----------------------------------------------------------------------------
    def export(self, staging: Path) -> None:
        formats = {
            "torchscript": [ExportFormat.TORCHSCRIPT],
            "aoti": [ExportFormat.AOTI],
            "both": [ExportFormat.TORCHSCRIPT, ExportFormat.AOTI],
        }[self.options.export_format]
        self.exported: dict[str, dict[ExportFormat, export.ExportResult]] = {}
        self.loaded: dict[str, Callable[..., torch.Tensor]] = {}
        for entry in self.entries:
            results = {}
            for fmt in formats:
                path = staging / entry_point_file(entry.name, fmt)
                results[fmt] = _EXPORTERS[fmt](entry.quantized.module, entry.golden_inputs, path)
            self.exported[entry.name] = results
            # Verify and record golden outputs with the first format written (the default one).
            self.loaded[entry.name] = load_entry_point(results[formats[0]].path, formats[0])

    # -- stage 4 ----------------------------------------------------------------------------
    def index(self, staging: Path) -> None:
        retrieval = self.retrieval
        candidate = retrieval.model.candidate_tower  # type: ignore[union-attr]
        items = retrieval.train.items
        self.item_embeddings = (
            tower_embeddings(candidate, items, candidate.feature_names).numpy().astype(np.float32)
        )
        # Validation users' queries tune the index too; ungated, sampled item vectors do.
        self.eval_users = (
            self.evaluation.sample(self.options.max_eval_users, self.rng)
            if self.evaluation is not None
            else np.zeros(0, dtype=np.int64)
        )
        self.packaged_queries = (
            _batched(
                self.loaded[QUERY_TOWER],
                lambda users: _query_inputs(retrieval.train, users, self.query_features),
                self.eval_users,
            )
            if self.eval_users.size
            else None
        )
        self.built = build_index(
            self.item_embeddings,
            np.arange(items.num_rows, dtype=np.int64),
            kind=self.options.index,
            params=index_params(self.options.index_params),
            min_recall=self.options.thresholds.min_index_recall,
            queries=self.packaged_queries,
            seed=self.options.seed,
        )
        for rejected in self.built.fallbacks:
            self.console.print(f"[yellow]index: {rejected}[/yellow]")
        write_index(self.built.index, staging / INDEX_FILE)

    # -- stage 5 ----------------------------------------------------------------------------
    def verify(self, staging: Path) -> QualityResult:
        golden_records = {}
        self.golden_checks: dict[str, float] = {}
        for entry in self.entries:
            with torch.no_grad():
                packaged = self.loaded[entry.name](*entry.golden_inputs)
                reference = entry.fp32(*entry.golden_inputs)
                quantized_eager = entry.quantized.module(*entry.golden_inputs)
            self.golden_checks[f"{entry.name} export vs eager quantized"] = float(
                (packaged - quantized_eager).abs().max()
            )
            if entry.name == QUERY_TOWER:
                cosine = torch.nn.functional.cosine_similarity(packaged, reference, dim=1)
                self.golden_checks[f"{entry.name} min cosine vs fp32"] = float(cosine.min())
            else:
                self.golden_checks[f"{entry.name} max logit diff vs fp32"] = float(
                    (packaged - reference).abs().max()
                )
            golden_records[entry.name] = golden.GoldenRecord(entry.golden_inputs, packaged)
        # Raw queries as a client sends them, for hosts that encode raw values themselves.
        raw = record_raw_queries(
            self.ranking.train.transforms,
            self.loaded[QUERY_TOWER],
            self.query_features,
            [f.name for f in self.ranking.config.schema.user_dense()],
        )
        golden.write_golden(staging / GOLDEN_FILE, golden_records, GOLDEN_ATOL, GOLDEN_RTOL, raw)

        checks = tuple(
            Check(f"golden: {name}", self.golden_checks[name], threshold, comparison)
            for name, threshold, comparison in (
                ("query_tower min cosine vs fp32", MIN_QUERY_COSINE, ">="),
                ("ranker max logit diff vs fp32", self.options.thresholds.max_logit_diff, "<="),
                ("query_tower export vs eager quantized", MAX_EXPORT_DIFF, "<="),
                ("ranker export vs eager quantized", MAX_EXPORT_DIFF, "<="),
            )
        )
        if self.evaluation is None:  # --no-quality-gate: what needs no validation data
            index_recall = self.built.recall_at_100
            minimum = self.options.thresholds.min_index_recall
            index_check = Check("index recall@100 vs exact", index_recall, minimum, ">=")
            return QualityResult(
                {"index/recall@100_vs_exact": index_recall}, (*checks, index_check), 0, 0
            )
        quality = self._quality_gate()
        return dataclasses.replace(quality, checks=quality.checks + checks)

    def _quality_gate(self) -> QualityResult:
        """Per-stage and end-to-end quality on the sampled validation users."""
        assert self.evaluation is not None and self.packaged_queries is not None
        users = self.eval_users
        targets = self.evaluation.targets(users)
        train = self.retrieval.train
        fp32_queries = _batched(
            self.query_fp32, lambda block: _query_inputs(train, block, self.query_features), users
        )
        index_search = functools.partial(search, self.built.index, threads=None)
        seen = positives_by_user(train.user_ids, train.item_ids, users)
        recall_fp32 = ranked_recall(
            fp32_queries, exact_search(self.item_embeddings), users, targets, seen
        )
        recall_packaged = ranked_recall(self.packaged_queries, index_search, users, targets, seen)
        end_to_end = measure_end_to_end(
            users,
            self.packaged_queries,
            lambda queries, k, exclude: index_search(queries, k, exclude)[1],
            self._packaged_scores,
            train,
            seen,
            targets,
            retrieve_k_sweep(train.num_items),
        )
        ranker_auc, examples = self._ranker_auc(users)
        return quality_gate(
            recall_fp32,
            recall_packaged,
            ranker_auc,
            self.built.recall_at_100,
            end_to_end,
            self.options.thresholds,
            examples,
        )

    def _packaged_scores(self, user_ids: np.ndarray, item_ids: np.ndarray) -> np.ndarray:
        """Packaged ranker logits of (user, item) pairs, features from the bundle's tables."""
        data, ranker = self.ranking.train, self.loaded[RANKER]
        parts = [np.zeros(0, dtype=np.float32)]
        with torch.no_grad():
            for start in range(0, user_ids.size, SCORE_BATCH):
                stop = start + SCORE_BATCH
                batch = pair_batch(data, user_ids[start:stop], item_ids[start:stop])
                sparse = batch.sparse_features
                parts.append(
                    ranker(batch.dense_features, sparse.values(), sparse.lengths()).numpy()
                )
        return np.concatenate(parts)

    def _ranker_auc(self, users: np.ndarray) -> tuple[tuple[float, float] | None, int]:
        """((fp32, packaged) AUC, pairs) on the ranker's held-out labelled pairs of `users`;
        (None, 0) when gating on --eval-data (pairs without labels) or without both labels."""
        held_out = self.ranking.held_out
        rows = np.flatnonzero(np.isin(held_out.user_ids, users))
        if self.options.eval_data is not None or np.unique(held_out.labels[rows]).size < 2:
            return None, 0
        fp32 = _batched(self.ranker_fp32, lambda r: _ranker_inputs(held_out, r), rows)
        packaged = _batched(self.loaded[RANKER], lambda r: _ranker_inputs(held_out, r), rows)
        labels = held_out.labels[rows]
        return (auc(fp32, labels), auc(packaged, labels)), int(rows.size)

    # -- stage 6 ----------------------------------------------------------------------------
    def fill_manifest(self, manifest: manifest_pb2.BundleManifest, quality: QualityResult) -> None:
        """Completes the manifest the writer started (name, release id, files, libraries)."""
        retrieval, ranking = self.retrieval, self.ranking
        for role, checkpoint in (
            (manifest_pb2.MODEL_ROLE_RETRIEVAL, retrieval),
            (manifest_pb2.MODEL_ROLE_RANKING, ranking),
        ):
            source = manifest.sources.add(
                role=role,
                path=str(checkpoint.path.resolve()),
                model_type=checkpoint.config.kind,
                step=checkpoint.step,
                world_size=checkpoint.world_size,
                config_sha256=checkpoint.config_sha256,
            )
            source.metrics.update(checkpoint.metrics)
        self._fill_schema(manifest.schema)
        plan = manifest.sharding
        plan.device_count = self.options.devices
        plan.device_type = self.device_type
        device_bytes = [0] * self.options.devices
        for entry in self.entries:
            role = _ROLES[entry.name]
            sizes = {stats.table: stats for stats in entry.quantized.tables}
            for stats in entry.quantized.tables:
                manifest.quantization.add(
                    table=stats.table,
                    model=role,
                    dtype=_QUANT_DTYPES[stats.quant],
                    fp32_bytes=stats.fp32_bytes,
                    packaged_bytes=stats.packaged_bytes,
                )
            for placement in entry.quantized.placements:
                plan.placements.add(
                    table=placement.table,
                    model=role,
                    sharding_type=placement.sharding_type,
                    ranks=list(placement.ranks),
                )
                share = sizes[placement.table].packaged_bytes // max(len(placement.ranks), 1)
                for rank in placement.ranks:
                    device_bytes[rank] += share
            for fmt, result in self.exported[entry.name].items():
                self._fill_entry_point(manifest.entry_points.add(), entry, fmt, result)
        manifest.index.CopyFrom(self.built.spec)
        manifest.index.file = INDEX_FILE
        items = manifest.item_features
        items.file = ITEM_FEATURES_FILE
        if ranking.config.schema.user_id_feature is not None:
            users = manifest.user_features
            users.file = USER_FEATURES_FILE
            users.format = "npz"
            users.num_users = ranking.train.num_users
            users.sparse_features.extend(self.user_sparse)
            users.dense_features.extend(self.user_dense)
        end_to_end = quality.end_to_end
        manifest.serving.retrieve_k = (
            end_to_end.retrieve_k
            if end_to_end is not None
            else min(DEFAULT_RETRIEVE_K, retrieval.train.num_items)
        )
        manifest.transforms.file = TRANSFORMS_FILE
        manifest.transforms.features.extend(ranking.train.transforms.features)
        items.format = "npz"
        items.num_items = retrieval.train.num_items
        items.sparse_features.extend(self.ranker_item_features)
        items.dense_features.extend(f.name for f in ranking.config.schema.item_dense())
        manifest.golden.file = GOLDEN_FILE
        manifest.golden.examples = self.golden_count
        manifest.golden.atol = GOLDEN_ATOL
        manifest.golden.rtol = GOLDEN_RTOL
        report = manifest.quality
        report.passed = quality.passed
        report.metrics.update(quality.metrics)
        report.eval_queries = quality.eval_queries
        report.eval_examples = quality.eval_examples
        report.ungated = self.evaluation is None
        if self.evaluation is not None:
            report.eval_source = self.evaluation.source
        if end_to_end is not None:
            _fill_end_to_end(report.end_to_end, end_to_end)
        for check in quality.checks:
            report.checks.add(
                name=check.name,
                value=check.value,
                threshold=check.threshold,
                comparison=check.comparison,
                passed=check.passed,
            )
        manifest.resources.host_bytes = sum(entry.size_bytes for entry in manifest.files)
        manifest.resources.device_bytes.extend(device_bytes)

    def write_tables(self, staging: Path) -> None:
        """The item table, the user table and the transforms (bundle/FORMAT.md).

        The user table stores every query-side feature either model reads but the user key
        (whose id is the row), encoded, so a request may send only the user key.
        """
        ranking = self.ranking
        write_item_features(
            staging / ITEM_FEATURES_FILE,
            ranking.train.items,
            self.ranker_item_features,
            [f.name for f in ranking.config.schema.item_dense()],
        )
        transforms = ranking.train.transforms
        schema = ranking.config.schema
        self.user_sparse = [
            name
            for name in dict.fromkeys(self.query_features + self.ranker_query_features)
            if name != schema.user_id_feature
        ]
        self.user_dense = [f.name for f in schema.user_dense()]
        if schema.user_id_feature is not None:
            write_item_features(
                staging / USER_FEATURES_FILE,
                ranking.train.users,
                self.user_sparse,
                self.user_dense,
            )
        self.transform_files = write_transforms(staging, transforms)

    def _fill_schema(self, schema: manifest_pb2.FeatureSchema) -> None:
        retrieval, ranking = self.retrieval.config, self.ranking.config
        for role, config in (
            (manifest_pb2.MODEL_ROLE_RETRIEVAL, retrieval),
            (manifest_pb2.MODEL_ROLE_RANKING, ranking),
        ):
            pooling = {"sum": manifest_pb2.POOLING_TYPE_SUM, "mean": manifest_pb2.POOLING_TYPE_MEAN}
            for table in config.tables:
                schema.tables.add(
                    name=table.name,
                    model=role,
                    num_embeddings=table.num_embeddings,
                    embedding_dim=table.embedding_dim,
                    pooling=pooling[table.pooling],
                    feature_names=[table.feature],
                )
        used_by: dict[str, list[int]] = {}
        specs = {}
        # The query tower reads the user side only: its item tables are the candidate tower's.
        for role, features in (
            (manifest_pb2.MODEL_ROLE_RETRIEVAL, retrieval.schema.user_sparse()),
            (manifest_pb2.MODEL_ROLE_RANKING, ranking.schema.sparse),
        ):
            for feature in features:
                used_by.setdefault(feature.name, []).append(role)
                specs.setdefault(feature.name, feature)
        for name, feature in specs.items():
            schema.sparse_features.add(
                name=name,
                side=manifest_pb2.FEATURE_SIDE_QUERY
                if feature.side == "user"
                else manifest_pb2.FEATURE_SIDE_ITEM,
                cardinality=feature.cardinality,
                multi_valued=feature.multi_valued,
                used_by=used_by[name],
                description=feature.description,
            )
        schema.dense_features.extend(f.name for f in ranking.schema.user_dense())
        schema.dense_features.extend(f.name for f in ranking.schema.item_dense())
        schema.query_dense_count = len(ranking.schema.user_dense())
        schema.item_id_feature = retrieval.schema.item_id_feature or ""
        schema.user_id_feature = retrieval.schema.user_id_feature or ""
        schema.num_items = self.retrieval.train.num_items
        schema.retrieval_dim = int(self.item_embeddings.shape[1])

    def _fill_entry_point(
        self,
        message: manifest_pb2.EntryPoint,
        entry: _EntryPoint,
        fmt: ExportFormat,
        result: export.ExportResult,
    ) -> None:
        message.name = entry.name
        message.format = MANIFEST_FORMATS[fmt]
        message.file = result.path.name
        message.sparse_feature_order.extend(entry.feature_order)
        message.required_libraries.extend(REQUIRED_LIBRARIES[fmt])
        layout = "feature-major: the B bags of each feature in sparse_feature_order"
        inputs = [
            ("values", "int64", "[N]", f"every id of every bag, {layout}"),
            ("lengths", "int32", "[F * B]", f"bag lengths, {layout}"),
        ]
        if entry.name == RANKER:
            inputs.insert(
                0,
                ("dense", "float32", "[B, Fd]", "schema.dense_features: query side, then item"),
            )
            output = ("logits", "float32", "[B]", "ranker logits; sigmoid gives the probability")
        else:
            output = ("embeddings", "float32", "[B, D]", "query embeddings for the index")
        for name, dtype, shape, description in inputs:
            message.inputs.add(name=name, dtype=dtype, shape=shape, description=description)
        name, dtype, shape, description = output
        message.outputs.add(name=name, dtype=dtype, shape=shape, description=description)

    def run(self) -> PackageReport:
        options = self.options
        timer = self.timer
        with timer.stage("load", "checkpoints -> unsharded fp32 models, held-out splits"):
            self.load()
        with timer.stage(
            "quantize", f"{options.quant} tables, table-wise over {options.devices} device(s)"
        ):
            self.quantize()
        with BundleWriter(options.repo, options.name) as staged:
            with timer.stage("export", f"{options.export_format} entry points"):
                self.export(staged.path)
            with timer.stage("index", f"FAISS index ({options.index}) of every item"):
                self.index(staged.path)
            with timer.stage("verify", "golden outputs and the quality gate"):
                quality = self.verify(staged.path)
            if not quality.passed:
                raise QualityGateFailed(
                    "quality gate failed, nothing published: " + "; ".join(quality.failures())
                )
            with timer.stage("publish", f"{options.repo}/{options.name}/<next version>"):
                self.write_tables(staged.path)
                captured: list[manifest_pb2.BundleManifest] = []

                def fill(manifest: manifest_pb2.BundleManifest) -> None:
                    self.fill_manifest(manifest, quality)
                    captured.append(manifest)

                ref = staged.publish(fill, sign=_signer(options.sign_key))
        manifest = captured[0]
        manifest.version = ref.version
        return PackageReport(ref, manifest, quality, dict(timer.seconds))


def _fill_end_to_end(message: manifest_pb2.EndToEndQuality, measured: EndToEnd) -> None:
    """The manifest's record of Recommend against retrieval alone (and the retrieve_k sweep)."""
    (retrieval_recall, retrieval_ndcg), (recall, ndcg) = measured.retrieval(), measured.recommend()
    message.top_n = measured.top_n
    message.users = measured.users
    message.retrieval_recall, message.retrieval_ndcg = retrieval_recall, retrieval_ndcg
    message.recommend_recall, message.recommend_ndcg = recall, ndcg
    message.recall_ratio = recall / retrieval_recall if retrieval_recall > 0 else 0.0
    message.ndcg_ratio = ndcg / retrieval_ndcg if retrieval_ndcg > 0 else 0.0
    for k in measured.sweep:
        point_recall, point_ndcg = measured.recommend(k)
        message.sweep.add(retrieve_k=k, recall=point_recall, ndcg=point_ndcg)


def _signer(key: Path | None):
    """The publish-time signing hook for `--sign-key` (None: publish unsigned)."""
    if key is None:
        return None
    from recship.bundle.signature import sign_version

    return lambda folder: sign_version(folder, key)


def package(options: PackageOptions, console: Console | None = None) -> PackageReport:
    """Builds, verifies and publishes one bundle version.

    Args:
        options: what to build (see `PackageOptions`).
        console: where progress goes (stderr by default).

    Returns:
        The published version with its manifest, quality and timings.

    Raises:
        NotFound: a checkpoint folder or checkpoint is missing.
        InvalidInput: the inputs do not fit together or an option is invalid.
        QualityGateFailed: the packaged pipeline missed a threshold (nothing is published).

    Example::

        report = package(PackageOptions(Path("runs/tt"), Path("runs/dlrm"), Path("repo"), "movies"))
        print(report.ref.path)  # repo/movies/1
    """
    if options.sign_key is not None:  # an unusable key fails now, not after the build
        from recship.bundle.signature import check_private_key

        check_private_key(options.sign_key)
    return _Packager(options, console or Console(stderr=True)).run()
