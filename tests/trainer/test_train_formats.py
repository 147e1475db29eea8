"""2-rank training from files: a generated MovieLens-format directory and a Criteo TSV file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from recship.trainer.checkpoint import list_checkpoints, load_unsharded
from recship.trainer.config import TrainConfig
from recship.trainer.data.criteo import CriteoSource
from recship.trainer.data.movielens import load_movielens, write_movielens
from recship.trainer.data.synthetic import generate
from recship.trainer.evaluate import evaluate, evaluate_ranking
from recship.trainer.train import launch

pytestmark = pytest.mark.slow


def test_dlrm_trains_on_a_movielens_format_directory(tmp_path: Path) -> None:
    data = generate(num_users=300, num_items=150, interactions_per_user=10, seed=5)
    folder = write_movielens(data, tmp_path / "ml", layout="grouplens")
    out = tmp_path / "run"
    # Labelled pairs (rating >= 4): the held-out AUC then checks that the ratings were read.
    config = TrainConfig(
        model="dlrm",
        data=str(folder),
        out=out,
        nproc=2,
        epochs=2,
        batch_size=64,
        examples="labelled",
    )
    metrics = launch(config)
    assert metrics["dataset"] == "ml"
    assert metrics["eval"]["auc"] > 0.6
    model_config, model = load_unsharded(out)
    train, held_out = load_movielens(folder).split(0.1, 0)
    assert evaluate(model_config, model, train, held_out)["auc"] == pytest.approx(
        metrics["eval"]["auc"], abs=1e-5
    )


def _criteo_file(path: Path, rows: int) -> Path:
    """Criteo-format lines whose label follows the first categorical and first dense column."""
    rng = np.random.default_rng(0)
    lines = []
    for _ in range(rows):
        category = int(rng.integers(0, 8))
        count = int(rng.integers(0, 50))
        label = int(rng.random() < (0.85 if category < 4 else 0.15))
        dense = [str(count)] + ["" if rng.random() < 0.2 else str(int(rng.integers(0, 9)))
                                for _ in range(12)]  # fmt: skip
        sparse = [f"{category:08x}"] + [
            "" if rng.random() < 0.1 else f"{int(rng.integers(0, 1000)):08x}" for _ in range(25)
        ]
        lines.append("\t".join([str(label), *dense, *sparse]))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_dlrm_trains_on_a_criteo_tsv_file(tmp_path: Path) -> None:
    tsv = _criteo_file(tmp_path / "day_0.tsv", 1200)
    out = tmp_path / "run"
    config = TrainConfig(
        model="dlrm",
        data=str(tsv),
        out=out,
        nproc=2,
        epochs=3,
        batch_size=32,
        data_options={"table_size": 64},
    )
    metrics = launch(config)
    assert metrics["dataset"] == "criteo"
    assert metrics["split"]["num_train"] + metrics["split"]["num_eval"] == 1200
    assert metrics["eval"]["eval_examples"] == metrics["split"]["num_eval"]
    assert metrics["eval"]["auc"] > 0.75
    assert list_checkpoints(out)
    _, model = load_unsharded(out)
    source = CriteoSource(tsv, table_size=64)
    batches = source.batches(metrics["split"]["num_eval"], eval_fraction=0.1, seed=0, split="eval")
    reloaded = evaluate_ranking(model, batches)
    assert reloaded["auc"] == pytest.approx(metrics["eval"]["auc"], abs=1e-5)
