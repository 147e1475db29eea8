"""Train both models, then package them: the one recipe behind `recship demo`, the tests and
the benchmarks.

The same steps a user runs (`recship train two-tower`, `recship train dlrm`, `recship
package`), as plain functions over the trainer's `TrainConfig` and the packager's
`PackageOptions`, so that every caller that needs a real bundle builds it the same way.

Example::

    runs = train_models(Path("runs"), "synthetic", {"num_users": 400}, nproc=2, epochs=3)
    report = package_runs(runs, Path("repo"), "movies")
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from recship.packager.api import PackageReport, package
from recship.packager.options import PackageOptions, QualityThresholds
from recship.trainer.config import METRICS_FILE, TrainConfig
from recship.trainer.train import launch

MODELS = ("two-tower", "dlrm")

# A gate that passes any bundle that loads and answers: for bundles trained an epoch or two on
# a few hundred synthetic users, where what is under test is serving, not model quality.
SMOKE_GATE = QualityThresholds(
    max_recall_loss=1.0, max_auc_loss=1.0, min_index_recall=0.5, max_recommend_loss=1.0
)


@dataclass(frozen=True)
class TrainedRuns:
    """The two training output folders a bundle is packaged from."""

    retrieval: Path
    ranking: Path


def train_model(
    out: Path, model: str, data: str, data_options: Mapping[str, Any], **config: Any
) -> Path:
    """Trains one model (`recship train <model>`) into `out`; returns `out`.

    Args:
        config: any further `TrainConfig` field (nproc, epochs, embedding_dim, ...).
    """
    launch(TrainConfig(model=model, data=data, out=out, data_options=dict(data_options), **config))
    return out


def train_models(
    out: Path,
    data: str,
    data_options: Mapping[str, Any],
    *,
    nproc: int | Mapping[str, int] = 1,
    reuse: bool = False,
    **config: Any,
) -> TrainedRuns:
    """Trains the two-tower and then the DLRM on its candidates (`--retrieval`) into
    `out/two-tower` and `out/dlrm`.

    Args:
        nproc: ranks per model, one number for both or per model name.
        reuse: keep a model whose folder already holds a finished run (its metrics.json).
        config: any further `TrainConfig` field, for both models (but `embedding_dim`, which
            the DLRM takes from the two-tower's output dim).
    """
    runs = TrainedRuns(out / "two-tower", out / "dlrm")
    for model, folder in zip(MODELS, (runs.retrieval, runs.ranking), strict=True):
        if reuse and (folder / METRICS_FILE).is_file():
            continue
        ranks = nproc if isinstance(nproc, int) else nproc[model]
        model_config = dict(config)
        if model == "dlrm":
            # The ranker learns to order the two-tower's candidates (trainer.retrieval); its
            # id tables are the two-tower's outputs, so its tables take their dim.
            model_config.pop("embedding_dim", None)
            model_config["retrieval"] = str(runs.retrieval)
        train_model(folder, model, data, data_options, nproc=ranks, **model_config)
    return runs


def package_runs(
    runs: TrainedRuns,
    repo: Path,
    name: str,
    console: Console | None = None,
    **options: Any,
) -> PackageReport:
    """Packages two trained runs as the next version of `repo/name` (`recship package`).

    Args:
        options: any further `PackageOptions` field (thresholds, quant, devices, ...).
    """
    return package(PackageOptions(runs.retrieval, runs.ranking, repo, name, **options), console)
