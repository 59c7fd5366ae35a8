"""The TCP listener's pass over one batch of ended-connection records (pure Python).

The engine hands a listener the records of every connection of it that ended during one
wake-up, packed (api.RECORD). `fold` takes each one out of the table and counts it: `ended` or
`rejected` with its reason (codes.outcome), the duration and time-to-first-byte histograms, the
backend's load and byte totals, the per-source count, and, when a flow log is on, the record's
JSON line (the same text as flowlog.tcp_line). What the whole batch shares (active counts, the
descriptor budget, the flow log's queue, freed queue slots) is the caller's, once per batch.

`connected` counts the successes through quiet targets (targets.py: `connect_result` is not
called for them) from the engine's packed batch of one wake-up (api.CONNECTED), as
connect_result would have at connect: the flow's backend id, its snapshot let go, the backend's
`total` and its connect time (the very elapsed time the engine would have passed). They are
counted while their connections are open, not when they end, so a long-lived connection shows in
the connection rate at once.

This is the reference; `_policy.pyx` is the same passes compiled (records read in place, no
tuple per record, the line printed in C), used with the compiled engine. Both give the same
counts, histogram sums to the last bit (the same additions in the same order) and the same
lines (tests/unit/proxy/test_fold.py).
"""

from __future__ import annotations

import json
from bisect import bisect_left
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, TypeVar

from pointsman.proxy.codes import PLAIN_END, outcome
from pointsman.proxy.engine.api import CONNECTED, POLICY_ERROR, RECORD
from pointsman.proxy.flows import Flow
from pointsman.telemetry.flow import EndReason, RejectReason
from pointsman.telemetry.flowlog import client_text, quoted

if TYPE_CHECKING:
    from pointsman.pool.pool import Pool
    from pointsman.pool.snapshot import PoolSnapshot
    from pointsman.protect.limits import Admission
    from pointsman.proxy.targets import Slot
    from pointsman.telemetry.stats import ListenerStats

_CONNECT_FAILED = EndReason.CONNECT_FAILED
_INTERNAL = RejectReason.INTERNAL_ERROR
T = TypeVar("T", bound=Callable[..., object])
# The flow log's `end` of each outcome, as JSON. Two tables: the reasons are str enums, and
# EndReason.INTERNAL_ERROR == RejectReason.INTERNAL_ERROR ("internal_error"), so one table
# keyed by both would log an ended one as rejected.
END_JSON: dict[EndReason, str] = {reason: json.dumps(reason.value) for reason in EndReason}
REJECT_JSON: dict[RejectReason, str] = {
    reason: json.dumps(f"rejected:{reason.value}") for reason in RejectReason}


class Folding(Protocol):
    """What `fold` reads and calls on the listener."""

    connections: dict[int, Flow]
    stats: ListenerStats
    admission: Admission | None

    def _preamble_done(self, conn_id: int, flow: Flow) -> None: ...

    def left_queue(self, conn_id: int, pool: Pool) -> None: ...


def fold(listener: Folding, records: bytes, head: str | None,
         lines: list[str] | None) -> tuple[int, set[Pool] | None]:
    """Count every record of `records`; returns how many left the table and the pools with a
    capped backend that one of them let go (None: none). With a flow log, `head` is the start
    of each line (flowlog.tcp_head: the time and the listener) and the lines go into `lines`."""
    pop = listener.connections.pop
    stats = listener.stats
    ended, rejected = stats.ended, stats.rejected
    # Histogram.observe, inline; the sums add in the same order as one observe each.
    durations, ttfbs = stats.duration, stats.ttfb
    d_counts, d_bounds, d_sum = durations.counts, durations.bounds, durations.sum
    t_counts, t_bounds, t_sum = ttfbs.counts, ttfbs.bounds, ttfbs.sum
    d_count = t_count = 0
    admission = listener.admission
    gone = 0
    freed: set[Pool] | None = None
    for (conn_id, _backend, reason, _flags, detail, bytes_in, bytes_out, started, _connected,
         first_byte, finished, _lid, _attempt) in RECORD.iter_unpack(records):
        flow = pop(conn_id, None)
        if flow is None:  # refused at accept: counted then (unless our policy raised)
            if detail == POLICY_ERROR:
                rejected[_INTERNAL] += 1
            continue
        gone += 1
        detour = flow.detour
        how = PLAIN_END[reason]
        if detour is not None:
            if detour.preamble is not None:
                listener._preamble_done(conn_id, flow)
            if detour.queued:  # its client left (or a cut) while it waited
                detour.queued = False
                listener.left_queue(conn_id, flow.pool)
            how = outcome(reason, detail, detour.backend_failed)
        elif how is None:
            how = outcome(reason, detail, False)
        duration = (finished - started) * 1e-9
        if type(how) is EndReason:
            end_json = END_JSON[how]
            ended[how] += 1
            d_counts[bisect_left(d_bounds, duration)] += 1
            d_sum += duration
            d_count += 1
            if how is _CONNECT_FAILED:
                stats.connect_failed += 1
        else:
            end_json = REJECT_JSON[how]
            rejected[how] += 1
        ttfb = None
        if first_byte:
            ttfb = (first_byte - started) * 1e-9
            t_counts[bisect_left(t_bounds, ttfb)] += 1
            t_sum += ttfb
            t_count += 1
        slot = flow.slot
        backend_id = flow.backend_id
        if slot is not None:
            backend = slot.stats
            backend.active -= 1
            if slot.cap:
                if freed is None:
                    freed = set()
                freed.add(flow.pool)
            if backend_id is not None:
                backend.bytes_in += bytes_in
                backend.bytes_out += bytes_out
        if flow.source_key is not None and admission is not None:
            admission.closed(flow.source_key)
        if lines is not None:
            lines.append(f'{head}{client_text(flow.peer)}","backend":{quoted(backend_id)},'
                         f'"bytes_in":{bytes_in},"bytes_out":{bytes_out},'
                         f'"duration":{duration:.6f},'
                         f'"ttfb":{"null" if ttfb is None else f"{ttfb:.6f}"},'
                         f'"end":{end_json}}}\n')
    durations.sum, durations.count = d_sum, durations.count + d_count
    ttfbs.sum, ttfbs.count = t_sum, ttfbs.count + t_count
    return gone, freed


def connected(connections: dict[int, Flow], entries: bytes) -> None:
    """Do for each quiet connect success of `entries` (api.CONNECTED) what connect_result does
    for a success it is given, but passive health (connect.py reports those per slot): the
    flow's backend id, its snapshot let go, the backend's `total` and connect-time histogram.
    The engine hands them over before the records of the same wake-up, so each connection is
    still in the table (with the slot it connected through, whether or not its backend has
    since left the snapshot), and its record finds the backend id set."""
    get = connections.get
    for conn_id, _backend, elapsed_ns in CONNECTED.iter_unpack(entries):
        flow = get(conn_id)
        if flow is None:  # not one of ours (a policy handed entries that are not its own)
            continue
        slot = flow.slot
        if slot is None:
            continue
        flow.backend_id = slot.id
        flow.snapshot = None  # the pick is done: the flow keeps no snapshot alive
        backend = slot.stats
        backend.total += 1
        elapsed = elapsed_ns / 1e9
        histogram = backend.connect_time
        histogram.counts[bisect_left(histogram.bounds, elapsed)] += 1
        histogram.sum += elapsed
        histogram.count += 1


Connected = Callable[[dict[int, Flow], bytes], None]


def connector(engine: str) -> Connected:
    """`connected`, compiled with the compiled engine when built (see `twin`)."""
    return twin(engine, connected)


def admit(connections: dict[int, Flow], batch: list[tuple[int, int, int, str, int]],
          pool: Pool, snapshot: PoolSnapshot, slots: dict[int, Slot]) -> None:
    """The per-connection part of `TcpListener.admitted`: a Flow for each connection the
    engine admitted on its fast path (conn_id, engine backend id, accept time in
    CLOCK_MONOTONIC ns, host, port), holding load on its backend's slot, in accept order."""
    for conn_id, backend, started, host, port in batch:
        flow = Flow((host, port), pool, started / 1e9)  # perf_counter is CLOCK_MONOTONIC
        slot = slots[backend]
        flow.slot = slot
        flow.snapshot = snapshot
        slot.stats.active += 1
        connections[conn_id] = flow


Admit = Callable[[dict[int, Flow], "list[tuple[int, int, int, str, int]]", "Pool",
                  "PoolSnapshot", "dict[int, Slot]"], None]


def admitter(engine: str) -> Admit:
    """`admit`, compiled with the compiled engine when built (see `twin`)."""
    return twin(engine, admit)


Fold = Callable[[Folding, bytes, "str | None", "list[str] | None"], "tuple[int, set[Pool] | None]"]


def folder(engine: str) -> Fold:
    """The pass for a listener on `engine` (see `twin`)."""
    return twin(engine, fold)


def twin(engine: str, reference: T) -> T:
    """The function for a listener on `engine` ("cython" or "python"): `reference`'s compiled
    twin of the same name in _policy.pyx with the compiled engine when it is built, else
    `reference` itself."""
    if engine == "cython":
        try:
            from pointsman.proxy import _policy
        except ImportError:
            return reference
        compiled: T = getattr(_policy, reference.__name__)
        return compiled
    return reference
