from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pointsman.balance import ALGORITHMS, build_picker

from .helpers import candidates, loads


def test_algorithm_names() -> None:
    assert ALGORITHMS == (
        "round_robin",
        "weighted_round_robin",
        "least_connections",
        "power_of_two",
        "source_hash",
        "maglev",
    )


def test_unknown_algorithm() -> None:
    with pytest.raises(ValueError, match="unknown balancing algorithm 'random'"):
        build_picker("random", candidates(1), load=loads(0))


def test_seeded_rng_makes_pickers_reproducible() -> None:
    for algorithm in ALGORITHMS:
        runs = []
        for _ in range(2):
            picker = build_picker(
                algorithm,
                candidates(1, 2, 3),
                load=loads(0, 0, 0),
                table_size=13,
                rng=random.Random(9),
            )
            runs.append([picker.pick(i.to_bytes(2, "big")) for i in range(20)])
        assert runs[0] == runs[1], algorithm


def test_rotation_start_comes_from_rng() -> None:
    starts = {
        build_picker(
            "round_robin", candidates(1, 1, 1, 1), load=loads(0, 0, 0, 0), rng=random.Random(seed)
        ).pick(b"")
        for seed in range(40)
    }
    assert starts == {0, 1, 2, 3}


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(ALGORITHMS),
    st.lists(st.tuples(st.sampled_from([0.0, 0.5, 1.0, 3.0]), st.integers(0, 5)), max_size=8),
    st.lists(st.tuples(st.binary(max_size=4), st.sets(st.integers(0, 8))), min_size=1, max_size=6),
    st.integers(0, 2**32),
)
def test_never_excluded_never_unavailable_none_only_when_empty(
    algorithm: str,
    backends: list[tuple[float, int]],
    requests: list[tuple[bytes, set[int]]],
    seed: int,
) -> None:
    cands = candidates(*(w for w, _ in backends))
    picker = build_picker(
        algorithm,
        cands,
        load=loads(*(a for _, a in backends)),
        table_size=101,
        rng=random.Random(seed),
    )
    for key, exclude in requests:
        left = {i for i, c in enumerate(cands) if c.weight > 0} - exclude
        index = picker.pick(key, frozenset(exclude))
        if left:
            assert index in left
        else:
            assert index is None
