from __future__ import annotations

from collections import Counter

import xxhash

from pointsman.balance import Candidate
from pointsman.balance.source_hash import SourceHash

from .helpers import candidates

KEYS = [i.to_bytes(4, "big") for i in range(4000)]


def by_id(cands: list[Candidate], keys: list[bytes] = KEYS) -> dict[bytes, str]:
    picker = SourceHash(cands)
    out = {}
    for key in keys:
        index = picker.pick(key)
        assert index is not None
        out[key] = cands[index].id
    return out


def test_equal_weights_pick_the_highest_hash() -> None:
    # Reference written straight from the definition, with the binding called directly.
    cands = candidates(1, 1, 1, 1, 1)
    picker = SourceHash(cands)
    for key in KEYS[:500]:
        seed = xxhash.xxh64_intdigest(key)
        expected = max(range(5), key=lambda i: xxhash.xxh64_intdigest(cands[i].id.encode(), seed))
        assert picker.pick(key) == expected


def test_golden_picks() -> None:
    # Recorded from this module when written (the equal-weight case also agrees with the
    # reference above). A change here means every deployed source_hash pool remaps its clients.
    keys = [bytes([192, 0, 2, i]) for i in range(8)]
    equal = SourceHash([Candidate("a", 1), Candidate("b", 1), Candidate("c", 1)])
    assert [equal.pick(k) for k in keys] == GOLDEN_EQUAL
    weighted = SourceHash([Candidate("a", 1), Candidate("b", 2), Candidate("c", 5)])
    assert [weighted.pick(k) for k in keys] == GOLDEN_WEIGHTED


GOLDEN_EQUAL = [1, 1, 1, 1, 1, 2, 1, 1]
GOLDEN_WEIGHTED = [2, 2, 1, 2, 1, 2, 1, 1]


def test_removing_a_backend_moves_only_its_keys() -> None:
    cands = candidates(*([1] * 20))
    before = by_id(cands)
    after = by_id(cands[:7] + cands[8:])
    moved = {k for k in KEYS if before[k] != after[k]}
    assert moved == {k for k in KEYS if before[k] == "backend-7"}


def test_weight_zero_is_the_same_as_removal() -> None:
    cands = candidates(*([1] * 20))
    removed = by_id(cands[:7] + cands[8:])
    zeroed = candidates(*([1] * 7 + [0] + [1] * 12))
    assert by_id(zeroed) == removed


def test_adding_a_backend_moves_keys_only_to_it() -> None:
    cands = candidates(*([1] * 20))
    before = by_id(cands)
    after = by_id(cands + candidates(1, prefix="new-"))
    moved = [k for k in KEYS if before[k] != after[k]]
    assert all(after[k] == "new-0" for k in moved)
    assert 0 < len(moved) < 2 * len(KEYS) / 21


def test_weighted_removal_still_moves_only_its_keys() -> None:
    cands = candidates(1, 2, 3, 4, 5)
    before = by_id(cands)
    after = by_id(cands[:2] + cands[3:])
    assert {k for k in KEYS if before[k] != after[k]} == {
        k for k in KEYS if before[k] == "backend-2"
    }


def test_shares_follow_weight() -> None:
    cands = candidates(1, 3)
    keys = [i.to_bytes(4, "big") for i in range(20000)]
    counts = Counter(by_id(cands, keys).values())
    assert abs(counts["backend-1"] / len(keys) - 0.75) < 0.015


def test_independent_of_candidate_order() -> None:
    cands = candidates(1, 2, 1, 3)
    shuffled = cands[::-1]
    assert by_id(cands) == by_id(shuffled)


def test_exclusion_gives_the_runner_up() -> None:
    cands = candidates(1, 1, 1, 1)
    picker = SourceHash(cands)
    for key in KEYS[:300]:
        first = picker.pick(key)
        assert first is not None
        second = picker.pick(key, frozenset({first}))
        without = cands[:first] + cands[first + 1 :]
        expected = SourceHash(without).pick(key)
        assert second is not None and expected is not None
        assert cands[second].id == without[expected].id
    assert picker.pick(b"k", frozenset({0, 1, 2, 3})) is None
    assert SourceHash(candidates(0, 0)).pick(b"k") is None


def test_exclusion_holds_even_when_scores_tie() -> None:
    # Two entries with one id score identically for every key; excluding the first must give
    # the second, not the first again.
    picker = SourceHash([Candidate("same", 1), Candidate("same", 1), Candidate("other", 1)])
    for key in KEYS[:50]:
        first = picker.pick(key)
        if first == 0:
            assert picker.pick(key, frozenset({0})) == 1
