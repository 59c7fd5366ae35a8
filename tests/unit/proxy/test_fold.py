"""The TCP policy's pass over a batch of ended records (proxy/fold.py) and its compiled twin
(proxy/_policy.pyx): every record counted once with its outcome, histograms and backend totals
exact, per-source counts given back, detours handed to the listener, and each flow-log line the
same text as flowlog.tcp_line. The twins must agree to the byte and to the last bit of a sum."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pointsman.pool.pool import Pool
from pointsman.proxy.codes import END_CODE, REJECT_CODE, outcome
from pointsman.proxy.engine.api import CONNECTED, POLICY_ERROR, RECORD, End, Flag
from pointsman.proxy.flows import Flow
from pointsman.proxy.fold import Fold, admit, connected, connector, fold, folder
from pointsman.telemetry.flow import EndReason, RejectReason
from pointsman.telemetry.flowlog import tcp_head, tcp_line
from pointsman.telemetry.histogram import Histogram
from pointsman.telemetry.stats import BackendStats, ListenerStats

try:
    from pointsman.proxy._policy import fold as compiled
except ImportError:  # no compiler: only the reference runs
    compiled = None

TWINS: list[Any] = [pytest.param(fold, id="python"), pytest.param(
    compiled, id="cython", marks=pytest.mark.skipif(compiled is None, reason="not built"))]
POOL = Pool.__new__(Pool)  # only its identity matters here (a set of freed pools)


class Slot:
    def __init__(self, backend_id: str, cap: int) -> None:
        self.id = backend_id
        self.stats = BackendStats()
        self.cap = cap


class Admission:
    def __init__(self) -> None:
        self.closed_keys: list[bytes] = []

    def closed(self, key: bytes) -> None:
        self.closed_keys.append(key)


class Listener:
    """What fold reads and calls on a TcpListener, recording the calls."""

    def __init__(self) -> None:
        self.connections: dict[int, Flow] = {}
        self.stats = ListenerStats(100)
        self.admission: Admission | None = Admission()
        self.calls: list[tuple[str, int]] = []

    def _preamble_done(self, conn_id: int, flow: Flow) -> None:
        self.calls.append(("preamble_done", conn_id))
        assert flow.detour is not None
        flow.detour.preamble = None

    def left_queue(self, conn_id: int, pool: Pool) -> None:
        self.calls.append(("left_queue", conn_id))


PEERS = st.one_of(st.tuples(st.sampled_from(["127.0.0.1", "::1", "10.0.0.7", "fe80::1%eth0"]),
                            st.integers(0, 65535)), st.just("unix"))
NS = st.one_of(st.integers(0, 10**4), st.integers(0, 10**10), st.integers(0, 10**15),
               st.sampled_from([500, 1500, 999_999_500, 10**14 + 500]))
CASE = st.fixed_dictionaries({
    "known": st.booleans(),  # in the table (else refused at accept)
    "reason": st.sampled_from(list(End)),
    "detail": st.sampled_from([0, POLICY_ERROR, *REJECT_CODE.values(), *END_CODE.values()]),
    "peer": PEERS,
    "slot": st.sampled_from([None, 0, 1]),  # no slot, an uncapped one, a capped one
    # Not connected; connected with connect_result told (it set backend_id); connected through
    # a quiet target (the record flags it; `connected` counted the success and set backend_id).
    "connected": st.sampled_from([None, "reported", "quiet"]),
    "connect": NS,  # the successful attempt's length, ns
    "source_key": st.sampled_from([None, b"k1"]),
    "detour": st.sampled_from([None, "plain", "preamble", "queued", "failed"]),
    "bytes": st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)),
    "duration": NS,
    "ttfb": st.one_of(st.just(None), NS),
})


def build(cases: list[dict[str, Any]]) -> tuple[Listener, bytes, list[Slot]]:
    listener = Listener()
    slots = [Slot("b1", 0), Slot('b"2', 4)]
    records = []
    for conn_id, case in enumerate(cases, start=1):
        started = 10**12 + conn_id
        if case["known"]:
            flow = Flow(case["peer"], POOL, 0.0)  # type: ignore[arg-type]
            if case["slot"] is not None:
                slot = slots[case["slot"]]
                slot.stats.active += 1
                flow.slot = slot  # type: ignore[assignment]
                if case["connected"] is not None:
                    flow.backend_id = slot.id
            flow.source_key = case["source_key"]
            if case["detour"] is not None:
                detour = flow.more()
                detour.preamble = object() if case["detour"] == "preamble" else None  # type: ignore[assignment]
                detour.queued = case["detour"] == "queued"
                detour.backend_failed = case["detour"] == "failed"
            listener.connections[conn_id] = flow
        ttfb = case["ttfb"]
        flags = connected = attempt = 0
        if case["connected"] is not None:
            flags = Flag.CONNECTED | (Flag.QUIET if case["connected"] == "quiet" else 0)
            attempt = started + 7
            connected = attempt + case["connect"]
        records.append(RECORD.pack(
            conn_id, -1, case["reason"], flags, case["detail"], *case["bytes"], started,
            connected, 0 if ttfb is None else started + ttfb + 1, started + case["duration"], 0,
            attempt))
    return listener, b"".join(records), slots


def run(twin: Fold, cases: list[dict[str, Any]], log: bool = True) -> tuple[Any, ...]:
    listener, records, slots = build(cases)
    lines: list[str] | None = [] if log else None
    gone, freed = twin(listener, records, tcp_head(1_700_000_000.25, "web") if log else None,
                       lines)
    stats = listener.stats
    assert listener.admission is not None
    return (gone, freed, lines, dict(stats.ended), dict(stats.rejected), stats.connect_failed,
            stats.duration.counts, stats.duration.sum, stats.duration.count,
            stats.ttfb.counts, stats.ttfb.sum, stats.ttfb.count,
            [(s.stats.active, s.stats.bytes_in, s.stats.bytes_out) for s in slots],
            [(s.stats.total, s.stats.connect_time.counts, s.stats.connect_time.sum,
              s.stats.connect_time.count) for s in slots],
            listener.admission.closed_keys, listener.calls, sorted(listener.connections))


@pytest.mark.parametrize("twin", TWINS)
@settings(max_examples=150, deadline=None)
@given(st.lists(CASE, max_size=12))
def test_each_record_counts_once_as_its_outcome(twin: Fold, cases: list[dict[str, Any]]) -> None:
    (gone, freed, lines, ended, rejected, connect_failed, _, _, d_count, _, _, t_count, slots,
     connects, closed, calls, left) = run(twin, cases)
    known = [c for c in cases if c["known"]]
    assert gone == len(known) and left == []
    outcomes = [outcome(c["reason"], c["detail"], c["detour"] == "failed") for c in known]
    # Two counters: EndReason.INTERNAL_ERROR == RejectReason.INTERNAL_ERROR (str enums).
    expected_ended = Counter(how for how in outcomes if type(how) is EndReason)
    expected_rejected = Counter(how for how in outcomes if type(how) is RejectReason)
    expected_rejected.update(RejectReason.INTERNAL_ERROR for c in cases
                             if not c["known"] and c["detail"] == POLICY_ERROR)
    assert Counter(ended) == expected_ended and Counter(rejected) == expected_rejected
    assert all(type(how) is EndReason for how in ended)
    assert all(type(how) is RejectReason for how in rejected)
    assert connect_failed == expected_ended[EndReason.CONNECT_FAILED]
    assert d_count == sum(expected_ended.values())
    assert t_count == sum(1 for c in known if c["ttfb"] is not None)
    assert [active for active, _, _ in slots] == [0, 0]
    for index, (_, bytes_in, bytes_out) in enumerate(slots):
        mine = [c for c in known if c["slot"] == index and c["connected"]]
        assert (bytes_in, bytes_out) == (sum(c["bytes"][0] for c in mine),
                                         sum(c["bytes"][1] for c in mine))
    for total, counts, total_time, count in connects:
        # No success is counted at the end: connect_result or `connected` counted it at connect.
        assert (total, count, total_time) == (0, 0, 0.0) and not any(counts)
    assert freed == ({POOL} if any(c["slot"] == 1 for c in known) else None)
    assert closed == [c["source_key"] for c in known if c["source_key"] is not None]
    assert [name for name, _ in calls] == [
        name for c in known for name, wanted in (("preamble_done", "preamble"),
                                                 ("left_queue", "queued"))
        if c["detour"] == wanted]
    assert lines is not None and len(lines) == len(known)
    for line, case in zip(lines, known, strict=True):
        how = outcome(case["reason"], case["detail"], case["detour"] == "failed")
        end = how.value if type(how) is EndReason else f"rejected:{how.value}"
        backend = None
        if case["slot"] is not None and case["connected"] is not None:
            backend = ["b1", 'b"2'][case["slot"]]
        duration = case["duration"] * 1e-9
        ttfb = None if case["ttfb"] is None else (case["ttfb"] + 1) * 1e-9
        assert line == tcp_line(1_700_000_000.25, "web", case["peer"], backend, *case["bytes"],
                                duration, ttfb, end)
        assert json.loads(line)["end"] == end


@pytest.mark.skipif(compiled is None, reason="the compiled twin is not built")
@settings(max_examples=200, deadline=None)
@given(st.lists(CASE, max_size=12), st.booleans())
def test_the_compiled_twin_agrees_to_the_byte_and_bit(cases: list[dict[str, Any]],
                                                      log: bool) -> None:
    assert run(compiled, cases, log) == run(fold, cases, log)


def test_the_compiled_engine_gets_the_compiled_twin() -> None:
    assert folder("python") is fold
    assert folder("cython") is (compiled or fold)


@pytest.mark.skipif(compiled is None, reason="the compiled twin is not built")
def test_a_batch_that_is_not_whole_records_is_refused() -> None:
    with pytest.raises(ValueError):
        compiled(Listener(), b"\0" * (RECORD.size + 1), None, None)


try:
    from pointsman.proxy._policy import admit as compiled_admit
except ImportError:
    compiled_admit = None

ADMITS: list[Any] = [pytest.param(admit, id="python"), pytest.param(
    compiled_admit, id="cython",
    marks=pytest.mark.skipif(compiled_admit is None, reason="not built"))]


@pytest.mark.parametrize("twin", ADMITS)
@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([7, 9]), st.integers(0, 10**15),
                          st.sampled_from(["127.0.0.1", "::1"]), st.integers(0, 65535)),
                max_size=10))
def test_admit_makes_one_flow_per_admission_in_order(twin: Any, admissions: list[Any]) -> None:
    """What the engine admitted alone becomes the Flow `accepted` would have made: its client,
    pool, accept time (perf_counter's clock, in seconds), slot and snapshot, with load on the
    slot; in accept order (max_connection_duration's sweep relies on it)."""
    slots = {7: Slot("b1", 0), 9: Slot("b2", 0)}
    snapshot = object()
    connections: dict[int, Flow] = {1: Flow(("10.0.0.1", 1), POOL, 0.0)}
    batch = [(conn_id, backend, started, host, port)
             for conn_id, (backend, started, host, port) in enumerate(admissions, start=2)]
    twin(connections, batch, POOL, snapshot, slots)
    assert list(connections) == [1, *(conn_id for conn_id, *_ in batch)]
    for conn_id, backend, started, host, port in batch:
        flow = connections[conn_id]
        assert (flow.peer, flow.pool, flow.started) == ((host, port), POOL, started / 1e9)
        assert flow.slot is slots[backend] and flow.snapshot is snapshot
        assert flow.backend_id is None and flow.detour is None and flow.source_key is None
    assert [slot.stats.active for slot in slots.values()] == [
        sum(1 for _, b, *_ in batch if b == backend) for backend in (7, 9)]


try:
    from pointsman.proxy._policy import connected as compiled_connected
except ImportError:
    compiled_connected = None

CONNECTS: list[Any] = [pytest.param(connected, id="python"), pytest.param(
    compiled_connected, id="cython",
    marks=pytest.mark.skipif(compiled_connected is None, reason="not built"))]
SUCCESS = st.tuples(
    st.sampled_from(["b1", "b2", "odd", None, "unknown"]),  # the flow's slot (None: no slot)
    NS)  # the attempt's elapsed ns


SNAPSHOT = object()  # the pick's snapshot, held until the connect succeeds


def count_connects(twin: Any, successes: list[tuple[str | None, int]]) -> tuple[Any, ...]:
    """`successes` through one table: slots b1 and b2 share the default bounds, `odd` has its
    own (the compiled twin's other path); "unknown" names a connection not in the table."""
    slots = {"b1": Slot("b1", 0), "b2": Slot("b2", 3), "odd": Slot("odd", 0)}
    slots["odd"].stats.connect_time = Histogram((0.5e-6, 1e-3, 2.0))
    connections: dict[int, Flow] = {}
    entries = []
    for conn_id, (name, elapsed) in enumerate(successes, start=1):
        if name != "unknown":
            flow = Flow(("127.0.0.1", conn_id), POOL, 0.0)
            flow.slot = None if name is None else slots[name]  # type: ignore[assignment]
            flow.snapshot = SNAPSHOT  # type: ignore[assignment]
            connections[conn_id] = flow
        entries.append(CONNECTED.pack(conn_id, 40 + conn_id, elapsed))
    twin(connections, b"".join(entries))
    assert len(connections) == sum(1 for name, _ in successes if name != "unknown")
    for flow in connections.values():  # the rest of connect_result's success, slot or none
        connected_now = flow.slot is not None
        assert flow.backend_id == (flow.slot.id if connected_now else None)  # type: ignore[union-attr]
        assert (flow.snapshot is None) == connected_now
    return tuple((s.stats.total, s.stats.connect_time.counts, s.stats.connect_time.sum,
                  s.stats.connect_time.count, s.stats.active) for s in slots.values())


@pytest.mark.parametrize("twin", CONNECTS)
@settings(max_examples=100, deadline=None)
@given(st.lists(SUCCESS, max_size=16))
def test_each_quiet_success_counts_once_on_its_slot(twin: Any,
                                                    successes: list[tuple[str | None, int]]) -> None:
    """Each success of a connection in the table counts once on its slot's backend, as
    connect_result would have: the total, and the connect time the engine measured, to the bit
    (the same division, the same order); the connection stays in the table, load untouched."""
    got = count_connects(twin, successes)
    for name, (total, counts, total_time, count, active) in zip(("b1", "b2", "odd"), got,
                                                                 strict=True):
        expected = Histogram((0.5e-6, 1e-3, 2.0)) if name == "odd" else Histogram()
        mine = [elapsed for each, elapsed in successes if each == name]
        for elapsed in mine:
            expected.observe(elapsed / 1e9)
        assert total == count == len(mine) and active == 0
        assert (counts, total_time) == (expected.counts, expected.sum)


@pytest.mark.skipif(compiled_connected is None, reason="the compiled twin is not built")
@settings(max_examples=150, deadline=None)
@given(st.lists(SUCCESS, max_size=16))
def test_the_compiled_connected_agrees_to_the_bit(successes: list[tuple[str | None, int]]) -> None:
    assert count_connects(compiled_connected, successes) == count_connects(connected, successes)


def test_the_compiled_engine_gets_the_compiled_connected() -> None:
    assert connector("python") is connected
    assert connector("cython") is (compiled_connected or connected)


@pytest.mark.skipif(compiled_connected is None, reason="the compiled twin is not built")
def test_a_batch_that_is_not_whole_entries_is_refused() -> None:
    with pytest.raises(ValueError):
        compiled_connected({}, b"\0" * (CONNECTED.size + 1))
