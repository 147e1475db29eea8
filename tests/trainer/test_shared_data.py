"""The data set a multi-rank run encodes once and its ranks map (`trainer.shared_data`)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest

from recship.base.errors import InvalidInput
from recship.trainer.config import TrainConfig
from recship.trainer.data.synthetic import generate
from recship.trainer.shared_data import ALIGNMENT, read_shared, write_shared
from recship.trainer.train import _InteractionData, launch


def test_round_trip_gives_equal_read_only_views_of_one_mapping(tmp_path: Path) -> None:
    data = _InteractionData(generate(num_users=300, num_items=120), 0.1, seed=3, eval_users=50)
    path = tmp_path / "data.shared"
    size = write_shared(data, path)
    assert size == path.stat().st_size
    back = read_shared(path)
    for half in ("train", "held_out"):
        original, mapped = getattr(data, half), getattr(back, half)
        for name in ("user_ids", "item_ids", "labels", "timestamps", "raw_user_ids"):
            array = getattr(mapped, name)
            np.testing.assert_array_equal(array, getattr(original, name))
            assert not array.flags.writeable  # a view of the mapping, not a private copy
            assert array.ctypes.data % ALIGNMENT == 0
        np.testing.assert_array_equal(mapped.users.dense, original.users.dense)
    # Objects shared before (both halves' tables) are shared after: one copy of each.
    assert back.train.users is back.held_out.users
    np.testing.assert_array_equal(back.eval_sample, data.eval_sample)
    assert back.transforms == data.transforms


def test_a_file_of_something_else_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "data.shared"
    path.write_bytes(b"not a shared file, but long enough to hold a header")
    with pytest.raises(InvalidInput, match="not a shared training data file"):
        read_shared(path)


@pytest.mark.slow
def test_two_ranks_train_on_one_encoding_that_is_removed_afterwards(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    config = TrainConfig(
        model="two-tower", data="synthetic", out=tmp_path / "run", nproc=2, epochs=1,
        batch_size=64, data_options={"num_users": 200, "num_items": 100},
    )  # fmt: skip
    metrics = launch(config)
    assert metrics["world_size"] == 2 and metrics["eval"]["recall@10"] > 0
    err = capfd.readouterr().err
    assert "data: reading and encoding synthetic once for the 2 ranks" in err
    assert "MiB, mapped by every rank" in err
    assert list(temp.iterdir()) == []
