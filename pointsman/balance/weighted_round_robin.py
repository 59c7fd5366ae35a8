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

Because the sequence repeats, an engine that admits connections on its own (docs/engine.md, "Fast
admission") can follow it from a table: `rotation` is the next full cycle, computed on a copy.
"""

from __future__ import annotations

from collections.abc import Sequence, Set

from pointsman.balance.base import Candidate

# Bounds of `rotation`: the cycle's length (one engine table entry per pick) and the work of
# computing it (picks x backends: a few milliseconds of Python at most, once per snapshot).
ROTATION_MAX = 4096
ROTATION_WORK = 65536


class WeightedRoundRobin:
    """nginx's smooth weighted round robin over the candidates with weight above zero."""

    __slots__ = ("_available", "_current", "_weights")

    def __init__(self, candidates: Sequence[Candidate]) -> None:
        self._available: tuple[int, ...] = tuple(
            i for i, c in enumerate(candidates) if c.weight > 0
        )
        self._weights: tuple[float, ...] = tuple(c.weight for c in candidates)
        self._current: list[float] = [0.0] * len(candidates)

    @property
    def rotation(self) -> tuple[tuple[int, ...], int] | None:
        """The next sum(weights) picks (one whole cycle: it then repeats) and 0, the position of
        the next pick in it; None when the weights are not whole numbers (slow start), the cycle
        is past the bounds above, or nothing is available. Computed on a copy: the picker's own
        state does not move."""
        available = self._available
        weights = [self._weights[i] for i in available]
        if not available or not all(w.is_integer() for w in map(float, weights)):
            return None
        period = int(sum(weights))
        if period > ROTATION_MAX or period * len(available) > ROTATION_WORK:
            return None
        copy = WeightedRoundRobin.__new__(WeightedRoundRobin)
        copy._available, copy._weights = available, self._weights
        copy._current = list(self._current)
        order: list[int] = []
        for _ in range(period):
            index = copy.pick(b"")
            if index is None:
                return None
            order.append(index)
        if copy._current != self._current:  # not on the cycle (left by a pick that excluded)
            return None
        return tuple(order), 0

    def pick(self, key: bytes, exclude: Set[int] = frozenset()) -> int | None:
        """Return the index with the largest current weight, or None if none is eligible.

        As in nginx, excluded backends sit the round out: their current weight does not move.
        """
        # A plain loop: for pools up to ~100 backends it beats list comprehensions plus
        # max/index (measured), and it reads like the nginx code it follows.
        weights = self._weights
        current = self._current
        total = 0.0
        best = -1
        best_current = 0.0
        for index in self._available:
            if index in exclude:
                continue
            weight = weights[index]
            value = current[index] + weight
            current[index] = value
            total += weight
            if best < 0 or value > best_current:
                best = index
                best_current = value
        if best < 0:
            return None
        current[best] = best_current - total
        return best
