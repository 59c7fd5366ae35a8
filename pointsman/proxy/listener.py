"""A TCP listener: its socket, its connection table and its counters."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

from pointsman.config.model import ListenerConfig
from pointsman.pool.pool import Pool
from pointsman.proxy.sockets import listen_socket
from pointsman.proxy.tcp import ClientConnection
from pointsman.telemetry.flow import EndReason, RejectReason
from pointsman.telemetry.stats import ListenerStats

log = logging.getLogger("pointsman.listener")

FlowSink = Callable[[ClientConnection], None]


class TcpListener:
    """Accepts connections on one address and proxies them to one pool.

    The connection table is the set of live connections, bounded by `max_connections`; a
    connection past the bound is closed at once and counted as `table_full`.
    """

    def __init__(
        self,
        config: ListenerConfig,
        pool: Pool,
        loop: asyncio.AbstractEventLoop,
        stats: ListenerStats | None = None,
        flow_sink: FlowSink | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self.pool = pool
        self.loop = loop
        self.stats = stats or ListenerStats(config.max_connections)
        self.stats.capacity = config.max_connections
        self.connections: set[ClientConnection] = set()
        self.flow_sink = flow_sink
        self.accepting = False
        self._server: asyncio.AbstractServer | None = None
        self._sock: socket.socket | None = None
        # uvloop sets TCP_NODELAY on accepted sockets; plain asyncio does not when we made the
        # listening socket ourselves, and setting it twice costs new-connection rate.
        self.set_nodelay = "uvloop" not in type(loop).__module__
        self._idle: asyncio.Event | None = None

    async def start(self, sock: socket.socket | None = None, reuse_port: bool = False) -> None:
        self._sock = sock or listen_socket(self.config.bind, backlog=self.config.backlog,
                                           reuse_port=reuse_port)
        self._server = await self.loop.create_server(
            self._protocol, sock=self._sock, backlog=self.config.backlog
        )
        self.accepting = True

    @property
    def socket(self) -> socket.socket | None:
        return self._sock

    def _protocol(self) -> ClientConnection:
        return ClientConnection(self)

    def admit(self) -> RejectReason | None:
        """Decide at accept time whether a new connection may enter the table."""
        if not self.accepting:
            return RejectReason.SHUTTING_DOWN
        if self.stats.active >= self.config.max_connections:
            return RejectReason.TABLE_FULL
        if self.pool.snapshot.available == 0:
            return RejectReason.NO_BACKEND
        return None

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

    def stop_accepting(self) -> None:
        self.accepting = False
        if self._server is not None:
            self._server.close()
            self._server = None

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
