"""Builds the picker an algorithm name asks for, from one pool snapshot."""

from __future__ import annotations

import random
from collections.abc import Sequence

from pointsman.balance.base import Candidate, Loaded, Picker
from pointsman.balance.least_connections import LeastConnections
from pointsman.balance.maglev import DEFAULT_TABLE_SIZE, Maglev
from pointsman.balance.power_of_two import PowerOfTwo
from pointsman.balance.round_robin import RoundRobin
from pointsman.balance.source_hash import SourceHash
from pointsman.balance.weighted_round_robin import WeightedRoundRobin

ALGORITHMS = (
    "round_robin",
    "weighted_round_robin",
    "least_connections",
    "power_of_two",
    "source_hash",
    "maglev",
)
"""Every algorithm name a pool may configure."""


def build_picker(
    algorithm: str,
    candidates: Sequence[Candidate],
    *,
    load: Sequence[Loaded],
    table_size: int = DEFAULT_TABLE_SIZE,
    rng: random.Random | None = None,
    home_weights: Sequence[float] | None = None,
) -> Picker:
    """Return a new picker over `candidates`.

    `load[i]` is the live load of `candidates[i]` (read by least_connections and power_of_two).
    `rng` draws power_of_two's samples and the starting point of the rotations, so that each new
    snapshot, and each worker, does not begin with backend 0; None means a fresh unseeded Random.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown balancing algorithm {algorithm!r}; expected one of {ALGORITHMS}")
    if rng is None:
        rng = random.Random()
    if algorithm == "round_robin":
        return RoundRobin(candidates, start=rng.randrange(max(len(candidates), 1)))
    if algorithm == "weighted_round_robin":
        return WeightedRoundRobin(candidates)
    if algorithm == "least_connections":
        return LeastConnections(candidates, load, start=rng.randrange(max(len(candidates), 1)))
    if algorithm == "power_of_two":
        return PowerOfTwo(candidates, load, rng)
    if algorithm == "source_hash":
        return SourceHash(candidates)
    return Maglev(candidates, table_size, home_weights)
