"""follow(): the engine table for each picker, and the compiled engine's XXH64 (the hash the
engine finds Maglev slots with) against the xxhash package that balance/hashing.py uses."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pointsman.balance.base import Candidate
from pointsman.balance.hashing import stable_hash64
from pointsman.balance.least_connections import LeastConnections
from pointsman.balance.maglev import Maglev
from pointsman.balance.power_of_two import PowerOfTwo
from pointsman.balance.round_robin import RoundRobin
from pointsman.balance.source_hash import SourceHash
from pointsman.balance.weighted_round_robin import WeightedRoundRobin
from pointsman.kernel.jhash import kernel_key_hash
from pointsman.proxy.follow import Follow, follow


class Load:
    active = 0


CANDIDATES = [Candidate("a", 2.0), Candidate("b", 0.0), Candidate("c", 1.0)]


def test_round_robin_and_weighted_round_robin_follow_their_rotation() -> None:
    assert follow(RoundRobin(CANDIDATES, start=1), 3, "source_ip") == Follow((0, 2), 1)
    plan = follow(WeightedRoundRobin(CANDIDATES), 3, "source_ip")
    assert plan == Follow((0, 2, 0), 0) and not plan.keyed
    assert follow(WeightedRoundRobin([Candidate("a", 0.5), Candidate("b", 0.3)]), 2,
                  "source_ip") is None  # no whole cycle


def test_least_connections_follows_its_scan_with_weights() -> None:
    picker = LeastConnections(CANDIDATES, [Load(), Load(), Load()], start=1)
    assert follow(picker, 3, "source_ip") == Follow((0, 2), 1, (2.0, 1.0))


def test_maglev_on_the_stable_hash_follows_its_table_with_the_key() -> None:
    picker = Maglev(CANDIDATES, 13)
    plan = follow(picker, 3, "source_ip_port")
    assert plan is not None and plan.keyed and plan.key_port
    assert plan.order == (0, 1, 2) and list(plan.lookup or ()) == list(picker.table)
    kernel = Maglev(CANDIDATES, 13, key_hash=kernel_key_hash(13))
    assert follow(kernel, 3, "source_ip") is None


def test_source_hash_follows_its_ranking_with_the_key() -> None:
    plan = follow(SourceHash(CANDIDATES), 3, "source_ip")
    assert plan == Follow((0, 2), 0, (2.0, 1.0), names=(b"a", b"c")) and plan.keyed
    even = follow(SourceHash([Candidate("a", 1.0), Candidate("b", 1.0)]), 2, "source_ip_port")
    assert even == Follow((0, 1), 0, None, key_port=True, names=(b"a", b"b"))


def test_power_of_two_follows_its_samples_and_weights() -> None:
    picker = PowerOfTwo(CANDIDATES, [Load(), Load(), Load()], random.Random(1))
    plan = follow(picker, 3, "source_ip")
    assert plan == Follow((0, 2), 0, (2.0, 1.0), sampled=True) and not plan.keyed


@given(st.binary(max_size=80), st.integers(0, 2**64 - 1))
def test_the_engine_s_xxh64_is_the_stable_hash(data: bytes, seed: int) -> None:
    engine = pytest.importorskip("pointsman.proxy.engine._engine")
    assert engine._xxh64(data, seed) == stable_hash64(data, seed)
