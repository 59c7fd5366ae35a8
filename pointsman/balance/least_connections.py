"""Least connections: the backend with the fewest active connections per unit of weight.

The comparison is nginx's `least_conn` and HAProxy's `leastconn`: active / weight, lowest wins.
Ties do not go to the first backend in list order (that would pile every burst onto backend 0
while all are idle); the scan starts one past the previous winner, so tied backends take turns as
in round robin (HAProxy likewise rotates among equally loaded servers).
"""

from __future__ import annotations

import math
from collections.abc import Sequence, Set

from pointsman.balance.base import Candidate, Loaded


class LeastConnections:
    """Fewest `active / weight`, ties broken by a rotating start position."""

    __slots__ = ("_available", "_load", "_offset", "_position", "_weights")

    def __init__(
        self, candidates: Sequence[Candidate], load: Sequence[Loaded], *, start: int = 0
    ) -> None:
        """`load[i]` is the live load of `candidates[i]`; the data plane updates it in place."""
        if len(load) != len(candidates):
            raise ValueError(f"{len(load)} load entries for {len(candidates)} candidates")
        self._available: tuple[int, ...] = tuple(
            i for i, c in enumerate(candidates) if c.weight > 0
        )
        self._position = {index: position for position, index in enumerate(self._available)}
        self._weights: tuple[float, ...] = tuple(candidates[i].weight for i in self._available)
        self._load = load
        self._offset = start % len(self._available) if self._available else 0

    def pick(self, key: bytes, exclude: Set[int] = frozenset()) -> int | None:
        """Return the least loaded eligible index, or None if none is eligible."""
        available = self._available
        if not available:
            return None
        load = self._load
        # One comprehension, then min and index in C: much cheaper than a branchy Python loop.
        scores = [load[i].active / w for i, w in zip(available, self._weights, strict=True)]
        for index in exclude:
            position = self._position.get(index)
            if position is not None:
                scores[position] = math.inf
        best = min(scores)
        if best == math.inf:
            return None
        try:
            position = scores.index(best, self._offset)
        except ValueError:
            position = scores.index(best)
        self._offset = position + 1 if position + 1 < len(available) else 0
        return available[position]
