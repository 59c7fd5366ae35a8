"""The userspace TCP data path: one client protocol and one upstream protocol per connection.

Design, after Envoy's tcp_proxy and uvicorn's flow control:
- the client is not read until the upstream connects, unless the listener must first read a
  PROXY header or peek at a ClientHello (the preamble, bounded in size and time);
- watermarks cross over: when one side's write buffer passes the high-water mark we stop reading
  the other side, and resume below the low-water mark, so memory per connection stays bounded;
- a FIN is forwarded as a FIN (`write_eof`), never as a close, so half-closed streams still deliver
  their replies; a reset on one side aborts the other;
- the idle timer is one handle per connection, re-armed lazily from the last-activity time instead
  of being reset on every read;
- how the connection ended is decided once, at teardown.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import time
from typing import TYPE_CHECKING, cast

from pointsman.balance.hashing import source_key
from pointsman.protocols.errors import ProtocolError
from pointsman.protocols.proxy_protocol import ProxyHeader
from pointsman.proxy.preamble import Decision, Preamble, Refused
from pointsman.proxy.splice import SPLICE, Spliced
from pointsman.proxy.upstream import open_connection, outgoing_header
from pointsman.telemetry.flow import EndReason, RejectReason

if TYPE_CHECKING:
    from pointsman.pool.pool import Pool
    from pointsman.pool.snapshot import PoolSnapshot
    from pointsman.proxy.listener import TcpListener
    from pointsman.telemetry.stats import BackendStats

log = logging.getLogger("pointsman.proxy")

# Write-buffer watermarks per direction. 256 KiB high lets a bulk stream keep a few socket
# buffers' worth in flight; memory per connection is bounded by about 2 x (HIGH + one read).
WRITE_HIGH_WATER = 256 * 1024
WRITE_LOW_WATER = 64 * 1024
# Bytes read from a client before its upstream is connected; past this we stop reading. Also
# bounds the preamble: a PROXY v2 header (4 KiB cap) plus a ClientHello (16 KiB cap) fit.
EARLY_DATA_MAX = 64 * 1024
_NO_SOURCE_PORT = (errno.EADDRNOTAVAIL, errno.EADDRINUSE)
_CONNECT_TIMEOUT = "pointsman: connect timeout"
NEVER = 1 << 62  # splice_after when zero copy is off for this connection


def _expire(task: asyncio.Task[None] | None) -> None:
    """Connect timeout: cancel the connect, marking the cancellation as ours."""
    if task is not None and not task.done():
        task.cancel(msg=_CONNECT_TIMEOUT)


class UpstreamProtocol(asyncio.Protocol):
    """The backend side: forwards to the client connection that owns it."""

    __slots__ = ("flow",)

    def __init__(self, flow: ClientConnection) -> None:
        self.flow = flow

    def data_received(self, data: bytes) -> None:
        self.flow.from_backend(data)

    def eof_received(self) -> bool:
        self.flow.backend_eof()
        return True

    def pause_writing(self) -> None:
        self.flow.pause_client()

    def resume_writing(self) -> None:
        self.flow.resume_client()

    def connection_lost(self, exc: Exception | None) -> None:
        self.flow.backend_lost(exc)


class ClientConnection(asyncio.Protocol):
    """One proxied TCP connection, owned by its listener from accept to teardown."""

    __slots__ = (
        "admitted",
        "backend_id",
        "backend_stats",
        "bytes_in",
        "bytes_out",
        "client",
        "client_eof",
        "connect_task",
        "early",
        "ended",
        "first_byte_at",
        "header",
        "idle_handle",
        "inspect_handle",
        "last_activity",
        "listener",
        "loop",
        "peer",
        "pool",
        "preamble",
        "reason",
        "reject",
        "server_name",
        "source_key",
        "splice_after",
        "spliced",
        "started",
        "stats",
        "upstream",
        "upstream_eof",
    )

    def __init__(self, listener: TcpListener) -> None:
        self.listener = listener
        self.loop = listener.loop
        self.pool: Pool = listener.pool
        self.client: asyncio.Transport | None = None
        self.upstream: asyncio.Transport | None = None
        self.connect_task: asyncio.Task[None] | None = None
        self.early: bytearray | None = None
        self.idle_handle: asyncio.TimerHandle | None = None
        self.inspect_handle: asyncio.TimerHandle | None = None
        self.preamble: Preamble | None = None
        self.header: ProxyHeader | None = None
        self.server_name: str | None = None
        self.source_key: bytes | None = None
        self.backend_id: str | None = None
        self.backend_stats: BackendStats | None = None
        self.peer: tuple[str, int] = ("", 0)
        self.reason: EndReason | None = None
        self.reject: RejectReason | None = None
        self.admitted = False
        self.spliced: Spliced | None = None
        self.splice_after = NEVER
        self.client_eof = False
        self.upstream_eof = False
        self.ended = False
        self.bytes_in = 0
        self.bytes_out = 0
        self.started = 0.0  # perf_counter: uvloop's loop.time() moves in 1 ms steps
        self.stats = listener.stats
        self.last_activity = 0.0
        self.first_byte_at = 0.0

    # --- accept and admission ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.client = transport
        self.started = time.perf_counter()
        listener = self.listener
        reject = listener.admit()
        if reject is None and listener.acl is not None:  # allow/deny lists on the peer (issue 15)
            reject = listener.screen(self, transport)
        if reject is not None:
            listener.stats.rejected[reject] += 1
            self.reason = EndReason.REJECTED
            self.reject = reject
            self.ended = True
            transport.abort()
            listener.flow_ended(self)
            return
        listener.enter(self)
        if listener.set_nodelay:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        self.peer = (peer[0], peer[1]) if peer else ("", 0)
        preamble = listener.new_preamble(self.peer[0])
        if preamble is None:
            transport.pause_reading()
            self._admit()
            return
        self.preamble = preamble
        self.early = bytearray()
        self.inspect_handle = self.loop.call_later(
            listener.inspect_timeout, self._refuse, RejectReason.INSPECT_TIMEOUT)

    def _admit(self) -> None:
        """Per-source limits on the real client address, then connect."""
        listener = self.listener
        reason, key = listener.admit_source(self.peer[0])
        if reason is not None:
            self._refuse(reason)
            return
        self.source_key = key
        pool = self.pool.route(listener.pools)  # this pool, or its fallback_pool (issue 15)
        if pool is None:
            self._refuse(RejectReason.NO_BACKEND)
            return
        self.pool = pool
        self.admitted = True
        listener.stats.accepted += 1
        self.connect_task = self.loop.create_task(self._connect())

    def _refuse(self, reason: RejectReason) -> None:
        """Refuse a connection already in the table: counted, closed at once, nothing forwarded."""
        self.listener.stats.rejected[reason] += 1
        self.reason = EndReason.REJECTED
        self.reject = reason
        if self.client is not None:
            self.client.abort()

    def _decided(self, decision: Decision) -> None:
        """The preamble is complete: strip the PROXY header, take its client, pick the pool."""
        if self.inspect_handle is not None:
            self.inspect_handle.cancel()
            self.inspect_handle = None
        self.preamble = None
        if decision.consumed and self.early is not None:
            del self.early[: decision.consumed]
        if decision.client is not None:
            self.peer = decision.client
        self.header = decision.header
        self.server_name = decision.server_name
        self.stats.tls_unrouted += decision.unrouted
        self.pool = self.listener.pool_named(decision.pool)
        if self.client is not None:
            self.client.pause_reading()
        self._admit()

    # --- client side ------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        n = len(data)
        self.bytes_in += n
        self.stats.bytes_in += n  # live totals: throughput panels need no teardown
        if self.backend_stats is not None:
            self.backend_stats.bytes_in += n
        self.last_activity = self.loop.time()
        upstream = self.upstream
        if upstream is not None:
            upstream.write(data)
            if self.bytes_in + self.bytes_out >= self.splice_after:
                self._try_splice()
            return
        self._hold(data)
        if self.preamble is not None:
            self._inspect()

    def _hold(self, data: bytes) -> None:
        """Keep bytes that arrive before the upstream is connected (the preamble, or a first read
        uvloop may deliver though reading was paused at accept); bounded by pausing the client."""
        if self.early is None:
            self.early = bytearray()
        self.early += data
        if len(self.early) >= EARLY_DATA_MAX and self.client is not None:
            if self.preamble is not None:
                self._refuse(RejectReason.BAD_CLIENT_HELLO)
            else:
                self.client.pause_reading()

    def _inspect(self) -> None:
        assert self.preamble is not None and self.early is not None
        in_header = self.preamble.in_header
        try:
            decision = self.preamble.feed(self.early)
        except Refused as exc:
            self._refuse(RejectReason(exc.reason.value))
            return
        except ProtocolError as exc:
            log.debug("%s: bad preamble from %s: %s", self.listener.name, self.peer, exc)
            self._refuse(RejectReason.BAD_PROXY_HEADER if in_header
                         else RejectReason.BAD_CLIENT_HELLO)
            return
        if decision is not None:
            self._decided(decision)

    def eof_received(self) -> bool:
        self.client_eof = True
        if self.reason is None:
            self.reason = EndReason.CLIENT_FIN
        if self.preamble is not None:  # closed before saying enough to be routed
            if self.inspect_handle is not None:
                self.inspect_handle.cancel()
            return False
        upstream = self.upstream
        if upstream is not None and not upstream.is_closing():
            upstream.write_eof()
        if self.upstream_eof:
            self._close_both()
        return True

    def pause_writing(self) -> None:
        if self.upstream is not None and not self.upstream.is_closing():
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None and not self.upstream.is_closing():
            self.upstream.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.spliced is not None:
            return  # the transport was closed on a duplicate: the splice owns the connection
        if exc is not None and self.reason is None:
            self.reason = EndReason.CLIENT_RESET
        if self.connect_task is not None and not self.connect_task.done():
            self.connect_task.cancel()
        if self.inspect_handle is not None:
            self.inspect_handle.cancel()
        upstream = self.upstream
        if upstream is not None:
            if exc is not None or self.reason is EndReason.IDLE_TIMEOUT:
                upstream.abort()
            else:
                upstream.close()
        self._teardown()

    # --- backend side (called by UpstreamProtocol) ---------------------------------------------------

    def from_backend(self, data: bytes) -> None:
        if not self.bytes_out:
            self.first_byte_at = time.perf_counter()
            self.stats.ttfb.observe(self.first_byte_at - self.started)
        n = len(data)
        self.bytes_out += n
        self.stats.bytes_out += n
        if self.backend_stats is not None:
            self.backend_stats.bytes_out += n
        self.last_activity = self.loop.time()
        assert self.client is not None
        self.client.write(data)
        if self.bytes_in + self.bytes_out >= self.splice_after:
            self._try_splice()

    def backend_eof(self) -> None:
        self.upstream_eof = True
        if self.reason is None:
            self.reason = EndReason.BACKEND_FIN
        client = self.client
        if client is not None and not client.is_closing():
            client.write_eof()
        if self.client_eof:
            self._close_both()

    def pause_client(self) -> None:
        if self.client is not None and not self.client.is_closing():
            self.client.pause_reading()

    def resume_client(self) -> None:
        if self.client is not None and not self.client.is_closing():
            self.client.resume_reading()

    def backend_lost(self, exc: Exception | None) -> None:
        if self.spliced is not None:
            return
        if exc is not None and self.reason is None:
            self.reason = EndReason.BACKEND_RESET
        client = self.client
        if client is not None and not client.is_closing():
            if exc is not None:
                client.abort()
            else:
                client.close()

    # --- connect, retry, idle ---------------------------------------------------------------------

    async def _connect(self) -> None:
        """Pick a backend and connect, retrying other backends on refusal or timeout."""
        listener = self.listener
        snapshot = self.pool.snapshot
        config = snapshot.config
        key = source_key(self.peer[0], self.peer[1], config.hash_key) if snapshot.needs_key else b""
        tried: set[int] = set()
        index = self._sticky_index(snapshot)
        for attempt in range(config.retries + 1):
            if index is None or index in tried:
                index = snapshot.picker.pick(key, tried)
            if index is None:
                break
            tried.add(index)
            if attempt:
                listener.stats.retried += 1
            if await self._try_backend(snapshot, index):
                if snapshot.affinity is not None and config.affinity is not None:
                    sticky = source_key(self.peer[0], self.peer[1], config.affinity.key)
                    snapshot.affinity.remember(sticky, snapshot.backends[index].id, self.loop.time())
                self.connect_task = None  # a finished Task is ~1 KiB per idle connection
                return
            index = None
        listener.stats.connect_failed += 1
        self.reason = EndReason.CONNECT_FAILED
        if self.client is not None:
            self.client.close()

    def _sticky_index(self, snapshot: PoolSnapshot) -> int | None:
        if snapshot.affinity is None or snapshot.config.affinity is None:
            return None
        sticky = source_key(self.peer[0], self.peer[1], snapshot.config.affinity.key)
        backend_id = snapshot.affinity.lookup(sticky, self.loop.time())
        if backend_id is None:
            return None
        for i, backend in enumerate(snapshot.backends):
            if backend.id == backend_id and backend.effective_weight > 0:
                return i
        return None

    async def _try_backend(self, snapshot: PoolSnapshot, index: int) -> bool:
        backend = snapshot.backends[index]
        stats = snapshot.stats[index]
        stats.active += 1  # a connect in progress counts as load for least-connections
        pool = self.pool
        began = time.perf_counter()
        # A timer handle rather than asyncio.timeout(): same effect, a third of the cost on the
        # new-connection path (measured with py-spy).
        task = self.connect_task
        timer = self.loop.call_later(snapshot.config.connect_timeout, _expire, task)
        try:
            transport = await open_connection(
                self.loop, lambda: UpstreamProtocol(self), backend.host, backend.port,
                snapshot.config, self.peer[0], stats.total)
        except asyncio.CancelledError as cancel:
            if task is None or cancel.args != (_CONNECT_TIMEOUT,):
                stats.active -= 1
                raise  # the client went away
            task.uncancel()
            exc: OSError | TimeoutError | None = TimeoutError(
                f"no connection in {snapshot.config.connect_timeout}s")
        except OSError as err:
            exc = err
        else:
            exc = None
        finally:
            timer.cancel()
        if exc is not None:
            stats.active -= 1
            log.debug("connect to %s failed: %r", backend.id, exc)
            if isinstance(exc, OSError) and exc.errno in _NO_SOURCE_PORT:
                self.listener.stats.source_port_failures += 1
            pool.report_connect_failure(backend.id)
            return False
        pool.report_connect_success(backend.id)
        stats.total += 1
        stats.connect_time.observe(time.perf_counter() - began)
        self.backend_id = backend.id
        self.backend_stats = stats
        self.upstream = transport
        client = self.client
        if client is None or client.is_closing():
            transport.abort()
            return True
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        client.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        if snapshot.config.proxy_protocol.send != "off":
            transport.write(outgoing_header(snapshot.config, self.peer,
                                            client.get_extra_info("sockname"), self.header,
                                            self.server_name))
        if self.early:
            transport.write(bytes(self.early))
            stats.bytes_in += len(self.early)  # counted for the listener when they arrived
        self.early = None
        if self.client_eof:
            transport.write_eof()
        if snapshot.config.zero_copy == "auto" and SPLICE and self.preamble is None:
            self.splice_after = snapshot.config.zero_copy_after
        self.last_activity = self.loop.time()
        idle = snapshot.config.idle_timeout
        if idle > 0:
            self.idle_handle = self.loop.call_later(idle, self._check_idle, idle)
        client.resume_reading()
        return True

    def _check_idle(self, idle: float) -> None:
        remaining = self.last_activity + idle - self.loop.time()
        if remaining > 0:
            self.idle_handle = self.loop.call_later(remaining, self._check_idle, idle)
            return
        self.idle_handle = None
        self.close(EndReason.IDLE_TIMEOUT)

    # --- teardown -----------------------------------------------------------------------------------

    # --- zero copy --------------------------------------------------------------------------------

    def _try_splice(self) -> None:
        """Move to splice(2) once both write buffers are empty (so no byte is reordered)."""
        client, upstream = self.client, self.upstream
        if client is None or upstream is None or self.client_eof or self.upstream_eof:
            self.splice_after = NEVER
            return
        if client.get_write_buffer_size() or upstream.get_write_buffer_size():
            return  # try again on the next chunk
        self.splice_after = NEVER
        client_sock = client.get_extra_info("socket")
        upstream_sock = upstream.get_extra_info("socket")
        if client_sock is None or upstream_sock is None:
            return
        self.spliced = Spliced(self.loop, os.dup(client_sock.fileno()), os.dup(upstream_sock.fileno()),
                               self._spliced_in, self._spliced_out, self._splice_ended)
        client.close()  # closes only the transports' descriptors: the sockets live on
        upstream.close()
        self.listener.stats.spliced += 1
        self.spliced.start()

    def _spliced_in(self, n: int) -> None:
        self.bytes_in += n
        self.stats.bytes_in += n
        if self.backend_stats is not None:
            self.backend_stats.bytes_in += n
        self.last_activity = self.loop.time()

    def _spliced_out(self, n: int) -> None:
        self.bytes_out += n
        self.stats.bytes_out += n
        if self.backend_stats is not None:
            self.backend_stats.bytes_out += n
        self.last_activity = self.loop.time()

    def _splice_ended(self, how: str) -> None:
        if how != "aborted" and (self.reason is None or how.endswith("_reset")):
            self.reason = EndReason(how)
        self._teardown()

    # --- teardown -----------------------------------------------------------------------------------

    def close(self, reason: EndReason) -> None:
        """Cut the connection now (idle timeout, shutdown deadline, operator)."""
        if self.reason not in (EndReason.CLIENT_RESET, EndReason.BACKEND_RESET):
            self.reason = reason  # a cut is how it ended, even after a half-close
        if self.spliced is not None:
            self.spliced.abort()
            return
        if self.upstream is not None:
            self.upstream.abort()
        if self.client is not None:
            self.client.abort()

    def _close_both(self) -> None:
        """Both sides sent FIN: close after flushing what is buffered."""
        if self.upstream is not None:
            self.upstream.close()
        if self.client is not None:
            self.client.close()

    def _teardown(self) -> None:
        if self.ended:
            return
        self.ended = True
        if self.idle_handle is not None:
            self.idle_handle.cancel()
        listener = self.listener
        stats = listener.stats
        stats.ended[self.reason or EndReason.CLIENT_FIN] += 1
        stats.duration.observe(time.perf_counter() - self.started)
        if self.backend_stats is not None:
            self.backend_stats.active -= 1
        listener.leave(self)
        listener.flow_ended(self)
