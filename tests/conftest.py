"""Shared pytest set-up: GPU marker handling."""

from __future__ import annotations

import shutil
import subprocess

import pytest


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
