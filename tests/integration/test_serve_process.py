"""`recship serve` as a real process: SIGTERM lets in-flight requests finish, then exits 0."""

from __future__ import annotations

import concurrent.futures
import time
import urllib.request

import pytest

from recship.base.errors import InvalidInput, Unavailable
from recship.runtime.client import Query, RecshipClient

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def queued_rows(metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/", timeout=5) as response:
        text = response.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("recship_queue_rows{")
    )


def test_sigterm_finishes_in_flight_requests_and_exits_zero(
    bundle_repo, serve_process, make_user
) -> None:
    # Batches wait up to 1 s to fill, so the requests are still in flight at SIGTERM. The
    # request bounds are set by flags, and a request past one is refused naming it.
    serve = serve_process(
        bundle_repo, "--max-delay-ms", "1000", "--grace-s", "20",
        "--max-queries", "8", "--max-exclusions", "2",
    )  # fmt: skip
    with RecshipClient(serve.target, timeout=30) as client:
        client.wait_until_serving(120)
        with pytest.raises(
            InvalidInput, match=r"exclude_item_ids \(count\): 3 is out of bounds \[0, 2\]"
        ):
            client.recommend("movies", [Query(make_user(0, 0.0))], 10, 3, exclude=[["1"] * 3])
        with pytest.raises(InvalidInput, match="9 queries, at most 8"):
            client.recommend("movies", [Query(make_user(u, 0.0)) for u in range(9)], 10, 3)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            calls = [
                pool.submit(client.recommend, "movies", [Query(make_user(u, 0.0))], 10, 3)
                for u in range(8)
            ]
            deadline = time.monotonic() + 20
            while queued_rows(serve.metrics_port) < 8 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert queued_rows(serve.metrics_port) >= 8
            serve.process.send_signal(15)
            results = [call.result(timeout=30) for call in calls]
        assert all(len(r.results[0]) == 3 and r.served_by.version == 1 for r in results)
        assert serve.process.wait(30) == 0
        with pytest.raises(Unavailable):
            client.recommend("movies", [Query(make_user(1, 0.0))], 10, 3, timeout=2)
