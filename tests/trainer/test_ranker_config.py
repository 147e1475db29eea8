"""Ranker options: defaults per data kind, the retrieval checks and the recorded provenance."""

from __future__ import annotations

from pathlib import Path

import pytest

from recship.base.errors import InvalidInput
from recship.trainer.config import (
    TrainConfig,
    merge_for_resume,
    model_config_for,
    read_model_config,
    resolve_defaults,
    write_model_config,
)
from recship.trainer.data.synthetic import generate
from recship.trainer.retrieval import (
    RetrievalProvenance,
    check_provenance,
    config_sha256,
    load_retrieval,
)

OUT = Path("unused")


def _dlrm(**fields) -> TrainConfig:
    return TrainConfig(**{"model": "dlrm", "data": "synthetic", "out": OUT, **fields})


def test_interaction_data_defaults_to_interaction_examples_with_retrieval_tables() -> None:
    config = resolve_defaults(_dlrm(retrieval="runs/tt"), "synthetic", retrieval_dim=64)
    assert config.examples == "interactions"
    assert (config.hard_negatives, config.random_negatives, config.mine_k) == (2, 8, 200)
    assert config.mine_skip == 20
    assert (config.batch_size, config.dense_lr, config.sparse_lr) == (1024, 4e-3, 0.2)
    assert config.init_from_retrieval and config.embedding_dim == 64
    assert config.dense_arch_layers[-1] == 64
    assert config.rating_weights and config.lr_schedule == "linear"


def test_a_given_batch_size_keeps_the_256_batch_learning_rates() -> None:
    config = resolve_defaults(
        _dlrm(retrieval="runs/tt", batch_size=128), "synthetic", retrieval_dim=64
    )
    assert (config.batch_size, config.dense_lr, config.sparse_lr) == (128, 1e-3, 0.1)
    labelled = resolve_defaults(_dlrm(examples="labelled"), "synthetic")
    assert (labelled.batch_size, labelled.dense_lr, labelled.mine_skip) == (256, 1e-3, None)
    with pytest.raises(InvalidInput, match="--mine-skip must be >= 0"):
        _dlrm(mine_skip=-1)


def test_without_retrieval_the_examples_must_be_chosen() -> None:
    with pytest.raises(InvalidInput, match="pass --retrieval"):
        resolve_defaults(_dlrm(), "synthetic")
    assert resolve_defaults(_dlrm(examples="labelled"), "synthetic").examples == "labelled"
    with pytest.raises(InvalidInput, match="--random-negatives: only for --examples"):
        resolve_defaults(_dlrm(examples="labelled", random_negatives=3), "synthetic")


def test_interactions_without_retrieval_draw_every_negative_from_the_catalogue() -> None:
    config = resolve_defaults(_dlrm(examples="interactions"), "synthetic")
    assert (config.hard_negatives, config.random_negatives) == (0, 10)
    assert not config.init_from_retrieval and config.embedding_dim == 16
    with pytest.raises(InvalidInput, match="--hard-negatives are mined"):
        resolve_defaults(_dlrm(examples="interactions", hard_negatives=2), "synthetic")
    with pytest.raises(InvalidInput, match="needs --retrieval"):
        resolve_defaults(_dlrm(examples="interactions", init_from_retrieval=True), "synthetic")


def test_labelled_examples_keep_the_old_recipe_and_criteo_keeps_its_labels() -> None:
    old = resolve_defaults(_dlrm(examples="labelled"), "movielens-100k")
    assert old.hard_negatives is None and old.lr_schedule == "constant"
    assert old.embedding_dim == 16 and not old.init_from_retrieval
    criteo = resolve_defaults(_dlrm(), "criteo")
    assert criteo.examples == "labelled"
    with pytest.raises(InvalidInput, match="keeps its labels"):
        resolve_defaults(_dlrm(retrieval="runs/tt"), "criteo")
    with pytest.raises(InvalidInput, match="labelled examples use none"):
        _dlrm(examples="labelled", retrieval="runs/tt")


def test_ranking_flags_are_refused_for_two_tower_and_dims_must_match() -> None:
    with pytest.raises(InvalidInput, match="only for `recship train dlrm`"):
        TrainConfig(model="two-tower", data="synthetic", out=OUT, retrieval="runs/tt")
    with pytest.raises(InvalidInput, match="--embedding-dim 32"):
        resolve_defaults(_dlrm(retrieval="runs/tt", embedding_dim=32), "synthetic", 64)
    free = resolve_defaults(
        _dlrm(retrieval="runs/tt", embedding_dim=32, init_from_retrieval=False), "synthetic", 64
    )
    assert free.embedding_dim == 32 and free.hard_negatives == 2


def test_a_resumed_ranker_keeps_its_examples_recipe(tmp_path: Path) -> None:
    saved = resolve_defaults(_dlrm(retrieval="runs/tt", out=tmp_path), "synthetic", 64)
    with pytest.raises(InvalidInput, match="--hard-negatives"):
        merge_for_resume(_dlrm(out=tmp_path, hard_negatives=3), saved)
    merged = merge_for_resume(_dlrm(out=tmp_path, lr_schedule="constant"), saved)
    assert merged.lr_schedule == "constant" and merged.retrieval == "runs/tt"


def _two_tower_output(folder: Path, seed: int) -> Path:
    data = generate(num_users=20, num_items=15, interactions_per_user=4)
    config = resolve_defaults(
        TrainConfig(model="two-tower", data="synthetic", out=folder, seed=seed), "synthetic"
    )
    split = {"seed": seed, "eval_fraction": 0.1, "num_train": 0, "num_eval": 0}
    folder.mkdir(parents=True)
    write_model_config(folder, model_config_for(config, data.schema), config, split)
    return folder


def test_retrieval_from_another_split_is_refused(tmp_path: Path) -> None:
    retrieval = _two_tower_output(tmp_path / "tt", seed=1)
    ranker = resolve_defaults(_dlrm(retrieval=str(retrieval)), "synthetic", 64)
    with pytest.raises(InvalidInput, match=r"another split .*seed 1 vs 0"):
        load_retrieval(retrieval, ranker)


def test_provenance_is_written_and_checked(tmp_path: Path) -> None:
    retrieval = _two_tower_output(tmp_path / "tt", seed=0)
    digest = config_sha256(retrieval)
    provenance = RetrievalProvenance(str(retrieval), digest, 42, "ab" * 32)
    data = generate(num_users=20, num_items=15, interactions_per_user=4)
    ranker = resolve_defaults(_dlrm(retrieval=str(retrieval), out=tmp_path / "r"), "synthetic", 64)
    (tmp_path / "r").mkdir()
    write_model_config(
        tmp_path / "r",
        model_config_for(ranker, data.schema),
        ranker,
        {"seed": 0, "eval_fraction": 0.1},
        retrieval=provenance.to_dict(),
    )
    _, payload = read_model_config(tmp_path / "r")
    assert RetrievalProvenance.from_dict(payload["retrieval"]) == provenance
    check_provenance(payload, digest, 42, "pair")
    with pytest.raises(InvalidInput, match="step 42"):
        check_provenance(payload, digest, 43, "pair")
    with pytest.raises(InvalidInput, match="mined from"):
        check_provenance(payload, "0" * 64, 42, "pair")
    check_provenance(payload, digest, 42, "pair", "ab" * 32)
    with pytest.raises(InvalidInput, match="retrained since"):
        check_provenance(payload, digest, 42, "pair", "cd" * 32)
    check_provenance({}, digest, 7, "pair")  # a ranker with no retrieval section passes
