from __future__ import annotations

from collections import Counter

import pytest

from pointsman.balance.least_connections import LeastConnections

from .helpers import candidates, loads


def test_steers_away_from_a_loaded_backend() -> None:
    load = loads(50, 0, 0, 0)
    picker = LeastConnections(candidates(1, 1, 1, 1), load)
    picks = []
    for _ in range(150):  # the other three need 150 new connections to catch up with 50
        index = picker.pick(b"")
        assert index is not None
        load[index].active += 1
        picks.append(index)
    assert Counter(picks) == {1: 50, 2: 50, 3: 50}


def test_score_is_active_per_weight() -> None:
    picker = LeastConnections(candidates(2, 1), loads(3, 1))  # 1.5 vs 1.0
    assert picker.pick(b"") == 1
    picker = LeastConnections(candidates(4, 1), loads(3, 1))  # 0.75 vs 1.0
    assert picker.pick(b"") == 0


def test_ties_rotate_instead_of_favouring_list_order() -> None:
    picker = LeastConnections(candidates(1, 1, 1, 1), loads(0, 5, 0, 0))
    assert [picker.pick(b"") for _ in range(6)] == [0, 2, 3, 0, 2, 3]
    weighted_tie = LeastConnections(candidates(2, 1), loads(2, 1))  # 1.0 vs 1.0
    assert [weighted_tie.pick(b"") for _ in range(4)] == [0, 1, 0, 1]


def test_start_offset() -> None:
    picker = LeastConnections(candidates(1, 1, 1), loads(0, 0, 0), start=2)
    assert [picker.pick(b"") for _ in range(3)] == [2, 0, 1]


def test_skips_weight_zero_and_excluded() -> None:
    picker = LeastConnections(candidates(0, 1, 1), loads(0, 9, 3))
    assert picker.pick(b"") == 2
    assert picker.pick(b"", frozenset({2})) == 1
    assert picker.pick(b"", frozenset({1, 2})) is None


def test_load_must_match_candidates() -> None:
    with pytest.raises(ValueError, match="2 load entries for 3 candidates"):
        LeastConnections(candidates(1, 1, 1), loads(0, 0))


def test_scan_is_where_the_next_pick_starts_over_the_available_with_their_weights() -> None:
    picker = LeastConnections(candidates(2, 0, 1), loads(0, 0, 0), start=0)
    assert picker.scan == ((0, 2), 0, (2.0, 1.0))
    assert picker.pick(b"") == 0
    assert picker.scan == ((0, 2), 1, (2.0, 1.0))  # one past the winner
