"""The event types, the bounded ring and its filter, the config diff of a reload, and the one-line
JSON form (telemetry/events.py: pure, no clock, no I/O)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pointsman.config.loader import load_text
from pointsman.config.model import Config
from pointsman.telemetry.events import (
    FILTERS,
    KINDS,
    MAX_NAMES,
    AdminEvent,
    BackendEvent,
    BgpEvent,
    ConfigDiff,
    Entry,
    EventFilter,
    EventRing,
    as_dict,
    config_diff,
    iso_utc,
    json_line,
    parse_filter,
    parse_since,
    reload_event,
)

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z


def backend(at: float = T0, pool: str = "p", name: str = "a", new: str = "down") -> BackendEvent:
    return BackendEvent(at, pool, name, "up", new, "health_down", "health check failed: refused")


def admin(at: float = T0, pool: str | None = "p", name: str | None = "a") -> AdminEvent:
    return AdminEvent(at, "127.0.0.1:5000", "ops", "POST", f"/api/v1/pools/{pool}/backends/{name}/drain",
                      200, "ok", pool=pool, backend=name, detail={"state": "draining"})


def bgp(at: float = T0, pool: str | None = "p") -> BgpEvent:
    return BgpEvent(at, "10.99.0.10/32", False, "too_few_backends",
                    "withdraw 10.99.0.10/32: pool p has 0 available backends, needs 1", pool=pool)


def config(backends: list[str], *, weight: int = 1, algorithm: str = "round_robin",
           listeners: tuple[str, ...] = ("web",), grace: str = "30s") -> Config:
    lines = ["listeners:"]
    for i, name in enumerate(listeners):
        lines.append(f"  - {{name: {name}, bind: '127.0.0.1:{8000 + i}', pool: p}}")
    lines += ["pools:", f"  - name: p\n    algorithm: {algorithm}\n    backends:"]
    lines += [f"      - {{address: '{address}', name: {name}, weight: {weight}}}"
              for name, address in ((b, f"127.0.0.1:{9000 + i}") for i, b in enumerate(backends))]
    lines.append(f"shutdown_grace: {grace}")
    return load_text("\n".join(lines) + "\n", "<test>")


# --- the ring ---------------------------------------------------------------------------------------


def test_the_ring_keeps_the_newest_and_counts_what_it_dropped() -> None:
    ring = EventRing(capacity=3)
    entries = [ring.add(backend(T0 + i)) for i in range(5)]
    assert [e.seq for e in entries] == [1, 2, 3, 4, 5]
    assert [e.seq for e in ring.query()] == [3, 4, 5]  # oldest first
    assert ring.statistics() == {"capacity": 3, "held": 3, "recorded": 5, "dropped": 2}


def test_a_ring_needs_room_for_one() -> None:
    with pytest.raises(ValueError):
        EventRing(capacity=0)


def test_filters_by_pool_backend_kind_since_after_and_limit() -> None:
    ring = EventRing()
    ring.add(backend(T0, "p", "a"))  # 1
    ring.add(backend(T0 + 1, "q", "a"))  # 2
    ring.add(admin(T0 + 2, "p", "b"))  # 3
    ring.add(admin(T0 + 3, None, None))  # 4: a reload call, no pool
    ring.add(bgp(T0 + 4, "p"))  # 5
    ring.add(reload_event(T0 + 5, "file", True, config(["a"]), config(["a", "c"]), []))  # 6

    def seqs(**kw: Any) -> list[int]:
        return [e.seq for e in ring.query(EventFilter(**kw))]

    assert seqs() == [1, 2, 3, 4, 5, 6]
    assert seqs(pool="p") == [1, 3, 5, 6]  # the reload added p/c
    assert seqs(pool="q") == [2]
    assert seqs(backend="a") == [1, 2]
    assert seqs(backend="c") == [6]
    assert seqs(pool="p", backend="a") == [1]
    assert seqs(kinds=frozenset({"admin"})) == [3, 4]
    assert seqs(kinds=frozenset({"bgp", "reload"})) == [5, 6]
    assert seqs(since=T0 + 2) == [3, 4, 5, 6]  # at or after
    assert seqs(after=4) == [5, 6]
    assert seqs(limit=2) == [5, 6]  # the newest
    assert seqs(limit=0) == []
    assert seqs(pool="p", limit=1) == [6]


@given(st.integers(1, 20), st.lists(st.sampled_from(["p", "q"]), max_size=60),
       st.integers(0, 70), st.integers(0, 30))
def test_ring_invariants(capacity: int, pools: list[str], after: int, limit: int) -> None:
    ring = EventRing(capacity)
    for i, pool in enumerate(pools):
        ring.add(backend(T0 + i, pool))
    held = ring.query()
    assert len(held) == min(capacity, len(pools))
    assert [e.seq for e in held] == list(range(len(pools) - len(held) + 1, len(pools) + 1))
    assert ring.statistics()["dropped"] == len(pools) - len(held)
    later = ring.query(EventFilter(after=after, limit=limit))
    newer = [e for e in held if e.seq > after]
    assert later == (newer[-limit:] if limit else [])


# --- since and the query string ------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("1767225600", T0),
    ("1767225600.25", T0 + 0.25),
    ("2026-01-01T00:00:00Z", T0),
    ("2026-01-01T00:00:00+00:00", T0),
    ("2026-01-01T01:00:00+01:00", T0),
    ("2026-01-01T00:00:00", T0),  # no offset: UTC
    ("2026-01-01T00:00:00.500Z", T0 + 0.5),
    (" 2026-01-01 00:00:00Z ", T0),
])
def test_since_takes_unix_seconds_or_iso_8601(text: str, expected: float) -> None:
    assert parse_since(text) == expected


@pytest.mark.parametrize("text", ["", "yesterday", "nan", "inf", "2026-13-01T00:00:00Z", "\x00"])
def test_a_bad_since_says_which_formats_it_takes(text: str) -> None:
    with pytest.raises(ValueError, match="since: expected unix seconds or ISO 8601"):
        parse_since(text)


def test_parse_filter_reads_every_key() -> None:
    got = parse_filter({"pool": "p", "backend": "a", "kind": "backend, admin", "since": "1767225600",
                        "after": "7", "limit": "20"})
    assert got == EventFilter(pool="p", backend="a", kinds=frozenset({"backend", "admin"}),
                              since=T0, after=7, limit=20)
    assert parse_filter({}) == EventFilter()
    assert set(FILTERS) == {"pool", "backend", "kind", "since", "after", "limit"}


@pytest.mark.parametrize(("query", "message"), [
    ({"pol": "p"}, "unknown filter 'pol'"),
    ({"kind": "nope"}, "kind: expected one or more of backend, admin, reload, bgp"),
    ({"kind": ","}, "kind: expected"),
    ({"limit": "-1"}, "limit: expected a whole number"),
    ({"limit": "1e3"}, "limit: expected a whole number"),
    ({"after": "٣"}, "after: expected a whole number"),  # a non-ASCII digit
    ({"after": "9" * 40}, "after: expected a whole number"),
    ({"since": "soon"}, "since: expected"),
])
def test_parse_filter_refuses_with_a_reason(query: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_filter(query)


@given(st.dictionaries(st.sampled_from([*FILTERS, "x"]), st.text()))
def test_parse_filter_raises_only_value_error(query: dict[str, str]) -> None:
    try:
        result = parse_filter(query)
    except ValueError as exc:
        assert str(exc)  # a reason the API sends back with its 400
    else:
        assert isinstance(result, EventFilter)


# --- the diff of a reload ------------------------------------------------------------------------------


def test_the_diff_names_added_removed_and_changed_backends_pools_and_listeners() -> None:
    old = config(["a", "b"])
    assert not config_diff(old, old)
    assert config_diff(old, old).describe() == "no change"

    diff = config_diff(old, config(["a", "c"]))
    assert diff.backends.added == ("p/c",) and diff.backends.removed == ("p/b",)
    assert not diff.pools and not diff.listeners and diff.settings == ()
    assert diff.describe() == "backends added: p/c; backends removed: p/b"

    diff = config_diff(old, config(["a", "b"], weight=3))
    assert diff.backends.changed == ("p/a", "p/b") and not diff.pools

    diff = config_diff(old, config(["a", "b"], algorithm="least_connections"))
    assert diff.pools.changed == ("p",) and not diff.backends

    diff = config_diff(old, config(["a", "b"], listeners=("web", "api"), grace="5s"))
    assert diff.listeners.added == ("api",) and diff.settings == ("shutdown_grace",)

    diff = config_diff(None, old)
    assert diff.pools.added == ("p",) and diff.backends.added == ("p/a", "p/b")
    assert config_diff(old, None).listeners.removed == ("web",)


def test_a_long_diff_lists_the_first_names_and_says_how_many() -> None:
    many = [f"b{i:04}" for i in range(MAX_NAMES + 20)]
    diff = config_diff(config(["a"]), config(["a", *many]))
    out = diff.as_dict()["backends"]
    assert len(out["added"]) == MAX_NAMES and out["added_total"] == MAX_NAMES + 20
    assert "and 115 more" in diff.describe()


def test_reload_events_accepted_and_refused() -> None:
    old, new = config(["a"]), config(["a", "b"])
    applied = reload_event(T0, "etcd", True, old, new, [])
    assert applied.accepted and applied.diff == config_diff(old, new)
    assert applied.summary() == "config from etcd applied: backends added: p/b"
    refused = reload_event(T0, "file", False, old, None, ["<f>:3 pools[0]: bad", "second"])
    assert refused.diff is None and refused.errors == ("<f>:3 pools[0]: bad", "second")
    assert refused.summary() == "config from file refused: <f>:3 pools[0]: bad (and 1 more)"
    assert reload_event(T0, "file", False, old, None, ["x"] * 50).errors == ("x",) * 20
    assert reload_event(T0, "file", False, old, None, ["y" * 2000]).errors[0].endswith("...")
    unbindable = reload_event(T0, "file", False, old, new, ["cannot apply: address in use"])
    assert unbindable.diff is not None and unbindable.diff.backends.added == ("p/b",)


# --- the JSON form -------------------------------------------------------------------------------------


def test_every_kind_as_one_json_line() -> None:
    events = [backend(), admin(), bgp(),
              reload_event(T0, "discovery", True, config(["a"]), config(["b"]), [])]
    assert {e.kind for e in events} == set(KINDS)
    for seq, event in enumerate(events, 1):
        line = json_line(Entry(seq, event))
        assert "\n" not in line
        doc = json.loads(line)
        assert doc["seq"] == seq and doc["kind"] == event.kind
        assert doc["time"] == "2026-01-01T00:00:00.000Z" and doc["ts"] == T0
        assert doc["summary"] == event.summary()
        assert doc == as_dict(Entry(seq, event))
    assert json.loads(json_line(Entry(1, backend())))["reason"] == "health check failed: refused"
    doc = json.loads(json_line(Entry(1, admin())))
    assert (doc["token"], doc["client"], doc["status"], doc["detail"]) == (
        "ops", "127.0.0.1:5000", 200, {"state": "draining"})
    doc = json.loads(json_line(Entry(1, events[3])))
    assert doc["diff"]["backends"] == {"added": ["p/b"], "removed": ["p/a"], "changed": []}
    assert doc["accepted"] is True and doc["errors"] == []


@given(st.text(), st.binary().map(lambda b: b.decode("utf-8", "surrogateescape")))
def test_whatever_a_client_sent_stays_on_one_line(text: str, escaped: str) -> None:
    event = AdminEvent(T0, "[::1]:1", None, "POST", "/" + text + escaped, 401, text + escaped)
    line = json_line(Entry(1, event))
    assert "\n" not in line and "\r" not in line and line.isascii()
    assert json.loads(line)["status"] == 401


def test_iso_utc() -> None:
    assert iso_utc(T0 + 0.5) == "2026-01-01T00:00:00.500Z"
    assert datetime.fromisoformat(iso_utc(T0)) == datetime(2026, 1, 1, tzinfo=UTC)


def test_an_empty_diff_is_falsy() -> None:
    assert not ConfigDiff()
