"""The connect half of a TCP listener's policy: which backend, from which address, with which
PROXY header, and what to do when the connect fails.

- the pool: the listener's, a TLS route's, or down the `fallback_pool` chain (`Pool.route`);
- the pick: the affinity table first, else the pool's picker (hash policies get the client key);
- the attempt: the backend's engine target (`targets.py`), with a PROXY header when the pool
  sends one, from the client's own address (transparent) or the next of `source.addresses`;
- the outcome: only a backend's own failure (refused, unreachable, timed out) is reported to the
  pool as a passive failure; a success through a quiet target (targets.py) is not reported by
  the engine one by one: the backend's total and connect time come from the engine's batch of
  them, once per wake-up while the connections are open (`connected`, fold.py), and passive
  health gets the slot's counted successes before the next failure this listener reports for
  that backend (so one listener's order of successes and failures is kept), and otherwise on
  the listener's live tick (`report_successes`, every 0.1 s while connections are open); a
  shortage of ours (descriptors, memory, source ports) is counted as `local_resource` and
  blames nobody. A failed attempt moves to another backend, at most `retries` times; an
  unusable source address moves to the next address first.

A plain connection (no preamble, no affinity, no hash key, no PROXY header, no source address,
no per-source limit) takes one fast path: snapshot -> pick -> the backend's target (below its
cap, with nobody queued, where it has one).

Backend caps (`max_connections`): a backend at its cap in this process is not picked (excluded
like a backend already tried, so hash policies fall back to their next choice). When every
eligible backend is at its cap, or others already wait, the connection waits in the pool's queue
(`waiting.py`), held by the engine: `Hold`. It is picked again when it reaches the head and a
slot frees (`dequeued`), refused as `queue_full` when the queue is full, and as `queue_timeout`
when it waited `queue.timeout`.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from bisect import bisect_left
from collections.abc import Mapping

from pointsman.balance.hashing import source_key
from pointsman.config.model import PoolConfig
from pointsman.pool.pool import Pool
from pointsman.pool.snapshot import PoolSnapshot
from pointsman.proxy.codes import REJECT_CODE
from pointsman.proxy.engine import Engine
from pointsman.proxy.engine.api import HOLD, Connect, Decision, Refuse, Status
from pointsman.proxy.flows import Detour, Flow
from pointsman.proxy.resources import FD_ERRNOS, MEMORY_ERRNOS, PORT_ERRNOS, errno_name
from pointsman.proxy.targets import PoolTargets, Slot
from pointsman.proxy.upstream import outgoing_header
from pointsman.proxy.waiting import existing_line, line_for
from pointsman.telemetry.flow import RejectReason
from pointsman.telemetry.stats import ListenerStats

log = logging.getLogger("pointsman.proxy")

REFUSE = {reason: Refuse(code) for reason, code in REJECT_CODE.items()}
_NO_SOURCE_PORT = (errno.EADDRNOTAVAIL, errno.EADDRINUSE)
_GIVE_UP = FD_ERRNOS | MEMORY_ERRNOS  # every other backend needs the same descriptor or buffer
NOTHING: frozenset[int] = frozenset()  # no backend tried yet
_OK = int(Status.OK)  # a plain int: an enum member's lookup on its class costs 0.1 us a time


class ConnectPolicy:
    """Picks, connects and retries for the TCP listener that derives from it."""

    stats: ListenerStats
    engine: Engine | None
    lid: int
    loop: asyncio.AbstractEventLoop
    pools: Mapping[str, Pool]
    connections: dict[int, Flow]
    checks_source: bool  # per-source limits or lists on the client address apply

    def __init__(self) -> None:
        self._targets: dict[Pool, PoolTargets] = {}

    def admit_source(self, flow: Flow) -> Refuse | None:
        raise NotImplementedError  # the listener's: per-source limits and lists

    def local_error(self, op: str, err: int) -> None:
        raise NotImplementedError  # the listener's: counted, logged, accepting paused

    def left_queue(self, conn_id: int, pool: Pool) -> None:
        line = existing_line(pool)
        if line is not None:
            line.leave(conn_id)

    def report_successes(self) -> None:
        """Hand the quiet connect successes counted since the last call to passive health: one
        report per backend that had any (a success only restarts the failure streak, or, in a
        worker, tells the control process the backend answers again)."""
        for pool, targets in self._targets.items():
            for slot in targets.slots:
                if slot is not None and slot.successes():
                    pool.report_connect_success(slot.id)

    def slot_freed(self, pool: Pool) -> None:
        """A connection let go of a capped backend of `pool`: its queue may move."""
        line = existing_line(pool)
        if line is not None and len(line):
            line.serve()

    # --- the pick ------------------------------------------------------------------------------------

    def _targets_of(self, pool: Pool) -> PoolTargets:
        targets = self._targets.get(pool)
        if targets is None:
            assert self.engine is not None
            targets = self._targets[pool] = PoolTargets(self.engine)
        return targets

    def route(self, conn_id: int, flow: Flow) -> Decision:
        """Per-source limits, then the pool (this one or its fallback), then a backend."""
        pool = flow.pool
        snapshot = pool.snapshot
        if flow.detour is None and not self.checks_source and snapshot.available:
            targets = self._targets.get(pool)
            if targets is not None and targets.snapshot is snapshot and targets.direct:
                index = snapshot.picker.pick(self._key(flow, snapshot), NOTHING)
                if index is not None:
                    slot = targets.slots[index]
                    if slot is not None and (not slot.cap or _room(slot, pool)):
                        flow.slot = slot
                        flow.snapshot = snapshot
                        slot.stats.active += 1
                        target: Decision = slot.target
                        return target
        return self._route(conn_id, flow)

    def _route(self, conn_id: int, flow: Flow) -> Decision:
        detour = flow.detour
        if self.checks_source and (detour is None or not detour.source_checked):
            refusal = self.admit_source(flow)
            if refusal is not None:
                return refusal
        pool = flow.pool.route(self.pools)
        if pool is None:
            return REFUSE[RejectReason.NO_BACKEND]
        flow.pool = pool
        snapshot = pool.snapshot
        if snapshot.caps:
            line = existing_line(pool)
            if line is not None and len(line):  # others wait: first come, first served
                return self._queue(conn_id, flow)
        return self._pick(conn_id, flow, queued=False) or REFUSE[RejectReason.NO_BACKEND]

    def _pick(self, conn_id: int, flow: Flow, queued: bool) -> Decision | None:
        """A backend of the flow's pool for it, or its place in the queue when every eligible
        backend is full (`queued`: it is the head of that queue; None leaves it there)."""
        snapshot = flow.pool.snapshot
        self._targets_of(flow.pool).of(snapshot)
        full = _full(snapshot)
        key = self._key(flow, snapshot)
        index = self._sticky_index(snapshot, flow)
        if index is not None and index in full:
            index = None  # its sticky backend is full: another one, as when it is down
        if index is None:
            index = snapshot.picker.pick(key, full)
        if index is None:
            if full and snapshot.picker.pick(key, NOTHING) is not None:  # all eligible full
                return None if queued else self._queue(conn_id, flow)
            return REFUSE[RejectReason.NO_BACKEND]
        flow.snapshot = snapshot
        return self._attempt(conn_id, flow, index, first=True)

    def _queue(self, conn_id: int, flow: Flow) -> Decision:
        """Wait in the pool's queue, unread (the engine holds it), or queue_full."""
        if not line_for(flow.pool, self.loop).push(conn_id, self):
            return REFUSE[RejectReason.QUEUE_FULL]
        flow.more().queued = True
        return HOLD

    # --- the queue's side (waiting.Owner) ------------------------------------------------------------

    def dequeued(self, conn_id: int) -> Decision | None:
        """At the head of its pool's queue with a slot maybe free: a backend, a refusal (its
        pool has no backend any more), or None (still full)."""
        flow = self.connections.get(conn_id)
        if flow is None:  # ended meanwhile; its record came first
            return REFUSE[RejectReason.NO_BACKEND]
        pool = flow.pool.route(self.pools)
        if pool is None:
            return REFUSE[RejectReason.NO_BACKEND]
        queued_in, flow.pool = flow.pool, pool
        decision = self._pick(conn_id, flow, queued=True)
        if decision is None:
            flow.pool = queued_in  # it waits on where it queued
        return decision

    def resume(self, conn_id: int, decision: Decision) -> bool:
        flow = self.connections.get(conn_id)
        if flow is not None and flow.detour is not None:
            flow.detour.queued = False
        return self.engine is not None and self.engine.resume(conn_id, decision)

    def expired(self, conn_id: int) -> None:
        self.resume(conn_id, REFUSE[RejectReason.QUEUE_TIMEOUT])

    @staticmethod
    def _key(flow: Flow, snapshot: PoolSnapshot) -> bytes:
        if not snapshot.needs_key:
            return b""
        return source_key(flow.peer[0], flow.peer[1], snapshot.config.hash_key)

    def _sticky_index(self, snapshot: PoolSnapshot, flow: Flow) -> int | None:
        affinity = snapshot.affinity
        if affinity is None or snapshot.config.affinity is None:
            return None
        sticky = source_key(flow.peer[0], flow.peer[1], snapshot.config.affinity.key)
        backend_id = affinity.lookup(sticky, self.loop.time())
        if backend_id is None:
            return None
        for i, backend in enumerate(snapshot.backends):
            if backend.id == backend_id and backend.effective_weight > 0:
                return i
        return None

    def _attempt(self, conn_id: int, flow: Flow, index: int, first: bool = False) -> Decision:
        """Connect to backend `index` of the flow's snapshot (load on it from now: a connect in
        progress counts for least-connections)."""
        snapshot = flow.snapshot
        assert snapshot is not None
        slots = self._targets_of(flow.pool).of(snapshot)
        slot = slots[index]
        while slot is None:  # an address that cannot be used: as if it had failed, unblamed
            tried = flow.more().tried
            tried.add(index)
            picked = snapshot.picker.pick(self._key(flow, snapshot), tried)
            if picked is None:
                return REFUSE[RejectReason.NO_BACKEND]
            index = picked
            slot = slots[index]
        flow.slot = slot
        slot.stats.active += 1
        config = snapshot.config
        detour: Detour | None = flow.detour
        if first and config.source.addresses:
            detour = flow.more()
            detour.addr_turn = slot.stats.total
            detour.addr_step = 0
        header = b""
        if config.proxy_protocol.send != "off":
            assert self.engine is not None
            header = outgoing_header(config, flow.peer, self.engine.sockname(conn_id),
                                     detour.header if detour is not None else None,
                                     detour.server_name if detour is not None else None)
        source = _source(flow, config)
        consume = 0
        if detour is not None:
            consume, detour.consume = detour.consume, 0  # the engine drops these bytes once
        if header or consume or source is not None:
            return Connect(slot.target, header, consume, source)
        target: Decision = slot.target
        return target

    # --- the outcome ---------------------------------------------------------------------------------

    def connect_result(self, conn_id: int, backend: int, status: int, err: int,
                       elapsed: float) -> Decision | None:
        flow = self.connections[conn_id]
        slot = flow.slot
        assert slot is not None
        if status != _OK:
            return self._retry(conn_id, flow, slot, status, err)
        flow.backend_id = backend_id = slot.id
        flow.pool.report_connect_success(backend_id)
        stats = slot.stats
        stats.total += 1
        histogram = stats.connect_time  # Histogram.observe, inline: once per connection
        histogram.counts[bisect_left(histogram.bounds, elapsed)] += 1
        histogram.sum += elapsed
        histogram.count += 1
        snapshot = flow.snapshot
        flow.snapshot = None  # the pick is done: the flow keeps no snapshot alive
        if snapshot is not None and snapshot.affinity is not None:
            affinity = snapshot.config.affinity
            if affinity is not None:
                sticky = source_key(flow.peer[0], flow.peer[1], affinity.key)
                snapshot.affinity.remember(sticky, backend_id, self.loop.time())
        return None

    def _retry(self, conn_id: int, flow: Flow, slot: Slot, status: int,
               err: int) -> Decision | None:
        """After a failed attempt: another source address, another backend, or give up."""
        slot.stats.active -= 1
        flow.slot = None
        if slot.cap:  # served after this callback: the engine is in the middle of an event
            self.loop.call_soon(self.slot_freed, flow.pool)
        snapshot = flow.snapshot
        assert snapshot is not None
        config = snapshot.config
        detour = flow.more()
        if err in _NO_SOURCE_PORT:
            self.stats.source_port_failures += 1
        if status == Status.BACKEND:
            detour.backend_failed = True
            log.debug("connect to %s failed: %s", slot.id, errno_name(err))
            if slot.successes():  # quiet ones before this failure: they came first
                flow.pool.report_connect_success(slot.id)
            flow.pool.report_connect_failure(slot.id)
        else:
            self.local_error(_operation(err, config), err)
            if err in _GIVE_UP:
                return None
        slots = self._targets_of(flow.pool).of(snapshot)
        index = slots.index(slot) if slot in slots else -1
        if status != Status.BACKEND and err in _NO_SOURCE_PORT and index >= 0 \
                and detour.addr_step + 1 < len(config.source.addresses):
            detour.addr_step += 1  # the same backend from the next address
            return self._attempt(conn_id, flow, index)
        detour.attempts += 1
        if detour.attempts > config.retries:
            return None
        if index >= 0:
            detour.tried.add(index)
        full = _full(snapshot)
        picked = snapshot.picker.pick(self._key(flow, snapshot),
                                      detour.tried | full if full else detour.tried)
        if picked is None:
            return None
        self.stats.retried += 1
        return self._attempt(conn_id, flow, picked, first=True)


def _room(slot: Slot, pool: Pool) -> bool:
    """A capped backend the fast path picked takes this connection: below its cap, and nobody
    waits in the pool's queue (else the slow path queues it behind them)."""
    line = pool.waiting
    return slot.stats.active < slot.cap and (line is None or not len(line))


def _full(snapshot: PoolSnapshot) -> frozenset[int]:
    """Indices of the backends at their cap in this process (not to be picked now)."""
    caps = snapshot.caps
    if not caps:
        return NOTHING
    return frozenset(i for i, (cap, stats) in enumerate(zip(caps, snapshot.stats, strict=True))
                     if cap and stats.active >= cap)


def _source(flow: Flow, config: PoolConfig) -> str | None:
    """The source address of an attempt: the client's own (transparent; after a PROXY header,
    the client it names), or one of several local addresses in turn, so one backend can take
    more than one address's worth of ephemeral ports."""
    source = config.source
    if source.mode == "transparent":
        return flow.peer[0]
    if source.addresses:
        detour = flow.more()
        addresses = source.addresses
        return str(addresses[(detour.addr_turn + detour.addr_step) % len(addresses)])
    return None


def _operation(err: int, config: PoolConfig) -> str:
    """Which call most likely failed, for the metric label: descriptors run out at socket(); a
    port or address at bind() when we chose the source, else at connect()."""
    if err in FD_ERRNOS:
        return "socket"
    if err in PORT_ERRNOS and (config.source.mode == "transparent" or config.source.addresses):
        return "bind"
    return "connect"
