from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pointsman.health.hysteresis import Hysteresis


def feed(h: Hysteresis, results: str) -> list[bool | None]:
    """Feed a string of '+' (success) and '-' (failure); return what each record returned."""
    return [h.record(c == "+") for c in results]


def test_healthy_flips_down_exactly_at_fall() -> None:
    h = Hysteresis(rise=2, fall=3, healthy=True)
    assert feed(h, "--") == [None, None]
    assert h.streak == 2 and h.healthy
    assert h.record(False) is False
    assert not h.healthy and h.streak == 0


def test_unhealthy_flips_up_exactly_at_rise() -> None:
    h = Hysteresis(rise=2, fall=3, healthy=False)
    assert feed(h, "+") == [None]
    assert h.record(True) is True
    assert h.healthy


def test_results_agreeing_with_verdict_reset_the_streak() -> None:
    h = Hysteresis(rise=2, fall=3, healthy=True)
    assert feed(h, "--+--+--+") == [None] * 9
    assert h.healthy


def test_rise_and_fall_of_one_follow_every_result() -> None:
    h = Hysteresis(rise=1, fall=1, healthy=True)
    assert feed(h, "-+-") == [False, True, False]


def test_full_cycle() -> None:
    h = Hysteresis(rise=2, fall=2, healthy=True)
    assert feed(h, "+--++-+--") == [None, None, False, None, True, None, None, None, False]


@pytest.mark.parametrize(("rise", "fall"), [(0, 1), (1, 0), (-1, 3)])
def test_rejects_thresholds_below_one(rise: int, fall: int) -> None:
    with pytest.raises(ValueError):
        Hysteresis(rise, fall, True)


@given(
    rise=st.integers(2, 6),
    fall=st.integers(2, 6),
    healthy=st.booleans(),
    n=st.integers(0, 200),
)
def test_alternating_faster_than_thresholds_never_flips(
    rise: int, fall: int, healthy: bool, n: int
) -> None:
    h = Hysteresis(rise, fall, healthy)
    for i in range(n):
        assert h.record(i % 2 == 0) is None
    assert h.healthy is healthy


@given(
    rise=st.integers(1, 5),
    fall=st.integers(1, 5),
    results=st.lists(st.booleans(), max_size=100),
)
def test_verdict_matches_a_reference_model(rise: int, fall: int, results: list[bool]) -> None:
    h = Hysteresis(rise, fall, True)
    healthy = True
    for i, ok in enumerate(results):
        flipped = h.record(ok)
        # Reference: flip when the last `rise` / `fall` results all disagree with the verdict
        # and none of them already caused a flip.
        need = rise if ok else fall
        window = results[max(0, i - need + 1) : i + 1]
        expect_flip = ok != healthy and len(window) == need and all(r == ok for r in window)
        if expect_flip:
            healthy = ok
        assert flipped == (ok if expect_flip else None)
        assert h.healthy is healthy
