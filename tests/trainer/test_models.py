"""Models and configs: shapes, feature-name indexing, the in-batch loss, config round trips."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from recship.base.errors import InvalidInput, NotFound
from recship.trainer.config import (
    ModelConfig,
    TrainConfig,
    merge_for_resume,
    model_config_for,
    read_model_config,
    resolve_defaults,
    write_model_config,
)
from recship.trainer.data.batches import entity_kjt, ranking_batches, two_tower_batches
from recship.trainer.data.synthetic import generate
from recship.trainer.models import (
    TwoTower,
    build_model,
    build_train_module,
    in_batch_loss,
    item_log_frequencies,
)


@pytest.fixture(scope="module")
def data():
    return generate(num_users=60, num_items=40, interactions_per_user=5, seed=3)


def _config(model: str, data, **overrides) -> tuple[TrainConfig, ModelConfig]:
    if model == "dlrm":  # the model, not a ranking recipe, is under test
        overrides.setdefault("examples", "labelled")
    train = resolve_defaults(
        TrainConfig(
            model=model, data="synthetic", out=Path("unused"), embedding_dim=8, **overrides
        ),
        data.schema.name,
    )
    return train, model_config_for(train, data.schema)


def test_two_tower_towers_embed_into_the_same_normalised_space(data) -> None:
    _, config = _config("two-tower", data, tower_layers=(16, 12))
    torch.manual_seed(0)
    model = build_model(config)
    users = model.query_tower(entity_kjt(data.users, np.arange(7), model.query_tower.feature_names))
    items = model.candidate_tower(
        entity_kjt(data.items, np.arange(5), model.candidate_tower.feature_names)
    )
    assert users.shape == (7, 12) and items.shape == (5, 12)
    torch.testing.assert_close(users.norm(dim=1), torch.ones(7))
    assert {t.side for t in config.side_tables("user")} == {"user"}
    assert [t.feature for t in config.tables] == [f.name for f in data.schema.sparse]


def test_tower_output_does_not_depend_on_kjt_key_order(data) -> None:
    """Pooled embeddings are indexed by feature name, never by position."""
    _, config = _config("two-tower", data)
    torch.manual_seed(0)
    tower = build_model(config).query_tower
    names = tower.feature_names
    ids = np.arange(9)
    forward = tower(entity_kjt(data.users, ids, names))
    backward = tower(entity_kjt(data.users, ids, list(reversed(names))))
    torch.testing.assert_close(forward, backward)


def test_in_batch_softmax_masks_duplicate_items_and_applies_log_q() -> None:
    query = torch.eye(3)
    candidate = torch.eye(3)
    log_q = torch.log(torch.tensor([0.5, 0.25, 0.25]))
    # Items 0 and 0 twice: the duplicate must not count as a negative of its twin.
    duplicate_ids = torch.tensor([0, 0, 1])
    loss, positives = in_batch_loss(query, candidate, duplicate_ids, log_q, "softmax", 1.0)
    corrected = torch.eye(3) - log_q[duplicate_ids].unsqueeze(0)
    corrected[0, 1] = corrected[1, 0] = torch.finfo(torch.float32).min
    expected = torch.nn.functional.cross_entropy(corrected, torch.arange(3))
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(positives, torch.ones(3))
    bce, _ = in_batch_loss(query, candidate, torch.tensor([0, 1, 2]), log_q, "bce", 0.5)
    assert torch.isfinite(bce) and bce > 0


def test_train_modules_return_loss_and_outputs(data) -> None:
    _, tt_config = _config("two-tower", data)
    model = build_model(tt_config)
    wrapper = build_train_module(
        tt_config, model, item_log_frequencies(data.item_ids, data.num_items)
    )
    loss, (detached, _) = wrapper(next(two_tower_batches(data, 16)))
    loss.backward()
    assert loss.requires_grad and not detached.requires_grad
    assert all(k.startswith("model.") for k in wrapper.state_dict())

    _, dlrm_config = _config("dlrm", data)
    dlrm = build_model(dlrm_config)
    loss, (_, logits, labels) = build_train_module(dlrm_config, dlrm)(
        next(ranking_batches(data, 16))
    )
    assert logits.shape == labels.shape == (16,)


def test_log_frequencies_are_smoothed_log_shares() -> None:
    log_q = item_log_frequencies(np.array([0, 0, 1]), 3)
    torch.testing.assert_close(log_q.exp(), torch.tensor([3 / 6, 2 / 6, 1 / 6]))


def test_model_config_round_trips_through_model_config_json(data, tmp_path: Path) -> None:
    train, config = _config("two-tower", data, tower_layers=(32, 16))
    write_model_config(tmp_path, config, train, {"seed": 0, "eval_fraction": 0.1})
    loaded, payload = read_model_config(tmp_path)
    assert loaded == config
    assert payload["data"]["split"] == {"seed": 0, "eval_fraction": 0.1}
    assert TrainConfig.from_dict(payload["training"]) == train
    assert isinstance(build_model(loaded), TwoTower)


def test_config_errors_name_the_problem(data, tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="must end in the embedding dim"):
        _config("dlrm", data, dense_arch_layers=(32, 7))
    with pytest.raises(InvalidInput, match="eval-fraction"):
        TrainConfig(model="dlrm", data="x", out=tmp_path, eval_fraction=1.0)
    with pytest.raises(NotFound, match=r"model_config\.json"):
        read_model_config(tmp_path)
    (tmp_path / "model_config.json").write_text("{not json")
    with pytest.raises(InvalidInput, match=r"model_config\.json:1"):
        read_model_config(tmp_path)
    assert json.loads(json.dumps(_config("dlrm", data)[1].to_dict()))


def test_resume_keeps_the_saved_model_and_takes_the_new_schedule(tmp_path: Path) -> None:
    saved = TrainConfig(
        model="two-tower", data="synthetic", out=tmp_path, embedding_dim=32, epochs=2, seed=4
    )
    merged = merge_for_resume(
        TrainConfig(model="two-tower", data="synthetic", out=tmp_path, epochs=5, nproc=1), saved
    )
    assert (merged.epochs, merged.embedding_dim, merged.seed, merged.resume) == (5, 32, 4, True)
    with pytest.raises(InvalidInput, match="--embedding-dim is 32"):
        merge_for_resume(
            TrainConfig(model="two-tower", data="synthetic", out=tmp_path, embedding_dim=8), saved
        )
