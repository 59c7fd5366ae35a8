"""Smooth weighted round robin, as nginx does it.

Source: nginx commit 52327e0627f4 "Upstream: smooth weighted round-robin balancing." (2012),
`ngx_http_upstream_get_peer` in src/http/ngx_http_upstream_round_robin.c. Every pick, each
eligible backend's `current` grows by its effective weight; the largest `current` wins (the first
in list order on a tie) and loses the total of the effective weights. With integer weights the
state returns to all zeros every sum(weights) picks, each backend having been chosen exactly
`weight` times, and the picks of a heavy backend are spread out instead of bunched: weights 5, 1, 1
give a a b a c a a.

Unlike nginx we do not lower the effective weight on failures: passive health belongs to the
control plane, which publishes the effective weight (including slow start) in the snapshot. Float
weights work unchanged, which slow start needs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence, Set

from pointsman.balance.base import Candidate


class WeightedRoundRobin:
    """nginx's smooth weighted round robin over the candidates with weight above zero."""

    __slots__ = ("_available", "_current", "_position", "_total", "_weights")

    def __init__(self, candidates: Sequence[Candidate]) -> None:
        # State is kept per available backend (by position), so one pick is two list passes
        # done in C (a comprehension, max and index) rather than a Python loop with branches.
        self._available: tuple[int, ...] = tuple(
            i for i, c in enumerate(candidates) if c.weight > 0
        )
        self._position = {index: position for position, index in enumerate(self._available)}
        self._weights: tuple[float, ...] = tuple(candidates[i].weight for i in self._available)
        self._total = sum(self._weights)
        self._current: list[float] = [0.0] * len(self._available)

    def pick(self, key: bytes, exclude: Set[int] = frozenset()) -> int | None:
        """Return the index with the largest current weight, or None if none is eligible.

        As in nginx, excluded backends sit the round out: their current weight does not move.
        """
        if not self._available:
            return None
        weights = self._weights
        current = [c + w for c, w in zip(self._current, weights, strict=True)]
        total = self._total
        ranked = current
        if exclude:
            skipped = {p for i in exclude if (p := self._position.get(i)) is not None}
            if len(skipped) == len(current):
                return None
            ranked = current[:]
            for p in skipped:
                current[p] = self._current[p]
                ranked[p] = -math.inf
                total -= weights[p]
        best = max(ranked)
        position = ranked.index(best)  # the first on a tie, as nginx
        current[position] = best - total
        self._current = current
        return self._available[position]
