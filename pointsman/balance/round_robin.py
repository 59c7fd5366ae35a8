"""Plain round robin: each available backend in turn, ignoring weights other than zero.

The classic rotation (nginx's default before weights, HAProxy's `roundrobin` with equal weights).
Weight 0 and excluded (already tried) backends are skipped without losing the rotation's place.
"""

from __future__ import annotations

from collections.abc import Sequence, Set

from pointsman.balance.base import Candidate


class RoundRobin:
    """Rotates over the candidates whose weight is above zero."""

    __slots__ = ("_available", "_next")

    def __init__(self, candidates: Sequence[Candidate], *, start: int = 0) -> None:
        """`start` offsets the first pick, so fresh snapshots and workers do not all begin at 0."""
        self._available: tuple[int, ...] = tuple(
            i for i, c in enumerate(candidates) if c.weight > 0
        )
        self._next = start % len(self._available) if self._available else 0

    @property
    def rotation(self) -> tuple[tuple[int, ...], int]:
        """The indices taken in turn and the position of the next pick (what an engine that
        admits on its own continues from)."""
        return self._available, self._next

    def pick(self, key: bytes, exclude: Set[int] = frozenset()) -> int | None:
        """Return the next available index not in `exclude`, or None if there is none."""
        available = self._available
        count = len(available)
        position = self._next
        for _ in range(count):
            index = available[position]
            position += 1
            if position == count:
                position = 0
            if index not in exclude:
                self._next = position
                return index
        return None
