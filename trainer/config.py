"""Training and model configuration: frozen dataclasses and the `model_config.json` file.

`TrainConfig` is what one training run was asked to do (CLI flags map onto its fields one to
one); `ModelConfig` is everything needed to rebuild the unsharded model from a checkpoint
(schema, tables, feature roles, dims, layers, loss). `model_config.json` in the output folder
holds both plus the data source and the evaluation split, so the packager can rebuild the model
without the training data.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from recship.base.errors import InvalidInput, NotFound
from recship.base.files import write_bytes_atomic
from recship.trainer.data.schema import DatasetSchema, SparseFeatureSpec

ModelKind = Literal["two-tower", "dlrm"]
LossKind = Literal["softmax", "bce"]
Sharding = Literal["auto", "table_wise", "row_wise", "column_wise", "data_parallel"]
Pooling = Literal["sum", "mean"]

MODEL_KINDS: tuple[str, ...] = ("two-tower", "dlrm")
LOSS_KINDS: tuple[str, ...] = ("softmax", "bce")
SHARDINGS: tuple[str, ...] = ("auto", "table_wise", "row_wise", "column_wise", "data_parallel")

MODEL_CONFIG_FILE = "model_config.json"
# Two-tower softmax temperature: logits are divided by it in training (a default, stated once).
DEFAULT_TEMPERATURE = 0.05
METRICS_FILE = "metrics.json"
# Bumped when the meaning of a field in model_config.json changes.
MODEL_CONFIG_FORMAT = 1


@dataclass(frozen=True)
class TableSpec:
    """One embedding table: a single sparse feature looked up in its own table.

    Attributes:
        name: table name, `t_<feature>`; the key prefix of its weight in the state dict.
        feature: the sparse feature (schema name) the table embeds.
        num_embeddings: rows, the feature's cardinality (valid ids are 0 <= id < rows).
        embedding_dim: columns.
        side: "user" or "item": which tower (two-tower) or which half of a ranking row.
        pooling: how a multi-valued bag is pooled ("mean" for multi-valued features so a bag's
            size does not scale its vector, "sum" otherwise; identical for one id).
    """

    name: str
    feature: str
    num_embeddings: int
    embedding_dim: int
    side: str
    pooling: Pooling = "sum"

    def to_dict(self) -> dict[str, Any]:
        """Returns the JSON-able form."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TableSpec:
        """Rebuilds a `TableSpec` from `to_dict()` output."""
        return cls(**data)


def table_name(feature: str) -> str:
    """Returns the name of the table that embeds `feature`."""
    return f"t_{feature}"


def tables_for(
    features: tuple[SparseFeatureSpec, ...], embedding_dim: int
) -> tuple[TableSpec, ...]:
    """Returns one table per sparse feature, sized by the feature's cardinality."""
    return tuple(
        TableSpec(
            name=table_name(spec.name),
            feature=spec.name,
            num_embeddings=spec.cardinality,
            embedding_dim=embedding_dim,
            side=spec.side,
            pooling="mean" if spec.multi_valued else "sum",
        )
        for spec in features
    )


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the unsharded model (no data, no process group).

    Attributes:
        kind: "two-tower" or "dlrm".
        schema: the data set's feature schema.
        tables: the embedding tables (user side first, then item side, schema order).
        embedding_dim: columns of every table.
        tower_layers: two-tower MLP sizes after the pooled embeddings; the last one is the
            output dimension D shared by both towers.
        normalize: two-tower outputs are L2-normalised (scores are cosines).
        loss: two-tower training loss: "softmax" (in-batch sampled softmax with logQ
            correction) or "bce" (binary cross-entropy, the batch's other items as negatives).
        temperature: two-tower logits are divided by it in training (not at serving: the
            ranking does not change).
        dense_arch_layers: DLRM bottom MLP over the dense features; the last size must equal
            `embedding_dim`.
        over_arch_layers: DLRM top MLP; the last size is 1 (the logit).
    """

    kind: ModelKind
    schema: DatasetSchema
    tables: tuple[TableSpec, ...]
    embedding_dim: int
    tower_layers: tuple[int, ...] = ()
    normalize: bool = True
    loss: LossKind = "softmax"
    temperature: float = DEFAULT_TEMPERATURE
    dense_arch_layers: tuple[int, ...] = ()
    over_arch_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in MODEL_KINDS:
            raise InvalidInput(f"model kind {self.kind!r} is not one of {', '.join(MODEL_KINDS)}")
        if self.embedding_dim <= 0:
            raise InvalidInput(f"embedding_dim must be positive, got {self.embedding_dim}")
        if self.kind == "two-tower":
            if not self.tower_layers or min(self.tower_layers) <= 0:
                raise InvalidInput(f"tower_layers must be positive sizes, got {self.tower_layers}")
            if self.loss not in LOSS_KINDS:
                raise InvalidInput(f"loss {self.loss!r} is not one of {', '.join(LOSS_KINDS)}")
            if self.temperature <= 0:
                raise InvalidInput(f"temperature must be positive, got {self.temperature}")
            if self.schema.user_id_feature is None or self.schema.item_id_feature is None:
                raise InvalidInput(
                    f"data set {self.schema.name!r} has no user/item structure: "
                    "train a two-tower model on an interaction data set (synthetic, MovieLens)"
                )
        else:
            if not self.schema.dense:
                raise InvalidInput(f"DLRM needs dense features; {self.schema.name!r} has none")
            if not self.dense_arch_layers or self.dense_arch_layers[-1] != self.embedding_dim:
                raise InvalidInput(
                    f"dense_arch_layers {self.dense_arch_layers} must end in the embedding "
                    f"dim {self.embedding_dim} (DLRM's interaction needs equal widths)"
                )
            if not self.over_arch_layers or self.over_arch_layers[-1] != 1:
                raise InvalidInput(f"over_arch_layers {self.over_arch_layers} must end in 1")

    @property
    def output_dim(self) -> int:
        """Two-tower embedding dimension D (the last tower layer)."""
        return self.tower_layers[-1]

    def side_tables(self, side: str) -> tuple[TableSpec, ...]:
        """Returns the tables of one side ("user" or "item"), in schema order."""
        return tuple(table for table in self.tables if table.side == side)

    def to_dict(self) -> dict[str, Any]:
        """Returns the JSON-able form (the "model" section of model_config.json)."""
        return {
            "kind": self.kind,
            "schema": self.schema.to_dict(),
            "tables": [table.to_dict() for table in self.tables],
            "embedding_dim": self.embedding_dim,
            "tower_layers": list(self.tower_layers),
            "normalize": self.normalize,
            "loss": self.loss,
            "temperature": self.temperature,
            "dense_arch_layers": list(self.dense_arch_layers),
            "over_arch_layers": list(self.over_arch_layers),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Rebuilds a `ModelConfig` from `to_dict()` output."""
        return cls(
            kind=data["kind"],
            schema=DatasetSchema.from_dict(data["schema"]),
            tables=tuple(TableSpec.from_dict(table) for table in data["tables"]),
            embedding_dim=int(data["embedding_dim"]),
            tower_layers=tuple(int(size) for size in data["tower_layers"]),
            normalize=bool(data["normalize"]),
            loss=data["loss"],
            temperature=float(data["temperature"]),
            dense_arch_layers=tuple(int(size) for size in data["dense_arch_layers"]),
            over_arch_layers=tuple(int(size) for size in data["over_arch_layers"]),
        )


@dataclass(frozen=True)
class TrainConfig:
    """One training run. CLI flags map one to one onto these fields.

    Fields left `None` take the per-data-set default from `resolve_defaults`.

    Attributes:
        model: "two-tower" or "dlrm".
        data: the data source: "synthetic", "movielens-100k", or a path to a MovieLens-format
            directory or a Criteo TSV file.
        out: output folder: checkpoints/, model_config.json, metrics.json.
        nproc: local ranks to spawn (`recship train --nproc`); ignored under torchrun.
        epochs: passes over the training split.
        batch_size: examples per rank per step.
        embedding_dim: columns of every embedding table.
        seed: seeds the split, the shuffling and the initial weights (default 0).
        eval_fraction: share of each user's interactions held out for evaluation (0: none;
            default 0.1).
        resume: continue from the latest complete checkpoint in `out`.
        sharding: "auto" lets the planner choose; otherwise every table is sharded this way.
        checkpoint_every: steps between checkpoints (0: only at the end; default: at the end
            of every epoch).
        keep_checkpoints: keep only this many newest checkpoints (0: keep all).
        eval_every: steps between evaluations during training (0: only at the end).
        sparse_lr: learning rate of the fused row-wise Adagrad on the embedding tables.
        dense_lr: learning rate of Adam on the MLPs.
        weight_decay: Adam weight decay on the MLPs.
        loss, temperature, tower_layers: two-tower options (see `ModelConfig`).
        dense_arch_layers, over_arch_layers: DLRM options (see `ModelConfig`).
        max_steps: stop after this many steps in total (0: run all epochs); for smoke runs.
        data_options: source-specific size options (synthetic: num_users, num_items,
            interactions_per_user; criteo: table_size).
        pipeline: use `TrainPipelineSparseDist` (overlaps input distribution and compute).
    """

    model: ModelKind
    data: str
    out: Path
    nproc: int = 1
    epochs: int | None = None
    batch_size: int | None = None
    embedding_dim: int | None = None
    seed: int | None = None
    eval_fraction: float | None = None
    resume: bool = False
    sharding: Sharding = "auto"
    checkpoint_every: int | None = None
    keep_checkpoints: int = 3
    eval_every: int = 0
    sparse_lr: float | None = None
    dense_lr: float | None = None
    weight_decay: float | None = None
    loss: LossKind | None = None
    temperature: float | None = None
    tower_layers: tuple[int, ...] | None = None
    dense_arch_layers: tuple[int, ...] | None = None
    over_arch_layers: tuple[int, ...] | None = None
    max_steps: int = 0
    data_options: dict[str, int] = field(default_factory=dict)
    pipeline: bool = True

    def __post_init__(self) -> None:
        if self.model not in MODEL_KINDS:
            raise InvalidInput(f"model {self.model!r} is not one of {', '.join(MODEL_KINDS)}")
        if self.sharding not in SHARDINGS:
            raise InvalidInput(f"--sharding {self.sharding!r} is not one of {', '.join(SHARDINGS)}")
        if self.nproc < 1:
            raise InvalidInput(f"--nproc must be at least 1, got {self.nproc}")
        if self.eval_fraction is not None and not 0.0 <= self.eval_fraction < 1.0:
            raise InvalidInput(f"--eval-fraction must be in [0, 1), got {self.eval_fraction}")
        for name in ("epochs", "batch_size", "embedding_dim"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise InvalidInput(f"--{name.replace('_', '-')} must be positive, got {value}")
        for name in ("checkpoint_every", "keep_checkpoints", "eval_every", "max_steps"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise InvalidInput(f"--{name.replace('_', '-')} must be >= 0, got {value}")

    def to_dict(self) -> dict[str, Any]:
        """Returns the JSON-able form (the "training" section of model_config.json)."""
        data = dataclasses.asdict(self)
        data["out"] = str(self.out)
        for name in ("tower_layers", "dense_arch_layers", "over_arch_layers"):
            if data[name] is not None:
                data[name] = list(data[name])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Rebuilds a `TrainConfig` from `to_dict()` output."""
        values = dict(data)
        values["out"] = Path(values["out"])
        for name in ("tower_layers", "dense_arch_layers", "over_arch_layers"):
            if values.get(name) is not None:
                values[name] = tuple(values[name])
        return cls(**values)


# Per-model defaults (keys: (model, data set name); "*" matches any data set), tuned on ML-100K
# with 2 ranks on this machine. Two-tower there: recall@10 0.257, NDCG@10 0.297 in ~45 s.
_COMMON_DEFAULTS: dict[str, Any] = {"seed": 0, "eval_fraction": 0.1}
_DEFAULTS: dict[tuple[str, str], dict[str, Any]] = {
    ("two-tower", "*"): {
        "epochs": 10,
        "batch_size": 256,
        "embedding_dim": 64,
        "sparse_lr": 0.05,
        "dense_lr": 1e-3,
        "weight_decay": 0.0,
        "loss": "softmax",
        "temperature": DEFAULT_TEMPERATURE,
        "tower_layers": (128, 64),
    },
    # ML-100K, 2 ranks: AUC by epoch peaks at 5 with these (0.784); a lower table learning rate
    # (0.01-0.05) or wider tables (32, 64) peak lower (0.776-0.781) and overfit sooner.
    ("dlrm", "*"): {
        "epochs": 5,
        "batch_size": 256,
        "embedding_dim": 16,
        "sparse_lr": 0.1,
        "dense_lr": 1e-3,
        "weight_decay": 0.0,
        "dense_arch_layers": (32, 16),
        "over_arch_layers": (64, 32, 1),
    },
}


def resolve_defaults(config: TrainConfig, dataset_name: str) -> TrainConfig:
    """Fills every `None` field of `config` with the default for its model and data set.

    Args:
        config: the requested run.
        dataset_name: `DatasetSchema.name` of the opened source ("synthetic", "movielens-100k").

    Returns:
        A copy with no `None` fields; the DLRM dense arch is ended in the embedding dim.
    """
    defaults = dict(_COMMON_DEFAULTS)
    defaults.update(_DEFAULTS[(config.model, "*")])
    defaults.update(_DEFAULTS.get((config.model, dataset_name), {}))
    filled = {
        name: (defaults[name] if getattr(config, name) is None else getattr(config, name))
        for name in defaults
    }
    if config.model == "dlrm" and config.dense_arch_layers is None:
        # The bottom MLP must end in the embedding dim, whichever one was chosen.
        filled["dense_arch_layers"] = (
            *tuple(filled["dense_arch_layers"])[:-1],
            filled["embedding_dim"],
        )
    return dataclasses.replace(config, **filled)


def model_config_for(config: TrainConfig, schema: DatasetSchema) -> ModelConfig:
    """Returns the model a resolved `TrainConfig` trains on `schema`."""
    if config.embedding_dim is None:
        raise InvalidInput("embedding_dim is unresolved: call resolve_defaults first")
    if config.model == "two-tower":
        features = schema.user_sparse() + schema.item_sparse()
        return ModelConfig(
            kind="two-tower",
            schema=schema,
            tables=tables_for(features, config.embedding_dim),
            embedding_dim=config.embedding_dim,
            tower_layers=tuple(config.tower_layers or ()),
            normalize=True,
            loss=config.loss or "softmax",
            temperature=float(config.temperature or DEFAULT_TEMPERATURE),
        )
    return ModelConfig(
        kind="dlrm",
        schema=schema,
        tables=tables_for(schema.sparse, config.embedding_dim),
        embedding_dim=config.embedding_dim,
        dense_arch_layers=tuple(config.dense_arch_layers or ()),
        over_arch_layers=tuple(config.over_arch_layers or ()),
    )


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Writes `payload` as indented JSON to a temp file beside `path`, then renames it in place."""
    text = json.dumps(payload, indent=2, sort_keys=True) + "\n"
    write_bytes_atomic(path, text.encode("utf-8"))


def write_model_config(
    out: Path, model: ModelConfig, train: TrainConfig, split: dict[str, Any]
) -> Path:
    """Writes `<out>/model_config.json`.

    Args:
        out: the training output folder.
        model: the model to rebuild.
        train: the resolved run (data source, options, hyper-parameters).
        split: the evaluation split ({"seed", "eval_fraction", "num_train", "num_eval"}).

    Returns:
        The path written.
    """
    path = out / MODEL_CONFIG_FILE
    write_json_atomic(
        path,
        {
            "format_version": MODEL_CONFIG_FORMAT,
            "model": model.to_dict(),
            "data": {
                "source": train.data,
                "options": dict(train.data_options),
                "split": split,
            },
            "training": train.to_dict(),
        },
    )
    return path


def read_model_config(out: Path) -> tuple[ModelConfig, dict[str, Any]]:
    """Reads `<out>/model_config.json`.

    Returns:
        The model config and the whole parsed file (data source, split, training section).

    Raises:
        NotFound: no model_config.json in `out`.
        InvalidInput: the file is not valid JSON or misses a field.
    """
    path = out / MODEL_CONFIG_FILE
    if not path.is_file():
        raise NotFound(f"{path}: no model_config.json (is {out} a `recship train` output folder?)")
    try:
        payload = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise InvalidInput(f"{path}:{error.lineno}: not valid JSON: {error.msg}") from error
    if payload.get("format_version") != MODEL_CONFIG_FORMAT:
        raise InvalidInput(
            f"{path}: format_version {payload.get('format_version')!r} is not {MODEL_CONFIG_FORMAT}"
        )
    try:
        return ModelConfig.from_dict(payload["model"]), payload
    except (KeyError, TypeError, ValueError) as error:
        raise InvalidInput(f"{path}: malformed model section: {error!r}") from error


# Fields that define the model and its data: a resumed run must keep them.
_IDENTITY_FIELDS: tuple[str, ...] = (
    "model",
    "data",
    "seed",
    "eval_fraction",
    "embedding_dim",
    "loss",
    "temperature",
    "tower_layers",
    "dense_arch_layers",
    "over_arch_layers",
)
# Fields a resumed run may change; None (not given) keeps the saved value.
_SCHEDULE_FIELDS: tuple[str, ...] = (
    "epochs",
    "batch_size",
    "sparse_lr",
    "dense_lr",
    "weight_decay",
)


def merge_for_resume(requested: TrainConfig, saved: TrainConfig) -> TrainConfig:
    """Returns the config of a resumed run: the saved one with this invocation's schedule.

    The model, data, split and architecture come from the saved run; giving a different value
    for one of them is an error. Epochs, batch size and learning rates may change (None keeps
    the saved value); launch options (out, nproc, sharding, checkpointing, evaluation
    interval, max_steps, pipeline) are this invocation's.

    Raises:
        InvalidInput: a requested identity field differs from the saved run.
    """
    for name in _IDENTITY_FIELDS:
        wanted, have = getattr(requested, name), getattr(saved, name)
        if wanted is not None and wanted != have:
            flag = "the model kind" if name == "model" else f"--{name.replace('_', '-')}"
            raise InvalidInput(
                f"{requested.out / MODEL_CONFIG_FILE}: {flag} is {have!r} in the run being "
                f"resumed, not {wanted!r}; resume with the same value or use another --out"
            )
    if requested.data_options and requested.data_options != saved.data_options:
        raise InvalidInput(
            f"{requested.out / MODEL_CONFIG_FILE}: data options {saved.data_options} of the run "
            f"being resumed differ from {requested.data_options}"
        )
    schedule = {
        name: getattr(requested, name)
        for name in _SCHEDULE_FIELDS
        if getattr(requested, name) is not None
    }
    return dataclasses.replace(
        saved,
        out=requested.out,
        nproc=requested.nproc,
        resume=True,
        sharding=requested.sharding,
        checkpoint_every=requested.checkpoint_every,
        keep_checkpoints=requested.keep_checkpoints,
        eval_every=requested.eval_every,
        max_steps=requested.max_steps,
        pipeline=requested.pipeline,
        **schedule,
    )
