"""`recship package`: a thin click layer over `recship.packager.api.package`."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console

from recship.base.errors import InvalidInput
from recship.bundle.cli import print_summary
from recship.packager.options import (
    DEFAULT_MAX_EVAL_USERS,
    DEVICE_TYPES,
    EXPORT_CHOICES,
    INDEX_KINDS,
    QUANT_TYPES,
    QualityThresholds,
)


def _parse_table_quant(values: tuple[str, ...]) -> dict[str, str]:
    overrides = {}
    for value in values:
        table, sep, quant = value.partition("=")
        if not sep or not table or quant not in QUANT_TYPES:
            raise InvalidInput(
                f"--table-quant {value!r}: expected TABLE=TYPE with TYPE one of "
                + ", ".join(QUANT_TYPES)
            )
        overrides[table] = quant
    return overrides


def _parse_index_params(values: tuple[str, ...]) -> dict[str, int]:
    params = {}
    for value in values:
        key, sep, number = value.partition("=")
        if not sep or not key or not number.lstrip("-").isdigit():
            raise InvalidInput(f"--index-param {value!r}: expected NAME=INTEGER, e.g. nlist=256")
        params[key] = int(number)
    return params


@click.command("package")
@click.option(
    "--retrieval",
    type=click.Path(path_type=Path),
    required=True,
    help="Two-tower training output folder.",
)
@click.option(
    "--ranking", type=click.Path(path_type=Path), required=True, help="DLRM training output folder."
)
@click.option(
    "--repo", type=click.Path(path_type=Path), required=True, help="Bundle repository root."
)
@click.option("--name", required=True, help="Bundle name; published as REPO/NAME/<next version>.")
@click.option(
    "--quant",
    type=click.Choice(QUANT_TYPES),
    default="int8",
    show_default=True,
    help="Quantization of every embedding table.",
)
@click.option(
    "--table-quant",
    multiple=True,
    metavar="TABLE=TYPE",
    help="Per-table quantization override (repeatable).",
)
@click.option(
    "--devices",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Devices one replica spans (table-wise sharding).",
)
@click.option(
    "--device-type",
    type=click.Choice(DEVICE_TYPES),
    default=None,
    help="Target devices [default: cuda when a GPU is visible, else cpu].",
)
@click.option(
    "--format",
    "export_format",
    type=click.Choice(EXPORT_CHOICES),
    default="torchscript",
    show_default=True,
    help="Entry-point file formats.",
)
@click.option(
    "--index",
    type=click.Choice(INDEX_KINDS),
    default="auto",
    show_default=True,
    help="FAISS index family.",
)
@click.option(
    "--index-param",
    multiple=True,
    metavar="NAME=INT",
    help="Index parameter, e.g. nlist=256, pq_m=16, pq_bits=8, hnsw_m=32 (repeatable).",
)
@click.option(
    "--min-index-recall",
    type=click.FloatRange(0, 1),
    default=QualityThresholds.min_index_recall,
    show_default=True,
    help="Recall@100 the index must reach against exact search.",
)
@click.option(
    "--max-recall-loss",
    type=click.FloatRange(0, 1),
    default=QualityThresholds.max_recall_loss,
    show_default=True,
    help="Largest relative recall@10/@100 loss of the packaged pipeline vs fp32 exact.",
)
@click.option(
    "--max-auc-loss",
    type=click.FloatRange(0, 1),
    default=QualityThresholds.max_auc_loss,
    show_default=True,
    help="Largest ranker AUC loss vs fp32.",
)
@click.option(
    "--max-logit-diff",
    type=click.FloatRange(min=0),
    default=QualityThresholds.max_logit_diff,
    show_default=True,
    help="Largest ranker logit difference vs fp32 on the golden inputs.",
)
@click.option(
    "--max-recommend-loss",
    type=click.FloatRange(0, 1),
    default=QualityThresholds.max_recommend_loss,
    show_default=True,
    help="Largest relative recall@10/NDCG@10 loss of Recommend vs retrieval alone.",
)
@click.option(
    "--eval-data",
    type=click.Path(path_type=Path),
    default=None,
    help="CSV/TSV/Parquet of relevant (user key, item key) pairs to gate on, columns named "
    "by the key features [default: the checkpoint's held-out split].",
)
@click.option(
    "--max-eval-users",
    type=click.IntRange(min=1),
    default=DEFAULT_MAX_EVAL_USERS,
    show_default=True,
    help="Validation users the gate measures (a seeded sample beyond it).",
)
@click.option(
    "--no-quality-gate",
    is_flag=True,
    help="Publish without measuring quality; the bundle is marked UNGATED.",
)
@click.option(
    "--golden-examples",
    type=click.IntRange(min=2),
    default=16,
    show_default=True,
    help="Recorded examples per entry point for the load-time self-test.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--sign-key",
    type=click.Path(path_type=Path),
    default=None,
    help="PEM EC private key: publish the version with a MANIFEST.sig (see `recship keygen`).",
)
def package_command(
    retrieval: Path,
    ranking: Path,
    repo: Path,
    name: str,
    quant: str,
    table_quant: tuple[str, ...],
    devices: int,
    device_type: str | None,
    export_format: str,
    index: str,
    index_param: tuple[str, ...],
    min_index_recall: float,
    max_recall_loss: float,
    max_auc_loss: float,
    max_logit_diff: float,
    max_recommend_loss: float,
    eval_data: Path | None,
    max_eval_users: int,
    no_quality_gate: bool,
    golden_examples: int,
    seed: int,
    sign_key: Path | None,
) -> None:
    """Quantize, shard, export, index and verify two checkpoints into the next bundle version."""
    from recship.packager.api import package
    from recship.packager.options import PackageOptions

    options = PackageOptions(
        retrieval=retrieval,
        ranking=ranking,
        repo=repo,
        name=name,
        quant=quant,  # type: ignore[arg-type]
        table_quant=_parse_table_quant(table_quant),  # type: ignore[arg-type]
        devices=devices,
        device_type=device_type,
        export_format=export_format,  # type: ignore[arg-type]
        index=index,  # type: ignore[arg-type]
        index_params=_parse_index_params(index_param),
        thresholds=QualityThresholds(
            max_recall_loss, max_auc_loss, min_index_recall, max_logit_diff, max_recommend_loss
        ),
        eval_data=eval_data,
        max_eval_users=max_eval_users,
        quality_gate=not no_quality_gate,
        golden_examples=golden_examples,
        seed=seed,
        sign_key=sign_key,
    )
    console = Console(stderr=True)
    report = package(options, console)
    print_summary(Console(), report.ref, report.manifest, report.stage_seconds)
