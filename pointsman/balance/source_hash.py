"""Source hash by weighted rendezvous (highest random weight) hashing.

Sources: Thaler and Ravishankar, "Using Name-Based Mappings to Increase Hit Rates" (IEEE/ACM
Transactions on Networking 6(1), 1998) for rendezvous hashing; the weighted score
`-weight / ln(u)`, with `u` the key's hash for that backend mapped into (0, 1), is the logarithmic
method of Schindelhauer and Schomaker, "Weighted Distributed Hash Tables" (SPAA 2005). It gives each
backend a share of keys proportional to its weight.

Every backend scores every key independently and the highest score wins, so removing a backend moves
only the keys it held (each to its runner-up), and adding one moves to it only the keys it now wins:
no other key changes backend. The price is O(n) hashes per pick; for large pools Maglev is O(1).

Hash policies use the configured weight, not the slow start ramp (as HAProxy does): a ramp would
move keys back and forth while it runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence, Set

from pointsman.balance.base import Candidate
from pointsman.balance.hashing import stable_hash64

_TO_UNIT = 2.0**-53
"""With it, ((h >> 11) + 0.5) * _TO_UNIT maps a 64-bit hash into the open interval (0, 1), so that
ln() of it is finite and negative: the top 53 bits fill a float's mantissa."""


class SourceHash:
    """Weighted rendezvous hashing of the connection key over the available candidates."""

    __slots__ = ("_available", "_ids", "_uniform", "_weights")

    def __init__(self, candidates: Sequence[Candidate]) -> None:
        self._available: tuple[int, ...] = tuple(
            i for i, c in enumerate(candidates) if c.weight > 0
        )
        self._ids: tuple[bytes, ...] = tuple(candidates[i].id.encode() for i in self._available)
        self._weights: tuple[float, ...] = tuple(candidates[i].weight for i in self._available)
        # With equal weights the score is monotonic in the hash, so the log can be skipped.
        self._uniform = len(set(self._weights)) <= 1

    @property
    def ranking(self) -> tuple[tuple[int, ...], tuple[bytes, ...], tuple[float, ...] | None]:
        """The indices ranked, their ids as hashed, and their weights (None: all equal, the
        hash alone ranks): what an engine that admits on its own needs to pick as this does
        (docs/engine.md, "Fast admission")."""
        return self._available, self._ids, None if self._uniform else self._weights

    def pick(self, key: bytes, exclude: Set[int] = frozenset()) -> int | None:
        """Return the available, non-excluded index with the highest score for `key`."""
        available = self._available
        if not available:
            return None
        return _highest(scores(key, self._ids, None if self._uniform else self._weights),
                        available, exclude)


def scores(key: bytes, ids: Sequence[bytes], weights: Sequence[float] | None) -> Sequence[float]:
    """Each backend's score for `key` (the highest wins): its id's hash seeded with the key's
    (ints: all 64 bits rank), or with `weights`, -weight / ln(u) of it. Also what the
    pure-Python connection engine ranks by, so its fast path picks as the picker does."""
    # The key's own hash seeds each backend's hash: the same as hashing key and id together,
    # without the ambiguity of concatenation (b"ab" + "c" == b"a" + "bc").
    seed = stable_hash64(key)
    hash64 = stable_hash64
    if weights is None:  # equal weights: the score is monotonic in the hash, the log skipped
        return [hash64(name, seed) for name in ids]
    log = math.log
    # _unit() inlined: a call per backend per connection is measurable at 1000 backends.
    return [-weight / log(((hash64(name, seed) >> 11) + 0.5) * _TO_UNIT)
            for name, weight in zip(ids, weights, strict=True)]


def _highest(scores: Sequence[float], available: Sequence[int], exclude: Set[int]) -> int | None:
    """The index in `available` with the top score, skipping `exclude`; the first on a tie."""
    if not exclude:
        return available[scores.index(max(scores))]
    ranked = [s for s, i in zip(scores, available, strict=True) if i not in exclude]
    if not ranked:
        return None
    best = max(ranked)
    return next(i for s, i in zip(scores, available, strict=True) if s == best and i not in exclude)
