"""A TCP listener: the policy of its connections on the process's connection engine.

The engine (pointsman/proxy/engine, docs/engine.md) owns every byte and descriptor: accept,
the read right after accept, the connect and its timeout, the relay with its watermarks,
half-close, resets, splice, the idle and FIN timers. This listener decides and counts:

- `accepted`: admission (shutting down, table full, load shedding, the allow/deny lists on the
  peer, the descriptor budget), then a preamble to read (PROXY header, ClientHello) or a backend;
- `preamble`: the sans-I/O `Preamble` fed with every byte so far, until it decides;
- `connect_result`: passive signals (only a backend's own failure counts against it, never a
  shortage of ours), retries over the pool's picker, affinity;
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
from collections.abc import Callable, Mapping

from pointsman.balance.hashing import client_ip, source_key
from pointsman.config.model import ListenerConfig, PoolConfig
from pointsman.pool.pool import Pool
from pointsman.pool.snapshot import PoolSnapshot
from pointsman.protect.acl import AclLists
from pointsman.protect.limits import Admission, Limits
from pointsman.protect.shedding import Shedder
from pointsman.protocols.errors import ProtocolError
from pointsman.protocols.proxy_protocol import ProxyHeader
from pointsman.proxy import engines
from pointsman.proxy.codes import END_CODE, REJECT_CODE, outcome
from pointsman.proxy.engine import Engine
from pointsman.proxy.engine.api import EARLY_DATA_MAX, RECORD, Connect, Decision, ReadPreamble, Refuse, Status
from pointsman.proxy.preamble import Preamble, Refused, Route
from pointsman.proxy.resources import (
    BUDGET,
    ERRORS,
    FD_ERRNOS,
    FD_RESERVE,
    MEMORY_ERRNOS,
    PORT_ERRNOS,
    MemoryTrimmer,
    errno_name,
)
from pointsman.proxy.sockets import listen_socket
from pointsman.proxy.targets import PoolTargets, Slot
from pointsman.proxy.upstream import outgoing_header
from pointsman.telemetry.flow import EndReason, RejectReason
from pointsman.telemetry.stats import ListenerStats

log = logging.getLogger("pointsman.listener")

# A finished connection for the flow log: wall time, listener, client, backend id (None: never
# connected), bytes in and out, duration and time to first byte (seconds; None: no byte), end.
FlowSink = Callable[[float, str, tuple[str, int], str | None, int, int, float, float | None, str],
                    None]
# Accept errors that are the peer's doing (it left before we accepted): not counted (the old
# accept loop's rule; the engine counts them in its own statistics).
_TRANSIENT = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ENETDOWN,
                        errno.ENOPROTOOPT, errno.EHOSTDOWN, errno.ENONET, errno.EHOSTUNREACH,
                        errno.EOPNOTSUPP, errno.ENETUNREACH})
_NO_SOURCE_PORT = (errno.EADDRNOTAVAIL, errno.EADDRINUSE)
_GIVE_UP = FD_ERRNOS | MEMORY_ERRNOS  # every other backend needs the same descriptor or buffer
LIVE_INTERVAL = 0.1  # seconds between refreshes of the live byte totals while connections run
_NOTHING: frozenset[int] = frozenset()
REFUSE = {reason: Refuse(code) for reason, code in REJECT_CODE.items()}


class Flow:
    """What the policy keeps of one connection in the table, from accept to its record."""

    __slots__ = ("addr_step", "addr_turn", "attempts", "backend_failed", "backend_id", "consume",
                 "header", "index", "key", "peer", "pool", "preamble", "server_name", "slot",
                 "snapshot", "source_checked", "source_key", "started", "tried")

    def __init__(self, peer: tuple[str, int], pool: Pool, started: float) -> None:
        self.peer = peer
        self.pool = pool
        self.started = started  # time.perf_counter() at accept: connection ages
        self.preamble: Preamble | None = None
        self.header: ProxyHeader | None = None
        self.server_name: str | None = None
        self.consume = 0
        self.source_checked = False
        self.source_key: bytes | None = None
        self.snapshot: PoolSnapshot | None = None  # while connecting: retries pick from it
        self.key = b""
        self.index = -1
        self.tried: set[int] | None = None
        self.attempts = 0
        self.addr_turn = 0
        self.addr_step = 0
        self.slot: Slot | None = None  # the backend it holds load on (BackendStats.active)
        self.backend_failed = False
        self.backend_id: str | None = None  # once connected


class TcpListener:
    """Accepts connections on one address and proxies them to one pool (see the module doc)."""

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
        self.lid = -1
        self._sock: socket.socket | None = None
        self._trimmer: MemoryTrimmer | None = None
        self._targets: dict[Pool, PoolTargets] = {}
        self._idle: asyncio.Event | None = None
        self._live: asyncio.TimerHandle | None = None
        self._seen = (0, 0, 0)  # the engine's bytes in, out and splices already in `stats`
        self._released = False
        self._setup(config)

    async def start(self, sock: socket.socket | None = None, reuse_port: bool = False) -> None:
        self._sock = sock or listen_socket(self.config.bind, backlog=self.config.backlog,
                                           reuse_port=reuse_port)
        self._sock.setblocking(False)
        BUDGET.measure()
        self.engine = engines.acquire(self.loop)
        self.lid = self.engine.add_listener(self._sock, self)
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
        live = self.engine.listener_stats(self.lid)
        seen_in, seen_out, seen_spliced = self._seen
        if live.bytes_in != seen_in or live.bytes_out != seen_out or live.spliced != seen_spliced:
            # Added as deltas: a listener retiring under a reload shares `stats` with the new
            # one of the same name.
            stats = self.stats
            stats.bytes_in += live.bytes_in - seen_in
            stats.bytes_out += live.bytes_out - seen_out
            stats.spliced += live.spliced - seen_spliced
            self._seen = (live.bytes_in, live.bytes_out, live.spliced)

    def _tick_live(self) -> None:
        self._live = None
        self._refresh()
        if self.connections:
            self._live = self.loop.call_later(LIVE_INTERVAL, self._tick_live)

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
        self.set_acl(AclLists.from_file(config.allow, config.deny, config.acl_on,
                                        getattr(self, "acl_lists", None)))
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

    def reconfigure(self, config: ListenerConfig, pool: Pool) -> None:
        """Reload: new limits and pool for new connections; established ones are untouched."""
        self.config = config
        self.stats.capacity = config.max_connections
        self.pool = pool
        self._setup(config)

    def set_acl(self, lists: AclLists) -> None:
        """Put lists in force (config load, reload, admin API); new connections see them."""
        self.acl_lists = lists
        self.acl = lists.compile()

    # --- engine -> policy: accept --------------------------------------------------------------------

    def accepted(self, conn_id: int, host: str, port: int) -> Decision:
        stats = self.stats
        stats.accepted += 1
        reason = self._admit(host)
        if reason is not None:
            return self._refuse_now(reason, host, port)
        flow = Flow((host, port), self.pool, time.perf_counter())
        self.connections[conn_id] = flow
        stats.active += 1
        self.shedder.active += 1
        BUDGET.used += 2  # its socket and its backend's; given back with its record
        if not BUDGET.room():
            self._budget_spent()
        if self._live is None:
            self._live = self.loop.call_later(LIVE_INTERVAL, self._tick_live)
        if self.reads_preamble:
            return self._start_preamble(conn_id, flow)
        return self._route(conn_id, flow)

    def _admit(self, host: str) -> RejectReason | None:
        """Before the table: shutting down, table full, load shedding, the lists on the peer."""
        if not self.accepting:
            return RejectReason.SHUTTING_DOWN
        stats = self.stats
        if stats.active - stats.pending >= self.max_connections:
            return RejectReason.TABLE_FULL
        shed = self.shedder.reason()
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
            self.flow_sink(time.time(), self.name, (host, port), None, 0, 0, 0.0, None,
                           f"rejected:{reason.value}")
        return REFUSE[reason]

    def _budget_spent(self) -> None:
        """The descriptor budget is spent (a reserve stays for the admin listener and health
        checks): this connection is served, and accepting pauses until connections end, so the
        next ones wait in the backlog rather than failing at socket() for their backend."""
        self._count_local("accept", FD_RESERVE)
        if self.engine is not None:
            self.engine.pause_listener(self.lid)

    def accept_error(self, err: int) -> None:
        """accept() failed (EMFILE, ENFILE, ENOBUFS, ENOMEM...); the engine backs off."""
        if err in _TRANSIENT:
            return
        name = errno_name(err)
        self.stats.accept_errors[name] += 1
        ERRORS.note(self.name, "accept", name)

    # --- the preamble --------------------------------------------------------------------------------

    def _start_preamble(self, conn_id: int, flow: Flow) -> Decision:
        preamble = Preamble(self.proxy_accept, self._is_trusted(flow.peer[0]), self.routes,
                            self.config.fallback_pool)
        # Per-source limits during the preamble, on the TCP peer when no header can replace it.
        if not preamble.may_replace_peer:
            refusal = self._admit_source(flow)
            if refusal is not None:
                return refusal
        if len(self.pending) >= self.max_pending:
            oldest_id, oldest = next(iter(self.pending.items()))
            self._preamble_done(oldest_id, oldest)
            assert self.engine is not None
            self.engine.close(oldest_id, REJECT_CODE[RejectReason.PREAMBLE_EVICTED])
        flow.preamble = preamble
        self.pending[conn_id] = flow
        self.stats.pending += 1
        return self.read_preamble

    def _preamble_done(self, conn_id: int, flow: Flow) -> None:
        if flow.preamble is not None:
            flow.preamble = None
            del self.pending[conn_id]
            self.stats.pending -= 1

    def preamble(self, conn_id: int, data: bytes) -> Decision | None:
        flow = self.connections[conn_id]
        preamble = flow.preamble
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
        flow.consume = decision.consumed
        if decision.client is not None:
            flow.peer = decision.client
        flow.header = decision.header
        flow.server_name = decision.server_name
        stats.tls_unrouted += decision.unrouted
        flow.pool = self.pools.get(decision.pool, self.pool)
        return self._route(conn_id, flow)

    def _is_trusted(self, ip: str) -> bool:
        if self.trusted is None:
            return True
        address = client_ip(ip)
        return any(address in network for network in self.trusted)

    # --- the pick ------------------------------------------------------------------------------------

    def _admit_source(self, flow: Flow) -> Refuse | None:
        """Rate limits and per-source caps on the client address (after any PROXY header); with
        acl_on: proxy_header the allow/deny lists too, on that same address."""
        flow.source_checked = True
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

    def _route(self, conn_id: int, flow: Flow) -> Decision:
        """Per-source limits, then the pool (this one or its fallback), then a backend."""
        if not flow.source_checked and (self.admission is not None or self.acl is not None):
            refusal = self._admit_source(flow)
            if refusal is not None:
                return refusal
        pool = flow.pool.route(self.pools)
        if pool is None:
            return REFUSE[RejectReason.NO_BACKEND]
        flow.pool = pool
        snapshot = pool.snapshot
        config = snapshot.config
        if snapshot.needs_key:
            flow.key = source_key(flow.peer[0], flow.peer[1], config.hash_key)
        index = self._sticky_index(snapshot, flow)
        if index is None:
            index = snapshot.picker.pick(flow.key, _NOTHING)
        if index is None:
            return REFUSE[RejectReason.NO_BACKEND]
        flow.snapshot = snapshot
        return self._attempt(conn_id, flow, index, first=True)

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

    def _slots(self, pool: Pool, snapshot: PoolSnapshot) -> list[Slot | None]:
        targets = self._targets.get(pool)
        if targets is None:
            assert self.engine is not None
            targets = self._targets[pool] = PoolTargets(self.engine)
        return targets.of(snapshot)

    def _attempt(self, conn_id: int, flow: Flow, index: int, first: bool = False) -> Decision:
        """Connect to backend `index` of the flow's snapshot (counted as load now: a connect in
        progress is load for least-connections)."""
        snapshot = flow.snapshot
        assert snapshot is not None
        slot = self._slots(flow.pool, snapshot)[index]
        while slot is None:  # an address that cannot be used: as if it had failed, unblamed
            flow.tried = (flow.tried or set()) | {index}
            picked = snapshot.picker.pick(flow.key, flow.tried)
            if picked is None:
                return REFUSE[RejectReason.NO_BACKEND]
            index = picked
            slot = self._slots(flow.pool, snapshot)[index]
        flow.index = index
        flow.slot = slot
        slot.stats.active += 1
        config = snapshot.config
        if first:
            flow.addr_turn = slot.stats.total
            flow.addr_step = 0
        header = b""
        if config.proxy_protocol.send != "off":
            header = outgoing_header(config, flow.peer, self._local(conn_id), flow.header,
                                     flow.server_name)
        source = self._source(flow, config)
        consume, flow.consume = flow.consume, 0  # the engine drops these bytes once
        if header or consume or source is not None:
            return Connect(slot.target, header, consume, source)
        target: Decision = slot.target
        return target

    def _local(self, conn_id: int) -> tuple[str, int] | None:
        assert self.engine is not None
        return self.engine.sockname(conn_id)

    @staticmethod
    def _source(flow: Flow, config: PoolConfig) -> str | None:
        """The source address of this attempt: the client's own (transparent; after a PROXY
        header, the client it names), or one of several local addresses in turn, so one backend
        can take more than one address's worth of ephemeral ports."""
        source = config.source
        if source.mode == "transparent":
            return flow.peer[0]
        if source.addresses:
            addresses = source.addresses
            return str(addresses[(flow.addr_turn + flow.addr_step) % len(addresses)])
        return None

    # --- engine -> policy: connect outcome -----------------------------------------------------------

    def connect_result(self, conn_id: int, backend: int, status: int, err: int,
                       elapsed: float) -> Decision | None:
        flow = self.connections[conn_id]
        slot = flow.slot
        assert slot is not None
        if status == Status.OK:
            flow.pool.report_connect_success(slot.id)
            stats = slot.stats
            stats.total += 1
            stats.connect_time.observe(elapsed)
            flow.backend_id = slot.id
            snapshot = flow.snapshot
            if snapshot is not None and snapshot.affinity is not None \
                    and snapshot.config.affinity is not None:
                sticky = source_key(flow.peer[0], flow.peer[1], snapshot.config.affinity.key)
                snapshot.affinity.remember(sticky, slot.id, self.loop.time())
            flow.snapshot = None  # the pick is done: the flow keeps no snapshot alive
            flow.tried = None
            return None
        return self._retry(conn_id, flow, slot, status, err)

    def _retry(self, conn_id: int, flow: Flow, slot: Slot, status: int, err: int) -> Decision | None:
        """After a failed attempt: another source address, another backend, or give up."""
        slot.stats.active -= 1
        flow.slot = None
        snapshot = flow.snapshot
        assert snapshot is not None
        config = snapshot.config
        if err in _NO_SOURCE_PORT:
            self.stats.source_port_failures += 1
        if status == Status.BACKEND:
            flow.backend_failed = True
            log.debug("connect to %s failed: %s", slot.id, errno_name(err))
            flow.pool.report_connect_failure(slot.id)
        else:
            self.local_error(_operation(err, config), err)
            if err in _GIVE_UP:
                return None
            if err in _NO_SOURCE_PORT and flow.addr_step + 1 < len(config.source.addresses):
                flow.addr_step += 1  # the same backend from the next address
                return self._attempt(conn_id, flow, flow.index)
        flow.attempts += 1
        if flow.attempts > config.retries:
            return None
        tried = flow.tried
        if tried is None:
            tried = flow.tried = set()
        tried.add(flow.index)
        index = snapshot.picker.pick(flow.key, tried)
        if index is None:
            return None
        self.stats.retried += 1
        return self._attempt(conn_id, flow, index, first=True)

    def local_error(self, op: str, err: int) -> None:
        """A shortage of ours while serving a connection: counted, logged (rate-limited), and,
        when descriptors ran out, no more accepting for a moment."""
        self._count_local(op, errno_name(err))
        if err in FD_ERRNOS and self.engine is not None and not self._released:
            self.engine.pause_listener(self.lid)

    def _count_local(self, op: str, name: str) -> None:
        self.stats.local_resource[f"{op}:{name}"] += 1
        ERRORS.note(self.name, op, name)

    # --- engine -> policy: records -------------------------------------------------------------------

    def ended(self, records: bytes) -> None:
        """One pass over the connections that ended in one engine wake-up."""
        connections = self.connections
        stats = self.stats
        sink = self.flow_sink
        wall = time.time() if sink is not None else 0.0
        admission = self.admission
        gone = 0
        for (conn_id, _backend, reason, _flags, detail, bytes_in, bytes_out, started, _connected,
             first_byte, finished, _lid) in RECORD.iter_unpack(records):
            flow = connections.pop(conn_id, None)
            if flow is None:  # refused at accept: counted then (unless our policy raised)
                if detail == 0xFFFF:
                    stats.rejected[RejectReason.INTERNAL_ERROR] += 1
                continue
            gone += 1
            if flow.preamble is not None:
                self._preamble_done(conn_id, flow)
            how = outcome(reason, detail, flow.backend_failed)
            duration = (finished - started) / 1e9
            ttfb = (first_byte - started) / 1e9 if first_byte else None
            if isinstance(how, RejectReason):
                stats.rejected[how] += 1
                end = f"rejected:{how.value}" if sink is not None else ""
            else:
                stats.ended[how] += 1
                stats.duration.observe(duration)
                if how is EndReason.CONNECT_FAILED:
                    stats.connect_failed += 1
                end = how.value
            if ttfb is not None:
                stats.ttfb.observe(ttfb)
            slot = flow.slot
            if slot is not None:
                backend = slot.stats
                backend.active -= 1
                if flow.backend_id is not None:
                    backend.bytes_in += bytes_in
                    backend.bytes_out += bytes_out
            if flow.source_key is not None and admission is not None:
                admission.closed(flow.source_key)
            if sink is not None:
                sink(wall, self.name, flow.peer, flow.backend_id, bytes_in, bytes_out, duration,
                     ttfb, end)
        stats.active -= gone
        self.shedder.active -= gone
        BUDGET.used -= 2 * gone
        self._refresh()
        if not connections:
            if self._idle is not None:
                self._idle.set()
            if not self.accepting:
                self._release()

    # --- lifecycle -----------------------------------------------------------------------------------

    def stop_accepting(self) -> None:
        self.accepting = False
        if self.engine is not None and self._sock is not None and self._sock.fileno() >= 0:
            self.engine.stop_listener(self.lid)
            self._sock.close()
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
        return self.engine.close_all(END_CODE[reason], self.lid)

    def close_backend(self, backend_id: str, reason: EndReason) -> int:
        """Cut the connections to one backend (on_down: close_sessions, maintenance)."""
        if self.engine is None:
            return 0
        victims = [cid for cid, flow in self.connections.items() if flow.backend_id == backend_id]
        code = END_CODE[reason]
        return sum(self.engine.close(cid, code) for cid in victims)

    def oldest(self) -> dict[str, float]:
        """The accept time (time.perf_counter()) of the oldest open connection, by the pool it
        went to (the listener's pool present even with none open)."""
        now = time.perf_counter()
        oldest = {self.pool.name: now}
        for flow in list(self.connections.values()):
            name = flow.pool.name
            if flow.started < oldest.get(name, now):
                oldest[name] = flow.started
        return oldest


def _operation(err: int, config: PoolConfig) -> str:
    """Which call most likely failed, for the metric label: descriptors run out at socket(); a
    port or address at bind() when we chose the source, else at connect()."""
    if err in FD_ERRNOS:
        return "socket"
    if err in PORT_ERRNOS and (config.source.mode == "transparent" or config.source.addresses):
        return "bind"
    return "connect"
