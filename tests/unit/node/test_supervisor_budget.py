"""RestartBudget: doubling delays up to a cap, and a rate (at most `limit` restarts in `window`
seconds) rather than a lifetime count. Fake times only."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pointsman.node.supervisor import RestartBudget


def restart_at(budget: RestartBudget, now: float) -> float:
    """What the supervisor does for a worker that exited at `now`: wait, then restart and record
    the restart; returns when it restarted."""
    delay = budget.delay(now)
    assert delay >= 0
    budget.record(now + delay)
    return now + delay


def test_defaults_are_five_in_a_minute() -> None:
    budget = RestartBudget()
    assert (budget.limit, budget.window, budget.first, budget.cap) == (5, 60.0, 0.5, 10.0)
    assert budget.delay(0.0) == 0.5


def test_delays_double_up_to_the_cap() -> None:
    budget = RestartBudget(limit=100, window=1000.0, first=0.5, cap=10.0)
    delays = []
    now = 0.0
    for _ in range(8):
        delays.append(budget.delay(now))
        now = restart_at(budget, now)
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]


def test_delay_does_not_record() -> None:
    budget = RestartBudget(first=1.0)
    assert [budget.delay(5.0) for _ in range(3)] == [1.0, 1.0, 1.0]
    assert not budget.history


def test_the_rate_limit_waits_until_the_oldest_restart_leaves_the_window() -> None:
    budget = RestartBudget(limit=3, window=60.0, first=0.1, cap=1.0)
    for t in (0.0, 1.0, 2.0):
        budget.record(t)
    # A fourth exit at t=3: three restarts in the last 60 s, so wait until t=60 (0 leaves).
    assert budget.delay(3.0) == pytest.approx(57.0)
    assert budget.delay(59.5) == pytest.approx(0.5)
    # At t=60 the restart at 0 has left: two remain, so the doubled delay of two restarts.
    assert budget.delay(60.0) == pytest.approx(0.4)
    assert list(budget.history) == [1.0, 2.0]


def test_a_worker_crashing_at_once_gets_at_most_limit_restarts_per_window() -> None:
    budget = RestartBudget(limit=5, window=60.0, first=0.5, cap=10.0)
    restarts = [0.0]
    budget.record(0.0)
    for _ in range(30):  # the worker dies the moment it starts, 30 times
        restarts.append(restart_at(budget, restarts[-1]))
    for i in range(len(restarts) - 5):
        assert restarts[i + 5] - restarts[i] >= 60.0 - 1e-9, restarts[i:i + 6]
    # ... and not much less than that: the budget is a rate, not a lifetime count that stops.
    assert restarts[-1] < 30 / 5 * 60.0 + 60.0


def test_history_is_pruned() -> None:
    budget = RestartBudget(limit=5, window=60.0, first=0.5, cap=10.0)
    for t in (0.0, 10.0, 20.0, 30.0):
        budget.record(t)
    assert budget.delay(30.0) == 8.0  # four restarts in the window
    assert budget.delay(65.0) == 4.0  # 0 has left: three remain
    assert list(budget.history) == [10.0, 20.0, 30.0]
    assert budget.delay(70.0) == 2.0  # exactly a window old counts as gone (70 - 10)
    assert list(budget.history) == [20.0, 30.0]
    # After a quiet window the doubling starts again from the first delay.
    assert budget.delay(1000.0) == 0.5
    assert not budget.history


# Times on a grid of 1/8 s: every sum is exact in binary floating point, so the property is
# about the budget and not about rounding (the real supervisor sleeps past any deadline anyway).
EIGHTHS = st.integers(0, 8 * 90).map(lambda n: n / 8)


@settings(max_examples=150, deadline=None)
@given(limit=st.integers(1, 6), window=st.integers(8, 8 * 120).map(lambda n: n / 8),
       first=st.integers(1, 16).map(lambda n: n / 8), cap=st.integers(1, 8 * 30).map(lambda n: n / 8),
       runs=st.lists(EIGHTHS, min_size=1, max_size=40))
def test_never_more_than_limit_restarts_in_a_window(limit: int, window: float, first: float,
                                                   cap: float, runs: list[float]) -> None:
    """Whatever the worker's run times, no `window` holds more than `limit` restarts, every
    delay is bounded, and the history never grows past the limit."""
    budget = RestartBudget(limit=limit, window=window, first=first, cap=cap)
    now = 0.0
    restarts: list[float] = []
    for run in runs:
        now += run  # the worker served this long, then exited
        delay = budget.delay(now)
        assert 0.0 <= delay <= max(cap, window)
        assert len(budget.history) <= limit
        if len(budget.history) < limit:
            assert delay == min(cap, first * 2 ** len(budget.history))
        now += delay
        budget.record(now)
        restarts.append(now)
    for i in range(len(restarts) - limit):
        assert restarts[i + limit] - restarts[i] >= window
