"""What `recship package` is asked to build: one frozen dataclass, CLI flags map onto it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

# The choices of `recship package`, stated once (the CLI, the stages and the tests read them here;
# this module imports nothing heavy, so `recship package --help` stays fast).
QuantType = Literal["int8", "int4", "fp16", "fp32"]
QUANT_TYPES: tuple[QuantType, ...] = ("int8", "int4", "fp16", "fp32")
ExportChoice = Literal["torchscript", "aoti", "both"]
EXPORT_CHOICES: tuple[ExportChoice, ...] = ("torchscript", "aoti", "both")
# Index families (recship.packager.index): ivfpq = IVF-PQ with exact refinement, ivfpqfs = 4-bit
# fast-scan IVF-PQ with exact refinement; auto picks by corpus size.
IndexKind = Literal["flat", "ivfflat", "ivfpq", "ivfpqfs", "hnsw", "auto"]
INDEX_KINDS: tuple[IndexKind, ...] = ("flat", "ivfflat", "ivfpq", "ivfpqfs", "hnsw", "auto")
DEVICE_TYPES = ("cpu", "cuda")
#: Validation users the quality gate measures by default; more are sampled down to this many.
DEFAULT_MAX_EVAL_USERS = 10_000


@dataclass(frozen=True)
class QualityThresholds:
    """The packager's quality gate; a bundle that misses any of them is not published.

    Attributes:
        max_recall_loss: largest relative loss of recall@10 and recall@100 of the packaged
            pipeline (quantized query tower -> ANN index) against the fp32 exact pipeline.
        max_auc_loss: largest absolute AUC loss of the packaged ranker against fp32.
        min_index_recall: recall@100 the ANN index must reach against exact search.
        max_logit_diff: largest ranker logit difference of the exported entry point against
            the fp32 model on the golden inputs (int4 tables that feed a dot product need more).
        max_recommend_loss: largest relative recall@10 / NDCG@10 loss of the packaged
            Recommend pipeline (at the bundle's default retrieve_k) against packaged retrieval
            alone; 0: ranking must not make the top N worse.
    """

    max_recall_loss: float = 0.02
    max_auc_loss: float = 0.005
    min_index_recall: float = 0.95
    max_logit_diff: float = 0.25
    max_recommend_loss: float = 0.0


@dataclass(frozen=True)
class PackageOptions:
    """One `recship package` run.

    Attributes:
        retrieval: two-tower training output directory (model_config.json + checkpoints/).
        ranking: DLRM training output directory.
        repo: bundle repository root; the bundle is published as `<repo>/<name>/<next version>`.
        name: bundle name.
        quant: default quantization of every embedding table.
        table_quant: per-table overrides, table name -> type.
        devices: W, the inference devices one replica spans (table-wise sharding).
        device_type: "cpu" or "cuda"; None picks cuda when a GPU is visible.
        export_format: entry-point files to write.
        index: FAISS index family; "auto" picks by corpus size.
        index_params: explicit index parameters (e.g. {"nlist": 256, "m": 16}).
        thresholds: the quality gate.
        golden_examples: recorded examples per entry point for the load-time self-test.
        retrieval_step / ranking_step: checkpoint step to package; None = the latest.
        seed: seeds sampling of golden inputs and index training.
        sign_key: PEM EC private key; the version is published with a MANIFEST.sig made with
            it (`recship.bundle.signature`). None publishes it unsigned.
        eval_data: a table of relevant (user key, item key) pairs to gate on instead of the
            checkpoint's held-out split (`recship.packager.evaluation.read_eval_data`).
        max_eval_users: validation users the gate measures (a seeded sample beyond it).
        quality_gate: False publishes without measuring quality, marked UNGATED (golden
            outputs and the index's recall against exact search are still checked).
    """

    retrieval: Path
    ranking: Path
    repo: Path
    name: str
    quant: QuantType = "int8"
    table_quant: dict[str, QuantType] = field(default_factory=dict)
    devices: int = 1
    device_type: str | None = None
    export_format: ExportChoice = "torchscript"
    index: IndexKind = "auto"
    index_params: dict[str, int] = field(default_factory=dict)
    thresholds: QualityThresholds = field(default_factory=QualityThresholds)
    golden_examples: int = 16
    retrieval_step: int | None = None
    ranking_step: int | None = None
    seed: int = 0
    sign_key: Path | None = None
    eval_data: Path | None = None
    max_eval_users: int = DEFAULT_MAX_EVAL_USERS
    quality_gate: bool = True
