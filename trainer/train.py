"""Distributed training: one rank worker, two ways to start it.

`run_rank(config)` is the whole of one rank's work: open the data, split it, build the model,
shard it with `DistributedModelParallel` (planner, optional sharding override), train with a
fused row-wise Adagrad on the tables and Adam on the MLPs through `TrainPipelineSparseDist`,
checkpoint with `torch.distributed.checkpoint`, and evaluate. It runs unchanged

- under `recship train ... --nproc N` (`launch`), which spawns N local ranks with
  `torch.multiprocessing` and a free TCP port on 127.0.0.1, and
- under torchrun, single or multi node, which sets RANK / WORLD_SIZE / LOCAL_RANK /
  MASTER_ADDR / MASTER_PORT::

      torchrun --standalone --nproc_per_node=2 -m recship.trainer.train two-tower \\
          --data movielens-100k --out runs/ml100k

  (multi node: `--nnodes=2 --rdzv-backend=c10d --rdzv-endpoint=HOST:PORT` and an `--out` on
  a shared file system).

gloo on CPU, nccl on CUDA (one GPU per local rank).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import itertools
import json
import logging
import math
import os
import re
import resource
import signal
import socket
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from torch import nn
from torch.multiprocessing.spawn import ProcessException
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.distributed.types import ShardingPlan, ShardingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from recship.base import errors
from recship.base.errors import InvalidInput, RecshipError
from recship.bundle.transforms import Transforms, write_transforms
from recship.trainer.checkpoint import (
    Progress as CheckpointProgress,
)
from recship.trainer.checkpoint import (
    encode_rng_state,
    latest_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    sweep_incomplete,
)
from recship.trainer.config import (
    FITTED_TRANSFORMS_DIR,
    METRICS_FILE,
    MODEL_CONFIG_FILE,
    ModelConfig,
    TrainConfig,
    merge_for_resume,
    model_config_for,
    read_model_config,
    resolve_defaults,
    table_name,
    write_json_atomic,
    write_model_config,
)
from recship.trainer.data.batches import (
    num_batches,
    pair_batches,
    ranking_batches,
    two_tower_batches,
)
from recship.trainer.data.criteo import CriteoSource
from recship.trainer.data.dataset import InteractionDataset
from recship.trainer.data.ranking_examples import (
    ExampleRecipe,
    RankingExamples,
    build_examples,
    mine_candidates,
)
from recship.trainer.data.sources import open_source
from recship.trainer.evaluate import (
    EvaluationView,
    end_to_end_metrics,
    eval_user_sample,
    evaluate,
    evaluate_ranking,
    evaluation_view,
    popularity_baseline,
    retrieval_embeddings,
)
from recship.trainer.models import build_model, build_train_module, item_log_frequencies
from recship.trainer.retrieval import (
    RetrievalProvenance,
    check_provenance,
    load_retrieval,
    retrieval_output_dim,
)
from recship.trainer.shared_data import read_shared, write_shared

_SHARDING_TYPES = {
    "table_wise": ShardingType.TABLE_WISE.value,
    "row_wise": ShardingType.ROW_WISE.value,
    "column_wise": ShardingType.COLUMN_WISE.value,
    "data_parallel": ShardingType.DATA_PARALLEL.value,
}


@dataclass(frozen=True)
class DistEnv:
    """Where this rank sits: its rank, the world, and how to reach rank 0.

    Attributes:
        rank: global rank.
        world_size: number of ranks.
        local_rank: rank on this host (picks the GPU).
        local_world_size: ranks on this host.
        init_method: `torch.distributed` rendezvous ("env://" under torchrun, or
            "tcp://127.0.0.1:PORT").
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    init_method: str = "env://"

    @classmethod
    def from_environ(cls) -> DistEnv | None:
        """The torchrun environment (RANK, WORLD_SIZE, ...), or None outside torchrun."""
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            return None
        try:
            world_size = int(os.environ["WORLD_SIZE"])
            return cls(
                rank=int(os.environ["RANK"]),
                world_size=world_size,
                local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size))),
                init_method="env://",
            )
        except ValueError as error:
            raise InvalidInput(f"torchrun environment: {error}") from error


class CpuRowWiseEmbeddingBagCollectionSharder(EmbeddingBagCollectionSharder):
    """The stock sharder, plus row-wise and table-row-wise on CPU (they work; the stock one
    offers them only on CUDA)."""

    def sharding_types(self, compute_device_type: str) -> list[str]:
        """Sharding types the planner may choose for this device type."""
        types = list(super().sharding_types(compute_device_type))
        for extra in (ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value):
            if extra not in types:
                types.append(extra)
        return types


def free_port() -> int:
    """Returns a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def check_output_dir(config: TrainConfig) -> None:
    """Refuses to train into a non-empty output folder unless resuming a run there.

    Raises:
        InvalidInput: `out` is a file, or non-empty without --resume, or --resume on a folder
            that is not a `recship train` output.
    """
    out = config.out
    if out.exists() and not out.is_dir():
        raise InvalidInput(f"--out {out}: exists and is not a directory")
    populated = out.is_dir() and any(out.iterdir())
    if populated and not config.resume:
        raise InvalidInput(
            f"--out {out}: directory is not empty; pass --resume to continue the run in it "
            "or choose another --out"
        )
    if populated and not (out / MODEL_CONFIG_FILE).is_file():
        raise InvalidInput(
            f"--out {out}: --resume needs a `recship train` output folder, but it has no "
            f"{MODEL_CONFIG_FILE}"
        )


def _with_saved_config(config: TrainConfig) -> TrainConfig:
    """When resuming a run, the saved config merged with this invocation's; else `config`."""
    if config.resume and (config.out / MODEL_CONFIG_FILE).is_file():
        _, payload = read_model_config(config.out)
        return merge_for_resume(config, TrainConfig.from_dict(payload["training"]))
    return config


class _InteractionData:
    """An in-memory interaction data set, split per user into train and held-out parts.

    A DLRM trained on "interactions" examples (`prepare_ranking`) sees each epoch's positives
    and freshly drawn negatives (`ranking_examples.build_examples`) instead of the rated pairs.
    """

    def __init__(
        self, data: InteractionDataset, eval_fraction: float, seed: int, eval_users: int = 0
    ) -> None:
        self.schema = data.schema
        self.seed = seed
        self.train, self.held_out = data.split(eval_fraction, seed)
        self.transforms = self.train.transforms
        self.num_train = len(self.train)
        self.num_eval = len(self.held_out)
        # Two-tower evaluations rank for these users only (None: every held-out user).
        self.eval_sample = eval_user_sample(self.held_out, eval_users, seed)
        self.recipe: ExampleRecipe | None = None
        self.candidates: np.ndarray | None = None
        self.retrieval: RetrievalProvenance | None = None
        self.retrieval_vectors: tuple[torch.Tensor, torch.Tensor] | None = None
        self._epoch_examples: tuple[int, RankingExamples] | None = None

    def prepare_ranking(self, config: TrainConfig) -> None:
        """Loads the retrieval model and mines candidates for a resolved DLRM run.

        A no-op for two-tower runs and "labelled" examples. Every rank does the same work
        (float64 scores, ties by item id), so every rank builds the same examples.
        """
        if config.model != "dlrm" or config.examples != "interactions":
            return
        self.recipe = ExampleRecipe(
            int(config.hard_negatives or 0),
            int(config.random_negatives or 0),
            rating_weighted=bool(config.rating_weights),
        )
        if config.retrieval is None:
            return
        self.retrieval, model = load_retrieval(config.retrieval, config)
        self.retrieval_vectors = retrieval_embeddings(model, self.train)
        if self.recipe.hard_negatives:
            users, items = self.retrieval_vectors
            mined = mine_candidates(users, items, self.train, int(config.mine_k or 1))
            # Ranks 1..mine_skip hold many of a user's future positives: never negatives.
            skip = min(int(config.mine_skip or 0), mined.shape[1] - 1)
            self.candidates = np.ascontiguousarray(mined[:, skip:])

    def examples(self, epoch: int) -> RankingExamples:
        """The ranking examples of `epoch` (the last epoch's are cached)."""
        if self.recipe is None:
            raise InvalidInput("ranking examples need a DLRM run on interaction examples")
        if self._epoch_examples is None or self._epoch_examples[0] != epoch:
            built = build_examples(
                self.train, self.recipe, self.candidates, epoch=epoch, seed=self.seed
            )
            self._epoch_examples = (epoch, built)
        return self._epoch_examples[1]

    def num_examples(self, kind: str) -> int:
        """Training examples per epoch: interactions, or positives plus their negatives."""
        if kind == "dlrm" and self.recipe is not None:
            return len(self.examples(0))
        return self.num_train

    def train_batches(
        self, kind: str, batch_size: int, rank: int, world_size: int, epoch: int, start: int
    ) -> Iterator[Any]:
        """This rank's training batches of `epoch` from batch `start` on (shuffled per epoch)."""
        if kind == "dlrm" and self.recipe is not None:
            examples = self.examples(epoch)
            return pair_batches(
                self.train,
                examples.user_ids,
                examples.item_ids,
                examples.labels,
                batch_size,
                rank=rank,
                world_size=world_size,
                weights=examples.weights,
                epoch=epoch,
                seed=self.seed,
                drop_last=True,
                start_batch=start,
            )
        make = two_tower_batches if kind == "two-tower" else ranking_batches
        return make(
            self.train,
            batch_size,
            rank=rank,
            world_size=world_size,
            epoch=epoch,
            seed=self.seed,
            drop_last=True,
            start_batch=start,
        )

    def item_log_q(self) -> torch.Tensor:
        """Log share of training interactions per item (the in-batch sampling probability)."""
        return item_log_frequencies(self.train.item_ids, self.train.num_items)

    def evaluation_view(self, model_config: ModelConfig) -> EvaluationView:
        """What the evaluations read: the sampled held-out users (every one when there are
        fewer than --eval-users) and the rows of the user tables they look up."""
        return evaluation_view(model_config, self.train, self.held_out, self.eval_sample)

    def evaluate(self, model: nn.Module, view: EvaluationView | None) -> dict[str, float]:
        """Held-out metrics of the view's unsharded model on the view's users."""
        assert view is not None
        return evaluate(view.model_config, model, view.train, view.held_out)

    def end_to_end(self, model: nn.Module, view: EvaluationView | None) -> dict[str, float]:
        """Recommend offline (retrieve K, rank, top 10) vs. retrieval alone on the view's
        users, for a DLRM run given a retrieval model and a held-out split; {} otherwise."""
        assert view is not None
        kind = view.model_config.kind
        if kind != "dlrm" or self.retrieval_vectors is None or not self.num_eval:
            return {}
        users, items = self.retrieval_vectors
        return end_to_end_metrics(users[view.users], items, model, view.train, view.held_out)

    def baselines(self, model_config: ModelConfig) -> dict[str, dict[str, float]]:
        """Reference scores a trained model should beat."""
        if model_config.kind != "two-tower" or not self.num_eval:
            return {}
        return {
            "popularity": popularity_baseline(self.train, self.held_out, users=self.eval_sample)
        }


class _CriteoData:
    """A streamed Criteo TSV file; held-out lines are picked by a seeded hash of the line."""

    #: No retrieval model goes with click logs (see `_InteractionData`).
    retrieval: RetrievalProvenance | None = None
    #: Criteo lines are encoded as they stream; no fitted transforms to record.
    transforms: Transforms | None = None
    retrieval_vectors: tuple[torch.Tensor, torch.Tensor] | None = None

    def __init__(self, source: CriteoSource, eval_fraction: float, seed: int) -> None:
        self.source = source
        self.schema = source.schema
        self.eval_fraction = eval_fraction
        self.seed = seed
        self.num_train = source.num_examples(eval_fraction=eval_fraction, seed=seed, split="train")
        self.num_eval = (
            source.num_examples(eval_fraction=eval_fraction, seed=seed, split="eval")
            if eval_fraction > 0
            else 0
        )

    def train_batches(
        self, kind: str, batch_size: int, rank: int, world_size: int, epoch: int, start: int
    ) -> Iterator[Any]:
        """This rank's training batches from batch `start` on (file order in every epoch)."""
        return self.source.batches(
            batch_size,
            rank=rank,
            world_size=world_size,
            eval_fraction=self.eval_fraction,
            seed=self.seed,
            split="train",
            start_batch=start,
        )

    def prepare_ranking(self, config: TrainConfig) -> None:
        """Criteo keeps its click labels: nothing to mine."""

    def num_examples(self, kind: str) -> int:
        """Training lines per epoch."""
        return self.num_train

    def evaluation_view(self, model_config: ModelConfig) -> None:
        """None: the evaluation reads the whole model (hashed tables of --table-size rows)."""
        return None

    def end_to_end(self, model: nn.Module, view: EvaluationView | None) -> dict[str, float]:
        """No users and items: no end-to-end evaluation."""
        return {}

    def item_log_q(self) -> torch.Tensor:
        """Criteo has no items (DLRM only)."""
        raise InvalidInput("a Criteo file has no items: train DLRM on it, not two-tower")

    def evaluate(self, model: nn.Module, view: EvaluationView | None) -> dict[str, float]:
        """AUC and log loss of the held-out lines (every one: the batch size divides them)."""
        if not self.num_eval:
            return {}
        # The stream drops an incomplete last batch: pick a batch size that divides the count.
        batch_size = max(
            d for d in range(1, min(self.num_eval, 1024) + 1) if self.num_eval % d == 0
        )
        if batch_size < 32:
            batch_size = 1024
        batches = self.source.batches(
            batch_size, eval_fraction=self.eval_fraction, seed=self.seed, split="eval"
        )
        return evaluate_ranking(model, batches)

    def baselines(self, model_config: ModelConfig) -> dict[str, dict[str, float]]:
        """No reference scores for Criteo."""
        return {}


_Data = _InteractionData | _CriteoData


def _open_data(config: TrainConfig) -> _Data:
    source = open_source(config.data, **config.data_options)
    fraction = 0.1 if config.eval_fraction is None else config.eval_fraction
    seed = config.seed or 0
    if isinstance(source, CriteoSource):
        return _CriteoData(source, fraction, seed)
    return _InteractionData(source, fraction, seed, config.eval_users)


def _quiet_libraries() -> None:
    """Silences library chatter that says nothing to a person training a model (deprecation
    notices of torch / torchrec internals, planner dry-run notes)."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torchrec")
    for name in ("torchrec", "torch.fx._symbolic_trace", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _set_threads(env: DistEnv) -> None:
    # Ranks sharing a host share its cores: oversubscribed intra-op threads slow every rank.
    cores = os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // max(env.local_world_size, 1)))


def _planner_constraints(
    model_config: ModelConfig, sharding: str
) -> dict[str, ParameterConstraints] | None:
    if sharding == "auto":
        return None
    kind = _SHARDING_TYPES[sharding]
    constraints = {}
    for table in model_config.tables:
        # Column-wise needs a partition smaller than the dim to split at all.
        min_partition = max(4, table.embedding_dim // 2) if sharding == "column_wise" else None
        constraints[table.name] = ParameterConstraints(
            sharding_types=[kind], min_partition=min_partition
        )
    return constraints


def _sharded_model(
    model_config: ModelConfig,
    train_module: nn.Module,
    config: TrainConfig,
    env: DistEnv,
    device: torch.device,
    frozen_tables: frozenset[str] = frozenset(),
) -> tuple[DistributedModelParallel, CombinedOptimizer, dict[str, dict[str, Any]]]:
    """Shards `train_module` over the world; returns (DMP, combined optimizer, plan summary).

    Tables named in `frozen_tables` get a fused optimizer with learning rate 0 (they keep the
    values loaded into them; the learning-rate schedule scales 0 to 0).
    """
    ebcs = [m for m in train_module.modules() if isinstance(m, EmbeddingBagCollection)]
    named = [(name, p) for ebc in ebcs for name, p in ebc.named_parameters()]
    # EmbeddingBagCollection parameters are named "embedding_bags.<table>.weight".
    fixed = [p for name, p in named if name.split(".")[1] in frozen_tables]
    trained = [p for name, p in named if name.split(".")[1] not in frozen_tables]
    if trained:
        apply_optimizer_in_backward(RowWiseAdagrad, trained, {"lr": config.sparse_lr or 0.05})
    if fixed:
        apply_optimizer_in_backward(RowWiseAdagrad, fixed, {"lr": 0.0})
    sharder = CpuRowWiseEmbeddingBagCollectionSharder()
    planner = EmbeddingShardingPlanner(
        topology=Topology(
            world_size=env.world_size,
            compute_device=device.type,
            local_world_size=env.local_world_size,
        ),
        batch_size=config.batch_size or 256,
        constraints=_planner_constraints(model_config, config.sharding),
        debug=False,
    )
    plan = planner.collective_plan(train_module, [sharder], dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(
        module=train_module, device=device, plan=plan, sharders=[sharder]
    )
    dense = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(dmp.named_parameters())),
        lambda params: torch.optim.Adam(
            params, lr=config.dense_lr or 1e-3, weight_decay=config.weight_decay or 0.0
        ),
    )
    return dmp, CombinedOptimizer([dmp.fused_optimizer, dense]), _plan_summary(plan)


def _plan_summary(plan: ShardingPlan) -> dict[str, dict[str, Any]]:
    """{table: {"sharding": type, "ranks": [...]}} of a sharding plan (goes into metrics.json)."""
    summary: dict[str, dict[str, Any]] = {}
    for module_plan in plan.plan.values():
        for table, sharding in module_plan.items():  # type: ignore[attr-defined]
            summary[table] = {
                "sharding": sharding.sharding_type,
                "ranks": sorted(set(sharding.ranks or [])),
            }
    return dict(sorted(summary.items()))


#: A table's weight in a model state dict: `...<table name>.weight`.
_TABLE_WEIGHT = re.compile(r"(?:^|\.)(t_[^.]+)\.weight$")


def _gather_state(
    dmp: DistributedModelParallel, rank: int, rows: Mapping[str, np.ndarray]
) -> dict[str, torch.Tensor]:
    """The unsharded model state on rank 0 ({} elsewhere), each table named in `rows` cut to
    those rows (sorted): each rank copies the kept rows its shards hold and the parts are
    summed on rank 0, so no rank ever holds the whole table. Collective."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torch.distributed.tensor import DTensor

    full: dict[str, torch.Tensor] = {}
    for key, value in dmp.state_dict().items():
        match = _TABLE_WEIGHT.search(key)
        kept = rows.get(match.group(1)) if match else None
        if isinstance(value, ShardedTensor) and kept is not None:
            tensor = torch.zeros((kept.size, value.size(1)), dtype=value.dtype)
            for shard in value.local_shards():
                top, left = shard.metadata.shard_offsets
                height, width = shard.metadata.shard_sizes
                low, high = np.searchsorted(kept, [top, top + height])
                local = torch.from_numpy(kept[low:high] - top)
                tensor[low:high, left : left + width] = shard.tensor.detach().cpu()[local]
            dist.reduce(tensor, dst=0, op=dist.ReduceOp.SUM)
        elif isinstance(value, ShardedTensor):
            tensor = torch.empty(value.size(), dtype=value.dtype) if rank == 0 else None
            value.gather(dst=0, out=tensor)
        else:
            local = value.full_tensor() if isinstance(value, DTensor) else value.detach()
            tensor = local.cpu() if kept is None else local.cpu()[torch.from_numpy(kept)]
        if rank == 0 and tensor is not None:
            full[key] = tensor
    return full


def _copy_into(target: Any, full: torch.Tensor) -> None:
    """Copies a full (unsharded) tensor into this rank's part of a state-dict tensor.

    Handles `ShardedTensor` (each local shard takes its block by its offsets), replicated
    `DTensor`s and plain tensors.

    Raises:
        InvalidInput: on a shape mismatch or a DTensor placement other than replicated.
    """
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torch.distributed.tensor import DTensor, Replicate

    if tuple(target.size()) != tuple(full.shape):
        raise InvalidInput(f"table of shape {tuple(target.size())} cannot take {tuple(full.shape)}")
    with torch.no_grad():
        if isinstance(target, ShardedTensor):
            for shard in target.local_shards():
                rows, cols = shard.metadata.shard_offsets
                height, width = shard.metadata.shard_sizes
                shard.tensor.copy_(full[rows : rows + height, cols : cols + width])
        elif isinstance(target, DTensor):
            if not all(isinstance(p, Replicate) for p in target.placements):
                raise InvalidInput(f"cannot load a table placed as {target.placements}")
            target.to_local().copy_(full)
        else:
            target.copy_(full)


def _unsharded_from_state(model_config: ModelConfig, state: dict[str, torch.Tensor]) -> nn.Module:
    model = build_model(model_config, torch.device("cpu"))
    build_train_module(model_config, model).load_state_dict(state)
    return model


class _ProgressLog:
    """Progress lines for output that is not a terminal (a log file, a pipe, a CI job), where
    the live bar does not draw: the first step, then one line every `every` seconds and the
    last step, each with step, epoch, loss, examples/s and the estimated time left."""

    def __init__(
        self, console: Console, total_steps: int, epochs: int, every: float, enabled: bool
    ) -> None:
        self.console = console
        self.total_steps = total_steps
        self.epochs = epochs
        self.every = every
        self.enabled = enabled and every > 0
        self.last: float | None = None

    def step(self, step: int, epoch: int, loss: float, rate: float, steps_per_s: float) -> None:
        """Prints a line if one is due (the first step, `every` seconds on, the last step)."""
        if not self.enabled:
            return
        now = time.perf_counter()
        last_step = step >= self.total_steps
        if self.last is not None and now - self.last < self.every and not last_step:
            return
        self.last = now
        left = (self.total_steps - step) / steps_per_s if steps_per_s > 0 else math.nan
        eta = "?" if not math.isfinite(left) else _duration(left)
        self.say(
            f"step {step}/{self.total_steps} ({100 * step / max(self.total_steps, 1):.1f} %), "
            f"epoch {min(epoch + 1, self.epochs)}/{self.epochs}, loss {loss:.4f}, "
            f"{rate:,.0f} examples/s, ETA {eta}"
        )

    def say(self, text: str) -> None:
        """Prints one plain line (when enabled)."""
        if self.enabled:
            self.console.print(text, soft_wrap=True, highlight=False, markup=False)


def _duration(seconds: float) -> str:
    """H:MM:SS."""
    whole = round(seconds)
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


@dataclass
class _RunState:
    """Mutable training position of one rank."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    loss_sum: float = 0.0
    loss_count: int = 0
    last_loss: float = math.nan


class _Trainer:
    """One rank's training run (constructed and driven by `run_rank`)."""

    def __init__(
        self,
        config: TrainConfig,
        env: DistEnv,
        device: torch.device,
        shared_data: Path | None = None,
    ) -> None:
        self.env = env
        self.device = device
        self.rank = env.rank
        self.console = Console(stderr=True)
        config = _with_saved_config(config)
        self.data = _open_data(config) if shared_data is None else read_shared(shared_data)
        retrieval_dim = retrieval_output_dim(config.retrieval) if config.retrieval else None
        self.config = resolve_defaults(config, self.data.schema.name, retrieval_dim)
        self.data.prepare_ranking(self.config)
        self._check_resumed_retrieval()
        self.model_config = model_config_for(self.config, self.data.schema)
        self.split = {
            "seed": self.config.seed,
            "eval_fraction": self.config.eval_fraction,
            "num_train": self.data.num_train,
            "num_eval": self.data.num_eval,
        }
        self.batch_size = int(self.config.batch_size or 0)
        self.examples_per_epoch = self.data.num_examples(self.model_config.kind)
        self.steps_per_epoch = num_batches(
            self.examples_per_epoch, self.batch_size, env.world_size, drop_last=True
        )
        if self.steps_per_epoch == 0:
            raise InvalidInput(
                f"--data {self.config.data}: {self.examples_per_epoch} training examples are fewer "
                f"than one step ({self.batch_size} per rank x {env.world_size} ranks); "
                "lower --batch-size"
            )
        self.epochs = int(self.config.epochs or 0)
        self.total_steps = self.epochs * self.steps_per_epoch
        if self.config.max_steps:
            self.total_steps = min(self.total_steps, self.config.max_steps)
        self.history: list[dict[str, Any]] = []
        self.end_to_end: dict[str, float] = {}

    # -- set-up ----------------------------------------------------------------------------

    def _check_resumed_retrieval(self) -> None:
        """A resumed ranker must mine from the retrieval checkpoint it started from (its
        frozen id tables and its negatives came from it).

        Raises:
            InvalidInput: the --retrieval folder now holds another model or step.
        """
        provenance = self.data.retrieval
        if not self.config.resume or provenance is None:
            return
        if not (self.config.out / MODEL_CONFIG_FILE).is_file():
            return
        _, saved = read_model_config(self.config.out)
        check_provenance(
            saved,
            provenance.model_config_sha256,
            provenance.step,
            f"--resume {self.config.out} with --retrieval {provenance.path}",
            provenance.checkpoint_sha256,
        )

    def _prepare_out(self) -> tuple[CheckpointProgress, dict[str, Any]] | None:
        """Validates and initialises the output folder; loads the checkpoint to resume.

        Returns:
            (progress, loaded state) of the newest complete checkpoint when resuming, or None.
        """
        check_output_dir(self.config)
        _barrier()
        found = latest_checkpoint(self.config.out) if self.config.resume else None
        if self.rank == 0:
            self.config.out.mkdir(parents=True, exist_ok=True)
            sweep_incomplete(self.config.out)
            provenance = self.data.retrieval
            write_model_config(
                self.config.out,
                self.model_config,
                self.config,
                self.split,
                retrieval=None if provenance is None else provenance.to_dict(),
            )
            if self.data.transforms is not None:
                write_transforms(self.config.out / FITTED_TRANSFORMS_DIR, self.data.transforms)
            if self.config.resume:
                where = "starting fresh" if found is None else f"resuming from {found[1].name}"
                self.console.print(f"{self.config.out}: {where}", soft_wrap=True)
        _barrier()
        if found is None:
            return None
        state = self._checkpoint_state()
        progress = load_checkpoint(found[1], state)
        return progress, state

    def _build(self) -> None:
        torch.manual_seed(self.config.seed or 0)
        model = build_model(self.model_config, self.device, table_device=torch.device("meta"))
        log_q = None
        if self.model_config.kind == "two-tower":
            log_q = self.data.item_log_q().to(self.device)
        weighted = self.model_config.kind == "dlrm" and self.config.examples == "interactions"
        train_module = build_train_module(self.model_config, model, log_q, weighted=weighted)
        retrieval_tables = self._retrieval_tables()
        self.dmp, self.optimizer, self.plan = _sharded_model(
            self.model_config,
            train_module,
            self.config,
            self.env,
            self.device,
            frozen_tables=frozenset(retrieval_tables),
        )
        if retrieval_tables:
            self._load_tables(retrieval_tables)
        # Optimizer state exists only after a first step; create it (zero update) so that a
        # checkpoint's optimizer state has somewhere to load into.
        self.optimizer.init_state()
        self.base_lrs = [float(group["lr"]) for group in self.optimizer.param_groups]

    def _retrieval_tables(self) -> dict[str, torch.Tensor]:
        """{table: retrieval vectors} the ranker's id tables start from (and keep), or {}.

        With `init_from_retrieval`, the user-id table holds the query tower's output of each
        user and the item-id table the candidate tower's output of each item, so the DLRM's
        user-id x item-id dot product is the retrieval score.
        """
        vectors = self.data.retrieval_vectors
        if not self.config.init_from_retrieval or vectors is None:
            return {}
        schema = self.model_config.schema
        users, items = vectors
        return {
            table_name(schema.user_id_feature or ""): users,
            table_name(schema.item_id_feature or ""): items,
        }

    def _load_tables(self, tables: dict[str, torch.Tensor]) -> None:
        """Copies full tables into the sharded model (each rank its own shards)."""
        state = self.dmp.state_dict()
        found = set()
        for key, value in state.items():
            for table, full in tables.items():
                if key.endswith(f"embedding_bags.{table}.weight"):
                    _copy_into(value, full.to(torch.float32))
                    found.add(table)
        missing = sorted(set(tables) - found)
        if missing:
            raise InvalidInput(f"the ranker has no table(s) {', '.join(missing)} to initialise")
        self.dmp.load_state_dict(state)

    def _schedule_lr(self, step: int) -> None:
        """Sets every learning rate for the update of step `step` (0-based) by the schedule."""
        if self.config.lr_schedule != "linear" or not self.total_steps:
            return
        factor = max(0.0, 1.0 - step / self.total_steps)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * factor  # type: ignore[index]

    def _checkpoint_state(self) -> dict[str, Any]:
        return {"model": self.dmp.state_dict(), "optim": self.optimizer.state_dict()}

    def _resume(self, progress: CheckpointProgress, state: dict[str, Any]) -> _RunState:
        self.dmp.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optim"])
        restore_rng_state(progress.rng_state)
        global_step = self.batch_size * self.env.world_size
        batch = progress.examples_in_epoch // global_step
        epoch = progress.epoch
        if batch >= self.steps_per_epoch:
            epoch, batch = epoch + 1, 0
        return _RunState(step=progress.step, epoch=epoch, batch_in_epoch=batch)

    # -- loop ------------------------------------------------------------------------------

    def _batches(self, epoch: int, start_batch: int) -> Iterator[Any]:
        return self.data.train_batches(
            self.model_config.kind,
            self.batch_size,
            self.rank,
            self.env.world_size,
            epoch,
            start_batch,
        )

    def _save(self, state: _RunState) -> None:
        progress = CheckpointProgress(
            step=state.step,
            epoch=state.epoch,
            batch_in_epoch=state.batch_in_epoch,
            examples_in_epoch=state.batch_in_epoch * self.batch_size * self.env.world_size,
            world_size=self.env.world_size,
            batch_size=self.batch_size,
            rng_state=encode_rng_state(),
        )
        save_checkpoint(
            self.config.out,
            self._checkpoint_state(),
            progress,
            rank=self.rank,
            keep_last=self.config.keep_checkpoints,
        )

    def _evaluate(self, end_to_end: bool = False) -> dict[str, float]:
        """Gathers what the evaluation reads (`EvaluationView`) to rank 0 and evaluates there;
        {} on other ranks. Collective.

        With `end_to_end`, the end-to-end metrics (see `_InteractionData.end_to_end`) are kept
        in `self.end_to_end` as well.
        """
        view = self.data.evaluation_view(self.model_config)
        state = _gather_state(self.dmp, self.rank, view.rows if view is not None else {})
        metrics: dict[str, float] = {}
        if self.rank == 0:
            config = view.model_config if view is not None else self.model_config
            model = _unsharded_from_state(config, state)
            metrics = self.data.evaluate(model, view)
            if end_to_end:
                self.end_to_end = self.data.end_to_end(model, view)
        _barrier()
        return metrics

    def _checkpoint_due(self, step: int, end_of_epoch: bool) -> bool:
        every = self.config.checkpoint_every
        if every is None:
            return end_of_epoch
        return every > 0 and step % every == 0

    def _warn_without_retrieval(self) -> None:
        """Says, once, that a ranker on interaction data trained without --retrieval will
        rank retrieval candidates badly (after input validation: errors stay one line)."""
        interactions = isinstance(self.data, _InteractionData)
        if self.rank != 0 or self.model_config.kind != "dlrm" or not interactions:
            return
        if self.config.retrieval is not None:
            return
        recipe = (
            "trains on the rated pairs (rating >= 4)"
            if self.config.examples == "labelled"
            else "draws its negatives from the catalogue only"
        )
        self.console.print(
            f"[yellow]dlrm without --retrieval {recipe}: behind a retrieval model it ranks "
            "worse than retrieval alone (issue 11). Pass --retrieval <two-tower "
            "output folder> to train on the candidates it will rank.[/]",
            soft_wrap=True,
        )

    def run(self) -> dict[str, Any]:
        """Trains (from the start or the latest checkpoint), checkpoints, evaluates."""
        self._build()
        loaded = self._prepare_out()
        self._warn_without_retrieval()
        state = _RunState() if loaded is None else self._resume(*loaded)
        return self._loop(state)

    def _loop(self, state: _RunState) -> dict[str, Any]:
        start_step = state.step
        started = time.perf_counter()
        examples_per_step = self.batch_size * self.env.world_size
        last_saved = state.step if start_step else -1
        bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"),
            TextColumn("{task.fields[rate]:,.0f} ex/s"),
            TimeRemainingColumn(),
            console=self.console,
            disable=self.rank != 0 or not self.console.is_terminal,
        )
        log = _ProgressLog(
            self.console,
            self.total_steps,
            self.epochs,
            self.config.log_every,
            enabled=self.rank == 0 and not self.console.is_terminal,
        )
        log.say(
            f"{self.model_config.kind} x{self.env.world_size}: {self.total_steps} steps "
            f"({self.steps_per_epoch} per epoch, {examples_per_step} examples each), from step "
            f"{state.step}"
        )
        with bar:
            task = bar.add_task(
                f"{self.model_config.kind} x{self.env.world_size}",
                total=self.total_steps,
                completed=state.step,
                loss=math.nan,
                rate=0.0,
            )
            while state.epoch < self.epochs and state.step < self.total_steps:
                remaining = min(
                    self.steps_per_epoch - state.batch_in_epoch, self.total_steps - state.step
                )
                batches = itertools.islice(
                    self._batches(state.epoch, state.batch_in_epoch), remaining
                )
                pipeline = self._pipeline(state)
                for output in pipeline(batches):
                    state.step += 1
                    state.batch_in_epoch += 1
                    loss = float(output[0])
                    state.last_loss = loss
                    state.loss_sum += loss
                    state.loss_count += 1
                    end_of_epoch = state.batch_in_epoch == self.steps_per_epoch
                    if end_of_epoch:
                        state.epoch, state.batch_in_epoch = state.epoch + 1, 0
                    if self._checkpoint_due(state.step, end_of_epoch):
                        self._save(state)
                        last_saved = state.step
                    if self.config.eval_every and state.step % self.config.eval_every == 0:
                        self.history.append({"step": state.step, **self._evaluate()})
                    elapsed = time.perf_counter() - started
                    rate = (state.step - start_step) * examples_per_step / max(elapsed, 1e-9)
                    bar.update(task, completed=state.step, loss=loss, rate=rate)
                    log.step(state.step, state.epoch, loss, rate, rate / examples_per_step)
        elapsed = time.perf_counter() - started
        if last_saved != state.step:
            self._save(state)
        sample = getattr(self.data, "eval_sample", None)
        if self.model_config.kind != "two-tower":
            sample = None  # a ranker scores every held-out pair
        log.say(
            "evaluating"
            + (f" on a sample of {sample.size} held-out users" if sample is not None else "")
        )
        final = self._evaluate(end_to_end=True)
        return self._finish(state, start_step, elapsed, final)

    def _pipeline(self, state: _RunState) -> Any:
        """Returns a function mapping a batch iterator to per-step model outputs.

        Before each step the learning rates are set for it (`state.step` is the number of
        steps done: the loop consuming the outputs advances it).
        """
        if self.config.pipeline:
            pipeline = TrainPipelineSparseDist(self.dmp, self.optimizer, self.device)

            def run_pipelined(batches: Iterator[Any]) -> Iterator[Any]:
                while True:
                    # zero_grad() inside progress() hands the fused optimizers their rate.
                    self._schedule_lr(state.step)
                    try:
                        yield pipeline.progress(batches)
                    except StopIteration:
                        return

            return run_pipelined

        def run_plain(batches: Iterator[Any]) -> Iterator[Any]:
            for batch in batches:
                self._schedule_lr(state.step)
                self.optimizer.zero_grad()
                loss, output = self.dmp(batch.to(self.device))
                loss.backward()
                self.optimizer.step()
                yield output

        return run_plain

    def _finish(
        self, state: _RunState, start_step: int, elapsed: float, final: dict[str, float]
    ) -> dict[str, Any]:
        # Mean training loss of this invocation over all ranks.
        totals = torch.tensor([state.loss_sum, float(state.loss_count)], dtype=torch.float64)
        # The largest peak resident memory of any rank, in KiB (Linux's ru_maxrss).
        peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss], dtype=torch.int64)
        if dist.is_initialized():
            dist.all_reduce(totals)
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        steps_run = state.step - start_step
        metrics: dict[str, Any] = {
            "model": self.model_config.kind,
            "data": self.config.data,
            "dataset": self.model_config.schema.name,
            "world_size": self.env.world_size,
            "step": state.step,
            "epochs": self.config.epochs,
            "batch_size": self.batch_size,
            "split": self.split,
            "sharding_plan": self.plan,
            "train": {
                "steps_this_run": steps_run,
                "mean_loss_this_run": float(totals[0] / totals[1]) if totals[1] else math.nan,
                "last_loss": state.last_loss,
                "wall_s": elapsed,
                "examples_per_s": steps_run
                * self.batch_size
                * self.env.world_size
                / max(elapsed, 1e-9),
                "peak_rss_gib_largest_rank": round(int(peak) / 2**20, 2),
            },
            "eval": final,
            "history": self.history,
        }
        if not final:
            # Training rows are never reported as quality: say why there is none.
            metrics["eval_skipped"] = (
                "no held-out data (--eval-fraction 0): no quality metric was computed"
                if not self.data.num_eval
                else "the held-out split gave no metric (no held-out user or pair to score)"
            )
        if self.model_config.kind == "dlrm":
            metrics["train"]["examples_per_epoch"] = self.examples_per_epoch
            if self.rank == 0 and self.end_to_end:
                metrics["end_to_end"] = self.end_to_end
        if self.rank == 0:
            metrics["baselines"] = self.data.baselines(self.model_config)
            write_json_atomic(self.config.out / METRICS_FILE, _json_safe(metrics))
            _print_summary(self.console, metrics)
        _barrier()
        return metrics


def _json_safe(value: Any) -> Any:
    """Replaces NaN / inf floats (not valid JSON) by None, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    if isinstance(value, np.generic):
        return _json_safe(value.item())
    return value


def _print_summary(console: Console, metrics: dict[str, Any]) -> None:
    table = Table(title=f"recship train {metrics['model']} on {metrics['dataset']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows: list[tuple[str, Any]] = [
        ("steps", metrics["step"]),
        ("ranks", metrics["world_size"]),
        (
            "train examples / eval examples",
            f"{metrics['split']['num_train']} / {metrics['split']['num_eval']}",
        ),
        ("mean loss (this run)", metrics["train"]["mean_loss_this_run"]),
        ("examples/s", metrics["train"]["examples_per_s"]),
        ("wall s", metrics["train"]["wall_s"]),
        ("peak RSS GiB (largest rank)", metrics["train"]["peak_rss_gib_largest_rank"]),
    ]
    rows += [(f"eval {name}", value) for name, value in metrics["eval"].items()]
    for baseline, values in metrics.get("baselines", {}).items():
        rows += [(f"{baseline} {name}", value) for name, value in values.items() if "@" in name]
    rows += [
        (f"end to end {name}", value)
        for name, value in metrics.get("end_to_end", {}).items()
        if "@" in name
    ]
    for name, value in rows:
        text = f"{value:.4f}" if isinstance(value, float) else str(value)
        table.add_row(name, text)
    console.print(table)
    if "eval_skipped" in metrics:
        console.print(f"[yellow]eval: {metrics['eval_skipped']}[/yellow]")


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def run_rank(
    config: TrainConfig, env: DistEnv | None = None, shared_data: Path | None = None
) -> dict[str, Any]:
    """Runs one rank of a training run to the end (collective with every other rank).

    Args:
        config: the run (every rank gets the same one).
        env: this rank's place; None reads torchrun's environment, or runs a world of one.
        shared_data: the data set the launcher encoded once for every rank (`_prepare_data`);
            None: this rank reads and encodes it itself.

    Returns:
        The run's metrics (rank 0 writes them to `<out>/metrics.json`).

    Raises:
        RecshipError: bad input (data, flags, output folder), on every rank alike.
    """
    _quiet_libraries()
    check_output_dir(config)
    env = env or DistEnv.from_environ()
    if env is None:
        env = DistEnv(init_method=f"tcp://127.0.0.1:{free_port()}")
    _set_threads(env)
    use_cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{env.local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    # Data errors surface on every rank before any collective, so no rank waits on another.
    trainer = _Trainer(config, env, device, shared_data)
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            init_method=env.init_method,
            rank=env.rank,
            world_size=env.world_size,
        )
    try:
        return trainer.run()
    finally:
        if owns_group:
            dist.destroy_process_group()


def _die_with_parent() -> None:
    """Asks Linux to SIGKILL this process when its parent dies (no orphaned ranks)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)


def _spawned_rank(
    local_rank: int,
    config: TrainConfig,
    nproc: int,
    port: int,
    failures: Any,
    shared_data: Path | None,
) -> None:
    _die_with_parent()
    env = DistEnv(
        rank=local_rank,
        world_size=nproc,
        local_rank=local_rank,
        local_world_size=nproc,
        init_method=f"tcp://127.0.0.1:{port}",
    )
    try:
        run_rank(config, env, shared_data)
    except RecshipError as error:
        failures.put((type(error).__name__, str(error)))
        raise
    _exit_now(0)


def _spawned_preparation(config: TrainConfig, path: Path, failures: Any) -> None:
    """Reads and encodes the run's data set once and writes it for the ranks to map (a
    process of its own, so that the encoding's peak memory is returned before they start).
    Writes nothing for streamed data (Criteo), which every rank reads as it trains."""
    _die_with_parent()
    _quiet_libraries()
    try:
        data = _open_data(_with_saved_config(config))
        if isinstance(data, _InteractionData):
            write_shared(data, path)
    except RecshipError as error:
        failures.put((type(error).__name__, str(error)))
        _exit_now(1)
    _exit_now(0)


def _raise_failure(failures: Any, fallback: str) -> None:
    """Raises the first RecshipError a child process reported, else RecshipError(fallback)."""
    if not failures.empty():
        name, message = failures.get()
        error_class = getattr(errors, name, RecshipError)
        raise error_class(message) from None
    raise RecshipError(fallback) from None


def _prepare_data(config: TrainConfig, folder: Path, context: Any, failures: Any) -> Path | None:
    """The run's data set encoded once for all local ranks (`trainer.shared_data`) in
    `folder`, or None for streamed data. Says what it did on stderr (also into a log file)."""
    path = folder / "data.shared"
    console = Console(stderr=True)
    started = time.perf_counter()
    say = functools.partial(console.print, markup=False, highlight=False)
    say(f"data: reading and encoding {config.data} once for the {config.nproc} ranks")
    child = context.Process(target=_spawned_preparation, args=(config, path, failures))
    child.start()
    child.join()
    if child.exitcode != 0:
        _raise_failure(failures, f"preparing the training data failed (exit {child.exitcode})")
    if not path.is_file():
        return None
    say(
        f"data: {path.stat().st_size / 2**20:,.1f} MiB, mapped by every rank "
        f"({time.perf_counter() - started:.0f} s)"
    )
    return path


def _exit_now(code: int) -> None:
    """Ends a finished rank without interpreter teardown.

    About one run in ten, a rank aborted in C++ teardown after its work was complete
    ("terminate called without an active exception", SIGABRT, gloo / torchrec threads); the
    outputs are already written and fsynced by then, so skipping teardown loses nothing.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def launch(config: TrainConfig) -> dict[str, Any]:
    """Runs a training run: in this process under torchrun or with --nproc 1, else N ranks.

    Returns:
        The metrics written to `<out>/metrics.json`.

    Raises:
        RecshipError: bad input, or a rank failed (the message says which and why).
    """
    torchrun = DistEnv.from_environ()
    if torchrun is not None or config.nproc == 1:
        return run_rank(config, torchrun)
    check_output_dir(config)
    context = mp.get_context("spawn")
    failures = context.SimpleQueue()
    # (In the temporary folder, not the run's: the ranks refuse an --out they did not write.)
    with tempfile.TemporaryDirectory(prefix="recship-train-data-") as folder:
        shared_data = _prepare_data(config, Path(folder), context, failures)
        try:
            mp.start_processes(
                _spawned_rank,
                args=(config, config.nproc, free_port(), failures, shared_data),
                nprocs=config.nproc,
                join=True,
                start_method="spawn",
            )
        except ProcessException as failure:
            last_line = str(failure).strip().splitlines()[-1] if str(failure).strip() else ""
            _raise_failure(failures, f"training rank {failure.error_index} failed: {last_line}")
    return json.loads((config.out / METRICS_FILE).read_text())


def main() -> None:
    """`python -m recship.trainer.train {two-tower,dlrm} ...`: the torchrun entry point."""
    from recship.base.commands import run
    from recship.trainer.cli import train_command

    try:
        run(train_command, sys.argv[1:], "recship train")
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else 0 if done.code is None else 1
        _exit_now(code)


if __name__ == "__main__":
    main()
