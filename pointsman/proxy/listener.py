"""A TCP listener: its socket and accept loop, its connection table, its preamble budget and its
counters."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Callable, Mapping, Sequence

from pointsman.balance.hashing import client_ip
from pointsman.config.model import ListenerConfig
from pointsman.pool.pool import Pool
from pointsman.protect.acl import AclLists
from pointsman.protect.limits import Admission, Limits
from pointsman.protect.shedding import Shedder
from pointsman.proxy.accept import Acceptor, attach
from pointsman.proxy.preamble import Preamble, Route
from pointsman.proxy.resources import BUDGET, ERRORS, FD_ERRNOS, FD_RESERVE, MemoryTrimmer, errno_name
from pointsman.proxy.sockets import listen_socket
from pointsman.proxy.tcp import ClientConnection
from pointsman.telemetry.flow import EndReason, RejectReason
from pointsman.telemetry.stats import ListenerStats

log = logging.getLogger("pointsman.listener")

FlowSink = Callable[[ClientConnection], None]
Socket = socket.socket  # the class has a `socket` property


class TcpListener:
    """Accepts connections on its addresses (one socket each) and proxies them to one pool.

    The connection table holds the connections being served, bounded by `max_connections`; a
    connection past the bound is closed at once and counted as `table_full`. Connections still
    reading a PROXY header or ClientHello wait apart, in the preamble budget
    (`preamble.max_pending`): when it is full the oldest of them is closed (`preamble_evicted`),
    so clients that stall after one byte cannot fill the table.
    """

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
        self.connections: set[ClientConnection] = set()
        self.pending: dict[ClientConnection, None] = {}  # in the preamble, oldest first
        self.flow_sink = flow_sink
        self.accepting = False
        self.acceptors: list[Acceptor] = []  # one per listening socket (address)
        self._socks: list[socket.socket] = []
        self._sock: socket.socket | None = None
        self._trimmer: MemoryTrimmer | None = None
        # uvloop sets TCP_NODELAY on accepted sockets; plain asyncio does not when we made the
        # listening socket ourselves, and setting it twice costs new-connection rate.
        self.set_nodelay = "uvloop" not in type(loop).__module__
        self._idle: asyncio.Event | None = None
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
        for each in socks:
            each.setblocking(False)
            acceptor = Acceptor(self.loop, each, self._accepted, self._accept_failed, BUDGET.room)
            acceptor.start()
            self.acceptors.append(acceptor)
        self._trimmer = MemoryTrimmer.acquire(self.loop, self._open_count)
        self.accepting = True

    def _open_count(self) -> int:
        return self.stats.active

    @property
    def socket(self) -> socket.socket | None:
        return self._sock

    def statistics(self) -> ListenerStats:
        return self.stats

    def _protocol(self) -> ClientConnection:
        return ClientConnection(self)

    # --- accept ------------------------------------------------------------------------------------

    def _accepted(self, sock: Socket, address: object) -> None:
        """A socket from the kernel. Once the descriptor budget is spent (a reserve stays for the
        admin listener and health checks) this one is still served, but accepting pauses until
        connections end: the next ones wait in the kernel's backlog rather than being accepted
        only to fail at socket() for their backend."""
        BUDGET.used += 2  # its socket and its backend's; given back by the connection's teardown
        attach(self.loop, self._protocol, sock)
        if not BUDGET.room() and any(not a.paused for a in self.acceptors):
            self._count_local("accept", FD_RESERVE)
            self._back_off()

    def _accept_failed(self, exc: OSError) -> None:
        """accept() itself failed (EMFILE, ENFILE, ENOBUFS, ENOMEM...); the acceptor backs off."""
        name = errno_name(exc.errno)
        self.stats.accept_errors[name] += 1
        ERRORS.note(self.name, "accept", name)

    def local_error(self, op: str, exc: OSError) -> None:
        """A shortage of ours while serving a connection: counted, logged (rate-limited), and,
        when descriptors ran out, no more accepting for a moment."""
        self._count_local(op, errno_name(exc.errno))
        if exc.errno in FD_ERRNOS:
            self._back_off()

    def _back_off(self) -> None:
        for acceptor in self.acceptors:
            if not acceptor.paused:
                acceptor.back_off()

    def _count_local(self, op: str, name: str) -> None:
        self.stats.local_resource[f"{op}:{name}"] += 1
        ERRORS.note(self.name, op, name)

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
        self.set_acl(AclLists.from_file(config.allow, config.deny, config.acl_on,
                                        getattr(self, "acl_lists", None)))
        self.max_pending = config.preamble_max_pending
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

    def admit(self) -> RejectReason | None:
        """Decide at accept time whether a new connection may enter the table."""
        if not self.accepting:
            return RejectReason.SHUTTING_DOWN
        if self.table_full():
            return RejectReason.TABLE_FULL
        shed = self.shedder.reason()
        if shed is not None:
            return RejectReason(shed)
        return None

    # --- allow/deny lists (issue 15) ------------------------------------------------------------

    def set_acl(self, lists: AclLists) -> None:
        """Put lists in force (config load, reload, admin API); new connections see them."""
        self.acl_lists = lists
        self.acl = lists.compile()

    def screen(self, conn: ClientConnection, transport: asyncio.BaseTransport) -> RejectReason | None:
        """At accept, before anything is read: the lists on the TCP peer (acl_on: peer). A denied
        connection keeps its peer address for the flow log."""
        acl = self.acl
        if acl is None or acl.on != "peer":
            return None
        peer = transport.get_extra_info("peername")
        if not peer or not acl.refuses(peer[0]):
            return None
        conn.peer = (peer[0], peer[1])
        return RejectReason.DENIED

    def table_full(self) -> bool:
        """No room for one more served connection (the pending ones do not count)."""
        stats = self.stats
        return stats.active - stats.pending >= self.config.max_connections

    def preamble_started(self, conn: ClientConnection) -> None:
        """`conn` reads its preamble now; the oldest pending one goes if the budget is full."""
        if len(self.pending) >= self.max_pending:
            oldest = next(iter(self.pending))
            oldest.refuse(RejectReason.PREAMBLE_EVICTED)
        self.pending[conn] = None
        self.stats.pending += 1

    def preamble_done(self, conn: ClientConnection) -> None:
        if conn in self.pending:
            del self.pending[conn]
            self.stats.pending -= 1

    def admit_source(self, ip: str) -> tuple[RejectReason | None, bytes | None]:
        """Rate limits and per-source caps, on the client address (after any PROXY header); with
        acl_on: proxy_header the allow/deny lists too, on that same address."""
        acl = self.acl
        if acl is not None and acl.on == "proxy_header" and acl.refuses(ip):
            return RejectReason.DENIED, None
        if self.admission is None:
            return None, None
        reason, key = self.admission.admit(ip, self.loop.time())
        return (RejectReason(reason.value) if reason is not None else None), key

    def new_preamble(self, peer_ip: str) -> Preamble | None:
        """A preamble reader when this listener reads a PROXY header or routes by SNI."""
        if self.proxy_accept == "off" and not self.routes:
            return None
        return Preamble(self.proxy_accept, self._is_trusted(peer_ip), self.routes,
                        self.config.fallback_pool)

    def _is_trusted(self, ip: str) -> bool:
        if self.trusted is None:
            return True
        address = client_ip(ip)
        return any(address in network for network in self.trusted)

    def pool_named(self, name: str) -> Pool:
        return self.pools.get(name, self.pool)

    def enter(self, conn: ClientConnection) -> None:
        self.stats.active += 1
        self.shedder.active += 1
        self.connections.add(conn)

    def leave(self, conn: ClientConnection) -> None:
        self.preamble_done(conn)
        self.stats.active -= 1
        self.shedder.active -= 1
        self.connections.discard(conn)
        if conn.source_key is not None and self.admission is not None:
            self.admission.closed(conn.source_key)
        for acceptor in self.acceptors:
            if acceptor.paused:
                acceptor.freed()  # its descriptors are back

    def flow_ended(self, conn: ClientConnection) -> None:
        if self.flow_sink is not None:
            self.flow_sink(conn)
        if self._idle is not None and not self.connections:
            self._idle.set()

    def reconfigure(self, config: ListenerConfig, pool: Pool) -> None:
        """Reload: new limits and pool for new connections; established ones are untouched."""
        self.config = config
        self.stats.capacity = config.max_connections
        self.pool = pool
        self._setup(config)

    def stop_accepting(self) -> None:
        self.accepting = False
        for acceptor in self.acceptors:
            acceptor.close()
        self.acceptors.clear()
        for each in self._socks:
            each.close()
        self._socks.clear()
        if self._trimmer is not None:
            self._trimmer.release(self._open_count)
            self._trimmer = None

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
        """Cut every live connection; returns how many were cut."""
        connections = list(self.connections)
        for conn in connections:
            conn.close(reason)
        return len(connections)

    def close_backend(self, backend_id: str, reason: EndReason) -> int:
        """Cut the connections to one backend (on_down: close_sessions, maintenance)."""
        victims = [c for c in self.connections if c.backend_id == backend_id]
        for conn in victims:
            conn.close(reason)
        return len(victims)
