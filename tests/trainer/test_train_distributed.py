"""Real 2-rank gloo training on small synthetic data: checkpoints, reload, resume, quality."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from recship.trainer.checkpoint import list_checkpoints, load_unsharded, read_progress
from recship.trainer.config import TrainConfig
from recship.trainer.data.synthetic import generate
from recship.trainer.evaluate import eval_user_sample, evaluate
from recship.trainer.train import launch

pytestmark = pytest.mark.slow

SYNTHETIC = {"num_users": 300, "num_items": 200, "interactions_per_user": 10}
EVAL_USERS = 100


def _train(out: Path, model: str, **overrides) -> dict:
    config = TrainConfig(
        model=model,
        data="synthetic",
        out=out,
        nproc=2,
        epochs=2,
        batch_size=64,
        data_options=dict(SYNTHETIC),
        **overrides,
    )
    return launch(config)


@pytest.fixture(scope="module")
def two_tower_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("tt") / "run"
    # 100 of the 300 users: the evaluation gathers only the rows of the user tables they read.
    return out, _train(out, "two-tower", checkpoint_every=10, eval_users=EVAL_USERS)


@pytest.fixture(scope="module")
def dlrm_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("dlrm") / "run"
    # Labelled pairs, so that the held-out AUC of the labels measures the training; the
    # interaction recipe is judged end to end in test_ranker_end_to_end.py.
    return out, _train(out, "dlrm", sharding="row_wise", examples="labelled")


def _held_out(out: Path):
    payload = json.loads((out / "model_config.json").read_text())
    data = generate(**payload["data"]["options"])
    split = payload["data"]["split"]
    return data.split(split["eval_fraction"], split["seed"])


def test_two_rank_run_writes_dcp_checkpoints_config_and_metrics(two_tower_run) -> None:
    out, metrics = two_tower_run
    steps = [step for step, _ in list_checkpoints(out)]
    # 2700 training examples / (64 x 2 ranks) = 21 steps per epoch, 2 epochs; keep 3 newest.
    assert steps == [30, 40, 42]
    final = out / "checkpoints" / "step_42"
    assert sorted(p.name for p in final.glob("__*_0.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert (final / ".metadata").is_file() and (final / "COMPLETE").is_file()
    progress = read_progress(final)
    assert (progress.step, progress.epoch, progress.batch_in_epoch) == (42, 2, 0)
    assert progress.world_size == 2
    model_config = json.loads((out / "model_config.json").read_text())
    assert model_config["model"]["kind"] == "two-tower"
    assert model_config["model"]["loss"] == "softmax"
    assert model_config["model"]["schema"]["name"] == "synthetic"
    assert model_config["data"]["split"]["eval_fraction"] == 0.1
    assert {t["side"] for t in model_config["model"]["tables"]} == {"user", "item"}
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["step"] == metrics["step"] == 42
    assert on_disk["world_size"] == 2
    assert set(on_disk["sharding_plan"]) == {t["name"] for t in model_config["model"]["tables"]}


def test_two_rank_checkpoint_reloads_in_one_process_with_equal_metrics(
    two_tower_run, dlrm_run
) -> None:
    # The runs evaluated a view (the sampled users' rows of the user tables, gathered from the
    # shards); the reloaded whole model on the same users gives the same figures.
    for out, metrics in (two_tower_run, dlrm_run):
        config, model = load_unsharded(out)
        train, held_out = _held_out(out)
        sample = eval_user_sample(held_out, EVAL_USERS, seed=0) if out == two_tower_run[0] else None
        assert (sample is None) == (out == dlrm_run[0])
        reloaded = evaluate(config, model, train, held_out, users=sample)
        assert reloaded.keys() == metrics["eval"].keys()
        for name, value in metrics["eval"].items():
            assert reloaded[name] == pytest.approx(value, abs=1e-5), name


def test_trained_models_beat_random_and_popularity(two_tower_run, dlrm_run) -> None:
    _, metrics = two_tower_run
    random_recall = 10 / SYNTHETIC["num_items"]
    assert metrics["eval"]["recall@10"] > 4 * random_recall
    assert metrics["eval"]["recall@10"] > metrics["baselines"]["popularity"]["recall@10"]
    _, metrics = dlrm_run
    assert metrics["eval"]["auc"] > 0.6
    assert all(entry["sharding"] == "row_wise" for entry in metrics["sharding_plan"].values())


def test_two_rank_checkpoint_resumes_under_one_rank(two_tower_run, tmp_path: Path) -> None:
    source, _ = two_tower_run
    out = tmp_path / "resumed"
    shutil.copytree(source, out)
    metrics = launch(
        TrainConfig(model="two-tower", data="synthetic", out=out, nproc=1, epochs=3, resume=True)
    )
    # One more epoch at world size 1: 2700 / 64 = 42 steps, after the 42 already taken.
    assert metrics["step"] == 84
    assert metrics["train"]["steps_this_run"] == 42
    assert metrics["world_size"] == 1
    assert read_progress(out / "checkpoints" / "step_84").world_size == 1
    assert metrics["eval"]["recall@10"] > metrics["baselines"]["popularity"]["recall@10"]
