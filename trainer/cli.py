"""`recship train two-tower|dlrm`: thin click commands over `recship.trainer.train.launch`.

Examples::

    recship data fetch movielens-100k
    recship train two-tower --data movielens-100k --nproc 2 --out runs/tt
    recship train dlrm --data movielens-100k --nproc 2 --out runs/dlrm --retrieval runs/tt
    recship train two-tower --data synthetic --num-users 5000 --out runs/syn --sharding row_wise
    recship train two-tower --data movielens-100k --out runs/tt --resume --epochs 30

    # the same entry point under torchrun (single or multi node):
    torchrun --standalone --nproc_per_node=2 -m recship.trainer.train two-tower \\
        --data movielens-100k --out runs/tt
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from recship.base.errors import InvalidInput
from recship.trainer.config import (
    DEFAULT_EVAL_USERS,
    DEFAULT_LOG_EVERY,
    DEFAULT_TEMPERATURE,
    SHARDINGS,
)


def _layers(flag: str) -> Callable[[click.Context, click.Parameter, str | None], Any]:
    def parse(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
        if value is None:
            return None
        try:
            sizes = tuple(int(part) for part in value.split(","))
        except ValueError:
            raise InvalidInput(
                f"{flag} {value!r}: expected comma-separated sizes, e.g. 128,64"
            ) from None
        if not sizes or min(sizes) <= 0:
            raise InvalidInput(f"{flag} {value!r}: sizes must be positive")
        return sizes

    return parse


def _common_options(function: Callable[..., Any]) -> Callable[..., Any]:
    """The options every model shares (applied bottom-up, so listed here in reverse)."""
    options = [
        click.option(
            "--data",
            "data",
            required=True,
            metavar="SOURCE",
            help="synthetic, movielens-100k (after `recship data fetch movielens-100k`), "
            "a MovieLens-format directory, or a Criteo TSV file (DLRM).",
        ),
        click.option(
            "--out",
            required=True,
            type=click.Path(path_type=Path, file_okay=False),
            help="Output folder (checkpoints/, model_config.json, metrics.json). Must be "
            "empty or new unless --resume.",
        ),
        click.option(
            "--nproc", default=1, show_default=True, type=int, help="Local ranks to spawn."
        ),
        click.option("--epochs", type=int, help="Passes over the training split."),
        click.option("--batch-size", type=int, help="Examples per rank per step."),
        click.option("--embedding-dim", type=int, help="Columns of every embedding table."),
        click.option("--seed", type=int, help="Split, shuffle and initialisation seed [0]."),
        click.option(
            "--eval-fraction",
            type=float,
            help="Share of each user's interactions held out for evaluation; 0 = none [0.1].",
        ),
        click.option(
            "--resume",
            is_flag=True,
            help="Continue the run in --out from its latest complete checkpoint.",
        ),
        click.option(
            "--sharding",
            type=click.Choice(SHARDINGS),
            default="auto",
            show_default=True,
            help="How every table is sharded; auto lets the planner choose.",
        ),
        click.option(
            "--checkpoint-every",
            type=int,
            help="Steps between checkpoints; 0 = only at the end [every epoch].",
        ),
        click.option(
            "--keep-checkpoints",
            type=int,
            default=3,
            show_default=True,
            help="Newest checkpoints to keep; 0 = all.",
        ),
        click.option(
            "--eval-every", type=int, default=0, help="Steps between evaluations; 0 = at the end."
        ),
        click.option(
            "--eval-users",
            type=int,
            default=DEFAULT_EVAL_USERS,
            show_default=True,
            help="Held-out users the evaluation scores (a seeded sample when there are more; "
            "0 = all): two-tower ranks every item for them, DLRM scores their held-out pairs.",
        ),
        click.option(
            "--log-every",
            type=float,
            default=DEFAULT_LOG_EVERY,
            show_default=True,
            help="Seconds between progress lines when output is not a terminal; 0 = none.",
        ),
        click.option("--sparse-lr", type=float, help="Row-wise Adagrad learning rate (tables)."),
        click.option("--dense-lr", type=float, help="Adam learning rate (MLPs)."),
        click.option("--weight-decay", type=float, help="Adam weight decay (MLPs)."),
        click.option(
            "--max-steps", type=int, default=0, help="Stop after this many steps; 0 = all."
        ),
        click.option(
            "--pipeline/--no-pipeline",
            default=True,
            show_default=True,
            help="Use TrainPipelineSparseDist (overlaps input distribution with compute).",
        ),
        click.option("--num-users", type=int, help="synthetic: number of users."),
        click.option("--num-items", type=int, help="synthetic: number of items."),
        click.option("--interactions-per-user", type=int, help="synthetic: items per user."),
        click.option("--data-seed", type=int, help="synthetic: generator seed."),
        click.option("--table-size", type=int, help="Criteo: rows each category is hashed into."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _run(model: str, options: dict[str, Any]) -> None:
    from recship.trainer.config import TrainConfig
    from recship.trainer.train import launch

    data_options = {
        name: value
        for name, value in (
            ("num_users", options.pop("num_users")),
            ("num_items", options.pop("num_items")),
            ("interactions_per_user", options.pop("interactions_per_user")),
            ("seed", options.pop("data_seed")),
            ("table_size", options.pop("table_size")),
        )
        if value is not None
    }
    launch(TrainConfig(model=model, data_options=data_options, **options))  # type: ignore[arg-type]


@click.group("train")
def train_command() -> None:
    """Train a sharded TorchRec model (two-tower retrieval or DLRM ranking)."""


@train_command.command("two-tower")
@_common_options
@click.option(
    "--loss",
    type=click.Choice(("softmax", "bce")),
    help="In-batch sampled softmax with logQ correction, or BCE [softmax].",
)
@click.option(
    "--temperature",
    type=float,
    help=f"Logits are divided by it in training [{DEFAULT_TEMPERATURE}].",
)
@click.option(
    "--tower-layers",
    callback=_layers("--tower-layers"),
    help="Comma-separated MLP sizes of each tower; the last is the output dim [128,64].",
)
def two_tower_command(**options: Any) -> None:
    """Two-tower retrieval: query tower (user features), candidate tower (item features)."""
    _run("two-tower", options)


@train_command.command("dlrm")
@_common_options
@click.option(
    "--dense-arch-layers",
    callback=_layers("--dense-arch-layers"),
    help="Bottom MLP sizes; the last must equal --embedding-dim [32,<dim>].",
)
@click.option(
    "--over-arch-layers",
    callback=_layers("--over-arch-layers"),
    help="Top MLP sizes; the last must be 1 [64,32,1].",
)
@click.option(
    "--retrieval",
    metavar="DIR",
    help="Two-tower output folder (same --data, --seed, --eval-fraction) whose top-K "
    "candidates per user are the hard negatives; recorded in model_config.json.",
)
@click.option(
    "--examples",
    type=click.Choice(("interactions", "labelled")),
    help="interactions: positives are the user's interactions, negatives come from the "
    "retrieval candidates and the catalogue (what the ranker ranks when served); labelled: "
    "the data set's own labels (Criteo clicks; MovieLens rating >= 4, which ranks retrieval "
    "candidates badly) [interactions with --retrieval; labelled without, and for Criteo].",
)
@click.option(
    "--hard-negatives",
    type=int,
    help="Negatives per positive drawn from the user's retrieval candidates [2; 0 without "
    "--retrieval].",
)
@click.option(
    "--random-negatives",
    type=int,
    help="Negatives per positive drawn from the catalogue items the user has not interacted "
    "with [8; 10 without --retrieval].",
)
@click.option(
    "--mine-k", type=int, help="Retrieval candidates per user the hard negatives come from [200]."
)
@click.option(
    "--mine-skip",
    type=int,
    help="The best N retrieval candidates are never hard negatives (they hold many future "
    "positives) [20].",
)
@click.option(
    "--rating-weights/--no-rating-weights",
    default=None,
    help="Weight each positive by its rating / the mean rating (sources with ratings) [on].",
)
@click.option(
    "--init-from-retrieval/--no-init-from-retrieval",
    default=None,
    help="Start the ranker's user-id and item-id tables from the --retrieval model's tower "
    "outputs and keep them frozen, so the ranker learns corrections to the retrieval score "
    "[on with --retrieval; --embedding-dim is then the two-tower output dim].",
)
@click.option(
    "--lr-schedule",
    type=click.Choice(("constant", "linear")),
    help="Learning rates constant, or decayed linearly to 0 [linear for interaction examples].",
)
def dlrm_command(**options: Any) -> None:
    """DLRM ranking (torchrec.models.dlrm.DLRM) over dense and sparse features."""
    _run("dlrm", options)
