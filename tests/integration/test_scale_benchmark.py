"""benchmarks/scale.py end to end at a tiny size: the same code as the 1M-item / 10M-user run
(generation, training, packaging, serving memory, Recommend under load, retrieval vs Flat),
every figure present and sane."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

_spec = importlib.util.spec_from_file_location(
    "recship_benchmarks_scale", Path(__file__).parents[2] / "benchmarks" / "scale.py"
)
assert _spec is not None and _spec.loader is not None
scale = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(scale)


def test_every_stage_runs_and_reports_its_figures(tmp_path: Path) -> None:
    args = vars(
        scale.parser().parse_args(
            ["--work", str(tmp_path), "--users", "300", "--items", "200", "--per-user", "8",
             "--nproc", "1", "--batch-size", "64", "--max-steps", "5", "--eval-users", "50",
             "--concurrency", "4", "--duration", "1", "--warmup", "0.5", "--queries", "20",
             "--qps-seconds", "0.2"]
        )
    )  # fmt: skip
    args["in_process"] = True
    figures = scale.run(args)
    assert figures["interactions"] == 300 * 8
    assert figures["tables_s"] >= 0 and figures["generate_s"] >= 0
    for model in ("two-tower", "dlrm"):
        assert figures[f"{model}_steps"] == 5 and figures[f"{model}_steps_per_s"] > 0
    assert figures["two-tower_eval"]["eval_users"] == 50
    assert figures["bundle_mib"] > 0 and set(figures["package_stage_s"]) >= {"index", "verify"}
    assert figures["index_factory"] == "IDMap2,Flat"  # auto below 50k items: exact
    for state in ("one_version", "two_versions", "after_unloading_the_first"):
        assert figures[f"serve_{state}"]["rss_mib"] > 0
    assert figures["serve_load_s"] > 0
    assert figures["recommend_qps"] > 0 and not figures["recommend_errors"]
    assert figures["recommend_p99_ms"] >= figures["recommend_p50_ms"] > 0
    assert figures["retrieval_recall_at_100"] == pytest.approx(1.0)  # Flat against Flat
    assert figures["retrieval_index_qps_1_thread"] > 0
