"""`recship bench` against the live server, with the unbatched comparison in the same run."""

from __future__ import annotations

import pytest

from recship.base.errors import Unavailable
from recship.runtime.bench import BenchConfig, bench

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _compare(live_server, bundle_repo, **overrides) -> BenchConfig:
    """A short batched-vs-unbatched run against the session server."""
    values = {
        "server": live_server.target,
        "bundle": "movies",
        "concurrency": 8,
        "duration_s": 1.5,
        "warmup_s": 0.5,
        "retrieve_k": 20,
        "repo": bundle_repo,
        "metrics": f"127.0.0.1:{live_server.metrics_port}",
        "compare_unbatched": True,
        "processes": 2,
    }
    values.update(overrides)
    return BenchConfig(**values)


def test_bench_measures_batched_and_unbatched(live_server, bundle_repo) -> None:
    batched, unbatched = bench(_compare(live_server, bundle_repo))
    assert batched.errors == {} and unbatched.errors == {}
    assert batched.qps > 0 and unbatched.qps > 0
    assert batched.percentile_ms(50) <= batched.percentile_ms(99)
    assert batched.batch_requests is not None and batched.batch_requests > 1
    assert unbatched.batch_requests == pytest.approx(1.0)
    # The server's own CPU per answered RPC: positive, and far below a whole second.
    for result in (batched, unbatched):
        assert result.server_cpu_ms is not None and 0 < result.server_cpu_ms < 1000


def test_the_unbatched_server_takes_the_given_serve_options(live_server, bundle_repo) -> None:
    # A bad option proves the options reach `recship serve`; its own error line is quoted.
    config = _compare(
        live_server,
        bundle_repo,
        concurrency=1,
        duration_s=0.3,
        warmup_s=0.1,
        unbatched_serve_args=("--threads", "0"),
        processes=1,
    )
    with pytest.raises(Unavailable, match=r"did not start: .*--threads must be >= 1, got 0"):
        bench(config)
