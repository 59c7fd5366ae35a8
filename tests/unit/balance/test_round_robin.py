from __future__ import annotations

from pointsman.balance.round_robin import RoundRobin

from .helpers import candidates


def test_rotates_over_all() -> None:
    picker = RoundRobin(candidates(1, 1, 1))
    assert [picker.pick(b"") for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0]


def test_weight_is_ignored_except_zero() -> None:
    picker = RoundRobin(candidates(5, 0, 1, 0))
    assert [picker.pick(b"") for _ in range(5)] == [0, 2, 0, 2, 0]


def test_excluded_are_skipped_and_rotation_keeps_its_place() -> None:
    picker = RoundRobin(candidates(1, 1, 1))
    assert picker.pick(b"") == 0
    assert picker.pick(b"", frozenset({1})) == 2
    assert picker.pick(b"") == 0
    assert picker.pick(b"", frozenset({1, 2})) == 0


def test_none_when_nothing_left() -> None:
    assert RoundRobin(candidates(1, 1)).pick(b"", frozenset({0, 1})) is None
    assert RoundRobin(candidates(0, 0)).pick(b"") is None
    assert RoundRobin([]).pick(b"") is None


def test_start_offsets_the_rotation() -> None:
    picker = RoundRobin(candidates(1, 0, 1, 1), start=4)  # 4 mod 3 available -> position 1
    assert [picker.pick(b"") for _ in range(4)] == [2, 3, 0, 2]
