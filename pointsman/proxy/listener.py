"""A TCP listener: the policy of its connections on the process's connection engine.

The engine (pointsman/proxy/engine, docs/engine.md) owns every byte and descriptor: accept,
the read right after accept, the connect and its timeout, the relay with its watermarks,
half-close, resets, splice, the idle and FIN timers. This listener decides and counts:

- `accepted`: admission (shutting down, table full, load shedding, the allow/deny lists on the
  peer, the descriptor budget), then a preamble to read (PROXY header, ClientHello) or a backend;
- `admitted`: the connections the engine admitted on its own (the fast path: a listener with no
  preamble and no per-source rule, a round-robin or whole-weight weighted pool of quiet
  targets; the engine gets the rotation or the weighted cycle and a credit of admissions within
  the table, budget and shedding bounds), folded in one pass before any other call about this
  listener: the same Flow and counts as `accepted`;
- `preamble`: the sans-I/O `Preamble` fed with every byte so far, until it decides;
- `connect_result` (connect.py): passive signals, retries, affinity;
- `connected`: the successes through quiet targets of one engine wake-up (no connect_result
  for them), counted on their backends in one pass while their connections are open;
- `ended`: one pass over the records of the connections that ended: counters, histograms,
  backend load and totals, per-source counts, the flow log.

Every connection the engine accepts ends exactly once: refused (counted in `rejected`, one
reason) or ended (`ended`, one reason), so accepted = rejected + ended + active holds whenever
the loop runs something else. The table holds the connections being served, bounded by
`max_connections`; connections still reading a preamble wait apart, in the preamble budget
(`preamble.max_pending`), the oldest closed (`preamble_evicted`) when it is full.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Protocol

from pointsman.balance.hashing import client_ip
from pointsman.config.model import ListenerConfig
from pointsman.pool.pool import LazyPicker, Pool
from pointsman.pool.snapshot import PoolSnapshot
from pointsman.protect.acl import AclLists
from pointsman.protect.limits import Admission, Limits
from pointsman.protect.shedding import Loan, Shedder
from pointsman.protocols.errors import ProtocolError
from pointsman.proxy import engines
from pointsman.proxy.codes import END_CODE, REJECT_CODE
from pointsman.proxy.connect import REFUSE, ConnectPolicy
from pointsman.proxy.engine import Engine
from pointsman.proxy.engine.api import EARLY_DATA_MAX, Decision, ReadPreamble, Refuse
from pointsman.proxy.flows import Flow
from pointsman.proxy.fold import (
    Admit,
    Fold,
    admit,
    admitter,
    connected,
    connector,
    fold,
    folder,
)
from pointsman.proxy.follow import Follow, follow
from pointsman.proxy.lifetime import Lifetimes
from pointsman.proxy.preamble import Preamble, Refused, Route
from pointsman.proxy.resources import BUDGET, ERRORS, FD_ERRNOS, FD_RESERVE, MemoryTrimmer, errno_name
from pointsman.proxy.sockets import listen_socket
from pointsman.proxy.targets import Slot, engine_keepalive
from pointsman.telemetry.flow import EndReason, RejectReason
from pointsman.telemetry.flowlog import tcp_head, tcp_line
from pointsman.telemetry.stats import ListenerStats

log = logging.getLogger("pointsman.listener")



class FlowSink(Protocol):
    """The flow log's side (telemetry/flowlog.py FlowLog): the lines of a batch of finished
    connections, each begun with `tcp_head(wall time, listener)` (proxy/fold.py)."""

    def tcp_lines(self, lines: list[str]) -> None: ...


# Accept errors that are the peer's doing (it left before we accepted): not counted (the engine
# counts them in its own statistics).
_TRANSIENT = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ENETDOWN,
                        errno.ENOPROTOOPT, errno.EHOSTDOWN, errno.ENONET, errno.EHOSTUNREACH,
                        errno.EOPNOTSUPP, errno.ENETUNREACH})
LIVE_INTERVAL = 0.1  # seconds between refreshes of the live byte totals while connections run
# Admissions the engine may make on its fast path before the policy looks again (each `admitted`
# batch and each slow-path accept renews it): bounds the overshoot of a process-wide budget.
CREDIT_MAX = 64
_perf_counter = time.perf_counter


def _connected_to(engine: Engine, conn_id: int, flow: Flow, backend_id: str) -> bool:
    """Whether the connection is connected to `backend_id`: its flow knows it once
    connect_result or the wake-up's `connected` batch saw the success; a quiet success not yet
    handed over (this is called inside the engine's wake-up, e.g. after a passive ejection):
    its slot names the backend and the engine knows whether the connect is done."""
    if flow.backend_id is not None:
        return flow.backend_id == backend_id
    slot = flow.slot
    return slot is not None and slot.id == backend_id and engine.is_connected(conn_id)


class TcpListener(ConnectPolicy):
    """Accepts connections on its addresses (one socket each) and proxies them to one pool (see
    the module doc)."""

    def __init__(
        self,
        config: ListenerConfig,
        pool: Pool,
        loop: asyncio.AbstractEventLoop,
        stats: ListenerStats | None = None,
        flow_sink: FlowSink | None = None,
        pools: Mapping[str, Pool] | None = None,
        shedder: Shedder | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.name = config.name
        self.pool = pool
        self.pools: Mapping[str, Pool] = pools if pools is not None else {pool.name: pool}
        self.shedder = shedder or Shedder()
        self.loop = loop
        self.stats = stats or ListenerStats(config.max_connections)
        self.stats.capacity = config.max_connections
        self.connections: dict[int, Flow] = {}  # conn_id -> its flow, while in the table
        self.pending: dict[int, Flow] = {}  # in the preamble, oldest first
        self.flow_sink = flow_sink
        self.accepting = False
        self.engine: Engine | None = None
        self.lids: list[int] = []  # the engine's listener per socket (address)
        self._socks: list[socket.socket] = []
        self._sock: socket.socket | None = None
        self._trimmer: MemoryTrimmer | None = None
        self._idle: asyncio.Event | None = None
        self._live: asyncio.TimerHandle | None = None
        self._seen = (0, 0, 0)  # the engine's bytes in, out and splices already in `stats`
        self._released = False
        self.lifetimes = Lifetimes()  # max_connection_duration (proxy/lifetime.py)
        self._fold: Fold = fold  # the compiled twin once on the compiled engine (start)
        self._admit_flows: Admit = admit  # likewise
        # `connected` (the engine's optional callback): the quiet connect successes of one
        # engine wake-up (api.CONNECTED), each backend's total and connect time counted now
        # rather than when the connection ends (fold.py); after `admitted`, before `ended`.
        # The fold bound to the table, so the engine calls it with no Python frame of ours.
        self.connected: Callable[[bytes], None] = partial(connected, self.connections)
        # The engine's fast admission table: (pool, snapshot, slot by engine backend id).
        self._fast: tuple[Pool, PoolSnapshot, dict[int, Slot]] | None = None
        self._withdrawing = False
        self._no_fast: PoolSnapshot | None = None  # the last snapshot found not to allow it
        self._loan = Loan(self._recall)  # the engine's credit, lent by the shedder
        self.fast_admitted = 0  # connections the engine admitted alone (tests, docs/engine.md)
        self._setup(config)

    async def start(self, sock: socket.socket | Sequence[socket.socket] | None = None,
                    reuse_port: bool = False) -> None:
        """Serve on the given sockets (one per address), else bind the config's addresses."""
        socks = [sock] if isinstance(sock, socket.socket) else list(sock or ())
        if not socks:
            socks = [listen_socket(address, backlog=self.config.backlog, reuse_port=reuse_port)
                     for address in self.config.addresses]
        self._sock = socks[0]
        self._socks = socks
        BUDGET.measure()
        self.engine = engine = engines.acquire(self.loop)
        self._fold = folder(engine.name)
        self._admit_flows = admitter(engine.name)
        self.connected = partial(connector(engine.name), self.connections)
        keepalive = engine_keepalive(self.config.tcp_keepalive)
        self.lids = [engine.add_listener(each, self, keepalive=keepalive) for each in socks]
        self._trimmer = MemoryTrimmer.acquire(self.loop, self._open_count)
        self.accepting = True

    def _open_count(self) -> int:
        return self.stats.active

    @property
    def socket(self) -> socket.socket | None:
        return self._sock

    def statistics(self) -> ListenerStats:
        self._refresh()
        return self.stats

    def _refresh(self) -> None:
        """Live totals from the engine: bytes (connections still open included) and splices."""
        if self.engine is None or self._released:
            return
        bytes_in = bytes_out = spliced = 0
        for lid in self.lids:
            live = self.engine.listener_stats(lid)
            bytes_in += live.bytes_in
            bytes_out += live.bytes_out
            spliced += live.spliced
        seen_in, seen_out, seen_spliced = self._seen
        if bytes_in != seen_in or bytes_out != seen_out or spliced != seen_spliced:
            # Added as deltas: a listener retiring under a reload shares `stats` with the new
            # one of the same name.
            stats = self.stats
            stats.bytes_in += bytes_in - seen_in
            stats.bytes_out += bytes_out - seen_out
            stats.spliced += spliced - seen_spliced
            self._seen = (bytes_in, bytes_out, spliced)

    def _tick_live(self) -> None:
        self._live = None
        self._refresh()
        self.report_successes()
        now = _perf_counter()
        if self.lifetimes.due <= now:
            self._cut_old(now)
        if self.connections:
            self._live = self.loop.call_later(LIVE_INTERVAL, self._tick_live)

    def _cut_old(self, now: float) -> None:
        """Cut the connections older than their pool's max_connection_duration."""
        victims = self.lifetimes.sweep(self.connections, self.pools, now)
        if victims and self.engine is not None and not self._released:
            code = END_CODE[EndReason.MAX_CONNECTION_DURATION]
            for conn_id in victims:
                self.engine.close(conn_id, code)

    # --- settings ----------------------------------------------------------------------------------

    def _setup(self, config: ListenerConfig) -> None:
        """Derive what the data path reads from the listener config (at start and on reload)."""
        pp = config.proxy_protocol
        self.proxy_accept = pp.accept
        self.trusted = None if pp.trusted_sources is None else [
            ipaddress.ip_network(n) for n in pp.trusted_sources]
        self.routes = tuple(Route(tuple(r.server_names), tuple(r.alpn), r.pool)
                            for r in config.tls_routes)
        self.inspect_timeout = max(pp.timeout if pp.accept != "off" else 0.0,
                                   config.inspect_timeout if self.routes else 0.0)
        self.read_preamble = ReadPreamble(EARLY_DATA_MAX, self.inspect_timeout,
                                          REJECT_CODE[RejectReason.INSPECT_TIMEOUT],
                                          REJECT_CODE[RejectReason.BAD_PROXY_HEADER])
        self.reads_preamble = self.proxy_accept != "off" or bool(self.routes)
        self.max_pending = config.preamble_max_pending
        self.max_connections = config.max_connections
        limits = config.limits
        settings = Limits(limits.max_connections_per_source, limits.new_connections_per_second,
                          limits.new_connections_per_second_per_source, limits.source_prefix_v4,
                          limits.source_prefix_v6, limits.max_sources)
        active = settings.per_source or settings.new_connections_per_second is not None
        old = getattr(self, "admission", None)
        if not active:
            self.admission: Admission | None = None
        elif old is None or old.limits != settings:
            self.admission = Admission(settings, self.loop.time())
        self.set_acl(AclLists.from_file(config.allow, config.deny, config.acl_on,
                                        getattr(self, "acl_lists", None)))

    def reconfigure(self, config: ListenerConfig, pool: Pool) -> None:
        """Reload: new limits, pool and keepalive for new connections; established ones keep
        theirs (but their pools' max_connection_duration is looked at again)."""
        old = self.config.tcp_keepalive
        self.config = config
        self.stats.capacity = config.max_connections
        self.pool = pool
        self._setup(config)  # withdraws the fast path: the next accept renews it
        self.lifetimes.changed()
        if config.tcp_keepalive != old and self.engine is not None and self._socks:
            keepalive = engine_keepalive(config.tcp_keepalive)
            for lid in self.lids:
                self.engine.set_listener_keepalive(lid, keepalive)

    def set_acl(self, lists: AclLists) -> None:
        """Put lists in force (config load, reload, admin API); new connections see them."""
        self.acl_lists = lists
        self.acl = acl = lists.compile()
        self.screens_peer = acl is not None and acl.on == "peer"
        self.checks_source = self.admission is not None or (
            acl is not None and acl.on == "proxy_header")
        # The engine may admit on its own (admitted): nothing to decide per connection here.
        self.fast_ok = not (self.reads_preamble or self.checks_source or self.screens_peer)
        self._no_fast = None
        self._fast_withdraw()

    # --- engine -> policy: accept --------------------------------------------------------------------

    def accepted(self, conn_id: int, host: str, port: int) -> Decision:
        stats = self.stats
        stats.accepted += 1
        shedder = self.shedder
        if (not self.accepting or stats.active - stats.pending >= self.max_connections
                or self.screens_peer or shedder.max_connections is not None
                or shedder.max_loop_lag is not None):
            reason = self._admit(host)
            if reason is not None:
                return self._refuse_now(reason, host, port)
        flow = Flow((host, port), self.pool, _perf_counter())
        self.connections[conn_id] = flow
        stats.active += 1
        shedder.active += 1
        budget = BUDGET
        budget.used += 2  # its socket and its backend's; given back with its record
        if budget.used + 2 > budget.cap:
            self._budget_spent()
        if self._live is None:
            self._live = self.loop.call_later(LIVE_INTERVAL, self._tick_live)
        if self.reads_preamble:
            return self._start_preamble(conn_id, flow)
        decision = self.route(conn_id, flow)
        if self.fast_ok:
            self._fast_refresh()
        return decision

    # --- the fast path: the engine admits -----------------------------------------------------------

    def admitted(self, batch: list[tuple[int, int, int, str, int]]) -> None:
        """Connections the engine admitted on the fast path (conn_id, engine backend id, accept
        time in CLOCK_MONOTONIC ns, host, port), in accept order: what `accepted` and `route`
        do for each, in one pass. Comes before any other call about these connections."""
        fast = self._fast
        assert fast is not None  # withdrawn only after the engine handed over what it admitted
        self._admit_flows(self.connections, batch, *fast)
        count = len(batch)
        self.fast_admitted += count
        self.shedder.used(self._loan, count)
        stats = self.stats
        stats.accepted += count
        stats.active += count
        self.shedder.active += count
        budget = BUDGET
        budget.used += 2 * count
        if budget.used + 2 > budget.cap:
            self._budget_spent()
        if self._live is None:
            self._live = self.loop.call_later(LIVE_INTERVAL, self._tick_live)
        if not self._withdrawing:  # else the caller is replacing the table
            self._fast_refresh()

    def _fast_refresh(self) -> None:
        """Renew the engine's fast path: the credit, and the table when the pool's snapshot
        changed (or withdraw it when the listener or its pool no longer allows one)."""
        engine = self.engine
        if engine is None or self._released:
            return
        fast = self._fast
        pool = self.pool
        snapshot = pool.snapshot
        if fast is not None and fast[0] is pool and fast[1] is snapshot and self._fast_allowed():
            credit = self._credit()
            for lid in self.lids:
                engine.set_credit(lid, credit)
            return
        if fast is None and snapshot is self._no_fast:
            return  # known: this snapshot does not allow it (a slow accept pays nothing more)
        table = self._fast_table(pool, snapshot)
        self._fast_withdraw()
        if table is None:
            self._no_fast = snapshot
            return
        slots, plan = table
        self._fast = (pool, snapshot, {slot.target.backend: slot for slot in slots})
        targets = [slots[i].target for i in plan.order]
        credit = self._credit()
        for lid in self.lids:
            engine.set_fast(lid, targets, plan.start, credit, pool, snapshot, plan.weights,
                            plan.lookup, plan.key_port, plan.names, plan.sampled)

    def _fast_table(self, pool: Pool, snapshot: PoolSnapshot) -> tuple[list[Slot], Follow] | None:
        """The slots of `snapshot` and how the engine follows its picker (follow.py), from
        where the pick `accepted` just made left it; or None: a pick the engine cannot follow,
        caps and their queue, affinity, a PROXY header or source address to send, or a backend
        whose target is not quiet."""
        if not self._fast_allowed():
            return None
        picker: object = snapshot.picker
        if type(picker) is LazyPicker:  # built by the pick `accepted` just made
            picker = picker.built
        if not snapshot.available or snapshot.caps:
            return None
        targets = self._targets_of(pool)
        slots = targets.of(snapshot)
        plan = follow(picker, len(slots), snapshot.config.hash_key)
        if plan is None or not plan.order or not (targets.direct if plan.keyed else targets.plain):
            return None
        chosen: list[Slot] = []
        for slot in slots:
            if slot is None or not slot.target.quiet:
                return None
            chosen.append(slot)
        return chosen, plan

    def _fast_allowed(self) -> bool:
        """The listener may leave admission to the engine: no rule per connection, accepting.
        (Load shedding's bounds hold through the credit: `_credit`.)"""
        return self.fast_ok and self.accepting

    def _credit(self) -> int:
        """Admissions the engine may make alone, per socket: below the table size and the
        descriptor budget, at most CREDIT_MAX, shared by this listener's sockets, and lent by
        the shedder (within the room its process-wide bounds leave the other listeners)."""
        stats = self.stats
        sockets = max(1, len(self.lids))
        room = min(self.max_connections - (stats.active - stats.pending),
                   (BUDGET.cap - BUDGET.used) // 2 - 1, CREDIT_MAX) if self.accepting else 0
        return self.shedder.lend(self._loan, room, sockets) // sockets

    def _recall(self) -> int:
        """The shedder calls the credit back (another listener needs the room, the loop lags,
        new bounds): returns what the engine had not used; the next connections go through
        `accepted`, which sheds them or renews the credit."""
        engine = self.engine
        if engine is None or self._released:
            return self._loan.amount
        return sum(engine.set_credit(lid, 0) for lid in self.lids)

    def _fast_withdraw(self) -> None:
        """Take the fast path back (what the engine admitted is folded first)."""
        if self._fast is None:
            return
        engine = self.engine
        if engine is not None and not self._released:
            self._withdrawing = True
            try:
                for lid in self.lids:
                    engine.set_fast(lid, None)
            finally:
                self._withdrawing = False
        self._fast = None
        self.shedder.repay(self._loan)

    def _admit(self, host: str) -> RejectReason | None:
        """Before the table: shutting down, table full, load shedding, the lists on the peer."""
        if not self.accepting:
            return RejectReason.SHUTTING_DOWN
        stats = self.stats
        if stats.active - stats.pending >= self.max_connections:
            return RejectReason.TABLE_FULL
        shed = self.shedder.reason(self._loan)
        if shed is not None:
            return RejectReason(shed)
        acl = self.acl
        if acl is not None and acl.on == "peer" and acl.refuses(host):
            return RejectReason.DENIED
        return None

    def _refuse_now(self, reason: RejectReason, host: str, port: int) -> Refuse:
        """Refused before entering the table: counted now (its record is not looked at)."""
        self.stats.rejected[reason] += 1
        if self.flow_sink is not None:
            self.flow_sink.tcp_lines([tcp_line(time.time(), self.name, (host, port), None, 0, 0,
                                               0.0, None, f"rejected:{reason.value}")])
        return REFUSE[reason]

    def _budget_spent(self) -> None:
        """The descriptor budget is spent (a reserve stays for the admin listener and health
        checks): this connection is served, and accepting pauses until connections end, so the
        next ones wait in the backlog rather than failing at socket() for their backend."""
        self._count_local("accept", FD_RESERVE)
        self._pause()

    def _pause(self) -> None:
        """Accept on none of our sockets for a moment (the engine resumes them)."""
        if self.engine is not None and not self._released:
            for lid in self.lids:
                self.engine.pause_listener(lid)

    def accept_error(self, err: int) -> None:
        """accept() failed (EMFILE, ENFILE, ENOBUFS, ENOMEM...); the engine backs off."""
        if err in _TRANSIENT:
            return
        name = errno_name(err)
        self.stats.accept_errors[name] += 1
        ERRORS.note(self.name, "accept", name)

    def admit_source(self, flow: Flow) -> Refuse | None:
        """Rate limits and per-source caps on the client address (after any PROXY header); with
        acl_on: proxy_header the allow/deny lists too, on that same address."""
        flow.more().source_checked = True
        ip = flow.peer[0]
        acl = self.acl
        if acl is not None and acl.on == "proxy_header" and acl.refuses(ip):
            return REFUSE[RejectReason.DENIED]
        if self.admission is None:
            return None
        reason, key = self.admission.admit(ip, self.loop.time())
        if reason is not None:
            return REFUSE[RejectReason(reason.value)]
        flow.source_key = key
        return None

    # --- the preamble --------------------------------------------------------------------------------

    def _start_preamble(self, conn_id: int, flow: Flow) -> Decision:
        preamble = Preamble(self.proxy_accept, self._is_trusted(flow.peer[0]), self.routes,
                            self.config.fallback_pool)
        # Per-source limits during the preamble, on the TCP peer when no header can replace it.
        if not preamble.may_replace_peer and self.checks_source:
            refusal = self.admit_source(flow)
            if refusal is not None:
                return refusal
        if len(self.pending) >= self.max_pending:
            oldest_id, oldest = next(iter(self.pending.items()))
            self._preamble_done(oldest_id, oldest)
            assert self.engine is not None
            self.engine.close(oldest_id, REJECT_CODE[RejectReason.PREAMBLE_EVICTED])
        flow.more().preamble = preamble
        self.pending[conn_id] = flow
        self.stats.pending += 1
        return self.read_preamble

    def _preamble_done(self, conn_id: int, flow: Flow) -> None:
        detour = flow.detour
        if detour is not None and detour.preamble is not None:
            detour.preamble = None
            del self.pending[conn_id]
            self.stats.pending -= 1

    def preamble(self, conn_id: int, data: bytes) -> Decision | None:
        flow = self.connections[conn_id]
        detour = flow.more()
        preamble = detour.preamble
        if preamble is None:  # evicted meanwhile: the engine cuts it after this call
            return REFUSE[RejectReason.PREAMBLE_EVICTED]
        in_header = preamble.in_header
        try:
            decision = preamble.feed(data)
        except Refused as exc:
            return REFUSE[RejectReason(exc.reason.value)]
        except ProtocolError as exc:
            log.debug("%s: bad preamble from %s: %s", self.name, flow.peer, exc)
            return REFUSE[RejectReason.BAD_PROXY_HEADER if in_header
                          else RejectReason.BAD_CLIENT_HELLO]
        if decision is None:
            if len(data) >= EARLY_DATA_MAX:
                return REFUSE[RejectReason.BAD_PROXY_HEADER if preamble.in_header
                              else RejectReason.BAD_CLIENT_HELLO]
            return None
        stats = self.stats
        if stats.active - stats.pending >= self.max_connections:  # now it counts in the table
            return REFUSE[RejectReason.TABLE_FULL]
        self._preamble_done(conn_id, flow)
        detour.consume = decision.consumed
        if decision.client is not None:
            flow.peer = decision.client
        detour.header = decision.header
        detour.server_name = decision.server_name
        stats.tls_unrouted += decision.unrouted
        flow.pool = self.pools.get(decision.pool, self.pool)
        return self.route(conn_id, flow)

    def _is_trusted(self, ip: str) -> bool:
        if self.trusted is None:
            return True
        address = client_ip(ip)
        return any(address in network for network in self.trusted)

    # --- shortages of ours ---------------------------------------------------------------------------

    def local_error(self, op: str, err: int) -> None:
        """A shortage of ours while serving a connection: counted, logged (rate-limited), and,
        when descriptors ran out, no more accepting for a moment."""
        self._count_local(op, errno_name(err))
        if err in FD_ERRNOS:
            self._pause()

    def _count_local(self, op: str, name: str) -> None:
        self.stats.local_resource[f"{op}:{name}"] += 1
        ERRORS.note(self.name, op, name)

    # --- engine -> policy: records -------------------------------------------------------------------

    def ended(self, records: bytes) -> None:
        """One pass over the connections that ended in one engine wake-up (fold.py)."""
        sink = self.flow_sink
        if sink is None:
            gone, freed = self._fold(self, records, None, None)
        else:
            lines: list[str] = []
            gone, freed = self._fold(self, records, tcp_head(time.time(), self.name), lines)
            if lines:
                sink.tcp_lines(lines)
        if gone:
            self.stats.active -= gone
            self.shedder.active -= gone
            BUDGET.used -= 2 * gone
        if freed is not None:  # hand the freed slots to the queues' heads
            for pool in freed:
                self.slot_freed(pool)
        if not self.connections:
            self._refresh()  # exact totals whenever nothing is open
            if self._idle is not None:
                self._idle.set()
            if not self.accepting:
                self._release()

    # --- lifecycle -----------------------------------------------------------------------------------

    def stop_accepting(self) -> None:
        self.accepting = False
        self._fast_withdraw()
        if self.engine is not None:
            for lid in self.lids:
                self.engine.stop_listener(lid)
        for each in self._socks:
            each.close()
        self._socks.clear()
        if self._trimmer is not None:
            self._trimmer.release(self._open_count)
            self._trimmer = None
        if not self.connections:
            self._release()

    def _release(self) -> None:
        """Give the engine back once nothing of ours is left on it."""
        if self._released or self.engine is None:
            return
        self._refresh()
        self.report_successes()
        self._released = True
        if self._live is not None:
            self._live.cancel()
            self._live = None
        engines.release(self.loop, self.engine)

    async def wait_drained(self, timeout: float) -> bool:
        """Wait until no connection is left, at most `timeout` seconds; True if drained."""
        if not self.connections:
            return True
        self._idle = asyncio.Event()
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    def close_all(self, reason: EndReason) -> int:
        """Cut every live connection (a reset both ways); returns how many were cut."""
        if self.engine is None or self._released:
            return 0
        code = END_CODE[reason]
        return sum(self.engine.close_all(code, lid) for lid in self.lids)

    def close_backend(self, backend_id: str, reason: EndReason, pool: str | None = None) -> int:
        """Cut the connections to one backend (on_down: close_sessions, maintenance); with
        `pool`, only those that went to it through that pool (one address can serve two)."""
        if self.engine is None or self._released:
            return 0
        engine = self.engine
        victims = [cid for cid, flow in self.connections.items() if _connected_to(
            engine, cid, flow, backend_id) and (pool is None or flow.pool.name == pool)]
        code = END_CODE[reason]
        return sum(engine.close(cid, code) for cid in victims)

    def oldest(self) -> dict[str, float]:
        """The accept time (time.perf_counter()) of the oldest open connection, by the pool it
        went to (the listener's pool present even with none open)."""
        now = _perf_counter()
        oldest = {self.pool.name: now}
        for flow in list(self.connections.values()):
            name = flow.pool.name
            if flow.started < oldest.get(name, now):
                oldest[name] = flow.started
        return oldest
