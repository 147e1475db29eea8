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
ExampleKind = Literal["interactions", "labelled"]
LrSchedule = Literal["constant", "linear"]
Sharding = Literal["auto", "table_wise", "row_wise", "column_wise", "data_parallel"]
Pooling = Literal["sum", "mean"]

MODEL_KINDS: tuple[str, ...] = ("two-tower", "dlrm")
LOSS_KINDS: tuple[str, ...] = ("softmax", "bce")
SHARDINGS: tuple[str, ...] = ("auto", "table_wise", "row_wise", "column_wise", "data_parallel")
EXAMPLE_KINDS: tuple[str, ...] = ("interactions", "labelled")
LR_SCHEDULES: tuple[str, ...] = ("constant", "linear")

MODEL_CONFIG_FILE = "model_config.json"
# Two-tower softmax temperature: logits are divided by it in training (a default, stated once).
DEFAULT_TEMPERATURE = 0.05
#: Held-out users the end-of-training retrieval evaluation ranks by default (a seeded sample
#: when there are more; 0 = all). 10k users put the standard error of recall@10 near 0.005.
DEFAULT_EVAL_USERS = 10_000
#: Seconds between progress lines when training output is not a terminal.
DEFAULT_LOG_EVERY = 30.0
METRICS_FILE = "metrics.json"
#: The feature transforms fitted on the run's training data (bundle/FORMAT.md's transforms.json
#: and vocab/ files), so the packager can prove its refit of the data is what training saw.
FITTED_TRANSFORMS_DIR = "transforms"
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
        eval_users: held-out users the evaluations score (a seeded sample when there are
            more, the same in every evaluation of the run and for its popularity baseline; 0:
            every held-out user): a two-tower ranks every item for them, a DLRM scores their
            held-out pairs. Only their rows of the user tables are gathered to evaluate.
        log_every: seconds between progress lines when the console is not a terminal
            (redirected output: step, examples/s, loss, ETA; 0: none). A terminal gets a
            live progress bar instead.
        sparse_lr: learning rate of the fused row-wise Adagrad on the embedding tables.
        dense_lr: learning rate of Adam on the MLPs.
        weight_decay: Adam weight decay on the MLPs.
        loss, temperature, tower_layers: two-tower options (see `ModelConfig`).
        dense_arch_layers, over_arch_layers: DLRM options (see `ModelConfig`).
        max_steps: stop after this many steps in total (0: run all epochs); for smoke runs.
        data_options: source-specific size options (synthetic: num_users, num_items,
            interactions_per_user; criteo: table_size).
        pipeline: use `TrainPipelineSparseDist` (overlaps input distribution and compute).
        retrieval: DLRM on interaction data: the two-tower output folder whose newest
            checkpoint's top-`mine_k` candidates per user are the hard negatives (trained on
            the same data and split; recorded with its sha256 and step in model_config.json).
        examples: DLRM: "interactions" (positives = the user's interactions, negatives sampled
            from the retrieval candidates and the catalogue: what the ranker sees served) or
            "labelled" (the data set's own labelled pairs: Criteo clicks, or MovieLens rated
            pairs labelled rating >= 4, which ranks retrieval candidates badly). Default:
            "interactions" for interaction data, "labelled" for Criteo (the only choice there).
        hard_negatives: "interactions": negatives per positive drawn from the user's retrieval
            candidates (needs `retrieval`; without it they are drawn from the catalogue).
        random_negatives: "interactions": negatives per positive drawn uniformly from the
            catalogue items the user has not interacted with.
        mine_k: "interactions": retrieval candidates per user the hard negatives come from.
        mine_skip: "interactions": the best `mine_skip` of those candidates are never drawn as
            hard negatives (ranks mine_skip+1..mine_k are): the top of a user's list holds many
            of the user's future positives.
        rating_weights: "interactions": weight each positive by its rating / the mean rating
            (sources with ratings; default on).
        init_from_retrieval: "interactions" with `retrieval`: initialise the ranker's user-id
            and item-id tables with the retrieval model's query / candidate tower outputs and
            keep them frozen, so that the DLRM's user-id x item-id interaction is exactly the
            retrieval score and the rest of the ranker learns corrections to it (popularity,
            attributes). Needs `embedding_dim` = the two-tower output dim (the default then).
            Default on with `retrieval`.
        lr_schedule: "constant", or "linear" decay of both learning rates to 0 over the run
            (steadier final weights; default for "interactions", "constant" otherwise).
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
    eval_users: int = DEFAULT_EVAL_USERS
    log_every: float = DEFAULT_LOG_EVERY
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
    retrieval: str | None = None
    examples: ExampleKind | None = None
    hard_negatives: int | None = None
    random_negatives: int | None = None
    mine_k: int | None = None
    mine_skip: int | None = None
    rating_weights: bool | None = None
    init_from_retrieval: bool | None = None
    lr_schedule: LrSchedule | None = None

    def __post_init__(self) -> None:
        if self.model not in MODEL_KINDS:
            raise InvalidInput(f"model {self.model!r} is not one of {', '.join(MODEL_KINDS)}")
        if self.examples is not None and self.examples not in EXAMPLE_KINDS:
            raise InvalidInput(
                f"--examples {self.examples!r} is not one of {', '.join(EXAMPLE_KINDS)}"
            )
        if self.lr_schedule is not None and self.lr_schedule not in LR_SCHEDULES:
            raise InvalidInput(
                f"--lr-schedule {self.lr_schedule!r} is not one of {', '.join(LR_SCHEDULES)}"
            )
        ranking_only = (
            "retrieval",
            "examples",
            "hard_negatives",
            "random_negatives",
            "mine_k",
            "mine_skip",
            "rating_weights",
            "init_from_retrieval",
        )
        if self.model != "dlrm":
            given = [name for name in ranking_only if getattr(self, name) is not None]
            if given:
                flags = ", ".join(f"--{name.replace('_', '-')}" for name in given)
                raise InvalidInput(f"{flags}: only for `recship train dlrm`")
        if self.examples == "labelled" and self.retrieval is not None:
            raise InvalidInput(
                "--retrieval mines negatives for --examples interactions; labelled examples "
                "use none"
            )
        for name in ("hard_negatives", "random_negatives"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise InvalidInput(f"--{name.replace('_', '-')} must be >= 0, got {value}")
        if self.mine_k is not None and self.mine_k < 1:
            raise InvalidInput(f"--mine-k must be positive, got {self.mine_k}")
        if self.mine_skip is not None and self.mine_skip < 0:
            raise InvalidInput(f"--mine-skip must be >= 0, got {self.mine_skip}")
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
        for name in (
            "checkpoint_every",
            "keep_checkpoints",
            "eval_every",
            "eval_users",
            "log_every",
            "max_steps",
        ):
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
#: DLRM embedding dim without `init_from_retrieval` (with it: the two-tower output dim).
DLRM_EMBEDDING_DIM = 16
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
        "embedding_dim": DLRM_EMBEDDING_DIM,
        "sparse_lr": 0.1,
        "dense_lr": 1e-3,
        "weight_decay": 0.0,
        "dense_arch_layers": (32, 16),
        "over_arch_layers": (64, 32, 1),
        # Ranking examples of interaction data (issue 11; ML-100K, 3 splits, Recommend at
        # K = 100 vs retrieval alone): 2 hard negatives from the retrieval top 200 and 8
        # catalogue negatives per positive, positives weighted by rating, id tables from the
        # retrieval model: recall@10 +3.9 %, NDCG@10 +8.4 % on average; 1 + 4 negatives:
        # +2.8 %, +7.7 % in about half the training time. (Batch and learning rates of that
        # recipe: RETRIEVAL_RANKER_SCHEDULE.)
        "hard_negatives": 2,
        "random_negatives": 8,
        "mine_k": 200,
        "mine_skip": 20,
        "rating_weights": True,
    },
}

# The ranker on frozen retrieval tables (interaction examples with --retrieval), when no batch
# size is given: 4x the batch, 4x the MLP and 2x the table learning rate. ML-100K, `recship
# train --nproc 2`, splits 0/1/2, Recommend at K = 100 vs retrieval alone, with hard negatives
# from ranks 21..200 (mine_skip): recall@10 +5.9/+3.9/+6.6 %, NDCG@10 +9.7/+9.3/+9.2 %; the
# 256 batch with ranks 1..200 gave +4.7/+4.5/+2.4 %, +9.7/+10.0/+5.6 %.
RETRIEVAL_RANKER_SCHEDULE: dict[str, Any] = {"batch_size": 1024, "dense_lr": 4e-3, "sparse_lr": 0.2}

#: Data sets whose rows are labelled pairs with no user/item structure (they keep their labels).
LABELLED_ONLY_DATASETS: frozenset[str] = frozenset({"criteo"})


def resolve_defaults(
    config: TrainConfig, dataset_name: str, retrieval_dim: int | None = None
) -> TrainConfig:
    """Fills every `None` field of `config` with the default for its model and data set.

    DLRM ranking examples: Criteo-style data sets (`LABELLED_ONLY_DATASETS`) keep their labels
    ("labelled"); interaction data needs `retrieval` and then defaults to "interactions".
    Without `retrieval` the examples must be chosen explicitly (the trainer warns that either
    ranks retrieval candidates worse than retrieval alone): "labelled" (rated pairs) or
    "interactions", whose hard negatives are then drawn from the catalogue instead (the same
    number of negatives per positive).

    Args:
        config: the requested run.
        dataset_name: `DatasetSchema.name` of the opened source ("synthetic", "movielens-100k").
        retrieval_dim: output dim of the `retrieval` two-tower model, when one is given.

    Returns:
        A copy with no `None` fields except, for two-tower runs and labelled DLRM runs, the
        ranking-example fields that do not apply (`retrieval` stays None when not given); the
        DLRM dense arch is ended in the embedding dim.

    Raises:
        InvalidInput: interaction examples or --retrieval asked for on a labelled-only data
            set, a ranker on interaction data with neither --retrieval nor --examples, hard
            negatives or table initialisation asked for without --retrieval, or an
            embedding dim other than the retrieval output dim with table initialisation.
    """
    defaults = dict(_COMMON_DEFAULTS)
    defaults.update(_DEFAULTS[(config.model, "*")])
    defaults.update(_DEFAULTS.get((config.model, dataset_name), {}))
    ranking_fields = (
        "hard_negatives",
        "random_negatives",
        "mine_k",
        "mine_skip",
        "rating_weights",
    )
    examples = config.examples
    if config.model == "dlrm":
        labelled_only = dataset_name in LABELLED_ONLY_DATASETS
        if labelled_only and (config.examples == "interactions" or config.retrieval):
            raise InvalidInput(
                f"data set {dataset_name!r} is labelled pairs with no users and items: it keeps "
                "its labels (--examples labelled, no --retrieval)"
            )
        if examples is None and not labelled_only and config.retrieval is None:
            raise InvalidInput(
                "dlrm on interaction data ranks a retrieval model's candidates: pass "
                "--retrieval <two-tower output folder> (or choose --examples interactions / "
                "labelled to train without one, which ranks worse than retrieval alone)"
            )
        examples = examples or ("labelled" if labelled_only else "interactions")
        given = [
            name
            for name in (*ranking_fields, "init_from_retrieval")
            if getattr(config, name) not in (None, False)
        ]
        if examples == "labelled" and given:
            flags = ", ".join(f"--{name.replace('_', '-')}" for name in given)
            raise InvalidInput(
                f"{flags}: only for --examples interactions (the default with --retrieval)"
            )
        if examples == "interactions" and config.retrieval is None:
            if config.hard_negatives:
                raise InvalidInput(
                    "--hard-negatives are mined from a retrieval model: pass --retrieval "
                    "<two-tower output folder> or set --hard-negatives 0"
                )
            if config.random_negatives is None:
                defaults["random_negatives"] += defaults["hard_negatives"]
            defaults["hard_negatives"] = 0
            if config.init_from_retrieval:
                raise InvalidInput(
                    "--init-from-retrieval needs --retrieval <two-tower output folder>"
                )
        init = bool(
            examples == "interactions"
            and config.retrieval is not None
            and config.init_from_retrieval is not False
        )
        if init:
            if retrieval_dim is None:
                raise InvalidInput("--init-from-retrieval: the retrieval output dim is unknown")
            if config.embedding_dim is not None and config.embedding_dim != retrieval_dim:
                raise InvalidInput(
                    f"--embedding-dim {config.embedding_dim}: the ranker's id tables are "
                    f"initialised from the retrieval model's {retrieval_dim}-d outputs; use "
                    f"--embedding-dim {retrieval_dim} or --no-init-from-retrieval"
                )
            defaults["embedding_dim"] = retrieval_dim
            if config.batch_size is None:
                defaults.update(RETRIEVAL_RANKER_SCHEDULE)
        else:
            defaults["embedding_dim"] = DLRM_EMBEDDING_DIM
        defaults["init_from_retrieval"] = init
        defaults["lr_schedule"] = "linear" if examples == "interactions" else "constant"
    else:
        defaults["lr_schedule"] = "constant"
    if config.model != "dlrm" or examples == "labelled":
        for name in ranking_fields:
            defaults.pop(name, None)
    filled = {
        name: (defaults[name] if getattr(config, name) is None else getattr(config, name))
        for name in defaults
    }
    if "init_from_retrieval" in defaults:
        filled["init_from_retrieval"] = defaults["init_from_retrieval"]
    if config.model == "dlrm":
        filled["examples"] = examples
        if examples == "interactions" and filled["hard_negatives"] + filled["random_negatives"] < 1:
            raise InvalidInput(
                "--examples interactions needs at least one negative per positive "
                "(--hard-negatives, --random-negatives)"
            )
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
    out: Path,
    model: ModelConfig,
    train: TrainConfig,
    split: dict[str, Any],
    retrieval: dict[str, Any] | None = None,
) -> Path:
    """Writes `<out>/model_config.json`.

    Args:
        out: the training output folder.
        model: the model to rebuild.
        train: the resolved run (data source, options, hyper-parameters).
        split: the evaluation split ({"seed", "eval_fraction", "num_train", "num_eval"}).
        retrieval: a ranker's provenance of the retrieval checkpoint it mined its negatives
            from ({"path", "model_config_sha256", "step"}, see
            `recship.trainer.retrieval.RetrievalProvenance`); written as the "retrieval"
            section, which the packager compares with the retrieval model it is given.

    Returns:
        The path written.
    """
    path = out / MODEL_CONFIG_FILE
    payload: dict[str, Any] = {
        "format_version": MODEL_CONFIG_FORMAT,
        "model": model.to_dict(),
        "data": {
            "source": train.data,
            "options": dict(train.data_options),
            "split": split,
        },
        "training": train.to_dict(),
    }
    if retrieval is not None:
        payload["retrieval"] = dict(retrieval)
    write_json_atomic(path, payload)
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
    "retrieval",
    "examples",
    "hard_negatives",
    "random_negatives",
    "mine_k",
    "mine_skip",
    "rating_weights",
    "init_from_retrieval",
)
# Fields a resumed run may change; None (not given) keeps the saved value.
_SCHEDULE_FIELDS: tuple[str, ...] = (
    "epochs",
    "batch_size",
    "sparse_lr",
    "dense_lr",
    "weight_decay",
    "lr_schedule",
)


def merge_for_resume(requested: TrainConfig, saved: TrainConfig) -> TrainConfig:
    """Returns the config of a resumed run: the saved one with this invocation's schedule.

    The model, data, split and architecture come from the saved run; giving a different value
    for one of them is an error. Epochs, batch size and learning rates may change (None keeps
    the saved value); launch options (out, nproc, sharding, checkpointing, evaluation
    interval and users, progress lines, max_steps, pipeline) are this invocation's.

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
        eval_users=requested.eval_users,
        log_every=requested.log_every,
        max_steps=requested.max_steps,
        pipeline=requested.pipeline,
        **schedule,
    )
