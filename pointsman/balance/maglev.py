"""Maglev consistent hashing.

Source: Eisenbud et al., "Maglev: A Fast and Reliable Software Network Load Balancer", NSDI 2016,
section 3.4 ("Consistent Hashing"), Pseudocode 1. Each backend gets a preference list, a
permutation of the M table slots given by `offset = h1(id) mod M` and `skip = h2(id) mod (M-1) + 1`
(M prime, so every skip is coprime with M and the walk visits every slot). Backends take turns
claiming their next preferred free slot until the table is full; a key's backend is then
`table[hash(key) mod M]`, one hash and one index per connection.

The paper's pseudocode has no weights (Katran and Envoy add them, each its own way); here a
backend of weight w takes its k-th turn at virtual time k / w, so turns, and therefore slots, are
handed out in proportion to weight and every available backend gets at least one. With equal
weights this is exactly the paper's round-robin order. Turn order among backends is by id, so the
table depends only on the set of (id, weight), not on the order of the backend list.

Maglev trades a little disruption for balance (section 3.4 aims for minimal disruption, not zero;
section 5.3 measures it): a removed backend's freed slots change who claims what later in the
fill, so some other keys move too. Measured here at M=65537 with 100 equal backends: removing one
moves its own 1 % of keys plus about 0.5 % of all keys from other backends; adding one moves about
1.6/(N+1) of keys instead of the ideal 1/(N+1).

A backend that only leaves service for a while (down, ejected, draining) should move only its own
keys, and get exactly them back when it returns. So with `home_weights` (each backend's weight
when in service) the picker keeps the table of every backend in service ("home table") and
gives only the slots of unavailable backends to the table built from the available ones: keys of
available backends never move on a health change (0 collateral), and the freed slots are spread
over the others in proportion to weight. Configuration changes (a backend added, removed or
re-weighted) rebuild the home table, with the paper's disruption.

Hash policies use the configured weight, not the slow start ramp: a ramp would move keys.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence, Set

from pointsman.balance.base import Candidate
from pointsman.balance.hashing import stable_hash64

DEFAULT_TABLE_SIZE = 65537
"""Prime, one of the two sizes the paper evaluates (section 5.3), and ~100x a large pool."""

OFFSET_SEED = 0x4D41474C45563031
"""Seed of h1, the offset hash (ASCII "MAGLEV01")."""

SKIP_SEED = 0x4D41474C45563032
"""Seed of h2, the skip hash (ASCII "MAGLEV02"); must differ from OFFSET_SEED."""

MAX_REHASH = 8
"""How many re-seeded lookups a retry tries before walking the available backends in order."""


def is_prime(n: int) -> bool:
    """Deterministic trial division; table sizes are small enough (up to ~10**7) for this."""
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    divisor = 3
    while divisor * divisor <= n:
        if n % divisor == 0:
            return False
        divisor += 2
    return True


def build_table(candidates: Sequence[Candidate], table_size: int) -> list[int]:
    """Return the Maglev lookup table: `table_size` candidate indices.

    Only candidates with weight > 0 enter the table. With none, every slot is -1.
    """
    if not is_prime(table_size):
        raise ValueError(f"Maglev table size must be prime, got {table_size}")
    available = sorted(
        (i for i, c in enumerate(candidates) if c.weight > 0), key=lambda i: (candidates[i].id, i)
    )
    if len(available) > table_size:
        raise ValueError(f"{len(available)} backends do not fit a table of {table_size} slots")
    size = table_size
    table = [-1] * size
    if not available:
        return table
    ids = [candidates[i].id.encode() for i in available]
    position = [stable_hash64(b, OFFSET_SEED) % size for b in ids]
    skip = [stable_hash64(b, SKIP_SEED) % (size - 1) + 1 if size > 1 else 1 for b in ids]
    weights = [candidates[i].weight for i in available]
    if len(set(weights)) == 1:
        _fill_round_robin(table, available, position, skip)
    else:
        _fill_weighted(table, available, position, skip, weights)
    return table


def _fill_round_robin(
    table: list[int], available: list[int], position: list[int], skip: list[int]
) -> None:
    """Pseudocode 1 of the paper: backends claim slots in strict turns."""
    size = len(table)
    filled = 0
    turns = list(zip(range(len(available)), available, strict=True))
    while True:
        for rank, index in turns:
            # Walk this backend's permutation to its next free slot; `position` is the
            # permutation computed lazily, one step at a time, with no multiply or modulo.
            slot = position[rank]
            step = skip[rank]
            while table[slot] >= 0:
                slot += step
                if slot >= size:
                    slot -= size
            table[slot] = index
            slot += step
            position[rank] = slot - size if slot >= size else slot
            filled += 1
            if filled == size:
                return


def _fill_weighted(
    table: list[int],
    available: list[int],
    position: list[int],
    skip: list[int],
    weights: list[float],
) -> None:
    """Like `_fill_round_robin`, but backend r takes its k-th turn at virtual time k / w[r]."""
    size = len(table)
    filled = 0
    taken = [0] * len(available)
    # (virtual time, rank): ties go to the lower rank, so the order is fully deterministic.
    queue = [(0.0, rank) for rank in range(len(available))]
    heapreplace = heapq.heapreplace
    while True:
        rank = queue[0][1]
        slot = position[rank]
        step = skip[rank]
        while table[slot] >= 0:
            slot += step
            if slot >= size:
                slot -= size
        table[slot] = available[rank]
        slot += step
        position[rank] = slot - size if slot >= size else slot
        filled += 1
        if filled == size:
            return
        taken[rank] += 1
        heapreplace(queue, (taken[rank] / weights[rank], rank))


def _overlay(
    candidates: Sequence[Candidate], home_weights: Sequence[float], live: list[int], size: int
) -> list[int]:
    """Home table, with the slots of unavailable backends taken from the live table."""
    home_candidates = [Candidate(c.id, w) for c, w in zip(candidates, home_weights, strict=True)]
    if all(c.weight == h.weight for c, h in zip(candidates, home_candidates, strict=True)):
        return live  # everyone in service at home weight: the two tables are the same
    home = build_table(home_candidates, size)
    return [h if h >= 0 and candidates[h].weight > 0 else v
            for h, v in zip(home, live, strict=True)]


class Maglev:
    """Picks by Maglev table lookup; retries re-hash the key so they stay deterministic."""

    __slots__ = ("_available", "_key_hash", "_size", "_table")

    def __init__(
        self,
        candidates: Sequence[Candidate],
        table_size: int = DEFAULT_TABLE_SIZE,
        home_weights: Sequence[float] | None = None,
        key_hash: Callable[[bytes], int] = stable_hash64,
    ) -> None:
        """`key_hash` maps a key to its slot (mod `table_size`); the kernel fast path passes
        `pointsman.kernel.jhash.kernel_key_hash` so that a pick here is the kernel's pick."""
        self._key_hash = key_hash
        self._table = build_table(candidates, table_size)
        if home_weights is not None:
            self._table = _overlay(candidates, home_weights, self._table, table_size)
        self._size = table_size
        self._available: tuple[int, ...] = tuple(
            i for i, c in enumerate(candidates) if c.weight > 0
        )

    @property
    def key_hash(self) -> Callable[[bytes], int]:
        """What maps a key to its slot (stable_hash64, or the kernel's jhash)."""
        return self._key_hash

    @property
    def table(self) -> Sequence[int]:
        """The lookup table, for the kernel fast path and for table utilisation metrics."""
        return self._table

    def pick(self, key: bytes, exclude: Set[int] = frozenset()) -> int | None:
        """Return `table[hash(key) mod M]`; on a retry, the first non-excluded of a few rehashes."""
        table = self._table
        size = self._size
        hash0 = self._key_hash(key)
        index = table[hash0 % size]
        if index < 0:
            return None
        if not exclude or index not in exclude:
            return index
        for seed in range(1, MAX_REHASH + 1):
            index = table[stable_hash64(key, seed) % size]
            if index not in exclude:
                return index
        available = self._available
        count = len(available)
        start = hash0 % count
        for step in range(count):
            index = available[(start + step) % count]
            if index not in exclude:
                return index
        return None
