from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pointsman.balance.affinity import AffinityTable


def test_hit_and_miss() -> None:
    table = AffinityTable(timeout=10, max_entries=10)
    assert table.lookup(b"k", 0.0) is None
    table.remember(b"k", "b1", 0.0)
    assert table.lookup(b"k", 9.9) == "b1"
    assert len(table) == 1


def test_expires_timeout_after_last_use() -> None:
    table = AffinityTable(timeout=10, max_entries=10)
    table.remember(b"k", "b1", 100.0)
    assert table.lookup(b"k", 110.0) is None  # exactly `timeout` idle: expired
    assert len(table) == 0
    assert table.lookup(b"k", 100.0) is None  # and removed, not just hidden


def test_hit_refreshes_last_use() -> None:
    table = AffinityTable(timeout=10, max_entries=10)
    table.remember(b"k", "b1", 0.0)
    assert table.lookup(b"k", 8.0) == "b1"
    assert table.lookup(b"k", 17.0) == "b1"  # 9 s after the refresh at 8
    assert table.lookup(b"k", 27.0) is None  # 10 s after the refresh at 17


def test_lru_bound() -> None:
    table = AffinityTable(timeout=100, max_entries=2)
    table.remember(b"a", "b1", 0.0)
    table.remember(b"b", "b1", 1.0)
    assert table.lookup(b"a", 2.0) == "b1"  # now b is the least recent
    table.remember(b"c", "b2", 3.0)
    assert len(table) == 2
    assert table.lookup(b"b", 4.0) is None
    assert table.lookup(b"a", 4.0) == "b1"
    assert table.lookup(b"c", 4.0) == "b2"


def test_forget_backend() -> None:
    table = AffinityTable(timeout=100, max_entries=10)
    table.remember(b"a", "b1", 0.0)
    table.remember(b"b", "b2", 0.0)
    table.remember(b"c", "b1", 0.0)
    table.remember(b"c", "b2", 1.0)  # rebound: forgetting b1 must not drop it
    assert table.forget_backend("b1") == 1
    assert table.lookup(b"a", 2.0) is None
    assert table.lookup(b"c", 2.0) == "b2"
    assert table.forget_backend("b1") == 0
    assert table.forget_backend("b2") == 2
    assert len(table) == 0


def test_expire_drops_only_idle_entries() -> None:
    table = AffinityTable(timeout=10, max_entries=10)
    table.remember(b"a", "b1", 0.0)
    table.remember(b"b", "b1", 5.0)
    table.remember(b"c", "b1", 6.0)
    assert table.lookup(b"a", 7.0) == "b1"
    assert table.expire(16.0) == 2  # b (idle 11 s) and c (idle 10 s); a was used at 7
    assert len(table) == 1
    assert table.forget_backend("b1") == 1


def test_rejects_bad_limits() -> None:
    with pytest.raises(ValueError, match="timeout"):
        AffinityTable(timeout=0, max_entries=1)
    with pytest.raises(ValueError, match="at least one"):
        AffinityTable(timeout=1, max_entries=0)


operations = st.lists(
    st.tuples(
        st.sampled_from(["lookup", "remember", "forget", "expire"]),
        st.sampled_from([b"a", b"b", b"c", b"d"]),
        st.sampled_from(["b1", "b2"]),
        st.integers(0, 4),
    ),
    max_size=60,
)


@given(operations)
def test_behaves_like_a_simple_model(ops: list[tuple[str, bytes, str, int]]) -> None:
    table = AffinityTable(timeout=5, max_entries=3)
    model: dict[bytes, tuple[str, float]] = {}  # insertion order = least recent first
    now = 0.0
    for op, key, backend, advance in ops:
        now += advance
        if op == "lookup":
            entry = model.pop(key, None)
            expected = None
            if entry is not None and now - entry[1] < 5:
                expected = entry[0]
                model[key] = (entry[0], now)
            assert table.lookup(key, now) == expected
        elif op == "remember":
            model.pop(key, None)
            model[key] = (backend, now)
            while len(model) > 3:
                del model[next(iter(model))]
            table.remember(key, backend, now)
        elif op == "forget":
            doomed = [k for k, (b, _) in model.items() if b == backend]
            for k in doomed:
                del model[k]
            assert table.forget_backend(backend) == len(doomed)
        else:
            stale = [k for k, (_, t) in model.items() if now - t >= 5]
            for k in stale:
                del model[k]
            assert table.expire(now) == len(stale)
        assert len(table) == len(model)
