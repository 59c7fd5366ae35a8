"""The userspace TCP data path: one client protocol and one upstream protocol per connection.

Design, after Envoy's tcp_proxy and uvicorn's flow control:
- what the client sends while the upstream connects is held (bounded: past EARLY_DATA_MAX the
  client is paused), so a reset or FIN during the connect is seen at once; a PROXY header or a
  ClientHello is read first when the listener asks for one (the preamble, bounded in size and
  time);
- watermarks cross over: when one side's write buffer passes the high-water mark we stop reading
  the other side, and resume below the low-water mark, so memory per connection stays bounded;
- a FIN is forwarded as a FIN (`write_eof`), never as a close, so half-closed streams still deliver
  their replies; a reset is forwarded as a reset (SO_LINGER 0), after the bytes that came before
  it have been delivered (`resets.py`);
- the idle timer is one handle per connection, re-armed lazily from the last-activity time instead
  of being reset on every read; once either side has sent its FIN (or reset) it enforces the
  shorter `half_close_timeout`;
- every connection the listener accepts ends exactly once: refused (one reason, counted when
  refused, and out of the table at that moment) or ended (one reason, counted at teardown, when
  both sides are closed), so accepted = rejected + ended + active holds at every moment;
- a shortage of our own (descriptors, buffers, source ports) is `local_resource`, never a backend
  failure (`resources.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
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
from pointsman.proxy.resets import LINGER_RESET, ResetWhenSent, reset_transport
from pointsman.proxy.resources import BUDGET, FD_ERRNOS, MEMORY_ERRNOS, is_local
from pointsman.proxy.splice import SPLICE, Spliced
from pointsman.proxy.upstream import open_connection, outgoing_header
from pointsman.telemetry.flow import EndReason, RejectReason

if TYPE_CHECKING:
    from pointsman.config.model import PoolConfig
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
# A reason that says who ended it cleanly; a reset that follows overrides it.
_CLEAN = (None, EndReason.CLIENT_FIN, EndReason.BACKEND_FIN)
_RESETS = (EndReason.CLIENT_RESET, EndReason.BACKEND_RESET)


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
        "backend_id",
        "backend_stats",
        "bytes_in",
        "bytes_out",
        "client",
        "client_closed",
        "client_eof",
        "connect_task",
        "early",
        "ended",
        "fds",
        "first_byte_at",
        "half_limit",
        "header",
        "idle_handle",
        "idle_limit",
        "in_table",
        "inspect_handle",
        "last_activity",
        "listener",
        "loop",
        "peer",
        "pool",
        "preamble",
        "reason",
        "reject",
        "resetter",
        "resetting",
        "server_name",
        "source_checked",
        "source_key",
        "splice_after",
        "spliced",
        "started",
        "stats",
        "upstream",
        "upstream_closed",
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
        self.source_checked = False
        self.backend_id: str | None = None
        self.backend_stats: BackendStats | None = None
        self.peer: tuple[str, int] = ("", 0)
        self.reason: EndReason | None = None
        self.reject: RejectReason | None = None
        self.in_table = False
        self.spliced: Spliced | None = None
        self.splice_after = NEVER
        self.resetting: asyncio.Transport | None = None  # the side a reset is being forwarded to
        self.resetter: ResetWhenSent | None = None
        self.client_eof = False
        self.upstream_eof = False
        self.client_closed = False
        self.upstream_closed = False
        self.ended = False
        self.bytes_in = 0
        self.bytes_out = 0
        self.started = 0.0  # perf_counter: uvloop's loop.time() moves in 1 ms steps
        self.stats = listener.stats
        self.last_activity = 0.0
        self.first_byte_at = 0.0
        self.idle_limit = 0.0
        self.half_limit = 0.0
        self.fds = 2  # descriptors counted in BUDGET for us: the client's and, reserved, the backend's

    # --- accept and admission ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.client = transport
        self.started = time.perf_counter()
        listener = self.listener
        self.stats.accepted += 1
        reject = listener.admit()
        if reject is None and listener.acl is not None:  # allow/deny lists on the peer (issue 15)
            reject = listener.screen(self, transport)
        if reject is not None:
            self.stats.rejected[reject] += 1
            self.reject = reject
            self.ended = True
            transport.abort()
            self._release_fds()
            listener.flow_ended(self)
            return
        listener.enter(self)
        self.in_table = True
        if listener.set_nodelay:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        self.peer = (peer[0], peer[1]) if peer else ("", 0)
        preamble = listener.new_preamble(self.peer[0])
        if preamble is None:
            # Reading goes on while we connect (into `early`, bounded): a client that resets or
            # closes meanwhile is seen at once, and its first bytes are ready to forward.
            self._admit()
            return
        # Per-source limits during the preamble, on the TCP peer when no header can replace it.
        if not preamble.may_replace_peer and not self._admit_source():
            return
        self.preamble = preamble
        self.early = bytearray()
        listener.preamble_started(self)
        self.inspect_handle = self.loop.call_later(
            listener.inspect_timeout, self.refuse, RejectReason.INSPECT_TIMEOUT)

    def _admit_source(self) -> bool:
        """Per-source limits on the client address; False when refused."""
        reason, key = self.listener.admit_source(self.peer[0])
        if reason is not None:
            self.refuse(reason)
            return False
        self.source_key = key
        self.source_checked = True
        return True

    def _admit(self) -> None:
        """Per-source limits on the real client address, then connect."""
        if not self.source_checked and not self._admit_source():
            return
        pool = self.pool.route(self.listener.pools)  # this pool, or its fallback_pool
        if pool is None:
            self.refuse(RejectReason.NO_BACKEND)
            return
        self.pool = pool
        self.connect_task = self.loop.create_task(self._connect())

    def refuse(self, reason: RejectReason) -> None:
        """Refuse a connection in the table: counted once, out of the table now, closed at once,
        nothing forwarded. Later calls (a second reason) are ignored."""
        if self.reject is not None or self.ended:
            return
        self.stats.rejected[reason] += 1
        self.reject = reason
        if self.inspect_handle is not None:
            self.inspect_handle.cancel()
            self.inspect_handle = None
        self._leave()
        if self.client is not None:
            self.client.abort()

    def _decided(self, decision: Decision) -> None:
        """The preamble is complete: strip the PROXY header, take its client, pick the pool."""
        if self.inspect_handle is not None:
            self.inspect_handle.cancel()
            self.inspect_handle = None
        self.preamble = None
        listener = self.listener
        if listener.table_full():  # pending connections wait apart from the table; now it counts
            self.refuse(RejectReason.TABLE_FULL)
            return
        listener.preamble_done(self)
        if decision.consumed and self.early is not None:
            del self.early[: decision.consumed]
        if decision.client is not None:
            self.peer = decision.client
        self.header = decision.header
        self.server_name = decision.server_name
        self.stats.tls_unrouted += decision.unrouted
        self.pool = listener.pool_named(decision.pool)
        self._admit()

    # --- client side ------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.reject is not None:
            return  # refused: the abort is on its way
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

    def _hold(self, data: bytes) -> None:
        """Keep bytes that arrive before the upstream is connected (the preamble, or a first read
        uvloop may deliver though reading was paused at accept); bounded by pausing the client."""
        if self.early is None:
            self.early = bytearray()
        self.early += data
        if self.preamble is not None:
            self._inspect()
            if self.preamble is not None and self.reject is None and len(self.early) >= EARLY_DATA_MAX:
                self.refuse(RejectReason.BAD_PROXY_HEADER if self.preamble.in_header
                            else RejectReason.BAD_CLIENT_HELLO)
        elif len(self.early) >= EARLY_DATA_MAX and self.client is not None:
            self.client.pause_reading()

    def _inspect(self) -> None:
        assert self.preamble is not None and self.early is not None
        in_header = self.preamble.in_header
        try:
            decision = self.preamble.feed(self.early)
        except Refused as exc:
            self.refuse(RejectReason(exc.reason.value))
            return
        except ProtocolError as exc:
            log.debug("%s: bad preamble from %s: %s", self.listener.name, self.peer, exc)
            self.refuse(RejectReason.BAD_PROXY_HEADER if in_header
                        else RejectReason.BAD_CLIENT_HELLO)
            return
        if decision is not None:
            self._decided(decision)

    def eof_received(self) -> bool:
        self.client_eof = True
        self.last_activity = self.loop.time()
        if self.reason is None:
            self.reason = EndReason.CLIENT_FIN
        if self.preamble is not None:  # closed before saying enough to be routed
            if self.inspect_handle is not None:
                self.inspect_handle.cancel()
            return False
        upstream = self.upstream
        if upstream is not None and not upstream.is_closing():
            upstream.write_eof()
        self._half_closed()
        if self.upstream_eof:
            self._close_both()
        return True

    def pause_writing(self) -> None:
        if self.upstream is not None and not self.upstream.is_closing():
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        if self.resetting is not None and self.resetting is self.client:
            self._reset_now_sent()
            return
        if self.upstream is not None and not self.upstream.is_closing():
            self.upstream.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.spliced is not None:
            return  # the transport was closed on a duplicate: the splice owns the connection
        self.client_closed = True
        if exc is not None and self.reason in _CLEAN:
            self.reason = EndReason.CLIENT_RESET
        if self.connect_task is not None and not self.connect_task.done():
            self.connect_task.cancel()
        if self.inspect_handle is not None:
            self.inspect_handle.cancel()
        upstream = self.upstream
        if upstream is None or self.upstream_closed:
            self._teardown()
        elif exc is not None:
            self._forward_reset(upstream)  # teardown once the upstream is closed
        elif self.reason is EndReason.IDLE_TIMEOUT:
            upstream.abort()
        else:
            upstream.close()

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
        self.last_activity = self.loop.time()
        if self.reason is None:
            self.reason = EndReason.BACKEND_FIN
        client = self.client
        if client is not None and not client.is_closing():
            client.write_eof()
        self._half_closed()
        if self.client_eof:
            self._close_both()

    def pause_client(self) -> None:
        if self.client is not None and not self.client.is_closing():
            self.client.pause_reading()

    def resume_client(self) -> None:
        if self.resetting is not None and self.resetting is self.upstream:
            self._reset_now_sent()
            return
        if self.client is not None and not self.client.is_closing():
            self.client.resume_reading()

    def backend_lost(self, exc: Exception | None) -> None:
        if self.spliced is not None:
            return
        self.upstream_closed = True
        if exc is not None and self.reason in _CLEAN:
            self.reason = EndReason.BACKEND_RESET
        client = self.client
        if self.client_closed or client is None:
            self._teardown()
        elif exc is not None:
            self._forward_reset(client)
        elif not client.is_closing():
            client.close()

    # --- resets -------------------------------------------------------------------------------------

    def _forward_reset(self, transport: asyncio.Transport) -> None:
        """The other side reset: deliver what is buffered for this side, then reset it too."""
        if self.resetting is not None or transport.is_closing():
            return
        self.resetting = transport
        self.last_activity = self.loop.time()
        transport.pause_reading()
        self._half_closed()  # a peer that does not read gets half_close_timeout, then the RST
        if transport.get_write_buffer_size() == 0:
            self._reset_now_sent()
        else:  # resume_writing() once the transport's buffer is empty
            transport.set_write_buffer_limits(high=0, low=0)

    def _reset_now_sent(self) -> None:
        transport = self.resetting
        if transport is None or self.resetter is not None or transport.is_closing():
            return
        self.resetter = reset_transport(self.loop, transport)

    # --- connect, retry, idle ---------------------------------------------------------------------

    async def _connect(self) -> None:
        """Pick a backend and connect, retrying other backends on refusal or timeout. A shortage of
        our own refuses the connection (`local_resource`) and blames no backend; a source port
        shortage to one backend moves on to the next."""
        listener = self.listener
        snapshot = self.pool.snapshot
        config = snapshot.config
        key = source_key(self.peer[0], self.peer[1], config.hash_key) if snapshot.needs_key else b""
        tried: set[int] = set()
        index = self._sticky_index(snapshot)
        backend_failed = False
        for attempt in range(config.retries + 1):
            if index is None or index in tried:
                index = snapshot.picker.pick(key, tried)
            if index is None:
                break
            tried.add(index)
            if attempt:
                listener.stats.retried += 1
            exc = await self._try_backend(snapshot, index)
            if exc is None:
                if snapshot.affinity is not None and config.affinity is not None:
                    sticky = source_key(self.peer[0], self.peer[1], config.affinity.key)
                    snapshot.affinity.remember(sticky, snapshot.backends[index].id, self.loop.time())
                self.connect_task = None  # a finished Task is ~1 KiB per idle connection
                return
            if isinstance(exc, OSError) and is_local(exc):
                listener.local_error(_operation(exc, config), exc)
                if exc.errno in FD_ERRNOS or exc.errno in MEMORY_ERRNOS:
                    break  # another backend needs the same descriptor or buffer
            else:
                backend_failed = True
            index = None
        self.connect_task = None
        if tried and not backend_failed:  # only our own shortages: no backend is to blame
            self.refuse(RejectReason.LOCAL_RESOURCE)
            return
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

    async def _try_backend(self, snapshot: PoolSnapshot, index: int) -> BaseException | None:
        """Connect to one backend; None when connected (or the client left meanwhile), else the
        error. Only a backend's own failure is reported to the pool."""
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
            if not is_local(exc):
                pool.report_connect_failure(backend.id)
            return exc
        pool.report_connect_success(backend.id)
        client = self.client
        if client is None or client.is_closing() or self.client_closed:
            stats.active -= 1  # the client left while we connected: nothing to carry
            self.upstream_closed = True
            _reset_now(transport)
            return None
        stats.total += 1
        stats.connect_time.observe(time.perf_counter() - began)
        self.backend_id = backend.id
        self.backend_stats = stats
        self.upstream = transport
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        client.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        config = snapshot.config
        if config.proxy_protocol.send != "off":
            transport.write(outgoing_header(config, self.peer, client.get_extra_info("sockname"),
                                            self.header, self.server_name))
        if self.early:
            transport.write(bytes(self.early))
            stats.bytes_in += len(self.early)  # counted for the listener when they arrived
        self.early = None
        if self.client_eof:
            transport.write_eof()
        if config.zero_copy == "auto" and SPLICE:
            self.splice_after = config.zero_copy_after
        self.last_activity = self.loop.time()
        self.idle_limit = config.idle_timeout
        self.half_limit = config.half_close_timeout
        self._arm_timer(self._limit())
        client.resume_reading()
        if self.bytes_in + self.bytes_out >= self.splice_after:
            self._try_splice()  # enough came before the connect (zero_copy_after: 0, or early data)
        return None

    # --- idle and half-close timers ---------------------------------------------------------------

    @property
    def half_closed(self) -> bool:
        """A FIN (or a reset) has crossed in one direction."""
        return (self.client_eof or self.upstream_eof or self.resetting is not None
                or (self.spliced is not None and bool(self.spliced.first_fin)))

    def _limit(self) -> float:
        """Seconds without traffic that end the connection now (0: no limit)."""
        idle, half = self.idle_limit, self.half_limit
        if half > 0 and (idle <= 0 or half < idle) and self.half_closed:
            return half
        return idle

    def _arm_timer(self, limit: float) -> None:
        if self.idle_handle is not None:
            self.idle_handle.cancel()
            self.idle_handle = None
        if limit > 0:
            self.idle_handle = self.loop.call_at(self.last_activity + limit, self._check_idle)

    def _half_closed(self) -> None:
        """Called on the first FIN or reset: the FIN timer, if shorter, takes over now."""
        if self.half_limit > 0 and (self.idle_limit <= 0 or self.half_limit < self.idle_limit):
            self._arm_timer(self.half_limit)

    def _check_idle(self) -> None:
        limit = self._limit()
        self.idle_handle = None
        if limit <= 0:
            return
        remaining = self.last_activity + limit - self.loop.time()
        if remaining > 0:
            self.idle_handle = self.loop.call_later(remaining, self._check_idle)
            return
        self.close(EndReason.HALF_CLOSE_TIMEOUT if self.half_closed and limit == self.half_limit
                   else EndReason.IDLE_TIMEOUT)

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
        fds: list[int] = []
        try:
            fds.append(os.dup(client_sock.fileno()))
            fds.append(os.dup(upstream_sock.fileno()))
            spliced = Spliced(self.loop, fds[0], fds[1], self._spliced_in, self._spliced_out,
                              self._splice_ended, self._half_closed)
        except OSError as exc:  # out of descriptors for the duplicates or pipes
            for fd in fds:
                os.close(fd)
            self.listener.local_error("splice", exc)
            return  # stays on the transport path
        self.spliced = spliced
        BUDGET.used += 4  # two duplicates and two pipes; the transports' two go below
        self.fds += 4
        client.close()  # closes only the transports' descriptors: the sockets live on
        upstream.close()
        self.listener.stats.spliced += 1
        spliced.start()

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
        if how != "aborted" and (self.reason in _CLEAN or how.endswith("_reset")):
            self.reason = EndReason(how)
        self._teardown()

    # --- teardown -----------------------------------------------------------------------------------

    def close(self, reason: EndReason) -> None:
        """Cut the connection now (idle or FIN timeout, shutdown deadline, operator)."""
        if self.reason not in _RESETS:
            self.reason = reason  # a cut is how it ended, even after a half-close
        if self.spliced is not None:
            self.spliced.abort()
            return
        if self.resetter is not None:
            self.resetter.cancel()  # the reset being forwarded goes now
        elif self.resetting is not None and not self.resetting.is_closing():
            _reset_now(self.resetting)  # still flushing its buffer: reset now all the same
        if self.upstream is not None and not self.upstream_closed:
            self.upstream.abort()
        if self.client is not None and not self.client_closed:
            self.client.abort()

    def _close_both(self) -> None:
        """Both sides sent FIN: close after flushing what is buffered."""
        if self.upstream is not None:
            self.upstream.close()
        if self.client is not None:
            self.client.close()

    def _release_fds(self) -> None:
        """Give our descriptors back to the budget."""
        BUDGET.used -= self.fds
        self.fds = 0

    def _leave(self) -> None:
        if self.in_table:
            self.in_table = False
            self.listener.leave(self)

    def _teardown(self) -> None:
        if self.ended:
            return
        self.ended = True
        if self.idle_handle is not None:
            self.idle_handle.cancel()
        if self.resetter is not None:
            self.resetter.cancel()
        stats = self.stats
        if self.reject is None:
            stats.ended[self.reason or EndReason.CLIENT_FIN] += 1
            stats.duration.observe(time.perf_counter() - self.started)
        if self.backend_stats is not None:
            self.backend_stats.active -= 1
        self._release_fds()
        self._leave()
        self.listener.flow_ended(self)


def _reset_now(transport: asyncio.Transport) -> None:
    """Abort with a RST (nothing of ours is queued on it)."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    transport.abort()


def _operation(exc: OSError, config: PoolConfig) -> str:
    """Which call most likely failed, for the metric label: descriptors run out at socket(); a
    port or address at bind() when we chose the source, else at connect()."""
    if exc.errno in FD_ERRNOS:
        return "socket"
    if exc.errno in _NO_SOURCE_PORT and (config.source.mode == "transparent"
                                          or config.source.addresses):
        return "bind"
    return "connect"
