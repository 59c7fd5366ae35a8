"""How a connection engine's fast table follows a pool's picker (docs/engine.md, "Fast
admission"): the engine admits connections on its own and picks as the picker would have.

- round robin: the rotation, from the picker's position;
- smooth weighted round robin with whole weights: its next whole cycle (it repeats);
- least connections: the backends and weights to scan, from where the picker's scan starts,
  by the engine's own count of each target's connections;
- power of two: the backends and weights to sample from, with the engine's own random numbers
  and counts;
- Maglev keyed by the stable hash: the lookup table, the engine hashing the client key itself;
- source hash: the backends' ids and weights, the engine ranking them for the client key.

Anything else (Maglev on the kernel's jhash, affinity) is picked in Python.
Pure: no I/O, tested on its own (tests/unit/proxy/test_follow.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from pointsman.balance.hashing import stable_hash64
from pointsman.balance.least_connections import LeastConnections
from pointsman.balance.maglev import Maglev
from pointsman.balance.power_of_two import PowerOfTwo
from pointsman.balance.round_robin import RoundRobin
from pointsman.balance.source_hash import SourceHash
from pointsman.balance.weighted_round_robin import WeightedRoundRobin


class Follow(NamedTuple):
    """An engine table: `order` (candidate indices, one engine target each), where the engine
    starts in it, and what it picks by (nothing: in turn)."""

    order: tuple[int, ...]
    start: int
    weights: tuple[float, ...] | None = None  # least connections or source hash, per `order`
    lookup: Sequence[int] | None = None  # Maglev: slot -> index into `order`
    key_port: bool = False  # the client's port is part of the hashed key
    names: tuple[bytes, ...] | None = None  # source hash: the ids ranked, per `order`
    sampled: bool = False  # power of two: `weights` are sampled, not scanned

    @property
    def keyed(self) -> bool:
        """The pick hashes the client key (the pool's targets carry one: `needs_key`)."""
        return self.lookup is not None or self.names is not None


def follow(picker: object, candidates: int, hash_key: str) -> Follow | None:
    """The table that follows `picker` (built over `candidates` backends), or None when an
    engine cannot pick as it does."""
    if isinstance(picker, LeastConnections):
        order, start, weights = picker.scan
        return Follow(order, start, weights)
    if isinstance(picker, PowerOfTwo):
        indices, odds = picker.sampled
        return Follow(indices, 0, odds, sampled=True)
    if isinstance(picker, RoundRobin | WeightedRoundRobin):
        rotation = picker.rotation
        return None if rotation is None else Follow(*rotation)
    key_port = hash_key == "source_ip_port"
    if isinstance(picker, Maglev) and picker.key_hash is stable_hash64:
        return Follow(tuple(range(candidates)), 0, lookup=picker.table, key_port=key_port)
    if isinstance(picker, SourceHash):
        ranked, names, shares = picker.ranking
        return Follow(ranked, 0, shares, key_port=key_port, names=names)
    return None
