"""benchmarks/service_overhead.py runs both paths on a real bundle and reports their ratio."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import BUNDLE

pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "service_overhead.py"


def test_the_serving_path_and_the_handler_are_measured_per_batch_size(bundle_repo: Path) -> None:
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--repo", str(bundle_repo), "--bundle", BUNDLE,
         "--batch-sizes", "1,4", "--requests", "16", "--rounds", "1", "--users", "32"],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert re.search(r"^host .+, \d+ cores$", run.stdout, re.M), run.stdout[-500:]
    number = r"([\d.]+)"
    rows = re.findall(
        rf"^\| (\d+) \| {number} \| {number} \| x{number} \| {number} \| {number} \|$",
        run.stdout,
        re.M,
    )
    assert [row[0] for row in rows] == ["1", "4"]
    for _, serving, handler, ratio, serving_faults, handler_faults in rows:
        assert float(serving) > 0 and float(handler) > 0
        assert float(ratio) == pytest.approx(float(serving) / float(handler), rel=0.02)
        assert float(serving_faults) >= 0 and float(handler_faults) >= 0
    # The per-batch and per-call costs: through two sizes the line gives back each batch's CPU.
    fits = dict(re.findall(r"^\| (serving path|TorchServe handler) \| (-?[\d.]+ \| -?[\d.]+) \|$",
                           run.stdout, re.M))  # fmt: skip
    assert set(fits) == {"serving path", "TorchServe handler"}
    for column, name in enumerate(("serving path", "TorchServe handler")):
        per_batch, per_call = (float(x) for x in fits[name].split(" | "))
        for size, *measured in rows:
            batch_ms = int(size) * float(measured[column])
            assert per_batch + int(size) * per_call == pytest.approx(batch_ms, abs=0.01)
