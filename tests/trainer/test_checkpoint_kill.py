"""SIGKILL a 2-rank training run after its first checkpoint; --resume continues from the last
complete checkpoint and ignores half-written ones."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from recship.trainer.checkpoint import list_checkpoints

pytestmark = pytest.mark.slow

RECSHIP = [sys.executable, "-c", "from recship.cli.main import main; main()"]
DATA = [
    "--data", "synthetic", "--num-users", "600", "--num-items", "200",
    "--interactions-per-user", "20",
]  # fmt: skip


def test_killed_run_resumes_from_last_complete_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "run"
    command = [
        *RECSHIP, "train", "two-tower", *DATA, "--out", str(out), "--nproc", "2",
        "--batch-size", "32", "--epochs", "200", "--checkpoint-every", "5",
    ]  # fmt: skip
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 180
        while not list_checkpoints(out):
            assert process.poll() is None, "training ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 180 s"
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert not (out / "metrics.json").exists()
    last_step = list_checkpoints(out)[-1][0]
    # What a crash mid-save leaves behind: a temp folder and a step folder without marker.
    (out / "checkpoints" / ".tmp_step_100000").mkdir()
    (out / "checkpoints" / "step_100005").mkdir()
    (out / "checkpoints" / "step_100005" / ".metadata").write_text("partial")

    target = last_step + 7
    resume = ["--resume", "--nproc", "1", "--max-steps", str(target)]
    resumed = subprocess.run(
        [*RECSHIP, "train", "two-tower", "--data", "synthetic", "--out", str(out), *resume],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming from step_{last_step}" in resumed.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["step"] == target
    assert metrics["train"]["steps_this_run"] == 7
    steps = [step for step, _ in list_checkpoints(out)]
    assert steps[-1] == target and 100005 not in steps
    assert not (out / "checkpoints" / ".tmp_step_100000").exists()
    assert not (out / "checkpoints" / "step_100005").exists()
