"""Training at size, what a person sees: progress lines when output is not a terminal, and an
evaluation on a seeded sample of users (`--eval-users`)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from recship.cli.main import main


def test_redirected_output_gets_progress_lines_and_the_sample_is_used(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    argv = [
        "train", "two-tower", "--data", "synthetic", "--num-users", "200", "--num-items", "50",
        "--interactions-per-user", "5", "--epochs", "2", "--batch-size", "64",
        "--embedding-dim", "8", "--tower-layers", "8", "--eval-users", "30",
        "--log-every", "0.000001", "--out", str(out),
    ]  # fmt: skip
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code in (0, None)
    err = capsys.readouterr().err  # captured: not a terminal, so no live bar
    lines = [line for line in err.splitlines() if line.startswith("step ")]
    metrics = json.loads((out / "metrics.json").read_text())
    total = metrics["step"]
    assert len(lines) == total  # every step's line is due with --log-every ~0
    first = re.fullmatch(
        r"step 1/(\d+) \([\d.]+ %\), epoch 1/2, loss [\d.]+, [\d,]+ examples/s, ETA \d+:\d\d:\d\d",
        lines[0],
    )
    assert first and int(first.group(1)) == total, lines[0]
    assert lines[-1].startswith(f"step {total}/{total} (100.0 %), epoch 2/2")
    assert f"two-tower x1: {total} steps" in err
    assert "evaluating on a sample of 30 held-out users" in err
    assert not re.search(r"two-tower x1 +[━╸]", err)  # no progress bar drawn into a file
    assert metrics["eval"]["eval_users"] == 30
    assert metrics["baselines"]["popularity"]["eval_users"] == 30
    assert json.loads((out / "model_config.json").read_text())["training"]["eval_users"] == 30
