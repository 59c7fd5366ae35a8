"""Least connections: the backend with the fewest active connections per unit of weight.

The comparison is nginx's `least_conn` and HAProxy's `leastconn`: active / weight, lowest wins.
Ties do not go to the first backend in list order (that would pile every burst onto backend 0
while all are idle); the scan starts one past the previous winner, so tied backends take turns as
in round robin (HAProxy likewise rotates among equally loaded servers).
"""

from __future__ import annotations

from collections.abc import Sequence, Set

from pointsman.balance.base import Candidate, Loaded


class LeastConnections:
    """Fewest `active / weight`, ties broken by a rotating start position."""

    __slots__ = ("_available", "_load", "_offset", "_weights")

    def __init__(
        self, candidates: Sequence[Candidate], load: Sequence[Loaded], *, start: int = 0
    ) -> None:
        """`load[i]` is the live load of `candidates[i]`; the data plane updates it in place."""
        if len(load) != len(candidates):
            raise ValueError(f"{len(load)} load entries for {len(candidates)} candidates")
        self._available: tuple[int, ...] = tuple(
            i for i, c in enumerate(candidates) if c.weight > 0
        )
        self._weights: tuple[float, ...] = tuple(c.weight for c in candidates)
        self._load = load
        self._offset = start % len(self._available) if self._available else 0

    @property
    def scan(self) -> tuple[tuple[int, ...], int, tuple[float, ...]]:
        """The indices scanned in turn, where the next scan starts, and their weights: what an
        engine that admits on its own scans with its own live counts (docs/engine.md, "Fast
        admission")."""
        return self._available, self._offset, tuple(self._weights[i] for i in self._available)

    def pick(self, key: bytes, exclude: Set[int] = frozenset()) -> int | None:
        """Return the least loaded eligible index, or None if none is eligible."""
        # A plain loop: for pools up to ~100 backends it beats list comprehensions plus
        # min/index (measured). The scan is O(n), as in nginx; HAProxy keeps a tree instead.
        available = self._available
        count = len(available)
        weights = self._weights
        load = self._load
        position = self._offset
        best = -1
        best_position = 0
        best_score = 0.0
        for _ in range(count):
            index = available[position]
            if index not in exclude:
                score = load[index].active / weights[index]
                if best < 0 or score < best_score:
                    best = index
                    best_score = score
                    best_position = position
            position += 1
            if position == count:
                position = 0
        if best < 0:
            return None
        self._offset = best_position + 1 if best_position + 1 < count else 0
        return best
