from __future__ import annotations

from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from pointsman.balance.weighted_round_robin import ROTATION_MAX, WeightedRoundRobin

from .helpers import candidates


def sequence(weights: tuple[float, ...], count: int) -> str:
    picker = WeightedRoundRobin(candidates(*weights))
    letters = "abcdefgh"
    return "".join(
        letters[p] if p is not None else "-" for p in (picker.pick(b"") for _ in range(count))
    )


def test_nginx_commit_example_5_1_1() -> None:
    # The sequence given in nginx commit 52327e0627f4's message, which tabulates every step.
    assert sequence((5, 1, 1), 14) == "aabacaa" * 2


def test_4_2_1_worked_by_hand() -> None:
    # current after "+= weight" then the winner loses 7:
    # (4,2,1)a (1,4,2)b (5,-1,3)a (2,1,4)c (6,3,-2)a (3,5,-1)b (7,0,0)a -> back to (0,0,0)
    assert sequence((4, 2, 1), 14) == "abacaba" * 2


def test_zero_weight_never_picked() -> None:
    assert sequence((2, 0, 1), 6) == "acaaca"


def test_float_weights_exact_shares() -> None:
    # Binary fractions add exactly, so the cycle closes exactly as with integers.
    assert sequence((0.5, 0.25), 6) == "abaaba"


def test_excluded_sits_out_the_round() -> None:
    picker = WeightedRoundRobin(candidates(5, 1, 1))
    assert picker.pick(b"", frozenset({0})) == 1
    assert picker.pick(b"", frozenset({0, 1, 2})) is None
    assert WeightedRoundRobin(candidates(0, 0)).pick(b"") is None


@given(st.lists(st.integers(0, 9), min_size=1, max_size=8), st.integers(1, 3))
def test_counts_exactly_proportional(weights: list[int], rounds: int) -> None:
    total = sum(weights)
    picker = WeightedRoundRobin(candidates(*weights))
    counts = Counter(picker.pick(b"") for _ in range(rounds * total))
    expected = {i: rounds * w for i, w in enumerate(weights) if w > 0}
    assert dict(counts) == expected


def reference_pick(current: list[float], weights: list[float], exclude: set[int]) -> int | None:
    """nginx's loop as the commit message states it, over eligible (non-excluded) peers only."""
    total = 0.0
    best = None
    for i, w in enumerate(weights):
        if w <= 0 or i in exclude:
            continue
        current[i] += w
        total += w
        if best is None or current[i] > current[best]:
            best = i
    if best is not None:
        current[best] -= total
    return best


@given(
    st.lists(st.integers(0, 6), min_size=1, max_size=6),
    st.lists(st.sets(st.integers(0, 5), max_size=3), max_size=30),
)
def test_exclusion_matches_the_nginx_loop(weights: list[int], excludes: list[set[int]]) -> None:
    picker = WeightedRoundRobin(candidates(*weights))
    current = [0.0] * len(weights)
    floats = [float(w) for w in weights]
    for exclude in excludes:
        assert picker.pick(b"", frozenset(exclude)) == reference_pick(current, floats, exclude)


# --- rotation: the cycle an engine follows from a table --------------------------------------------


def test_rotation_is_the_next_cycle_and_leaves_the_picker_where_it_was() -> None:
    picker = WeightedRoundRobin(candidates(5, 1, 1))
    assert picker.rotation == ((0, 0, 1, 0, 2, 0, 0), 0)
    picker.pick(b"")
    assert picker.rotation == ((0, 1, 0, 2, 0, 0, 0), 0)
    assert picker.pick(b"") == 0


def test_no_rotation_for_weights_that_do_not_repeat_within_bounds() -> None:
    assert WeightedRoundRobin(candidates(0.3, 1)).rotation is None  # slow start's fractions
    assert WeightedRoundRobin(candidates(0, 0)).rotation is None
    assert WeightedRoundRobin(candidates(ROTATION_MAX, 1)).rotation is None
    assert WeightedRoundRobin(candidates(*[1000] * 4)).rotation is not None
    assert WeightedRoundRobin(candidates(*[1000] * 5)).rotation is None  # past ROTATION_MAX
    many = candidates(*[30] * 100)  # 3000 picks x 100 backends: past ROTATION_WORK
    assert WeightedRoundRobin(many).rotation is None


@given(
    st.lists(st.integers(0, 9), min_size=1, max_size=8),
    st.lists(st.sets(st.integers(0, 7), max_size=2), max_size=20),
)
def test_rotation_is_what_the_picker_picks_next(weights: list[int],
                                                 before: list[set[int]]) -> None:
    """After any picks (with or without exclusions), a rotation, when there is one, is exactly
    the picker's next sum(weights) picks, and then the next ones again: it repeats."""
    picker = WeightedRoundRobin(candidates(*weights))
    for exclude in before:
        picker.pick(b"", frozenset(exclude))
    rotation = picker.rotation
    if not any(weights):
        assert rotation is None
        return
    if not any(before):  # no exclusion: always on the cycle
        assert rotation is not None
    if rotation is None:
        return
    order, start = rotation
    assert start == 0 and len(order) == sum(weights)
    assert tuple(picker.pick(b"") for _ in range(2 * len(order))) == order * 2
