"""Shared pytest set-up: GPU marker handling and real training runs to package."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

# Small synthetic data the packaging tests train on (seconds per model on 2 cores).
PACKAGING_DATA = {"num_users": 400, "num_items": 300, "interactions_per_user": 12}


def _train_synthetic(out: Path, model: str, nproc: int, **data: int) -> Path:
    """Trains `model` on synthetic data with real TorchRec ranks; returns the output folder."""
    from recship.trainer.config import TrainConfig
    from recship.trainer.train import launch

    launch(
        TrainConfig(
            model=model,
            data="synthetic",
            out=out,
            nproc=nproc,
            epochs=3,
            batch_size=64,
            data_options={**PACKAGING_DATA, **data},
        )
    )
    return out


@pytest.fixture(scope="session")
def train_synthetic() -> Callable[..., Path]:
    """`train(out, model, nproc, **data_overrides) -> out`: real training on synthetic data."""
    return _train_synthetic


@pytest.fixture(scope="session")
def trained_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(two-tower output written by 2 ranks, DLRM output written by 1 rank) on the same items."""
    root = tmp_path_factory.mktemp("runs")
    return (
        _train_synthetic(root / "tt", "two-tower", 2),
        _train_synthetic(root / "dlrm", "dlrm", 1),
    )


def _nvidia_gpu_present() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    return subprocess.run(["nvidia-smi", "-L"], capture_output=True, check=False).returncode == 0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `gpu` tests, with a reason, on machines without an NVIDIA GPU."""
    if _nvidia_gpu_present():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (nvidia-smi -L lists none here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
