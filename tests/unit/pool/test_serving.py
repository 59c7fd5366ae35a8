"""Who serves: primaries, backups, panic, none. Exact weights for hand-written cases, and
properties over random pools (hypothesis)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pointsman.pool.serving import serving
from pointsman.pool.state import OPERATOR_STATES, BackendState

UP, DOWN, EJECTED = BackendState.UP, BackendState.DOWN, BackendState.EJECTED
DRAINING, MAINT = BackendState.DRAINING, BackendState.MAINTENANCE


def live(states: list[BackendState], base: list[float]) -> list[float]:
    return [b if s is UP else 0.0 for s, b in zip(states, base, strict=True)]


def plan(states: list[BackendState], backup: list[bool], threshold: float = 0.0,
         base: list[float] | None = None) -> tuple[tuple[float, ...], str]:
    base = base or [1.0] * len(states)
    result = serving(states, live(states, base), base, backup, threshold)
    return result.weights, result.mode


def test_primaries_serve_and_backups_idle() -> None:
    assert plan([UP, DOWN, UP], [False, False, True]) == ((1.0, 0.0, 0.0), "primary")


def test_backups_serve_only_when_no_primary_is_available() -> None:
    assert plan([DOWN, EJECTED, UP, UP], [False, False, True, True]) == (
        (0.0, 0.0, 1.0, 1.0), "backup")
    assert plan([DRAINING, MAINT, UP], [False, False, True]) == ((0.0, 0.0, 1.0), "backup")


def test_nothing_to_offer() -> None:
    assert plan([DOWN, DOWN], [False, True]) == ((0.0, 0.0), "none")
    assert plan([], []) == ((), "none")


def test_panic_spreads_over_every_eligible_primary() -> None:
    states = [UP, DOWN, DOWN, DOWN, DRAINING, MAINT]
    weights, mode = plan(states, [False] * 6, 0.5, base=[2.0, 1.0, 3.0, 1.0, 1.0, 1.0])
    assert mode == "panic"  # 1 of 4 eligible available < 50 %
    assert weights == (2.0, 1.0, 3.0, 1.0, 0.0, 0.0)  # operator states stay out


def test_no_panic_at_or_above_the_threshold() -> None:
    assert plan([UP, UP, DOWN, DOWN], [False] * 4, 0.5) == ((1.0, 1.0, 0.0, 0.0), "primary")


def test_a_working_backup_beats_panic() -> None:
    assert plan([DOWN, DOWN, UP], [False, False, True], 0.9) == ((0.0, 0.0, 1.0), "backup")
    # ... and with the backups gone too, panic.
    assert plan([DOWN, DOWN, DOWN], [False, False, True], 0.9) == ((1.0, 1.0, 0.0), "panic")


def test_weight_zero_is_never_served_even_in_panic() -> None:
    assert plan([DOWN, DOWN], [False, False], 1.0, base=[0.0, 1.0]) == ((0.0, 1.0), "panic")


def test_panic_keeps_the_slow_start_weight_of_up_backends() -> None:
    result = serving([UP, DOWN], [0.25, 0.0], [1.0, 1.0], [False, False], 1.0)
    assert result.weights == (0.25, 1.0)


def test_backups_have_no_home_slot() -> None:
    result = serving([UP, UP], [1.0, 1.0], [3.0, 2.0], [False, True])
    assert result.home == (3.0, 0.0)


states = st.sampled_from(list(BackendState))


@given(st.lists(st.tuples(states, st.booleans(), st.sampled_from([0.0, 1.0, 2.5])), max_size=12),
       st.sampled_from([0.0, 0.3, 0.5, 1.0]))
def test_properties(pool: list[tuple[BackendState, bool, float]], threshold: float) -> None:
    s = [p[0] for p in pool]
    backup = [p[1] for p in pool]
    base = [p[2] for p in pool]
    result = serving(s, live(s, base), base, backup, threshold)
    served = [i for i, w in enumerate(result.weights) if w > 0]
    # Operator states and weight 0 are never served, whatever the mode.
    assert all(s[i] not in OPERATOR_STATES and base[i] > 0 for i in served)
    if result.mode == "primary":
        assert served and all(not backup[i] and s[i] is UP for i in served)
    elif result.mode == "backup":
        assert served and all(backup[i] and s[i] is UP for i in served)
        assert not any(not backup[i] and s[i] is UP and base[i] > 0 for i in range(len(s)))
    elif result.mode == "panic":
        assert threshold > 0 and served and not any(backup[i] for i in served)
    else:
        assert not served
    if threshold == 0:
        assert result.mode != "panic"


@pytest.mark.parametrize("threshold", [0.0, 0.5])
def test_all_primaries_up_is_plain_primary(threshold: float) -> None:
    assert plan([UP, UP, UP], [False, False, False], threshold)[1] == "primary"
