"""The end-to-end quality gate: validation sources, UNGATED bundles, the retrieve_k choice.

Real training (tiny synthetic data, one rank) for the sources; the gate's arithmetic on
measured figures for the choice of retrieve_k and the Recommend-vs-retrieval check.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from recship.base.errors import InvalidInput
from recship.bundle.layout import published_versions
from recship.bundle.manifest import read_manifest
from recship.bundle.store import UNGATED_WARNING, BundleStore
from recship.cli.pipeline import SMOKE_GATE, package_runs, train_models
from recship.packager.checkpoint import load_checkpoint
from recship.packager.evaluation import EvalSplit
from recship.packager.options import QualityThresholds
from recship.packager.verify import EndToEnd, choose_retrieve_k, quality_gate, retrieve_k_sweep
from recship.trainer.config import FITTED_TRANSFORMS_DIR

RECSHIP = str(Path(sys.executable).with_name("recship"))
DATA = {"num_users": 200, "num_items": 150, "interactions_per_user": 10}


@pytest.fixture(scope="module")
def unsplit_runs(tmp_path_factory: pytest.TempPathFactory, synthetic_data):
    """Both models trained with --eval-fraction 0: no held-out data at all."""
    root = tmp_path_factory.mktemp("unsplit")
    data = synthetic_data(root, **DATA)
    return train_models(root / "runs", str(data), {}, epochs=1, embedding_dim=8, eval_fraction=0)


@pytest.mark.slow
def test_no_held_out_data_is_refused_in_one_line(unsplit_runs, tmp_path: Path) -> None:
    for run in unsplit_runs.retrieval, unsplit_runs.ranking:  # the trainer said why, too
        written = json.loads((run / "metrics.json").read_text())
        assert written["eval"] == {} and "--eval-fraction 0" in written["eval_skipped"]
    runs = unsplit_runs
    argv = [RECSHIP, "package", "--retrieval", str(runs.retrieval),
            "--ranking", str(runs.ranking), "--repo", str(tmp_path), "--name", "m"]  # fmt: skip
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "--eval-fraction 0" in lines[0] and "--eval-data" in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "m").exists() or published_versions(tmp_path / "m") == []


@pytest.mark.slow
def test_no_quality_gate_publishes_it_marked_ungated(unsplit_runs, tmp_path: Path) -> None:
    report = package_runs(unsplit_runs, tmp_path, "m", quality_gate=False)
    manifest = read_manifest(report.ref.path / "MANIFEST.json")
    assert manifest.quality.ungated and not manifest.quality.HasField("end_to_end")
    assert not manifest.quality.eval_source
    # No figure measured on training rows is reported as quality.
    assert set(manifest.quality.metrics) == {"index/recall@100_vs_exact"}
    assert BundleStore(tmp_path).validate("m", 1).warnings[-1] == UNGATED_WARNING
    shown = subprocess.run(
        [RECSHIP, "inspect", str(tmp_path / "m")], capture_output=True, text=True, check=True
    ).stdout
    assert "quality gate UNGATED" in shown
    with pytest.raises(InvalidInput, match="exclude each other"):
        package_runs(unsplit_runs, tmp_path, "m", quality_gate=False, eval_data=tmp_path / "x")


def _write_pairs(path: Path, run: Path, users: np.ndarray, items: np.ndarray) -> None:
    """A --eval-data table of raw keys, columns named by the key features."""
    train = load_checkpoint(run, "two-tower").train
    assert train.transforms is not None
    header = f"{train.transforms.user_key},{train.transforms.item_key}"
    keys = zip(train.raw_user_ids[users], train.raw_item_ids[items], strict=True)
    rows = [f"{user},{item}" for user, item in keys]
    path.write_text("\n".join([header, *rows]) + "\n")


@pytest.mark.slow
def test_eval_data_of_the_held_out_split_gives_the_held_out_figures(
    trained_runs, tmp_path: Path
) -> None:
    from recship.cli.pipeline import TrainedRuns

    runs = TrainedRuns(*trained_runs)
    held_out = load_checkpoint(runs.retrieval, "two-tower").held_out
    own = package_runs(runs, tmp_path, "own", thresholds=SMOKE_GATE)
    table = tmp_path / "pairs.csv"
    _write_pairs(table, runs.retrieval, held_out.user_ids, held_out.item_ids)
    given = package_runs(runs, tmp_path, "given", thresholds=SMOKE_GATE, eval_data=table)
    for key, value in own.quality.metrics.items():
        if key.startswith(("fp32_exact/", "packaged/recall", "end_to_end/")):
            assert given.quality.metrics[key] == pytest.approx(value), key
    assert "auc_loss" not in given.quality.metrics  # --eval-data carries no labels
    assert given.manifest.quality.eval_source == f"--eval-data {table}"
    assert own.manifest.quality.eval_source.startswith("held-out split of ")

    # Unknown keys and training interactions are dropped and counted, not measured.
    train = load_checkpoint(runs.retrieval, "two-tower").train
    mixed = tmp_path / "mixed.csv"
    _write_pairs(mixed, runs.retrieval, train.user_ids[:5], train.item_ids[:5])
    with pytest.raises(InvalidInput, match="none of its 5 rows"):
        package_runs(runs, tmp_path, "given", thresholds=SMOKE_GATE, eval_data=mixed)
    with pytest.raises(InvalidInput, match="no column"):
        mixed.write_text("who\n1\n")
        package_runs(runs, tmp_path, "given", thresholds=SMOKE_GATE, eval_data=mixed)


def _end_to_end(points: dict[int, tuple[float, float]], retrieval: tuple[float, float]):
    metrics = {"retrieval/recall@10": retrieval[0], "retrieval/ndcg@10": retrieval[1]}
    for k, (recall, ndcg) in points.items():
        metrics[f"recommend@{k}/recall@10"] = recall
        metrics[f"recommend@{k}/ndcg@10"] = ndcg
    chosen = choose_retrieve_k(metrics, tuple(points), 10)
    return EndToEnd(metrics, tuple(points), chosen, 10, 100)


def test_retrieve_k_is_the_smallest_within_the_tolerance_of_the_best() -> None:
    flat = _end_to_end({50: (0.300, 0.308), 100: (0.302, 0.31), 200: (0.301, 0.31)}, (0.28, 0.3))
    assert flat.retrieve_k == 50  # within 1 % of the best on both
    rising = _end_to_end({50: (0.25, 0.30), 100: (0.28, 0.31), 200: (0.30, 0.32)}, (0.28, 0.3))
    assert rising.retrieve_k == 200
    # NDCG counts too: recall is flat, NDCG is best deeper.
    assert _end_to_end({50: (0.3, 0.25), 100: (0.3, 0.30)}, (0.2, 0.2)).retrieve_k == 100
    assert retrieve_k_sweep(1682) == (50, 100, 200, 500, 1000)
    assert retrieve_k_sweep(300) == (50, 100, 200)
    assert retrieve_k_sweep(30) == (30,)


def test_the_gate_fails_when_recommend_is_worse_than_retrieval_alone() -> None:
    worse = _end_to_end({50: (0.20, 0.26), 100: (0.19, 0.25)}, (0.25, 0.28))
    recall = {"recall@10": 0.25, "recall@100": 0.6}
    result = quality_gate(recall, recall, None, 1.0, worse, QualityThresholds(), 0)
    failed = result.failures()
    assert len(failed) == 2 and all("Recommend@50 vs retrieval alone" in f for f in failed)
    assert "recall@10 relative loss = 0.2000" in failed[0]
    tolerant = QualityThresholds(max_recommend_loss=0.25)
    assert quality_gate(recall, recall, None, 1.0, worse, tolerant, 0).passed
    better = _end_to_end({50: (0.27, 0.30)}, (0.25, 0.28))
    assert quality_gate(recall, recall, None, 1.0, better, QualityThresholds(), 0).passed


@pytest.mark.slow
def test_data_that_fit_otherwise_than_at_training_are_refused(unsplit_runs, tmp_path) -> None:
    run = tmp_path / "two-tower"
    shutil.copytree(unsplit_runs.retrieval, run)
    saved = run / FITTED_TRANSFORMS_DIR / "transforms.json"
    assert load_checkpoint(run, "two-tower").train.transforms is not None  # as trained: fine
    document = json.loads(saved.read_text())
    dense = next(f for f in document["features"] if f["kind"] == "dense")
    dense["mean"] += 1.0  # as if the users table had changed since training
    saved.write_text(json.dumps(document))
    with pytest.raises(InvalidInput, match=f"feature '{dense['name']}' fits differently"):
        load_checkpoint(run, "two-tower")


def test_a_sample_of_everyone_is_every_validation_user_and_smaller_ones_are_seeded() -> None:
    targets = {user: np.array([user % 7]) for user in range(0, 60, 3)}
    users = np.repeat(np.array(sorted(targets)), 2)  # two pairs per user, one item
    split = EvalSplit(users, users % 7, "held-out split of runs/tt")
    assert {u: t.tolist() for u, t in split.targets(np.arange(60)).items()} == {
        u: t.tolist() for u, t in targets.items()
    }
    assert sorted(split.targets(np.array([3, 4, 57]))) == [3, 57]
    everyone = split.sample(len(targets), np.random.default_rng(0))
    assert everyone.tolist() == sorted(targets)  # the sampled gate is then the full gate
    assert split.sample(10**6, np.random.default_rng(1)).tolist() == sorted(targets)
    some = split.sample(5, np.random.default_rng(3))
    assert some.size == 5 and set(some) <= set(targets) and list(some) == sorted(some)
    assert some.tolist() == split.sample(5, np.random.default_rng(3)).tolist()


@pytest.mark.slow
def test_a_ranker_is_packaged_only_with_the_retrieval_it_was_mined_from(
    trained_runs, train_synthetic, tmp_path: Path
) -> None:
    from recship.cli.pipeline import TrainedRuns

    other = train_synthetic(tmp_path / "other-tt", "two-tower", 1)  # same data, another run
    with pytest.raises(InvalidInput, match="negatives were mined from"):
        package_runs(TrainedRuns(other, trained_runs[1]), tmp_path / "repo", "m")
