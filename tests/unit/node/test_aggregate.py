"""Totals across processes (telemetry.aggregate) and the control process's WorkerReports:
counters add up and never go backwards when a worker exits; gauges describe the live workers."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pointsman.node.ipc import ListenerStatistics, StatsReport
from pointsman.node.remote import WorkerReports
from pointsman.telemetry.aggregate import add, blank, counters_of, total
from pointsman.telemetry.flow import DropReason, EndReason, RejectReason
from pointsman.telemetry.histogram import DURATION_BUCKETS, LATENCY_BUCKETS, Histogram
from pointsman.telemetry.process import ProcessFigures
from pointsman.telemetry.stats import BackendStats, ListenerStats, PoolStats
from pointsman.telemetry.udp_stats import UdpListenerStats

T = TypeVar("T")
Stats = ListenerStats | UdpListenerStats | BackendStats | PoolStats
KEYS: dict[tuple[type, str], list[Any]] = {
    (ListenerStats, "rejected"): list(RejectReason),
    (ListenerStats, "ended"): list(EndReason),
    (UdpListenerStats, "drops"): list(DropReason),
    (UdpListenerStats, "sessions_ended"): ["idle_timeout", "responses", "shutdown"],
    (ListenerStats, "local_resource"): ["socket:EMFILE", "connect:EADDRNOTAVAIL"],
    (ListenerStats, "accept_errors"): ["EMFILE", "ENFILE", "ENOBUFS"],
    (UdpListenerStats, "local_resource"): ["socket:EMFILE", "socket:ENFILE"],
}


def slots(obj: object) -> tuple[str, ...]:
    return tuple(type(obj).__slots__)  # type: ignore[attr-defined]


def make(cls: type[T], rng: random.Random, scale: int = 1000) -> T:
    """A statistics object with every field non-zero: counts, counters by key, histograms."""
    factory: Any = cls
    obj: Any = factory() if cls in (BackendStats, PoolStats) else factory(rng.randint(1, scale))
    for name in slots(obj):
        value = getattr(obj, name)
        if isinstance(value, Histogram):
            for _ in range(rng.randint(1, 20)):
                value.observe(rng.choice((*value.bounds, value.bounds[-1] * 2)) * rng.random())
        elif isinstance(value, Counter):
            for key in rng.sample(KEYS[(cls, name)], 2):
                value[key] = rng.randint(1, scale)
        elif isinstance(value, int):
            setattr(obj, name, rng.randint(1, scale))
    return obj  # type: ignore[no-any-return]


def picture(obj: object) -> dict[str, Any]:
    """Every field of a statistics object as plain, comparable values (Counter keys with their
    type, so an enum key turned into a str is a difference)."""
    out: dict[str, Any] = {}
    for name in slots(obj):
        value = getattr(obj, name)
        if isinstance(value, Histogram):
            out[name] = (value.bounds, list(value.counts), round(value.sum, 9), value.count)
        elif isinstance(value, Counter):
            out[name] = {(type(k), k): n for k, n in value.items() if n}
        else:
            out[name] = value
    return out


def fieldwise(live: list[Any], retired: Any | None) -> dict[str, Any]:
    """The expected total, computed field by field from the definitions: gauges of live objects,
    counters of live and retired ones."""
    parts = [*live, *([retired] if retired is not None else [])]
    like = parts[0]
    gauges = type(like).GAUGES
    out: dict[str, Any] = {}
    for name in slots(like):
        counted = [getattr(p, name) for p in live] + (
            [getattr(retired, name)] if retired is not None and name not in gauges else [])
        first = getattr(like, name)
        if isinstance(first, Histogram):
            counts = [sum(h.counts[i] for h in counted) for i in range(len(first.counts))]
            out[name] = (first.bounds, counts, round(sum(h.sum for h in counted), 9),
                         sum(h.count for h in counted))
        elif isinstance(first, Counter):
            summed: Counter[Any] = Counter()
            for c in counted:
                summed.update(c)
            out[name] = {(type(k), k): n for k, n in summed.items() if n}
        else:
            out[name] = sum(counted)
    return out


# --- telemetry.aggregate ---------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [ListenerStats, UdpListenerStats, BackendStats, PoolStats])
def test_total_sums_every_field(cls: type[Any]) -> None:
    rng = random.Random(cls.__name__)
    live = [make(cls, rng) for _ in range(3)]
    retired = make(cls, rng)
    before = [picture(x) for x in (*live, retired)]
    summed = total(live, retired)
    assert summed is not None and type(summed) is cls
    assert picture(summed) == fieldwise(live, retired)
    # The parts are untouched, and the total shares no mutable part with them.
    assert [picture(x) for x in (*live, retired)] == before
    for name in slots(summed):
        value = getattr(summed, name)
        if isinstance(value, Counter | Histogram):
            assert all(value is not getattr(part, name) for part in (*live, retired))


def test_total_of_listener_stats_in_figures() -> None:
    a, b = ListenerStats(500), ListenerStats(500)
    a.accepted, a.active, a.bytes_in = 10, 2, 1000
    b.accepted, b.active, b.bytes_in = 5, 1, 500
    a.rejected[RejectReason.TABLE_FULL] = 3
    b.rejected[RejectReason.TABLE_FULL] = 1
    b.rejected[RejectReason.NO_BACKEND] = 2
    a.ended[EndReason.CLIENT_FIN] = 8
    a.ttfb.observe(0.002)
    b.ttfb.observe(0.002)
    b.ttfb.observe(3.0)
    gone = ListenerStats(500)
    gone.accepted, gone.active, gone.bytes_in = 100, 40, 9000
    gone.rejected[RejectReason.NO_BACKEND] = 7
    gone.duration.observe(12.0)
    summed = total([a, b], gone)
    assert summed is not None
    assert (summed.accepted, summed.active, summed.bytes_in, summed.capacity) == (115, 3, 10500, 1000)
    assert summed.rejected == Counter({RejectReason.TABLE_FULL: 4, RejectReason.NO_BACKEND: 9})
    assert all(type(k) is RejectReason for k in summed.rejected)
    assert summed.ended == Counter({EndReason.CLIENT_FIN: 8})
    assert (summed.ttfb.count, round(summed.ttfb.sum, 6)) == (3, 3.004)
    assert summed.ttfb.counts[LATENCY_BUCKETS.index(0.0025)] == 2
    assert summed.duration.bounds == DURATION_BUCKETS and summed.duration.count == 1


def test_total_of_nothing_is_none() -> None:
    assert total([]) is None
    assert total([], None) is None


def test_total_of_only_retired_keeps_its_counters_not_its_gauges() -> None:
    gone = make(UdpListenerStats, random.Random(1))
    summed = total([], gone)
    assert summed is not None
    assert summed.sessions == 0 and summed.capacity == 0
    assert summed.sessions_created == gone.sessions_created
    assert summed.drops == gone.drops


def test_blank_and_counters_of() -> None:
    stats = make(ListenerStats, random.Random(2))
    empty = blank(stats)
    assert type(empty) is ListenerStats
    assert all(v == 0 for k, v in picture(empty).items() if k not in ("ttfb", "duration")
               and not isinstance(v, dict))
    assert empty.rejected == Counter() and empty.ended == Counter()
    assert empty.duration.bounds == DURATION_BUCKETS and empty.duration.count == 0
    assert empty.ttfb.bounds == LATENCY_BUCKETS
    kept = counters_of(stats)
    assert (kept.active, kept.capacity, kept.pending) == (0, 0, 0)
    expected = picture(stats)
    expected.update(active=0, capacity=0, pending=0)
    assert picture(kept) == expected
    kept.rejected[RejectReason.NO_BACKEND] += 1
    kept.ttfb.observe(1.0)
    assert picture(stats) == picture(make(ListenerStats, random.Random(2)))  # not aliased


def test_add_without_gauges() -> None:
    into, part = BackendStats(), BackendStats()
    part.active, part.total = 4, 9
    add(into, part, gauges=False)
    assert (into.active, into.total) == (0, 9)
    add(into, part)
    assert (into.active, into.total) == (4, 18)


def test_every_statistics_class_names_real_gauges() -> None:
    for cls in (ListenerStats, UdpListenerStats, BackendStats, PoolStats):
        assert set(cls.__slots__) >= cls.GAUGES, cls.__name__


@settings(max_examples=60, deadline=None)
@given(cls=st.sampled_from([ListenerStats, UdpListenerStats, BackendStats, PoolStats]),
       seed=st.integers(0, 2**32), live=st.integers(0, 4), with_retired=st.booleans())
def test_total_is_the_fieldwise_sum(cls: type[Any], seed: int, live: int, with_retired: bool) -> None:
    rng = random.Random(seed)
    parts = [make(cls, rng, scale=rng.choice((1, 10, 10**9))) for _ in range(live)]
    retired = make(cls, rng) if with_retired else None
    summed = total(parts, retired)
    if not parts and retired is None:
        assert summed is None
        return
    assert summed is not None
    assert picture(summed) == fieldwise(parts, retired)


# --- WorkerReports ----------------------------------------------------------------------------------


def figures(index: int) -> ProcessFigures:
    return ProcessFigures(f"worker-{index}", 1000 + index, 1.0, 0.5 * index, 1 << 20, 10, 1024, 0.001)


def report(index: int, *, accepted: int, active: int, udp_created: int = 0, sessions: int = 0,
           backend_total: int = 0, backend_active: int = 0, dropped: int = 0,
           accepting: frozenset[str] = frozenset({"web", "dns"})) -> StatsReport:
    web = ListenerStats(100)
    web.accepted, web.active = accepted, active
    web.ended[EndReason.CLIENT_FIN] = accepted - active
    web.ttfb.observe(0.001 * (index + 1))
    dns = UdpListenerStats(50)
    dns.sessions_created, dns.sessions = udp_created, sessions
    dns.drops[DropReason.NO_BACKEND] = index
    backend = BackendStats()
    backend.total, backend.active = backend_total, backend_active
    backend.connect_time.observe(0.0005)
    listeners: dict[str, ListenerStatistics] = {"web": web, "dns": dns}
    return StatsReport(index, listeners, accepting, {("pool", "a"): backend}, figures(index), dropped)


def web_of(reports: WorkerReports) -> ListenerStats:
    stats = reports.listener("web")
    assert isinstance(stats, ListenerStats)
    return stats


def dns_of(reports: WorkerReports) -> UdpListenerStats:
    stats = reports.listener("dns")
    assert isinstance(stats, UdpListenerStats)
    return stats


def test_worker_reports_sum_three_workers_and_keep_counters_of_an_exited_one() -> None:
    reports = WorkerReports()
    assert reports.listener("web") is None
    assert reports.backend("pool", "a").total == 0
    assert not reports.accepting("web")
    assert reports.processes() == [] and reports.flow_log_dropped() == 0

    reports.update(report(2, accepted=30, active=3, udp_created=7, sessions=2, backend_total=30,
                          backend_active=3, dropped=5, accepting=frozenset({"web"})))
    reports.update(report(0, accepted=10, active=1, udp_created=4, sessions=1, backend_total=10,
                          backend_active=1, dropped=1))
    reports.update(report(1, accepted=20, active=2, udp_created=5, sessions=0, backend_total=20,
                          backend_active=2, dropped=2))
    web = web_of(reports)
    assert (web.accepted, web.active, web.capacity) == (60, 6, 300)
    assert web.ended == Counter({EndReason.CLIENT_FIN: 54})
    assert web.ttfb.count == 3
    dns = dns_of(reports)
    assert (dns.sessions_created, dns.sessions, dns.capacity) == (16, 3, 150)
    assert dns.drops == Counter({DropReason.NO_BACKEND: 3})
    backend = reports.backend("pool", "a")
    assert (backend.total, backend.active, backend.connect_time.count) == (60, 6, 3)
    assert reports.backend("pool", "unknown").total == 0
    assert reports.accepting("web") and reports.accepting("dns")
    assert not reports.accepting("other")
    assert [p.process for p in reports.processes()] == ["worker-0", "worker-1", "worker-2"]
    assert reports.flow_log_dropped() == 8

    # A later report replaces the earlier one of its worker (snapshots, not increments).
    reports.update(report(1, accepted=25, active=1, udp_created=6, backend_total=25,
                          backend_active=1, dropped=3))
    assert web_of(reports).accepted == 65 and web_of(reports).active == 5
    assert reports.flow_log_dropped() == 9

    # Worker 1 exits: its counters stay in the totals, its gauges leave with it.
    reports.retire(1)
    web = web_of(reports)
    assert (web.accepted, web.active, web.capacity) == (65, 4, 200)
    assert web.ended == Counter({EndReason.CLIENT_FIN: 60})
    assert web.ttfb.count == 3
    dns = dns_of(reports)
    assert (dns.sessions_created, dns.sessions, dns.capacity) == (17, 3, 100)
    backend = reports.backend("pool", "a")
    assert (backend.total, backend.active) == (65, 4)
    assert [p.process for p in reports.processes()] == ["worker-0", "worker-2"]
    assert reports.flow_log_dropped() == 9
    reports.retire(1)  # twice: nothing more leaves
    reports.retire(7)  # a worker that never reported
    assert web_of(reports).accepted == 65 and reports.flow_log_dropped() == 9

    # Worker 1's replacement starts from zero; the totals continue from where they were.
    reports.update(report(1, accepted=0, active=0, dropped=0, accepting=frozenset()))
    assert web_of(reports).accepted == 65 and web_of(reports).active == 4
    reports.update(report(1, accepted=4, active=4, udp_created=1, backend_total=4,
                          backend_active=4, dropped=1))
    web = web_of(reports)
    assert (web.accepted, web.active) == (69, 8)
    assert reports.backend("pool", "a").total == 69
    assert reports.flow_log_dropped() == 10

    # Only workers that accept count for `accepting`; when every worker that served dns is gone,
    # the listener is not accepting (readiness names it), and its counters remain.
    reports.update(report(1, accepted=4, active=4, udp_created=1, backend_total=4,
                          backend_active=4, dropped=1, accepting=frozenset({"web"})))
    reports.retire(0)
    assert reports.accepting("web") and not reports.accepting("dns")
    reports.retire(1)
    reports.retire(2)
    assert not reports.accepting("web")
    web = web_of(reports)
    assert (web.accepted, web.active, web.capacity) == (69, 0, 0)
    assert reports.processes() == []
    assert reports.flow_log_dropped() == 10


def test_a_retired_listener_of_one_type_does_not_break_the_total_of_another() -> None:
    """A reload that turns listener "web" from TCP into UDP, after a worker has exited, leaves
    TCP counters retired under the name the UDP listener now reports."""
    reports = WorkerReports()
    reports.update(report(0, accepted=3, active=0))
    reports.retire(0)
    udp = UdpListenerStats(10)
    udp.sessions_created = 2
    reports.update(StatsReport(0, {"web": udp}, frozenset({"web"}), {}, figures(0), 0))
    stats = reports.listener("web")
    assert isinstance(stats, UdpListenerStats) and stats.sessions_created == 2


# Per worker: (accepted, active, dropped) of the current process; a retire ends the process.
Step = tuple[str, int, int, int]


@st.composite
def histories(draw: st.DrawFn) -> list[Step]:
    steps: list[Step] = []
    for _ in range(draw(st.integers(1, 30))):
        index = draw(st.integers(0, 2))
        if draw(st.integers(0, 4)) == 0:
            steps.append(("retire", index, 0, 0))
        else:
            steps.append(("grow", index, draw(st.integers(0, 50)), draw(st.integers(0, 3))))
    return steps


@settings(max_examples=80, deadline=None)
@given(histories())
def test_counters_never_go_backwards(steps: list[Step]) -> None:
    """Whatever the order of reports and exits, the counter totals never decrease, they equal
    the last figures of every process that ever reported, and gauges are the live ones."""
    reports = WorkerReports()
    current: dict[int, tuple[int, int, int]] = {}  # the live process of each index: its figures
    finished_accepted = finished_dropped = 0
    last_accepted = last_dropped = 0
    for kind, index, grow, active in steps:
        if kind == "retire":
            if index in current:
                accepted, _, dropped = current.pop(index)
                finished_accepted += accepted
                finished_dropped += dropped
            reports.retire(index)
        else:
            accepted, _, dropped = current.get(index, (0, 0, 0))
            current[index] = (accepted + grow, active, dropped + grow // 10)
            accepted, active, dropped = current[index]
            reports.update(report(index, accepted=accepted, active=active, backend_total=accepted,
                                  backend_active=active, dropped=dropped))
        web = reports.listener("web")
        total_accepted = finished_accepted + sum(a for a, _, _ in current.values())
        total_dropped = finished_dropped + sum(d for _, _, d in current.values())
        if web is None:
            assert total_accepted == 0 and not current
            continue
        assert isinstance(web, ListenerStats)
        assert web.accepted == total_accepted >= last_accepted
        assert reports.flow_log_dropped() == total_dropped >= last_dropped
        assert reports.backend("pool", "a").total == total_accepted
        assert web.active == sum(a for _, a, _ in current.values())
        assert reports.backend("pool", "a").active == web.active
        assert web.capacity == 100 * len(current)
        last_accepted, last_dropped = total_accepted, total_dropped


def queue_report(index: int, queued: int, entered: int, waits: list[float]) -> StatsReport:
    pool = PoolStats()
    pool.queued, pool.queued_total = queued, entered
    for wait in waits:
        pool.queue_wait.observe(wait)
    return StatsReport(index, {}, frozenset(), {}, figures(index), 0, pools={"pg": pool})


def test_worker_reports_sum_the_pools_queues_and_keep_an_exited_workers_counters() -> None:
    reports = WorkerReports()
    assert reports.pool("pg").queued == 0 and reports.pool("pg").queue_wait.count == 0
    reports.update(queue_report(0, queued=3, entered=10, waits=[0.1, 0.2]))
    reports.update(queue_report(1, queued=4, entered=5, waits=[1.0]))
    pg = reports.pool("pg")
    assert (pg.queued, pg.queued_total, pg.queue_wait.count) == (7, 15, 3)
    assert pg.queue_wait.sum == pytest.approx(1.3)
    reports.retire(1)  # its waiting connections went with it; what it counted stays
    pg = reports.pool("pg")
    assert (pg.queued, pg.queued_total, pg.queue_wait.count) == (3, 15, 3)
    assert reports.pool("other").queued_total == 0
