from __future__ import annotations

import pytest

from pointsman.balance.slow_start import MIN_FRACTION, effective_weight, ramp_done


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (100.0, 10 * MIN_FRACTION),  # just came up: a trickle, not zero
        (100.05, 10 * MIN_FRACTION),  # 0.5 % of the window is below the 1 % floor
        (101.0, 1.0),  # 10 % of a 10 s window
        (105.0, 5.0),
        (109.0, 9.0),
        (110.0, 10.0),
        (500.0, 10.0),
        (99.0, 10 * MIN_FRACTION),  # a clock earlier than available_since: still the floor
    ],
)
def test_linear_ramp(now: float, expected: float) -> None:
    assert effective_weight(10.0, available_since=100.0, now=now, window=10.0) == pytest.approx(
        expected
    )


def test_no_window_or_no_start_means_full_weight() -> None:
    assert effective_weight(3.0, available_since=100.0, now=100.0, window=0.0) == 3.0
    assert effective_weight(3.0, available_since=None, now=0.0, window=30.0) == 3.0


def test_weight_zero_stays_zero() -> None:
    assert effective_weight(0.0, available_since=100.0, now=105.0, window=10.0) == 0.0


def test_ramp_done() -> None:
    assert not ramp_done(100.0, 109.999, 10.0)
    assert ramp_done(100.0, 110.0, 10.0)
    assert ramp_done(100.0, 100.0, 0.0)
    assert ramp_done(None, 0.0, 10.0)
