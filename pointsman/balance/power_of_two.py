"""Power of two choices: sample two backends at random, send the connection to the less loaded.

Sources: Azar, Broder, Karlin and Upfal, "Balanced Allocations" (STOC 1994), and Mitzenmacher,
"The Power of Two Choices in Randomized Load Balancing" (IEEE TPDS 12(10), 2001). It is nginx's
`random two least_conn` and HAProxy's `random(2)`. Two samples are enough to cut the worst queue
from about log n / log log n to log log n, and, unlike least connections, many workers each with a
slightly stale view of the load do not all pile onto the same "least loaded" backend.

Both samples are drawn with probability proportional to weight, the second from the remaining
weight so the two are always distinct; the lower `active / weight` wins, the first on a tie.
"""

from __future__ import annotations

import random
from bisect import bisect_right
from collections.abc import Callable, Sequence, Set
from itertools import accumulate

from pointsman.balance.base import Candidate, Loaded


class _Wheel:
    """Cumulative weights over a set of indices, for weighted sampling by bisection."""

    __slots__ = ("ends", "indices", "weights")

    def __init__(self, indices: Sequence[int], weights: Sequence[float]) -> None:
        self.indices = tuple(indices)
        self.weights = tuple(weights[i] for i in self.indices)
        self.ends = list(accumulate(self.weights))  # the running sums; the last is the total


class PowerOfTwo:
    """Two weighted random choices, the less loaded (per unit of weight) wins."""

    __slots__ = ("_load", "_rng", "_weights", "_wheel")

    def __init__(
        self, candidates: Sequence[Candidate], load: Sequence[Loaded], rng: random.Random
    ) -> None:
        """`load[i]` is the live load of `candidates[i]`; `rng` is owned by this picker's user."""
        if len(load) != len(candidates):
            raise ValueError(f"{len(load)} load entries for {len(candidates)} candidates")
        self._weights: tuple[float, ...] = tuple(c.weight for c in candidates)
        self._wheel = _Wheel([i for i, c in enumerate(candidates) if c.weight > 0], self._weights)
        self._load = load
        self._rng = rng

    @property
    def sampled(self) -> tuple[tuple[int, ...], tuple[float, ...]]:
        """The indices sampled and their weights: what an engine that admits on its own
        samples from, with its own random numbers and live counts (docs/engine.md, "Fast
        admission")."""
        return self._wheel.indices, self._wheel.weights

    def pick(self, key: bytes, exclude: Set[int] = frozenset()) -> int | None:
        """Return the less loaded of two weighted samples, or None if none is eligible."""
        wheel = self._wheel
        if exclude and not exclude.isdisjoint(wheel.indices):
            # Retries only: rebuild the wheel without the backends already tried.
            wheel = _Wheel([i for i in wheel.indices if i not in exclude], self._weights)
        count = len(wheel.indices)
        if count < 2:
            return wheel.indices[0] if count else None
        first, second = draw_two(wheel.ends, wheel.weights, self._rng.random)
        a = wheel.indices[first]
        b = wheel.indices[second]
        load = self._load
        weights = self._weights
        if load[b].active / weights[b] < load[a].active / weights[a]:
            return b
        return a


def draw_two(ends: Sequence[float], weights: Sequence[float],
             random: Callable[[], float]) -> tuple[int, int]:
    """Positions of two distinct samples (two entries or more), each drawn with probability
    proportional to its weight, the second from the weight left once the first is out; `ends`
    are the weights' running sums. Also what the pure-Python connection engine samples with."""
    count = len(ends)
    total = ends[-1]
    first = min(bisect_right(ends, random() * total), count - 1)
    first_weight = weights[first]
    first_start = ends[first - 1] if first else 0.0
    # Draw from the weight left once `first` is taken out, then step over its interval.
    point = random() * (total - first_weight)
    if point >= first_start:
        point += first_weight
    second = min(bisect_right(ends, point), count - 1)
    if second == first:  # only by float rounding at an interval edge
        second = first + 1 if first + 1 < count else first - 1
    return first, second
