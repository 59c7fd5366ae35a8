"""The pure-Python connection engine: the reference for the compiled one, and the fallback.

Same API, same state machine and same batching as `_engine.pyx`: raw non-blocking sockets on a
private edge-triggered epoll, driven by one `loop.add_reader(epfd)`; no Task, transport or timer
handle per connection; timers in a wheel swept by one heartbeat.

Each socket is registered once for IN|OUT|RDHUP, edge-triggered; an event only sets the side's
`rd`/`wr` flags, and the connection then moves bytes while its flags allow. A read shorter than
asked clears `rd` (the next arrival makes a new edge), so an idle connection costs no syscall.

A connection goes PREAMBLE? -> CONNECTING -> RELAY -> (DRAIN) -> DONE:
- PREAMBLE: the client is read (at most `max_bytes`) and the bytes offered to the policy;
- CONNECTING: the client is read into the same buffer up to EARLY_DATA_MAX (held, sent after
  the connect), the backend socket connects;
- RELAY: each direction reads its source only when its destination has taken everything (so a
  connection holds at most one read per direction); a source's FIN becomes shutdown(SHUT_WR) on
  the destination once its bytes are out; after `splice_after` bytes with nothing buffered, the
  directions move to splice(2) through a pipe each;
- DRAIN: one side reset. Its socket is closed; what it sent before the reset is written to the
  other side, and once the other side's kernel has sent it all (SIOCOUTQNSD == 0), that side is
  closed with SO_LINGER {1, 0}: a reset arrives as a reset, after exactly the bytes before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import itertools
import logging
import mmap
import os
import random
import select
import socket
import struct
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from pointsman.balance.hashing import source_key, stable_hash64
from pointsman.balance.power_of_two import draw_two
from pointsman.balance.source_hash import scores as rendezvous_scores
from pointsman.proxy.engine.api import (
    ACCEPT_BACKOFF,
    ACCEPT_BATCH,
    BACKOFF_ERRNOS,
    CONNECTED,
    EARLY_DATA_MAX,
    ENGINE_ERROR,
    NEVER,
    PIPE_SIZE,
    POLICY_ERROR,
    READ_CHUNK,
    RECORD,
    TICK,
    WAKE_BUDGET,
    Connect,
    Decision,
    End,
    EngineStatistics,
    Flag,
    Hold,
    Keepalive,
    ListenerCounters,
    Op,
    Policy,
    ReadPreamble,
    Refuse,
    Status,
    classify,
    set_keepalive,
    set_nodelay,
)
from pointsman.proxy.engine.wheel import Wheel

log = logging.getLogger("pointsman.engine")

NAME = "python"
IP_TRANSPARENT = 19  # linux/in.h
SIOCOUTQNSD = 0x894B  # linux/sockios.h: bytes in the send queue not yet sent
F_SETPIPE_SZ = 1031
F_GETPIPE_SZ = 1032


def _pipe_slots(fd: int) -> int:
    """Make the pipe PIPE_SIZE when allowed; its capacity in buffers either way (0: unknown)."""
    try:
        size = fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        try:
            size = fcntl.fcntl(fd, F_GETPIPE_SZ)
        except OSError:
            return 0
    return size // mmap.PAGESIZE
_LINGER_RESET = struct.pack("ii", 1, 0)
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
_CONN_EVENTS = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET
_READ_EVENTS = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_HUP_EVENTS = select.EPOLLRDHUP | select.EPOLLHUP
_ERR_EVENTS = select.EPOLLHUP | select.EPOLLERR
# What a side's `hup` says: its FIN came (RDHUP) and nothing worse; or a reset or both ways shut.
HUP_FIN, HUP_ERR = 1, 2
_WRITE_EVENTS = select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP
_MAX_EVENTS = 256
_TICK_NS = int(TICK * 1e9)

PREAMBLE, CONNECTING, RELAY, DRAIN, DONE, HELD = range(6)
_OK, _SRC_RESET, _DST_RESET = range(3)


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


class Load:
    """The live load of one backend: its connections (connecting or connected, not ended)
    through every target that shares it (PyEngine.target's `load`), which a least-connections
    fast table scans and a power-of-two one compares."""

    __slots__ = ("__weakref__", "active")

    def __init__(self) -> None:
        self.active = 0


class PyTarget:
    """A backend address and the per-pool settings a connection to it uses; made once."""

    __slots__ = ("address", "backend", "connect_ns", "connected", "family", "half_close_ns",
                 "idle_ns", "keepalive", "load", "nodelay", "quiet", "source", "splice_after",
                 "transparent")

    def __init__(self, backend: int, host: str, port: int, source: str | None, transparent: bool,
                 connect_timeout: float, idle_timeout: float, half_close_timeout: float,
                 splice_after: int | None, nodelay: bool, keepalive: Keepalive | None,
                 quiet: bool = False, load: Load | None = None) -> None:
        self.family = socket.AF_INET6 if ":" in host else socket.AF_INET
        socket.inet_pton(self.family, host)  # numeric only: the policy resolves names
        if source is not None:
            socket.inet_pton(self.family, source)
        self.backend = backend
        self.address = (host, port)
        self.source = source
        self.transparent = transparent
        self.connect_ns = _ns(connect_timeout)
        self.idle_ns = _ns(idle_timeout)
        self.half_close_ns = _ns(half_close_timeout)
        self.splice_after = NEVER if splice_after is None or not hasattr(os, "splice") else splice_after
        self.nodelay = nodelay
        self.keepalive = None if keepalive is None else Keepalive(*keepalive).check()
        # Quiet: a success is not reported by connect_result, only counted here (and flagged
        # in the record); the policy reads the count when it needs the successes (api.py).
        self.quiet = quiet
        self.connected = 0
        # Connections assigned to it (connecting or connected, not ended), counted with those
        # of the targets that share its backend's load: what a least-connections fast table
        # scans (set_fast with weights).
        self.load = Load() if load is None else load

    @property
    def active(self) -> int:
        """The connections to its backend through it and every target sharing its load."""
        return self.load.active


def _weights(weights: Sequence[float] | None,
             targets: Sequence[PyTarget]) -> tuple[float, ...] | None:
    """A table's weights, one per target (least connections, a weighted source hash)."""
    if weights is None:
        return None
    if len(weights) != len(targets) or min(weights) <= 0:
        raise ValueError("fast table weights: one above 0 per target")
    return tuple(float(w) for w in weights)


def _lookup(lookup: Sequence[int] | None, targets: Sequence[PyTarget]) -> tuple[int, ...] | None:
    """A hash table's slots (None: no hashing), each an index into `targets`."""
    if lookup is None:
        return None
    table = tuple(lookup)
    if not table or min(table) < 0 or max(table) >= len(targets):
        raise ValueError("hash lookup: every slot an index into the targets")
    return table


def _names(names: Sequence[bytes] | None, targets: Sequence[PyTarget]) -> tuple[bytes, ...] | None:
    """A rendezvous table's backend ids (None: not rendezvous), one per target."""
    if names is None:
        return None
    table = tuple(names)
    if len(table) != len(targets) or any(type(name) is not bytes for name in table):
        raise ValueError("rendezvous names: one bytes per target")
    return table


def _client_key(lst: _Listener, addr: Any) -> bytes:
    return source_key(addr[0], addr[1], "source_ip_port" if lst.key_port else "source_ip")


def _hashed(lst: _Listener, fast: tuple[PyTarget, ...], lookup: tuple[int, ...],
            addr: Any) -> PyTarget:
    """The target of the client key's slot: the Maglev picker's pick, to the bit."""
    return fast[lookup[stable_hash64(_client_key(lst, addr)) % len(lookup)]]


def _rendezvous(lst: _Listener, fast: tuple[PyTarget, ...], names: tuple[bytes, ...],
                addr: Any) -> PyTarget:
    """The source hash picker's pick, by its own scores (balance/source_hash.py): the
    highest wins, the first on a tie."""
    ranked = rendezvous_scores(_client_key(lst, addr), names, lst.weights)
    return fast[ranked.index(max(ranked))]


def _ends(weights: tuple[float, ...] | None) -> list[float]:
    """The running sums of a power-of-two table's weights (as the picker's wheel)."""
    if weights is None:
        raise ValueError("a sampled table needs its weights")
    return list(itertools.accumulate(weights))


_RNG = random.Random()  # the engine's own random numbers (power of two's samples)


def _two(fast: tuple[PyTarget, ...], weights: tuple[float, ...], ends: list[float]) -> PyTarget:
    """balance/power_of_two.py's pick with the engine's own random numbers and counts: two
    distinct weighted samples, the lower active / weight wins, the first on a tie."""
    if len(fast) == 1:
        return fast[0]
    first, second = draw_two(ends, weights, _RNG.random)
    a, b = fast[first], fast[second]
    return b if b.load.active / weights[second] < a.load.active / weights[first] else a


def _least(lst: _Listener, fast: tuple[PyTarget, ...], weights: tuple[float, ...]) -> PyTarget:
    """The fewest active connections per weight, the first in scan order on a tie; the next
    scan starts one past the winner (as LeastConnections.pick)."""
    count = len(fast)
    position = lst.fast_next
    best = -1
    best_score = 0.0
    for _ in range(count):
        score = fast[position].load.active / weights[position]
        if best < 0 or score < best_score:
            best = position
            best_score = score
        position += 1
        if position == count:
            position = 0
    lst.fast_next = best + 1 if best + 1 < count else 0
    return fast[best]


class _Listener:
    __slots__ = ("accept_errors", "accepted", "active", "admits", "bytes_in", "bytes_out",
                 "connects", "credit", "ended", "ends", "family", "fast", "fast_next", "fd", "id",
                 "key_port", "lookup", "names", "nodelay", "on_accept", "on_accept_error", "on_admitted",
                 "on_connect", "on_connected", "on_ended", "on_preamble", "paused", "policy",
                 "records", "refused", "snapshot", "sock", "spliced", "stopped", "watch",
                 "weights")

    def __init__(self, lid: int, sock: socket.socket, policy: Policy, nodelay: bool) -> None:
        self.id = lid
        self.sock = sock
        self.fd = sock.fileno()
        self.family = sock.family
        self.policy = policy
        self.on_accept = policy.accepted
        self.on_preamble = policy.preamble
        self.on_connect = policy.connect_result
        self.on_ended = policy.ended
        self.on_accept_error: Callable[[int], object] | None = getattr(policy, "accept_error", None)
        # Fast admission (PyEngine.set_fast): while `credit` lasts and `watch.snapshot is
        # snapshot`, a new connection goes to the next of `fast` without a call; `admits` holds
        # them until the policy's `admitted`.
        self.on_admitted: Callable[[list[tuple[int, int, int, str, int]]], object] | None = (
            getattr(policy, "admitted", None))
        self.fast: tuple[PyTarget, ...] | None = None
        self.fast_next = 0
        self.credit = 0
        self.weights: tuple[float, ...] | None = None  # least connections: fast's weights
        # A hash pool (Maglev): slot -> index into fast (None: no hashing), and whether the
        # client's port is part of the key (hash_key: source_ip_port).
        self.lookup: tuple[int, ...] | None = None
        self.key_port = False
        self.names: tuple[bytes, ...] | None = None  # source hash: each target's backend id
        self.ends: list[float] | None = None  # power of two: the weights' running sums
        self.watch: Any = None
        self.snapshot: Any = None
        self.admits: list[tuple[int, int, int, str, int]] = []
        # Quiet successes (api.CONNECTED) for the policy's optional `connected`, once per
        # wake-up, after `admitted` and before `ended`.
        self.on_connected: Callable[[bytes], object] | None = getattr(policy, "connected", None)
        self.connects = bytearray()
        self.nodelay = nodelay
        self.records = bytearray()
        self.paused = False
        self.stopped = False
        self.accepted = self.refused = self.ended = self.active = 0
        self.bytes_in = self.bytes_out = self.spliced = self.accept_errors = 0

    def counters(self) -> ListenerCounters:
        return ListenerCounters(self.accepted, self.refused, self.ended, self.active,
                                self.bytes_in, self.bytes_out, self.spliced, self.accept_errors)


class _Side:
    """One socket of a connection and its edge-triggered readiness."""

    __slots__ = ("conn", "fd", "hup", "rd", "sock", "wr")

    def __init__(self, sock: socket.socket, conn: _Conn) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.conn = conn
        self.rd = False
        self.wr = False
        self.hup = 0  # HUP_FIN or HUP_ERR once epoll said so


class _Dir:
    """One direction: bytes read from `src` not yet taken by `dst`, and its FIN."""

    __slots__ = ("eof", "fin_sent", "pending", "pipe_len", "pipe_r", "pipe_slots", "pipe_w")

    def __init__(self) -> None:
        self.pending: bytes | bytearray | memoryview | None = None
        self.eof = False
        self.fin_sent = False
        self.pipe_r = -1
        self.pipe_w = -1
        self.pipe_len = 0
        self.pipe_slots = 0  # the pipe's capacity in buffers (pages): see _pump_splice


class _Conn:
    __slots__ = ("backend", "bytes_in", "bytes_out", "client", "down", "drain_deadline",
                 "drain_up", "first", "first_fin", "flags", "halfclosed", "id", "kill", "last",
                 "last_err", "last_status", "lst", "peer", "preamble", "reason", "splice_after",
                 "state", "t_attempt", "t_connect", "t_first", "t_start", "target", "tdue",
                 "tslot", "up")

    def __init__(self, cid: int, lst: _Listener, now: int, peer: str) -> None:
        self.id = cid
        self.lst = lst
        self.peer = peer
        self.state = PREAMBLE
        self.client: _Side | None = None
        self.backend: _Side | None = None
        self.up = _Dir()  # client -> backend
        self.down = _Dir()  # backend -> client
        self.t_start = now
        self.t_attempt = self.t_connect = self.t_first = 0
        self.last = now
        self.bytes_in = self.bytes_out = 0
        self.target: PyTarget | None = None
        self.first = b""
        self.preamble: ReadPreamble | None = None
        self.flags = 0
        self.first_fin = 0
        self.halfclosed = False
        self.splice_after = NEVER
        self.drain_up = True
        self.drain_deadline = 0
        self.reason = 0
        self.kill = -1
        self.last_err = 0
        self.last_status = Status.OK
        self.tslot = -1
        self.tdue = 0


class PyEngine:
    """Owns TCP connections' I/O on one event loop; see the module docstring and api.py."""

    name = NAME
    waits_for_loop = False  # one add_reader always: the wait for uvloop is the compiled engine's

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._ep = select.epoll()
        self._epfd = self._ep.fileno()
        self._fds: dict[int, _Side | _Listener] = {}
        self._conns: dict[int, _Conn] = {}
        self._listeners: dict[int, _Listener] = {}
        self._ids = itertools.count(1)
        self._lids = itertools.count(0)
        self._rbuf = bytearray(READ_CHUNK)
        self._rview = memoryview(self._rbuf)
        self.now = time.monotonic_ns()
        self._wheel: Wheel[_Conn] = Wheel(self.now // _TICK_NS)
        self._draining: set[_Conn] = set()
        self._again: list[_Conn] = []
        self._kills: list[_Conn] = []
        self._dirty: list[_Listener] = []
        self._admitting: list[_Listener] = []  # with fast admissions not yet handed over
        self._connecting: list[_Listener] = []  # with quiet successes not yet handed over
        self._paused: list[_Listener] = []
        self._resume_at = 0
        self._busy = 0
        self._tick_handle: asyncio.TimerHandle | None = None
        self._soon: asyncio.Handle | None = None
        self._accept_errors: dict[int, int] = {}
        self._local_errors: dict[tuple[int, int], int] = {}
        self._closing: list[socket.socket] = []  # closed after the poll round (see _close)
        self._errno = 0  # the error of the last failed send/recv/splice/shutdown (see _reset)
        self._closed = False
        # The backends' loads by the policy's key (target's `load`), while a target holds one.
        self._loads: weakref.WeakValueDictionary[object, Load] = weakref.WeakValueDictionary()
        loop.add_reader(self._epfd, self._on_ready)

    # --- the public API ---------------------------------------------------------------------------

    def target(self, backend: int, host: str, port: int, *, source: str | None = None,
               transparent: bool = False, connect_timeout: float = 5.0, idle_timeout: float = 300.0,
               half_close_timeout: float = 30.0, splice_after: int | None = None,
               nodelay: bool = True, keepalive: Keepalive | None = None,
               quiet: bool = False, load: object = None) -> PyTarget:
        """A target; those made with the same `load` key (the policy's: its backend's stats)
        share one count of their connections, so a least-connections or power-of-two table
        compares every connection to the backend in this engine, whichever listener's target
        or whichever target (one made before a reload) it went through."""
        shared = None
        if load is not None:
            shared = self._loads.get(load)
            if shared is None:
                shared = self._loads[load] = Load()
        return PyTarget(backend, host, port, source, transparent, connect_timeout, idle_timeout,
                        half_close_timeout, splice_after, nodelay, keepalive, quiet, shared)

    def add_listener(self, sock: socket.socket, policy: Policy, *, nodelay: bool = True,
                     keepalive: Keepalive | None = None) -> int:
        """Accept on `sock` (listening; stays the caller's to close after `stop_listener`).
        `keepalive` is set on `sock` itself (None: off, so a socket handed over by systemd or
        an earlier run keeps no stale setting): the sockets accepted from it inherit it."""
        set_keepalive(sock, None if keepalive is None else Keepalive(*keepalive).check())
        # TCP_NODELAY too: Linux copies it to every accepted socket (no system call each).
        inherited = set_nodelay(sock, nodelay)
        sock.setblocking(False)
        lst = _Listener(next(self._lids), sock, policy, nodelay and not inherited)
        self._listeners[lst.id] = lst
        self._fds[lst.fd] = lst
        self._ep.register(lst.fd, select.EPOLLIN)
        return lst.id

    def set_listener_keepalive(self, lid: int, keepalive: Keepalive | None) -> None:
        """Keepalive for the connections this listener accepts from now on (None: off)."""
        set_keepalive(self._listeners[lid].sock,
                      None if keepalive is None else Keepalive(*keepalive).check())

    def stop_listener(self, lid: int) -> None:
        """Accept no more on this listener; its connections go on."""
        lst = self._listeners[lid]
        if lst.stopped:
            return
        lst.stopped = True
        if not lst.paused:
            with contextlib.suppress(OSError, ValueError):
                self._ep.unregister(lst.fd)
        self._fds.pop(lst.fd, None)

    def set_fast(self, lid: int, targets: Sequence[PyTarget] | None = None, start: int = 0,
                 credit: int = 0, watch: Any = None, snapshot: Any = None,
                 weights: Sequence[float] | None = None, lookup: Sequence[int] | None = None,
                 key_port: bool = False, names: Sequence[bytes] | None = None,
                 sampled: bool = False) -> None:
        """Fast admission for a listener whose policy has `admitted`: while `credit` lasts and
        `watch.snapshot is snapshot`, each new connection goes to the next of `targets` (in
        turn, from `start`) with no call; the policy gets them in `admitted(batch)` (conn_id,
        backend, accepted ns, host, port) before any other call about this listener, and at
        the end of the wake-up. With `weights` (one per target, above 0), to the target with
        the fewest active connections per weight instead, the scan starting at `start` and
        then one past the last winner (balance/least_connections.py), by the engine's own
        count per target (every connection through it, from its connect to its end or retry).
        With `lookup` (a Maglev table: slot -> index into `targets`), to the target of the
        client key's slot, the key and hash as balance/hashing.py's (`key_port`: the port is
        in the key). With `names` (each target's backend id), by weighted rendezvous hashing of
        that key as balance/source_hash.py (`weights` None: equal weights). With `sampled` (and
        `weights`), by two weighted random choices, the lower active / weight winning, as
        balance/power_of_two.py with the engine's own counts. None (or no targets) turns it
        off."""
        lst = self._listeners[lid]
        self._flush_admits(lst)
        if not targets or lst.on_admitted is None:
            lst.fast = lst.watch = lst.snapshot = lst.weights = lst.lookup = lst.names = None
            lst.ends = None
            lst.credit = 0
            return
        if any(type(target) is not PyTarget for target in targets):
            raise TypeError("fast targets are this engine's targets")
        lst.weights = _weights(weights, targets)
        lst.lookup = _lookup(lookup, targets)
        lst.names = _names(names, targets)
        lst.ends = _ends(lst.weights) if sampled else None
        lst.key_port = key_port
        lst.fast = tuple(targets)
        lst.fast_next = start % len(lst.fast)
        lst.credit = credit
        lst.watch = watch
        lst.snapshot = snapshot

    def set_credit(self, lid: int, credit: int) -> int:
        """How many more connections the listener may admit on its fast path; returns the
        credit it replaces (what is left of the last one)."""
        lst = self._listeners[lid]
        left, lst.credit = lst.credit, credit
        return left

    def pause_listener(self, lid: int) -> None:
        """Accept nothing for ACCEPT_BACKOFF, or until one of the engine's connections closes
        (the policy's descriptor budget is spent: new connections wait in the backlog)."""
        lst = self._listeners[lid]
        if not lst.stopped:
            self._pause(lst)
            self._after_call()

    def close(self, conn_id: int, code: int) -> bool:
        """Cut one connection (reset both sides); its record says End.CLOSED, detail `code`."""
        conn = self._conns.get(conn_id)
        if conn is None:
            return False
        self._cut(conn, code)
        self._after_call()
        return True

    def resume(self, conn_id: int, decision: Decision) -> bool:
        """Continue a held connection (`Hold`) with a target, `Connect` or `Refuse`. False when
        it is not held (ended meanwhile, or never held)."""
        conn = self._conns.get(conn_id)
        if conn is None or conn.state != HELD:
            return False
        conn.state = PREAMBLE  # the state a decision after accept starts from
        self._busy += 1
        try:
            self._apply(conn, decision)
        except Exception:
            log.exception("engine: internal error on connection %d; it is cut", conn_id)
            if conn.state != DONE:
                self._end(conn, End.CLOSED, ENGINE_ERROR, rst_client=True, rst_backend=True)
        finally:
            self._busy -= 1
        self._after_call()
        return True

    def close_backend(self, backend: int, code: int) -> int:
        victims = [c for c in self._conns.values() if c.target is not None and c.target.backend == backend]
        for conn in victims:
            self._cut(conn, code)
        self._after_call()
        return len(victims)

    def close_all(self, code: int, listener: int | None = None) -> int:
        victims = [c for c in self._conns.values() if listener is None or c.lst.id == listener]
        for conn in victims:
            self._cut(conn, code)
        self._after_call()
        return len(victims)

    def active(self, listener: int | None = None) -> int:
        if listener is None:
            return len(self._conns)
        return self._listeners[listener].active

    def sockname(self, conn_id: int) -> tuple[str, int] | None:
        """The local address the client connected to (for a PROXY header's destination)."""
        conn = self._conns.get(conn_id)
        if conn is None or conn.client is None:
            return None
        name = conn.client.sock.getsockname()
        return (name[0], name[1])

    def buffered(self, conn_id: int) -> tuple[int, int] | None:
        """Bytes held for one connection (up, down): in our buffers, or in its pipes once
        spliced. None once it ended."""
        conn = self._conns.get(conn_id)
        if conn is None:
            return None
        return (len(conn.up.pending or b"") + conn.up.pipe_len,
                len(conn.down.pending or b"") + conn.down.pipe_len)

    def is_connected(self, conn_id: int) -> bool:
        """Whether this connection reached its backend (False once it ended): what a policy
        that takes quiet successes asks before it acts on the backend of an open connection."""
        conn = self._conns.get(conn_id)
        return conn is not None and conn.t_connect != 0

    def connections(self) -> list[int]:
        """Ids of the live connections."""
        return list(self._conns)

    def listener_stats(self, lid: int) -> ListenerCounters:
        return self._listeners[lid].counters()

    def statistics(self) -> EngineStatistics:
        return EngineStatistics(dict(self._accept_errors), dict(self._local_errors), len(self._conns))

    def shutdown(self, code: int) -> int:
        """Stop every listener, cut every connection, release the epoll descriptor."""
        if self._closed:
            return 0
        for lid in list(self._listeners):
            self.stop_listener(lid)
        cut = self.close_all(code)
        self._close_now()
        self._closed = True
        self.loop.remove_reader(self._epfd)
        for handle in (self._tick_handle, self._soon):
            if handle is not None:
                handle.cancel()
        self._ep.close()
        return cut

    # --- wake-ups ---------------------------------------------------------------------------------

    def _on_ready(self) -> None:
        self._busy += 1
        try:
            self.now = time.monotonic_ns()
            for _ in range(4):
                events = self._ep.poll(0, _MAX_EVENTS)
                for fd, mask in events:
                    try:
                        self._event(fd, mask)
                    except Exception:  # one connection's bug must not stall the batch
                        self._contain(fd)
                self._close_now()
                if not events:  # more came while these were handled: take them now (docs)
                    break
            self._sweep()
        finally:
            self._busy -= 1
            self._after_call()

    def _run_again(self) -> None:
        self._soon = None
        self._busy += 1
        try:
            self.now = time.monotonic_ns()
            again, self._again = self._again, []
            for conn in again:
                if conn.state != DONE:
                    self._advance(conn)
        finally:
            self._busy -= 1
            self._after_call()

    def _tick(self) -> None:
        self._tick_handle = None
        self._busy += 1
        try:
            self.now = time.monotonic_ns()
            self._sweep()
        finally:
            self._busy -= 1
            self._after_call()

    def _sweep(self) -> None:
        """Fire due timers, re-check draining resets, resume listeners after an accept backoff."""
        for conn in self._wheel.expire(self.now // _TICK_NS):
            self._expire(conn)
        for conn in list(self._draining):
            self._drain(conn)
        if self._paused and self.now >= self._resume_at:
            self._resume_listeners()

    def _after_call(self) -> None:
        """End of a wake-up or an operator call: deferred cuts, records out, heartbeat armed."""
        if self._busy or self._closed:
            return
        while self._kills:
            kills, self._kills = self._kills, []
            for conn in kills:
                self._end(conn, End.CLOSED, conn.kill, rst_client=True, rst_backend=True)
        self._close_now()
        self._flush_records()
        if self._again and self._soon is None:
            self._soon = self.loop.call_soon(self._run_again)
        if self._tick_handle is None and (self._wheel.count or self._draining or self._paused):
            self._tick_handle = self.loop.call_later(TICK, self._tick)

    def _close_now(self) -> None:
        closing, self._closing = self._closing, []
        for sock in closing:
            sock.close()

    def _close(self, sock: socket.socket, reset: bool) -> None:
        """Close a socket at the end of the poll round, a reset first where asked. Deferred
        because the kernel reuses a closed descriptor number at the next accept or socket(),
        and events already read for the old socket would then be taken for the new one's."""
        if reset:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        self._fds.pop(sock.fileno(), None)
        self._closing.append(sock)

    def _flush_records(self) -> None:
        while self._admitting or self._connecting or self._dirty:
            while self._admitting:  # before the rest: a fast connection may have ended already
                admitting, self._admitting = self._admitting, []
                for lst in admitting:
                    self._flush_admits(lst)
            while self._connecting:  # before the records: a connection may have ended already
                connecting, self._connecting = self._connecting, []
                for lst in connecting:
                    self._flush_connects(lst)
            dirty, self._dirty = self._dirty, []
            for lst in dirty:
                if lst.connects:  # connected and ended inside an earlier listener's `ended`
                    self._flush_connects(lst)
                records = bytes(lst.records)
                lst.records.clear()
                try:
                    lst.on_ended(records)
                except Exception:
                    log.exception("engine: policy.ended raised")

    def _contain(self, fd: int) -> None:
        log.exception("engine: internal error on descriptor %d; its connection is cut", fd)
        owner = self._fds.get(fd)
        if isinstance(owner, _Side) and owner.conn is not None and owner.conn.state != DONE:
            self._end(owner.conn, End.CLOSED, ENGINE_ERROR, rst_client=True, rst_backend=True)

    def _event(self, fd: int, mask: int) -> None:
        owner = self._fds.get(fd)
        if owner is None:
            return
        if type(owner) is _Listener:
            self._accept(owner)
            return
        assert isinstance(owner, _Side)
        side = owner
        if mask & _READ_EVENTS:
            side.rd = True
        if mask & _HUP_EVENTS:
            side.hup = HUP_ERR if mask & _ERR_EVENTS or side.hup == HUP_ERR else HUP_FIN
        if mask & _WRITE_EVENTS:
            side.wr = True
        conn = side.conn
        if conn.state == CONNECTING and side is conn.backend:
            self._check_connect(conn, mask)
        else:
            self._advance(conn)

    # --- accept -----------------------------------------------------------------------------------

    def _accept(self, lst: _Listener) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                fd, addr = lst.sock._accept()  # type: ignore[attr-defined]
            except BlockingIOError:
                return
            except InterruptedError:
                continue
            except OSError as exc:
                lst.accept_errors += 1
                err = exc.errno or errno.EIO
                self._accept_errors[err] = self._accept_errors.get(err, 0) + 1
                self._tell_accept_error(lst, err)
                if err in BACKOFF_ERRNOS:
                    self._pause(lst)
                    return
                continue
            if lst.stopped:
                os.close(fd)
                return
            self._new_conn(lst, fd, addr)
            if lst.paused:  # the policy asked for a pause (pause_listener)
                return

    def _tell_accept_error(self, lst: _Listener, err: int) -> None:
        """Accept errors are rare and the policy logs them: one call each."""
        if lst.on_accept_error is not None:
            try:
                lst.on_accept_error(err)
            except Exception:
                log.exception("engine: policy.accept_error raised")

    def _pause(self, lst: _Listener) -> None:
        """Out of descriptors or memory: stop accepting for ACCEPT_BACKOFF or until a close."""
        if lst.paused:
            return
        lst.paused = True
        self._ep.unregister(lst.fd)
        self._paused.append(lst)
        self._resume_at = self.now + _ns(ACCEPT_BACKOFF)

    def _resume_listeners(self) -> None:
        paused, self._paused = self._paused, []
        for lst in paused:
            lst.paused = False
            if not lst.stopped:
                self._ep.register(lst.fd, select.EPOLLIN)

    def _new_conn(self, lst: _Listener, fd: int, addr: Any) -> None:
        sock = socket.socket(lst.family, socket.SOCK_STREAM, 0, fd)
        sock.setblocking(False)
        if lst.nodelay:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        cid = next(self._ids)
        conn = _Conn(cid, lst, self.now, addr[0])
        conn.client = _Side(sock, conn)
        lst.accepted += 1
        lst.active += 1
        self._conns[cid] = conn
        if lst.credit > 0 and lst.fast is not None and lst.watch.snapshot is lst.snapshot:
            self._admit(lst, conn, addr)
            return
        decision = self._call(conn, lst.on_accept, cid, addr[0], addr[1])
        if conn.state == DONE:
            return
        try:
            if type(decision) is not Refuse:
                self._fds[conn.client.fd] = conn.client
                # No read yet: registering reports what is already there (docs/engine.md).
                self._ep.register(conn.client.fd, _CONN_EVENTS)
            self._apply(conn, decision)
        except Exception:  # the listener's event cannot name this connection: contain it here
            log.exception("engine: internal error on connection %d; it is cut", cid)
            if conn.state != DONE:
                self._end(conn, End.CLOSED, ENGINE_ERROR, rst_client=True, rst_backend=True)

    def _admit(self, lst: _Listener, conn: _Conn, addr: Any) -> None:
        """Fast admission: the next target of the listener's table, no policy call."""
        fast = lst.fast
        assert fast is not None and conn.client is not None
        if lst.lookup is not None:
            target = _hashed(lst, fast, lst.lookup, addr)
        elif lst.names is not None:
            target = _rendezvous(lst, fast, lst.names, addr)
        elif lst.ends is not None:
            assert lst.weights is not None
            target = _two(fast, lst.weights, lst.ends)
        elif lst.weights is not None:
            target = _least(lst, fast, lst.weights)
        else:
            target = fast[lst.fast_next]
            lst.fast_next += 1
            if lst.fast_next == len(fast):
                lst.fast_next = 0
        lst.credit -= 1
        lst.admits.append((conn.id, target.backend, conn.t_start, addr[0], addr[1]))
        if len(lst.admits) == 1:
            self._admitting.append(lst)
        try:
            self._fds[conn.client.fd] = conn.client
            self._ep.register(conn.client.fd, _CONN_EVENTS)
            self._apply(conn, target)
        except Exception:
            log.exception("engine: internal error on connection %d; it is cut", conn.id)
            if conn.state != DONE:
                self._end(conn, End.CLOSED, ENGINE_ERROR, rst_client=True, rst_backend=True)

    def _flush_admits(self, lst: _Listener) -> None:
        """Hand the listener's fast admissions to its policy (before any other call of it)."""
        if not lst.admits:
            return
        batch, lst.admits = lst.admits, []
        assert lst.on_admitted is not None
        self._hand(lst.on_admitted, batch, "admitted")

    def _flush_connects(self, lst: _Listener) -> None:
        """Hand the listener's quiet successes to its policy (after its admissions, before its
        records: the connections they name are still in its table)."""
        if not lst.connects:
            return
        entries = bytes(lst.connects)
        lst.connects.clear()
        assert lst.on_connected is not None
        self._hand(lst.on_connected, entries, "connected")

    def _hand(self, callback: Callable[[Any], object], batch: Any, what: str) -> None:
        """One batch to the policy; a raise is logged (the batch is the policy's from now)."""
        self._busy += 1
        try:
            callback(batch)
        except Exception:
            log.exception("engine: policy.%s raised", what)
        finally:
            self._busy -= 1

    def _call(self, conn: _Conn, fn: Callable[..., Any], *args: Any) -> Any:
        """Call the policy; a raise refuses the connection (logged), a cut from inside is seen."""
        self._flush_admits(conn.lst)
        self._busy += 1
        try:
            result = fn(*args)
        except Exception:
            log.exception("engine: policy raised; connection %d refused", conn.id)
            result = Refuse(POLICY_ERROR)
        finally:
            self._busy -= 1
        if conn.kill >= 0 and conn.state != DONE:
            self._end(conn, End.CLOSED, conn.kill, rst_client=True, rst_backend=True)
        return result

    # --- decisions --------------------------------------------------------------------------------

    def _apply(self, conn: _Conn, decision: Decision | None) -> None:
        kind = type(decision)
        if kind is PyTarget:
            assert isinstance(decision, PyTarget)
            self._connect(conn, decision, b"", 0, None)
        elif kind is Connect:
            assert isinstance(decision, Connect)
            if type(decision.target) is not PyTarget:
                self._policy_error(conn, decision)
                return
            target = decision.target
            assert isinstance(target, PyTarget)
            self._connect(conn, target, decision.send_first, decision.consume, decision.source)
        elif kind is Refuse:
            assert isinstance(decision, Refuse)
            self._end(conn, End.REFUSED, decision.code, rst_backend=True)
        elif kind is ReadPreamble and conn.state == PREAMBLE and conn.preamble is None:
            assert isinstance(decision, ReadPreamble)
            conn.preamble = decision
            self._arm(conn)
            self._read_preamble(conn)
        elif kind is Hold and conn.state == PREAMBLE and conn.preamble is None:
            conn.state = HELD
            self._wheel.remove(conn)
            self._check_held(conn)
        elif decision is None and conn.last_err:
            reason = End.LOCAL_RESOURCE if conn.last_status == Status.LOCAL else End.CONNECT_FAILED
            self._end(conn, reason, conn.last_err)
        else:
            self._policy_error(conn, decision)

    def _check_held(self, conn: _Conn) -> None:
        """A held client that hung up (FIN or reset) has given up: it ends now."""
        client = conn.client
        assert client is not None
        if not (client.hup or conn.up.eof):
            return
        err = client.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._reset(conn, True, err)
        else:
            self._fin(conn, Flag.CLIENT_FIN)
            self._end(conn, End.CLIENT_FIN)

    def _policy_error(self, conn: _Conn, decision: object) -> None:
        log.error("engine: policy returned %r; connection %d refused", decision, conn.id)
        self._end(conn, End.REFUSED, POLICY_ERROR, rst_backend=True)

    def _read_preamble(self, conn: _Conn) -> None:
        preamble = conn.preamble
        assert preamble is not None
        if not self._hold(conn, preamble.max_bytes):
            if conn.up.eof and conn.state == PREAMBLE:
                self._end(conn, End.CLIENT_FIN)
            return
        pending = conn.up.pending
        assert isinstance(pending, bytearray)
        decision = self._call(conn, conn.lst.on_preamble, conn.id, bytes(pending))
        if conn.state == DONE:
            return
        if decision is None:
            if len(pending) >= preamble.max_bytes:
                self._end(conn, End.REFUSED, preamble.overflow_code)
            elif conn.up.eof:
                self._end(conn, End.CLIENT_FIN)
            return
        conn.preamble = None
        self._apply(conn, decision)

    def _hold(self, conn: _Conn, limit: int) -> bool:
        """Read the client into the up buffer (not connected yet), at most `limit` bytes held.
        True when new bytes came."""
        side, up = conn.client, conn.up
        assert side is not None
        if up.pending is None:
            up.pending = bytearray()
        pending = up.pending
        assert isinstance(pending, bytearray)
        new = False
        while side.rd and not up.eof:
            room = min(limit - len(pending), READ_CHUNK)
            if room <= 0:
                break
            try:
                n = side.sock.recv_into(self._rbuf, room)
            except BlockingIOError:
                side.rd = False
                break
            except InterruptedError:
                continue
            except OSError as exc:
                self._reset(conn, True, exc.errno or errno.EIO)
                return False
            if n == 0:
                up.eof = True
                self._fin(conn, Flag.CLIENT_FIN)
                break
            pending += self._rview[:n]
            self._count_in(conn, n)
            new = True
            if n < room and not side.hup:
                side.rd = False
        return new

    # --- connect ----------------------------------------------------------------------------------

    def _connect(self, conn: _Conn, target: PyTarget, first: bytes, consume: int,
                 source: str | None) -> None:
        if conn.target is not None:  # a retry: the load moves
            conn.target.load.active -= 1
        target.load.active += 1
        conn.target = target
        conn.first = bytes(first)
        pending = conn.up.pending
        if consume and isinstance(pending, bytearray):
            del pending[:consume]
        conn.state = CONNECTING
        err, op = self._open(conn, target, source)
        if err:
            self._failed(conn, op, err)
            return
        conn.t_attempt = self.now
        self._arm(conn)
        self._hold(conn, EARLY_DATA_MAX)  # the client may be read while we wait (bounded)

    def _open(self, conn: _Conn, target: PyTarget, source: str | None) -> tuple[int, Op]:
        """Start a non-blocking connect; (0, _) when under way, else (errno, the failing op)."""
        try:
            sock = socket.socket(target.family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        except OSError as exc:
            return exc.errno or errno.EIO, Op.SOCKET
        op = Op.BIND
        try:
            if target.nodelay:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if target.keepalive is not None:
                set_keepalive(sock, target.keepalive)
            local = source or target.source
            if target.transparent:
                sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
                local = local or conn.peer
            if local is not None:
                sock.bind((local, 0))
            op = Op.CONNECT
            err = sock.connect_ex(target.address)
        except OSError as exc:
            err = exc.errno or errno.EIO
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            return err, op
        side = _Side(sock, conn)
        conn.backend = side
        self._fds[side.fd] = side
        self._ep.register(side.fd, _CONN_EVENTS)
        return 0, Op.CONNECT

    def _check_connect(self, conn: _Conn, mask: int) -> None:
        side = conn.backend
        assert side is not None
        err = 0
        if mask & (select.EPOLLERR | select.EPOLLHUP) or not mask & select.EPOLLOUT:
            err = side.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if not err and not mask & select.EPOLLOUT:
                return
        if err:
            self._drop_backend(conn, reset=False)
            self._failed(conn, Op.CONNECT, err)
            return
        self._connected(conn)

    def _connected(self, conn: _Conn) -> None:
        target = conn.target
        assert target is not None
        conn.state = RELAY
        conn.t_connect = self.now
        conn.flags |= Flag.CONNECTED
        conn.last = self.now
        conn.splice_after = target.splice_after
        if target.quiet:
            target.connected += 1
            conn.flags |= Flag.QUIET
            lst = conn.lst
            if lst.on_connected is not None:
                if not lst.connects:
                    self._connecting.append(lst)
                lst.connects += CONNECTED.pack(conn.id, target.backend, self.now - conn.t_attempt)
        else:
            self._call(conn, conn.lst.on_connect, conn.id, target.backend, Status.OK, 0,
                       (self.now - conn.t_attempt) / 1e9)
            if conn.state == DONE:
                return
        held = conn.up.pending or b""
        data = conn.first + bytes(held) if conn.first else held
        conn.up.pending = memoryview(data) if data else None
        conn.first = b""
        self._arm(conn)
        self._advance(conn)

    def _failed(self, conn: _Conn, op: Op, err: int) -> None:
        """One attempt failed: count it, ask the policy what next (another target, or give up)."""
        status = classify(op, err)
        if status == Status.LOCAL:
            key = (int(op), err)
            self._local_errors[key] = self._local_errors.get(key, 0) + 1
        conn.last_err = err
        conn.last_status = status
        target = conn.target
        assert target is not None
        elapsed = (self.now - conn.t_attempt) / 1e9 if conn.t_attempt else 0.0
        decision = self._call(conn, conn.lst.on_connect, conn.id, target.backend, status, err, elapsed)
        if conn.state == DONE:
            return
        conn.t_attempt = 0
        self._apply(conn, decision)

    def _drop_backend(self, conn: _Conn, reset: bool) -> None:
        side = conn.backend
        if side is None:
            return
        conn.backend = None
        self._fds.pop(side.fd, None)
        self._close(side.sock, reset)

    # --- relay ------------------------------------------------------------------------------------

    def _advance(self, conn: _Conn) -> None:
        state = conn.state
        if state == RELAY:
            self._relay(conn)
        elif state == CONNECTING:
            self._hold(conn, EARLY_DATA_MAX)
        elif state == PREAMBLE:
            if conn.preamble is not None:
                self._read_preamble(conn)
        elif state == DRAIN:
            self._drain(conn)
        elif state == HELD:
            self._check_held(conn)

    def _relay(self, conn: _Conn) -> None:
        client, backend = conn.client, conn.backend
        assert client is not None and backend is not None
        result = self._pump(conn, conn.up, client, backend, True)
        if result != _OK:
            self._reset(conn, result == _SRC_RESET, self._errno)
            return
        result = self._pump(conn, conn.down, backend, client, False)
        if result != _OK:
            self._reset(conn, result == _DST_RESET, self._errno)
            return
        if conn.up.fin_sent and conn.down.fin_sent:
            self._end(conn, End.CLIENT_FIN if conn.first_fin == Flag.CLIENT_FIN else End.BACKEND_FIN)
            return
        if (conn.bytes_in + conn.bytes_out >= conn.splice_after and conn.up.pipe_r < 0
                and self._to_splice(conn)):
            self._relay(conn)

    def _pump(self, conn: _Conn, d: _Dir, src: _Side, dst: _Side, up: bool) -> int:
        """Move src -> dst until one would block; _OK, _SRC_RESET or _DST_RESET."""
        if d.pipe_r >= 0:
            return self._pump_splice(conn, d, src, dst, up)
        moved = 0
        while True:
            pending = d.pending
            if pending is not None:
                if not dst.wr:
                    return _OK
                try:
                    # Once the source's FIN is in, MSG_MORE: the FIN forwarded after the
                    # last of it rides on its segment (as after _read_end).
                    n = dst.sock.send(pending, socket.MSG_MORE if d.eof else 0)
                except BlockingIOError:
                    dst.wr = False
                    return _OK
                except InterruptedError:
                    continue
                except OSError as exc:
                    self._errno = exc.errno or errno.EIO
                    return _DST_RESET
                conn.last = self.now
                if n < len(pending):
                    d.pending = memoryview(pending)[n:]
                    dst.wr = False
                    return _OK
                d.pending = None
            if d.eof:
                return self._forward_fin(conn, d, dst)
            if not src.rd:
                return _OK
            if moved >= WAKE_BUDGET:
                self._again.append(conn)
                return _OK
            try:
                n = src.sock.recv_into(self._rbuf)
            except BlockingIOError:
                src.rd = False
                return _OK
            except InterruptedError:
                continue
            except OSError as exc:
                self._errno = exc.errno or errno.EIO
                return _SRC_RESET
            if n == 0:
                d.eof = True
                self._fin(conn, Flag.CLIENT_FIN if up else Flag.BACKEND_FIN)
                continue
            self._count(conn, n, up)
            more = failed = 0
            if n < READ_CHUNK:
                if not src.hup:
                    src.rd = False
                elif src.hup == HUP_FIN:
                    more, failed, n = self._read_end(conn, d, src, n, up)
            moved += n
            sent = 0
            if dst.wr:  # straight from the read buffer: a copy only of what the destination leaves
                try:
                    sent = dst.sock.send(self._rview[:n], more)
                except BlockingIOError:
                    dst.wr = False
                except InterruptedError:
                    pass
                except OSError as exc:
                    self._errno = exc.errno or errno.EIO
                    return _DST_RESET
            if sent < n:
                d.pending = bytes(self._rview[sent:n])  # sent by the next pass of the loop
                if sent:
                    dst.wr = False
            if failed:  # reset after the data: what was read went on first
                self._errno = failed
                return _SRC_RESET

    def _read_end(self, conn: _Conn, d: _Dir, src: _Side, n: int, up: bool) -> tuple[int, int, int]:
        """After a short read from a side whose FIN came (and no error), the end is next: read
        it now, before the data goes on, so that the data goes with MSG_MORE and the FIN
        forwarded right after rides on its last segment (HAProxy merges them too): one segment
        fewer, and one ACK fewer from the peer. Returns (send flags, the errno of a reset found
        instead, the bytes now in the read buffer)."""
        try:
            more = src.sock.recv_into(self._rview[n:])
        except (BlockingIOError, InterruptedError):
            return 0, 0, n
        except OSError as exc:
            return 0, exc.errno or errno.EIO, n
        if more:  # not the end after all (a read is short only at the end of what came)
            self._count(conn, more, up)
            return 0, 0, n + more
        d.eof = True
        self._fin(conn, Flag.CLIENT_FIN if up else Flag.BACKEND_FIN)
        return socket.MSG_MORE, 0, n

    def _forward_fin(self, conn: _Conn, d: _Dir, dst: _Side) -> int:
        if not d.fin_sent:
            other = conn.down if d is conn.up else conn.up
            if other.fin_sent:  # the last FIN: the close that follows sends it
                d.fin_sent = True
                return _OK
            try:
                dst.sock.shutdown(socket.SHUT_WR)
            except OSError as exc:
                self._errno = exc.errno or errno.EIO
                return _DST_RESET
            d.fin_sent = True
            if not conn.halfclosed:
                conn.halfclosed = True
                self._arm(conn)
        return _OK

    def _pump_splice(self, conn: _Conn, d: _Dir, src: _Side, dst: _Side, up: bool) -> int:
        moved = 0
        while True:
            if d.pipe_len:
                if not dst.wr:
                    return _OK
                try:
                    n = os.splice(d.pipe_r, dst.fd, d.pipe_len, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    dst.wr = False
                    return _OK
                except InterruptedError:
                    continue
                except OSError as exc:
                    self._errno = exc.errno or errno.EIO
                    return _DST_RESET
                conn.last = self.now
                d.pipe_len -= n
                if d.pipe_len:
                    continue
            if d.eof:
                return self._forward_fin(conn, d, dst)
            if not src.rd:
                return _OK
            if moved >= WAKE_BUDGET:
                self._again.append(conn)
                return _OK
            try:
                n = os.splice(src.fd, d.pipe_w, PIPE_SIZE, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                src.rd = False
                return _OK
            except InterruptedError:
                continue
            except OSError as exc:
                self._errno = exc.errno or errno.EIO
                return _SRC_RESET
            if n == 0:
                d.eof = True
                self._fin(conn, Flag.CLIENT_FIN if up else Flag.BACKEND_FIN)
                continue
            moved += n
            d.pipe_len += n
            self._count(conn, n, up)
            # The pipe was empty and each of its buffers holds at least one byte: fewer bytes
            # than buffers means the pipe did not fill, so the socket had no more (a short read
            # drains, as on the copy path): no splice that would only say EAGAIN.
            if n < d.pipe_slots and not src.hup:
                src.rd = False

    def _to_splice(self, conn: _Conn) -> bool:
        """Move to splice(2) once nothing is buffered and neither side has finished."""
        up, down = conn.up, conn.down
        if up.pending is not None or down.pending is not None:
            return False
        conn.splice_after = NEVER
        if up.eof or down.eof:
            return False
        pipes: list[int] = []
        try:
            for _ in range(2):
                pipes.extend(os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC))
        except OSError as exc:
            for fd in pipes:
                os.close(fd)
            key = (int(Op.PIPE), exc.errno or errno.EIO)
            self._local_errors[key] = self._local_errors.get(key, 0) + 1
            return False
        up.pipe_r, up.pipe_w, down.pipe_r, down.pipe_w = pipes
        up.pipe_slots = _pipe_slots(up.pipe_w)  # best effort: the default 64 KiB works, slower
        down.pipe_slots = _pipe_slots(down.pipe_w)
        conn.flags |= Flag.SPLICED
        conn.lst.spliced += 1
        return True

    def _count(self, conn: _Conn, n: int, up: bool) -> None:
        """`n` bytes moved from the client (`up`) or from the backend."""
        if up:
            self._count_in(conn, n)
        else:
            self._count_out(conn, n)

    def _count_in(self, conn: _Conn, n: int) -> None:
        conn.bytes_in += n
        conn.lst.bytes_in += n
        conn.last = self.now

    def _count_out(self, conn: _Conn, n: int) -> None:
        if not conn.t_first:
            conn.t_first = self.now
        conn.bytes_out += n
        conn.lst.bytes_out += n
        conn.last = self.now

    def _fin(self, conn: _Conn, which: Flag) -> None:
        conn.flags |= which
        if not conn.first_fin:
            conn.first_fin = which

    # --- resets -----------------------------------------------------------------------------------

    def _reset(self, conn: _Conn, client: bool, err: int) -> None:
        """One side reset (`err`: the errno that said so). Before the backend is connected
        there is nothing to forward. ETIMEDOUT is a peer gone silent (keepalive probes or
        retransmissions unanswered): the same handling, its own reason."""
        conn.flags |= Flag.CLIENT_RESET if client else Flag.BACKEND_RESET
        if err == errno.ETIMEDOUT:
            reason = End.CLIENT_TIMEOUT if client else End.BACKEND_TIMEOUT
        else:
            reason = End.CLIENT_RESET if client else End.BACKEND_RESET
        if conn.state != RELAY:
            self._end(conn, reason, rst_client=not client, rst_backend=client)
            return
        conn.state = DRAIN
        conn.reason = reason
        conn.drain_up = client  # the client is gone: what it sent goes up to the backend
        dead = conn.client if client else conn.backend
        assert dead is not None
        self._salvage(conn, dead, client)
        self._fds.pop(dead.fd, None)
        self._close(dead.sock, reset=False)
        if client:
            conn.client = None
        else:
            conn.backend = None
        target = conn.target
        assert target is not None
        conn.drain_deadline = self.now + (target.half_close_ns or target.idle_ns or _ns(30))
        self._draining.add(conn)
        self._arm(conn)
        self._drain(conn)

    def _salvage(self, conn: _Conn, dead: _Side, up: bool) -> None:
        """Take what the reset side's kernel still holds from it, after what is buffered: a
        failed write or FIN towards it reports its reset while bytes it sent before the reset
        are still to be read. Bounded by that socket's receive buffer (nothing comes after a
        reset); a reset found by a read has nothing left (the kernel gives the bytes first)."""
        d = conn.up if up else conn.down
        if d.eof:
            return
        parts: list[bytes] = []
        while True:
            try:
                n = dead.sock.recv_into(self._rbuf)
            except InterruptedError:
                continue
            except OSError:  # nothing more (EAGAIN), or the reset itself
                break
            if n == 0:
                break
            parts.append(bytes(self._rview[:n]))
            self._count(conn, n, up)
        if parts:
            pending = d.pending
            d.pending = (b"" if pending is None else bytes(pending)) + b"".join(parts)

    def _drain(self, conn: _Conn) -> None:
        """Write what the reset side sent to the survivor, then reset the survivor once its
        kernel has sent every byte (a reset would drop bytes still queued)."""
        d = conn.up if conn.drain_up else conn.down
        survivor = conn.backend if conn.drain_up else conn.client
        assert survivor is not None
        survivor.wr = True  # polled: no edge tells that the send queue emptied
        while d.pending is not None or d.pipe_len:
            try:
                if d.pipe_len:
                    d.pipe_len -= os.splice(d.pipe_r, survivor.fd, d.pipe_len, flags=_SPLICE_FLAGS)
                else:
                    assert d.pending is not None
                    n = survivor.sock.send(d.pending)
                    d.pending = memoryview(d.pending)[n:] if n < len(d.pending) else None
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                break  # the survivor is gone too
        else:
            try:
                unsent = struct.unpack("i", fcntl.ioctl(survivor.fd, SIOCOUTQNSD, b"\0" * 4))[0]
            except OSError:
                unsent = 0
            if unsent > 0 and self.now < conn.drain_deadline:
                return
        self._end(conn, End(conn.reason), rst_client=True, rst_backend=True)

    # --- timers -----------------------------------------------------------------------------------

    def _due(self, conn: _Conn) -> int:
        """When this connection's current timeout falls due (ns), 0 for none."""
        state = conn.state
        if state == RELAY:
            target = conn.target
            assert target is not None
            span = target.half_close_ns if conn.halfclosed and target.half_close_ns else target.idle_ns
            return conn.last + span if span else 0
        if state == CONNECTING:
            assert conn.target is not None
            return conn.t_attempt + conn.target.connect_ns
        if state == PREAMBLE:
            return conn.t_start + _ns(conn.preamble.timeout) if conn.preamble is not None else 0
        if state == DRAIN:
            return conn.drain_deadline
        return 0

    def _arm(self, conn: _Conn) -> None:
        due = self._due(conn)
        if due:
            self._wheel.file(conn, -(-due // _TICK_NS))
        else:
            self._wheel.remove(conn)

    def _expire(self, conn: _Conn) -> None:
        due = self._due(conn)
        if not due:
            return
        if due > self.now:
            self._arm(conn)
            return
        state = conn.state
        if state == RELAY:
            target = conn.target
            assert target is not None
            # A half-close timeout only where one is in force (else idle_timeout ran out).
            # An idle connection is closed as TCP closes (a FIN unless bytes are left unread);
            # after a FIN timeout the side that stopped moving gets a reset, so the kernel does
            # not keep what it could not deliver.
            if conn.halfclosed and target.half_close_ns:
                self._end(conn, End.HALF_CLOSE_TIMEOUT, rst_client=True, rst_backend=True)
            else:
                self._end(conn, End.IDLE_TIMEOUT)
        elif state == CONNECTING:
            self._drop_backend(conn, reset=True)
            self._failed(conn, Op.CONNECT, errno.ETIMEDOUT)
        elif state == PREAMBLE:
            assert conn.preamble is not None
            self._end(conn, End.REFUSED, conn.preamble.timeout_code)
        elif state == DRAIN:
            self._end(conn, End(conn.reason), rst_client=True, rst_backend=True)

    # --- the end ----------------------------------------------------------------------------------

    def _cut(self, conn: _Conn, code: int) -> None:
        if self._busy:
            conn.kill = code
            self._kills.append(conn)
        else:
            self._end(conn, End.CLOSED, code, rst_client=True, rst_backend=True)

    def _end(self, conn: _Conn, reason: End, detail: int = 0, rst_client: bool = False,
             rst_backend: bool = False) -> None:
        """Close both sides (a reset where asked) and write the one record."""
        if conn.state == DONE:
            return
        conn.state = DONE
        self._wheel.remove(conn)
        self._draining.discard(conn)
        for side, reset in ((conn.client, rst_client), (conn.backend, rst_backend)):
            if side is not None:
                self._fds.pop(side.fd, None)
                self._close(side.sock, reset)
                side.conn = None  # type: ignore[assignment]
        conn.client = conn.backend = None
        for d in (conn.up, conn.down):
            if d.pipe_r >= 0:
                os.close(d.pipe_r)
                os.close(d.pipe_w)
                d.pipe_r = d.pipe_w = -1
        if conn.target is not None:
            conn.target.load.active -= 1
        lst = conn.lst
        lst.active -= 1
        if reason == End.REFUSED:
            lst.refused += 1
        else:
            lst.ended += 1
        if not lst.records:
            self._dirty.append(lst)
        lst.records += RECORD.pack(
            conn.id, conn.target.backend if conn.target is not None else -1, reason, conn.flags,
            detail & 0xFFFF, conn.bytes_in, conn.bytes_out, conn.t_start, conn.t_connect,
            conn.t_first, self.now, lst.id, conn.t_attempt if conn.t_connect else 0)
        del self._conns[conn.id]
        if self._paused:
            self._resume_listeners()
