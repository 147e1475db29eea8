"""`recship package` end to end on real checkpoints: publish, versions, quality gate, failures.

The packaged int8 pipeline is compared with the unsharded fp32 models reloaded from the
checkpoints (not only with its own sharded eager version), for W = 1 and W = 2.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from recship.base.errors import InvalidInput, NotFound, QualityGateFailed
from recship.bundle.entrypoints import load_entry_point
from recship.bundle.index import read_index, search
from recship.bundle.layout import published_versions
from recship.bundle.manifest import read_manifest
from recship.packager.api import package
from recship.packager.checkpoint import load_checkpoint
from recship.packager.entrypoints import jagged_inputs
from recship.packager.options import PackageOptions, QualityThresholds
from recship.packager.verify import exact_search, ranked_recall
from recship.trainer.data.batches import entity_kjt, pair_batch
from recship.trainer.evaluate import pipeline_metrics, positives_by_user, tower_embeddings

pytestmark = pytest.mark.slow

RECSHIP = str(Path(sys.executable).with_name("recship"))


@pytest.fixture(scope="module")
def runs(trained_runs: tuple[Path, Path]) -> tuple[Path, Path]:
    return trained_runs


def _options(runs: tuple[Path, Path], repo: Path, **overrides) -> PackageOptions:
    return PackageOptions(retrieval=runs[0], ranking=runs[1], repo=repo, name="movies", **overrides)


def _package_argv(runs: tuple[Path, Path], repo: Path) -> list[str]:
    """`recship package` of the session runs into `repo` as bundle "movies"."""
    return [RECSHIP, "package", "--retrieval", str(runs[0]), "--ranking", str(runs[1]),
            "--repo", str(repo), "--name", "movies"]  # fmt: skip


def _version_files(repo: Path) -> set[str]:
    return {str(p.relative_to(repo)) for p in repo.rglob("*") if ".staging-" not in str(p)}


@pytest.mark.parametrize("devices", [1, 2])
def test_packaged_int8_pipeline_matches_the_fp32_models(runs, tmp_path: Path, devices: int) -> None:
    repo = tmp_path / "repo"
    report = package(_options(runs, repo, devices=devices))
    assert report.ref.version == 1
    assert published_versions(repo / "movies") == [1]
    manifest = read_manifest(report.ref.path / "MANIFEST.json")
    assert manifest.quality.passed
    assert manifest.sharding.device_count == devices
    assert {rank for p in manifest.sharding.placements for rank in p.ranks} == set(range(devices))
    # The manifest records exactly what the gate measured.
    assert dict(manifest.quality.metrics) == pytest.approx(report.quality.metrics)

    # Recompute the gate's numbers independently from the published files and the fp32 models.
    retrieval = load_checkpoint(runs[0], "two-tower")
    query_tower = load_entry_point(report.ref.path / "query_tower.pt")
    index = read_index(report.ref.path / "items.faiss", manifest.index)
    users = np.arange(retrieval.train.num_users)
    features = list(manifest.entry_points[0].sparse_feature_order)
    inputs = jagged_inputs(retrieval.train.users, users, features)
    with torch.no_grad():
        packaged_queries = query_tower(*inputs).numpy()
        tower = retrieval.model.query_tower  # type: ignore[union-attr]
        fp32_queries = tower(entity_kjt(retrieval.train.users, users, features)).numpy()
    cosine = (packaged_queries * fp32_queries).sum(1) / (
        np.linalg.norm(packaged_queries, axis=1) * np.linalg.norm(fp32_queries, axis=1)
    )
    assert cosine.min() > 0.99
    candidate = retrieval.model.candidate_tower  # type: ignore[union-attr]
    items = tower_embeddings(candidate, retrieval.train.items, candidate.feature_names).numpy()
    targets = positives_by_user(retrieval.held_out.user_ids, retrieval.held_out.item_ids)
    held_out_users = np.array(sorted(targets))
    train = retrieval.train
    seen = positives_by_user(train.user_ids, train.item_ids)
    fp32 = ranked_recall(
        fp32_queries[held_out_users], exact_search(items), held_out_users, targets, seen
    )
    index_search = functools.partial(search, index, threads=None)
    packaged = ranked_recall(
        packaged_queries[held_out_users], index_search, held_out_users, targets, seen
    )
    metrics = manifest.quality.metrics
    for k in (10, 100):
        assert metrics[f"fp32_exact/recall@{k}"] == pytest.approx(fp32[f"recall@{k}"], abs=1e-9)
        assert metrics[f"packaged/recall@{k}"] == pytest.approx(packaged[f"recall@{k}"], abs=1e-9)
        assert packaged[f"recall@{k}"] >= 0.98 * fp32[f"recall@{k}"]
    # A model that learned something: far above random retrieval (10 / 300 items).
    assert fp32["recall@10"] > 3 * 10 / retrieval.train.num_items
    # End to end, recomputed from the published index and ranker: retrieve the deepest K of
    # the sweep with training items excluded inside the search, rank, keep the top 10.
    ranker = load_entry_point(report.ref.path / "ranker.pt")
    ranking = load_checkpoint(runs[1], "dlrm")
    sweep = [point.retrieve_k for point in manifest.quality.end_to_end.sweep]
    _, candidates = index_search(
        packaged_queries[held_out_users], max(sweep), [seen[int(u)] for u in held_out_users]
    )

    def score(user_ids: np.ndarray, item_ids: np.ndarray) -> np.ndarray:
        batch = pair_batch(ranking.train, user_ids, item_ids)
        kjt = batch.sparse_features
        with torch.no_grad():
            return ranker(batch.dense_features, kjt.values(), kjt.lengths()).numpy()

    expected = pipeline_metrics(held_out_users, candidates, score, targets, train, sweep, 10)
    end_to_end = manifest.quality.end_to_end
    assert end_to_end.users == held_out_users.size
    assert end_to_end.retrieval_recall == pytest.approx(expected["retrieval/recall@10"])
    assert end_to_end.retrieval_ndcg == pytest.approx(expected["retrieval/ndcg@10"])
    for point in end_to_end.sweep:
        assert point.recall == pytest.approx(expected[f"recommend@{point.retrieve_k}/recall@10"])
        assert point.ndcg == pytest.approx(expected[f"recommend@{point.retrieve_k}/ndcg@10"])
    assert manifest.serving.retrieve_k in sweep
    assert end_to_end.recommend_recall >= end_to_end.retrieval_recall  # the gate's default
    assert metrics["packaged/auc"] > 0.6
    assert abs(metrics["fp32/auc"] - metrics["packaged/auc"]) <= 0.005


def test_second_run_publishes_the_next_version_and_int8_is_smaller(runs, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    first = package(_options(runs, repo))
    # int4 tables under a dot product move logits further than int8's golden tolerance.
    int4_gate = QualityThresholds(max_logit_diff=1.0)
    second = package(_options(runs, repo, quant="int4", thresholds=int4_gate))
    assert (first.ref.version, second.ref.version) == (1, 2)
    assert published_versions(repo / "movies") == [1, 2]
    for report in (first, second):
        fp32 = sum(t.fp32_bytes for t in report.manifest.quantization)
        packaged = sum(t.packaged_bytes for t in report.manifest.quantization)
        assert fp32 / packaged >= (3.0 if report is first else 5.0)
    assert first.manifest.release_id != second.manifest.release_id


def test_failing_quality_gate_publishes_nothing(runs, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    impossible = QualityThresholds(max_recall_loss=-1.0)
    with pytest.raises(
        QualityGateFailed, match=r"recall@10 relative loss = .* \(needs <= -1\.0000\)"
    ):
        package(_options(runs, repo, thresholds=impossible))
    assert published_versions(repo / "movies") == []
    assert [p.name for p in (repo / "movies").iterdir() if p.name != ".lock"] == []


def test_mismatched_and_missing_inputs_are_clear_errors(
    runs, tmp_path: Path, train_synthetic
) -> None:
    with pytest.raises(NotFound, match=r"model_config\.json"):
        package(_options((tmp_path / "nowhere", runs[1]), tmp_path / "repo"))
    with pytest.raises(InvalidInput, match="holds a dlrm model, expected two-tower"):
        package(_options((runs[1], runs[1]), tmp_path / "repo"))
    other = train_synthetic(tmp_path / "other", "dlrm", 1, num_items=250)
    with pytest.raises(InvalidInput, match="item feature 'item_id' has 300 ids for retrieval"):
        package(_options((runs[0], other), tmp_path / "repo"))
    assert not (tmp_path / "repo" / "movies").exists() or not published_versions(
        tmp_path / "repo" / "movies"
    )


def test_cli_errors_are_one_line(runs, tmp_path: Path) -> None:
    unwritable = tmp_path / "file-not-dir"
    unwritable.write_text("x")
    result = subprocess.run(
        _package_argv(runs, unwritable),
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "cannot write to bundle repository" in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    bad_quant = subprocess.run(
        [*_package_argv(runs, tmp_path / "r"), "--quant", "int3"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad_quant.returncode == 2 and "int3" in bad_quant.stderr


def test_kill_during_package_leaves_the_repo_unchanged(runs, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    package(_options(runs, repo))
    before = _version_files(repo)
    process = subprocess.Popen(
        _package_argv(runs, repo),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # Wait until the run has started writing its staging folder, then kill -9 it.
        deadline = time.monotonic() + 120
        while not any(
            p.name.startswith(".staging-") and any(p.iterdir()) for p in (repo / "movies").iterdir()
        ):
            assert process.poll() is None, "package finished before it could be killed"
            assert time.monotonic() < deadline, "package never started writing"
            time.sleep(0.01)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    assert published_versions(repo / "movies") == [1]
    assert _version_files(repo) == before
    # The next run cleans nothing it should not and publishes version 2.
    assert package(_options(runs, repo)).ref.version == 2


def test_verify_and_inspect(runs, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    ref = package(_options(runs, repo)).ref
    ok = subprocess.run([RECSHIP, "verify", str(ref.path)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "verified" in ok.stdout
    shown = subprocess.run(
        [RECSHIP, "inspect", str(repo / "movies")], capture_output=True, text=True
    )
    assert shown.returncode == 0, shown.stderr
    for text in ("embedding tables", "quality gate passed", "items.faiss", "item_genres"):
        assert text in shown.stdout
    index_file = ref.path / "items.faiss"
    os.chmod(ref.path, 0o755)
    os.chmod(index_file, 0o644)
    data = bytearray(index_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    index_file.write_bytes(bytes(data))
    bad = subprocess.run([RECSHIP, "verify", str(ref.path)], capture_output=True, text=True)
    assert bad.returncode == 1
    assert "items.faiss: sha256" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_the_ranker_shares_the_retrievals_data_split_when_both_record_the_same(
    runs, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dataclasses

    from recship.packager import checkpoint

    reopened: list[Path] = []
    reopen = checkpoint.reopen_split

    def counted(payload, where):
        reopened.append(where)
        return reopen(payload, where)

    monkeypatch.setattr(checkpoint, "reopen_split", counted)
    retrieval = load_checkpoint(runs[0], "two-tower")
    ranking = load_checkpoint(runs[1], "dlrm", same_data=retrieval)
    assert reopened == [runs[0]]  # one copy of the data for both models
    assert ranking.train is retrieval.train and ranking.held_out is retrieval.held_out
    data = retrieval.payload["data"]
    other = {**data, "split": {**data["split"], "seed": data["split"]["seed"] + 1}}
    elsewhere = dataclasses.replace(retrieval, payload={**retrieval.payload, "data": other})
    assert load_checkpoint(runs[1], "dlrm", same_data=elsewhere).train is not retrieval.train
    assert reopened == [runs[0], runs[1]]
