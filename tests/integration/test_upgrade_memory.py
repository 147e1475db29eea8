"""Process memory returns after upgrade cycles (benchmarks/upgrade_memory.py on the test bundle).

The session bundle is small (hundreds of KiB), so this guards against per-cycle growth and
leaked versions; benchmarks/upgrade_memory.py runs the same measurement on a ~100 MiB bundle.
"""

from __future__ import annotations

import asyncio
import importlib.util
import shutil
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

_spec = importlib.util.spec_from_file_location(
    "recship_benchmarks_upgrade_memory",
    Path(__file__).parents[2] / "benchmarks" / "upgrade_memory.py",
)
assert _spec is not None and _spec.loader is not None
upgrade_memory = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(upgrade_memory)


def test_rss_returns_to_steady_state_over_upgrade_cycles(
    bundle_repo: Path, tmp_path: Path, publish_copy
):
    repo = tmp_path / "repo"
    shutil.copytree(bundle_repo / "movies" / "1", repo / "movies" / "1")
    publish_copy(repo)
    steady, after = asyncio.run(upgrade_memory.measure_upgrade_memory(repo, cycles=10))
    print(f"\nsteady {steady / 2**20:.1f} MiB, after each cycle (MiB):",
          [round(v / 2**20, 1) for v in after])  # fmt: skip
    assert all(value <= steady * 1.10 for value in after)
    # No growth: the second half of the cycles ends where the first half did (within 2%).
    assert after[-1] <= after[len(after) // 2 - 1] * 1.02
