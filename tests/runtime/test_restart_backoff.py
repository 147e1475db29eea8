"""The restart delays of a process that keeps dying (workers and the native front end alike)."""

from __future__ import annotations

from recship.runtime.fleet import (
    MAX_RESTART_DELAY_S,
    RESTART_DELAY_S,
    STABLE_AFTER_S,
    RestartBackoff,
)


def test_quick_deaths_double_the_wait_up_to_the_bound_and_a_stable_run_resets_it() -> None:
    backoff = RestartBackoff()
    waits = [backoff.next(0.1) for _ in range(10)]
    assert waits[:3] == [RESTART_DELAY_S, 2 * RESTART_DELAY_S, 4 * RESTART_DELAY_S]
    assert max(waits) == MAX_RESTART_DELAY_S and waits[-1] == MAX_RESTART_DELAY_S
    assert backoff.next(STABLE_AFTER_S + 1) == RESTART_DELAY_S
    assert backoff.next(0.1) == 2 * RESTART_DELAY_S
