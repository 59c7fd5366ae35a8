"""Admission limits with explicit times: exact counts, no sockets."""

from __future__ import annotations

from pointsman.protect.limits import Admission, LimitReason, Limits, TokenBucket


def test_token_bucket_allows_burst_then_rate() -> None:
    bucket = TokenBucket(rate=10.0, burst=5.0, now=0.0)
    assert [bucket.take(0.0) for _ in range(6)] == [True] * 5 + [False]
    assert bucket.take(0.1)  # 0.1 s at 10/s gives one token
    assert not bucket.take(0.1)
    assert sum(bucket.take(1.1 + i * 0.001) for i in range(20)) == 5  # refilled to burst only


def test_listener_rate_limit_counts_exactly() -> None:
    admission = Admission(Limits(new_connections_per_second=100.0))
    results = [admission.admit("10.0.0.1", 0.0)[0] for _ in range(150)]
    assert results.count(None) == 100
    assert results.count(LimitReason.RATE) == 50


def test_per_source_cap_and_release() -> None:
    admission = Admission(Limits(max_connections_per_source=2))
    first, key1 = admission.admit("192.0.2.1", 0.0)
    second, _ = admission.admit("192.0.2.1", 0.0)
    third, _ = admission.admit("192.0.2.1", 0.0)
    other, _ = admission.admit("192.0.2.2", 0.0)
    assert (first, second, third, other) == (None, None, LimitReason.SOURCE_CONNECTIONS, None)
    assert key1 is not None
    admission.closed(key1)
    assert admission.admit("192.0.2.1", 0.0)[0] is None


def test_sources_grouped_by_prefix() -> None:
    admission = Admission(Limits(max_connections_per_source=1, source_prefix_v4=24,
                                 source_prefix_v6=64))
    assert admission.admit("198.51.100.7", 0.0)[0] is None
    assert admission.admit("198.51.100.200", 0.0)[0] is LimitReason.SOURCE_CONNECTIONS
    assert admission.admit("198.51.101.1", 0.0)[0] is None
    assert admission.admit("2001:db8::1", 0.0)[0] is None
    assert admission.admit("2001:db8::ffff", 0.0)[0] is LimitReason.SOURCE_CONNECTIONS
    assert admission.admit("::ffff:198.51.100.9", 0.0)[0] is LimitReason.SOURCE_CONNECTIONS


def test_per_source_rate_does_not_touch_other_sources() -> None:
    admission = Admission(Limits(new_connections_per_second_per_source=5.0))
    flood = [admission.admit("203.0.113.9", 0.0)[0] for _ in range(50)]
    assert flood.count(None) == 5
    assert all(admission.admit(f"203.0.113.{i}", 0.0)[0] is None for i in range(10, 20))


def test_source_table_is_bounded_and_keeps_busy_sources() -> None:
    admission = Admission(Limits(max_connections_per_source=10, max_sources=3))
    _, busy = admission.admit("10.0.0.1", 0.0)
    for i in range(2, 50):
        _, key = admission.admit(f"10.0.0.{i}", 0.0)
        assert key is not None
        admission.closed(key)
    assert len(admission.sources) == 3
    assert busy in admission.sources
