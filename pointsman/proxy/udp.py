"""The userspace UDP data path: sessions keyed by client address, one upstream socket each.

A session is (client address, port). Its first datagram picks a backend with the pool's algorithm;
later datagrams go to the same backend through the session's own connected socket, and replies
come back to the client from the listener's address. Datagram boundaries are kept exactly.

Unlike IPVS, a session whose backend leaves service (down, ejected, drained) moves to an available
backend on its next datagram. ICMP port unreachable from a backend surfaces as ECONNREFUSED on the
connected upstream socket and counts as a passive failure of that backend; the session then moves
to another backend on its next datagram (the client's retry), so no client waits past one retry
even before passive ejection takes the backend out. A session's first reply counts as a passive
success, as a TCP connect does, so only consecutive refusals add up to an ejection.

This listener is the policy of a UDP forwarding plane (proxy/udpfast.py, compiled in
engine/_udp.pyx; docs/engine.md): the plane owns an epoll set of the listening sockets and its
sessions' sockets, watched with one `add_reader`, and moves a known session's datagrams both ways
in recvmmsg/sendmmsg batches without calling in here. Datagrams of new clients, and of sessions
whose pools changed since (a new generation), come here in one list per wake-up; a session is
handed to the plane after its datagram went through the policy. Counters come back once per
wake-up (totals) and once per sweep (per-session counts and last activity): one call per new
session, not per datagram. Sessions the plane cannot carry (per_packet, a responses limit, a
PROXY header prefix) stay here: their socket has its own `add_reader`, and datagrams move through
the connection engine's batch functions (`pointsman.proxy.engine.batch_functions`).

Idle sessions are swept by one timer per listener over a table kept in last-use order.

A session that cannot get its socket because we ran out of descriptors or buffers (or it would eat
into the descriptor reserve) is not a backend failure: its datagram is dropped as
`local_resource`, the error counted by op and errno, and the pool hears nothing.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from operator import itemgetter
from typing import TYPE_CHECKING

from pointsman.balance.hashing import source_key
from pointsman.config.model import ListenerConfig
from pointsman.pool.pool import Pool
from pointsman.protect.acl import AclLists
from pointsman.protocols.proxy_protocol import Transport
from pointsman.proxy.engine import batch_functions
from pointsman.proxy.resources import BUDGET, ERRORS, FD_ERRNOS, FD_RESERVE, errno_name, is_local
from pointsman.proxy.sockets import family_of, listen_socket
from pointsman.proxy.udpfast import new_plane
from pointsman.proxy.upstream import outgoing_header
from pointsman.telemetry.flow import DropReason, UdpEndReason
from pointsman.telemetry.stats import BackendStats
from pointsman.telemetry.udp_stats import UdpListenerStats

if TYPE_CHECKING:
    from pointsman.pool.snapshot import PoolSnapshot

log = logging.getLogger("pointsman.udp")

# Largest UDP payload over IPv4 is 65507 bytes; IPv6 allows 65527 without jumbograms. One buffer
# size covers both, so no datagram is ever truncated.
MAX_DATAGRAM = 65535
# Datagrams read per readiness callback before yielding to the loop: amortises the callback cost
# without letting one busy socket starve the others.
READ_BATCH = 64

ClientAddr = tuple[str, int]
# (client ip, port); per_packet adds the backend index; a listener with several sockets adds the
# socket's index too (one client talking to two of its ports has two sessions).
SessionKey = tuple[str, int] | tuple[str, int, int] | tuple[str, int, int, int]
SessionSink = Callable[["UdpSession"], None]


class ReserveReached(Exception):
    """The descriptor budget is spent: a new socket would eat the reserve kept for the admin
    listener and health checks."""


class UdpSession:
    """One client's flow to one backend."""

    __slots__ = (
        "answered",
        "avoid",
        "backend_id",
        "backend_index",
        "backend_stats",
        "bytes_in",
        "bytes_out",
        "client",
        "datagrams_in",
        "datagrams_out",
        "key",
        "last_activity",
        "listener",
        "local",
        "out",
        "pool",
        "prefix",
        "reason",
        "slot",
        "sock",
        "started",
        "version",
    )

    def __init__(self, listener: UdpListener, key: SessionKey, client: ClientAddr,
                 out: socket.socket | None = None) -> None:
        self.listener = listener
        self.pool = listener.pool  # the pool its backend is in (the listener's, or a fallback)
        self.key = key
        self.client = client
        self.out = out or listener.sock  # the listening socket it came in on: replies leave by it
        self.local = listener.locals.get(self.out.fileno(), listener.local)
        self.sock: socket.socket | None = None
        self.backend_id = ""
        self.backend_index = -1
        self.backend_stats: BackendStats | None = None
        self.version = -1
        self.prefix = b""
        self.datagrams_in = 0
        self.datagrams_out = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.started = listener.loop.time()
        self.last_activity = self.started
        self.reason: UdpEndReason | None = None
        self.answered = False  # the current backend replied at least once
        self.avoid = ""  # a backend that just refused: the next pick skips it
        self.slot = -1  # registered in the listener's forwarding plane (udpfast) under this slot

    def attach(self, index: int, backend_id: str, host: str, port: int, stats: BackendStats,
               version: int, prefix: bytes = b"") -> None:
        """Open the connected upstream socket for the chosen backend. `prefix` (a PROXY v2
        header) goes in front of every datagram, as the spec allows for UDP."""
        self.detach()
        self.prefix = prefix
        if not BUDGET.room(1):
            raise ReserveReached
        sock = socket.socket(family_of(host), socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.connect((host, port))
        except BaseException:
            sock.close()
            raise
        BUDGET.used += 1
        self.sock = sock
        self.backend_index = index
        self.backend_id = backend_id
        self.backend_stats = stats
        self.version = version
        self.answered = False
        stats.active += 1
        stats.total += 1
        self.listener.loop.add_reader(sock.fileno(), self._readable)

    def detach(self) -> None:
        if self.slot >= 0:
            self.listener.unregister(self, rewatch=False)
        if self.sock is not None:
            self.listener.loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None
            BUDGET.used -= 1
        if self.backend_stats is not None:
            self.backend_stats.active -= 1
            self.backend_stats = None

    def send(self, data: bytes) -> bool:
        """Forward one datagram to the backend; False if the backend refused it. Only datagrams
        the kernel took count as forwarded; the others count as drops."""
        assert self.sock is not None
        try:
            self.sock.send(self.prefix + data if self.prefix else data)
        except (BlockingIOError, InterruptedError):
            self.listener.stats.drops[DropReason.SEND_FAILED] += 1
            return True
        except ConnectionRefusedError:
            return False
        except OSError:
            self.listener.stats.drops[DropReason.SEND_FAILED] += 1
            return True
        n = len(data)
        self.datagrams_in += 1
        self.bytes_in += n
        stats = self.listener.stats
        stats.datagrams_in += 1
        stats.bytes_in += n
        return True

    def _readable(self) -> None:
        """Replies: one batch read from the backend, one batch sent back to the client."""
        sock = self.sock
        if sock is None:
            return
        listener = self.listener
        try:
            batch = listener.recv_batch(sock, READ_BATCH)
        except ConnectionRefusedError:
            listener.backend_refused(self)
            return
        except OSError as exc:
            log.debug("udp session %s: recv failed: %r", self.client, exc)
            return
        if not batch:
            return
        if not self.answered:
            self.answered = True
            self.pool.report_connect_success(self.backend_id)
        limit = listener.config.udp.responses
        if limit:  # no reply past the session's last one
            batch = batch[:max(limit - self.datagrams_out, 0)]
        client = self.client
        replies = [(data, client) for data, _ in batch]
        sent, size = listener.reply(self.out, replies)
        stats = listener.stats
        self.datagrams_out += sent
        self.bytes_out += size
        stats.datagrams_out += sent
        stats.bytes_out += size
        if sent:
            self.last_activity = listener.loop.time()
            # Traffic either way keeps a session alive, so it also moves the session to the end
            # of the table: the sweeper stops at the first live session and must find idle ones
            # first.
            listener.sessions.move_to_end(self.key)
        if limit and self.datagrams_out >= limit:
            listener.end_session(self, UdpEndReason.RESPONSES)


class UdpListener:
    """Receives datagrams on its addresses (one socket each) and balances sessions over one pool."""

    def __init__(
        self,
        config: ListenerConfig,
        pool: Pool,
        loop: asyncio.AbstractEventLoop,
        stats: UdpListenerStats | None = None,
        session_sink: SessionSink | None = None,
        pools: Mapping[str, Pool] | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self.pool = pool
        self.pools: Mapping[str, Pool] = pools if pools is not None else {pool.name: pool}
        self.loop = loop
        self.stats = stats or UdpListenerStats(config.udp.max_sessions)
        self.stats.capacity = config.udp.max_sessions
        self.sessions: OrderedDict[SessionKey, UdpSession] = OrderedDict()
        self.session_sink = session_sink
        self.sock: socket.socket  # the first socket
        self.socks: list[socket.socket] = []
        self._sweep_handle: asyncio.TimerHandle | None = None
        self.accepting = False
        self._bound = False
        self.local: tuple[str, int] = ("", 0)  # our bound address: the PROXY destination
        self.locals: dict[int, tuple[str, int]] = {}  # by socket descriptor
        self._socket_index: dict[int, int] = {}  # socket descriptor -> index in `socks`
        self.recv_batch, self.send_batch = batch_functions()
        # Known sessions' datagrams move through the plane without the code below (udpfast.py).
        self.plane = new_plane()
        self._by_slot: dict[int, UdpSession] = {}
        self._gen = 1  # bumped when a pool's snapshot changes: sessions pass the policy again
        self._gen_snaps: tuple[PoolSnapshot, ...] = ()
        self._fast_ok = self._fast_eligible(config)
        self.set_acl(AclLists.from_file(config.allow, config.deny, config.acl_on))

    async def start(self, sock: socket.socket | Sequence[socket.socket] | None = None,
                    reuse_port: bool = False) -> None:
        """Serve on the given sockets (one per address), else bind the config's addresses."""
        socks = [sock] if isinstance(sock, socket.socket) else list(sock or ())
        if not socks:
            socks = [listen_socket(address, socket.SOCK_DGRAM, reuse_port=reuse_port)
                     for address in self.config.addresses]
        self.sock, self.socks = socks[0], socks
        BUDGET.measure()
        for i, each in enumerate(socks):
            name = each.getsockname()
            self.locals[each.fileno()] = (str(name[0]), int(name[1]))
            self._socket_index[each.fileno()] = i
            lid = self.plane.listen(each)
            assert lid == i
        self.loop.add_reader(self.plane.fileno(), self._wake)
        self.local = self.locals[self.sock.fileno()]
        self.accepting = True
        self._bound = True
        self._arm_sweep()

    def statistics(self) -> UdpListenerStats:
        return self.stats

    def reconfigure(self, config: ListenerConfig, pool: Pool) -> None:
        """Reload: new settings and pool for new sessions; live sessions keep their backend."""
        self.config = config
        self.stats.capacity = config.udp.max_sessions
        self.pool = pool
        self._fast_ok = self._fast_eligible(config)
        self._gen += 1
        self.set_acl(AclLists.from_file(config.allow, config.deny, config.acl_on, self.acl_lists))

    # --- client datagrams ------------------------------------------------------------------------

    def _wake(self) -> None:
        """One wake-up of the plane: it moved known sessions' datagrams both ways; what needs
        the policy comes here, with the totals."""
        slow, refused, answered, errors, d_in, b_in, d_out, b_out, failed = \
            self.plane.run(self._generation())
        stats = self.stats
        if d_in:
            stats.datagrams_in += d_in
            stats.bytes_in += b_in
        if d_out:
            stats.datagrams_out += d_out
            stats.bytes_out += b_out
        if failed:
            stats.drops[DropReason.SEND_FAILED] += failed
        by_slot = self._by_slot
        for slot in answered:
            session = by_slot.get(slot)
            if session is not None and not session.answered:
                session.answered = True
                session.pool.report_connect_success(session.backend_id)
        for slot, code in errors:
            session = by_slot.get(slot)
            if session is None:
                continue
            if code == errno.ECONNREFUSED:
                self.backend_refused(session)
            else:
                log.debug("udp session %s: recv failed: errno %d", session.client, code)
        for slot in refused:
            session = by_slot.get(slot)
            if session is not None:
                self.backend_refused(session)
        several = len(self.socks) > 1
        for data, addr, lid in slow:
            self.datagram(data, (addr[0], addr[1]), self.socks[lid] if several else None)

    @staticmethod
    def _fast_eligible(config: ListenerConfig) -> bool:
        """per_packet sessions and response limits stay on the Python path (udp.py)."""
        return not config.udp.per_packet and not config.udp.responses

    def _generation(self) -> int:
        """The plane's generation: a new one whenever any pool's snapshot changed."""
        last = self._gen_snaps
        pool = self.pool
        if len(last) == 1 and pool.snapshot is last[0] and len(self.pools) == 1 and \
                next(iter(self.pools.values())) is pool:
            return self._gen  # the common case: one pool, unchanged
        snaps = tuple({id(s): s for s in (pool.snapshot,
                                          *[pool.snapshot for pool in self.pools.values()])}
                      .values())
        if len(snaps) != len(last) or any(a is not b for a, b in zip(snaps, last, strict=True)):
            self._gen_snaps = snaps
            self._gen += 1
        return self._gen

    def _fast_sync(self, session: UdpSession) -> None:
        """After the policy handled a datagram: hand the session (back) to the plane, or take
        it out when it can no longer go there (a reload turned on per_packet or a limit)."""
        if self._fast_ok and not session.prefix and session.sock is not None:
            if session.slot >= 0:
                self.plane.validate(session.slot, self._gen)
            else:
                lid = self._socket_index[session.out.fileno()]
                try:
                    slot = self.plane.add(lid, session.client[0], session.client[1],
                                          session.sock, self._gen)
                except ValueError:  # an address the plane cannot key (a scoped IPv6 one)
                    return
                # The plane's epoll watches its socket from now on, not the loop.
                self.loop.remove_reader(session.sock.fileno())
                session.slot = slot
                self._by_slot[slot] = session
        elif session.slot >= 0:
            self.unregister(session)

    def unregister(self, session: UdpSession, rewatch: bool = True) -> None:
        """Take a session out of the plane (before its socket closes), with its last counts;
        `rewatch`: its socket stays open, and the loop watches it again (the Python path)."""
        slot = session.slot
        session.slot = -1
        self._by_slot.pop(slot, None)
        d_in, d_out, b_in, b_out = self.plane.remove(slot)
        if rewatch and session.sock is not None:
            self.loop.add_reader(session.sock.fileno(), session._readable)
        session.datagrams_in += d_in
        session.datagrams_out += d_out
        session.bytes_in += b_in
        session.bytes_out += b_out

    def sync(self) -> None:
        """Take the plane's per-session counts and last activity into the sessions (per sweep,
        and before anything reads them); touched sessions move to the end of the table."""
        touched = self.plane.touched()
        if not touched:
            return
        touched.sort(key=itemgetter(1))
        sessions, by_slot = self.sessions, self._by_slot
        for slot, last, d_in, d_out, b_in, b_out in touched:
            session = by_slot.get(slot)
            if session is None:
                continue
            session.datagrams_in += d_in
            session.datagrams_out += d_out
            session.bytes_in += b_in
            session.bytes_out += b_out
            if last > session.last_activity:
                session.last_activity = last
                if session.key in sessions:
                    sessions.move_to_end(session.key)

    def reply(self, out: socket.socket, replies: list[tuple[bytes, ClientAddr]]) -> tuple[int, int]:
        """Send replies from a listening socket, in batches: (datagrams sent, their bytes).
        One that the socket refuses (full, or an error) is a drop; the rest are still tried."""
        sent = size = 0
        start = 0
        while start < len(replies):
            try:
                n = self.send_batch(out, replies[start:])
            except OSError:
                n = 0
            for data, _ in replies[start:start + n]:
                size += len(data)
            sent += n
            start += n
            if start < len(replies):  # this one could not go
                self.stats.drops[DropReason.SEND_FAILED] += 1
                start += 1
        return sent, size

    def datagram(self, data: bytes, client: ClientAddr, via: socket.socket | None = None) -> None:
        """One client datagram; `via`: the listening socket it came in on, when there are
        several (its sessions are its own)."""
        stats = self.stats
        # issue 15: allow/deny lists on a new client; fallback_pool while this pool is empty.
        if self.acl is not None and client not in self.sessions and self.acl.refuses(client[0]):
            stats.drops[DropReason.DENIED] += 1
            return
        per_packet = self.config.udp.per_packet
        where = -1 if via is None else self._socket_index[via.fileno()]
        key: SessionKey = client if via is None else (client[0], client[1], -1, where)
        pool = self._route(None if per_packet else self.sessions.get(key))
        snapshot = pool.snapshot
        index = -1
        if per_packet:
            picked = self._pick(snapshot, client)
            if picked is None:
                stats.drops[DropReason.NO_BACKEND] += 1
                return
            index = picked
            key = (client[0], client[1], index) if via is None else (client[0], client[1], index,
                                                                      where)
        session = self.sessions.get(key)
        if session is None:
            if len(self.sessions) >= self.config.udp.max_sessions:
                stats.drops[DropReason.TABLE_FULL] += 1
                return
            session = UdpSession(self, key, client, via)
            session.pool = pool
        elif (session.version != snapshot.version or session.pool is not pool) and \
                not self._still_available(session, pool):
            session.detach()
        if session.sock is None and not self._connect(session, snapshot, index):
            if session.key not in self.sessions:
                return
            self.end_session(session, UdpEndReason.BACKEND_UNAVAILABLE)
            return
        if session.key not in self.sessions:
            self.sessions[key] = session
            stats.sessions += 1
            stats.sessions_created += 1
        else:
            self.sessions.move_to_end(key)
        session.last_activity = self.loop.time()
        if not session.send(data):
            self.backend_refused(session)
        elif self._fast_ok:
            self._fast_sync(session)
        elif session.slot >= 0:
            self.unregister(session)

    def _pick(self, snapshot: PoolSnapshot, client: ClientAddr, avoid: str = "") -> int | None:
        """Pick a backend; skip `avoid` (one that just refused) unless it is the only one left."""
        config = snapshot.config
        key = source_key(client[0], client[1], config.hash_key) if snapshot.needs_key else b""
        if avoid:
            skip = frozenset(i for i, b in enumerate(snapshot.backends) if b.id == avoid)
            picked = snapshot.picker.pick(key, skip)
            if picked is not None:
                return picked
        return snapshot.picker.pick(key)

    def _still_available(self, session: UdpSession, pool: Pool) -> bool:
        """After a snapshot change: is the session's backend still in service? A session that
        changes pools (a fallback, a reload) always picks afresh in its new pool."""
        if session.pool is not pool:
            session.pool = pool
            return False
        snapshot = pool.snapshot
        for i, backend in enumerate(snapshot.backends):
            if backend.id == session.backend_id:
                if backend.effective_weight > 0:
                    session.version = snapshot.version
                    session.backend_index = i
                    return True
                return False
        return False

    def _connect(self, session: UdpSession, snapshot: PoolSnapshot, index: int) -> bool:
        if index < 0:
            picked = self._pick(snapshot, session.client, session.avoid)
            if picked is None:
                self.stats.drops[DropReason.NO_BACKEND] += 1
                return False
            index = picked
        backend = snapshot.backends[index]
        try:
            prefix = outgoing_header(snapshot.config, session.client, session.local, None, None,
                                     Transport.DGRAM)
            session.attach(index, backend.id, backend.host, backend.port, snapshot.stats[index],
                           snapshot.version, prefix)
        except ReserveReached:
            self._local_error("socket", FD_RESERVE)
            return False
        except OSError as exc:
            if is_local(exc):  # ours, not the backend's: no passive failure
                self._local_error("socket" if exc.errno in FD_ERRNOS else "connect",
                                  errno_name(exc.errno))
                return False
            log.debug("udp connect to %s failed: %r", backend.id, exc)
            session.pool.report_connect_failure(backend.id)
            self.stats.drops[DropReason.SEND_FAILED] += 1
            return False
        session.avoid = ""
        return True

    def _local_error(self, op: str, name: str) -> None:
        self.stats.drops[DropReason.LOCAL_RESOURCE] += 1
        self.stats.local_resource[f"{op}:{name}"] += 1
        ERRORS.note(self.name, op, name)

    # --- session end ---------------------------------------------------------------------------------

    def backend_refused(self, session: UdpSession) -> None:
        """ICMP port unreachable from the backend: a passive failure. The session keeps its place
        without an upstream socket and its next datagram goes to another backend; with no other
        backend available it ends, and the next datagram starts afresh."""
        self.stats.drops[DropReason.BACKEND_REFUSED] += 1
        refused = session.backend_id
        session.pool.report_connect_failure(refused)
        session.detach()
        if session.key not in self.sessions:
            return
        if any(b.effective_weight > 0 and b.id != refused for b in session.pool.snapshot.backends):
            session.avoid = refused
        else:
            self.end_session(session, UdpEndReason.BACKEND_REFUSED)

    def end_session(self, session: UdpSession, reason: UdpEndReason) -> None:
        if self.sessions.pop(session.key, None) is None:
            return
        session.reason = reason
        session.detach()
        stats = self.stats
        stats.sessions -= 1
        stats.sessions_ended[reason.value] += 1
        if self.session_sink is not None:
            self.session_sink(session)

    def _arm_sweep(self) -> None:
        period = max(min(self.config.udp.session_timeout / 4, 1.0), 0.01)
        self._sweep_handle = self.loop.call_later(period, self._sweep)

    def _sweep(self) -> None:
        """Expire idle sessions; the table is in last-use order, so stop at the first live one."""
        self.sync()
        deadline = self.loop.time() - self.config.udp.session_timeout
        while self.sessions:
            session = next(iter(self.sessions.values()))
            if max(session.last_activity, 0.0) > deadline:
                break
            self.end_session(session, UdpEndReason.IDLE_TIMEOUT)
        self._arm_sweep()

    # --- fallback pools and allow/deny lists (issue 15) --------------------------------------------

    def _route(self, session: UdpSession | None) -> Pool:
        """The pool a datagram goes to. A session in a fallback pool stays there while the
        listener's pool has nothing to offer; otherwise the listener's pool decides (itself, or
        its fallback_pool, counted once per session that moves there)."""
        primary = self.pool
        if session is not None and session.pool is not primary and not primary.snapshot.available:
            return session.pool
        return primary.route(self.pools) or primary

    def set_acl(self, lists: AclLists) -> None:
        """Put lists in force (config load, reload, admin API). A session is a flow we keep open
        on the client's behalf, so sessions of a source the new lists refuse end now."""
        self.acl_lists = lists
        self.acl = acl = lists.compile()
        if acl is None:
            return
        for session in [s for s in self.sessions.values() if acl.refuses(s.client[0])]:
            self.end_session(session, UdpEndReason.DENIED)

    # --- shutdown --------------------------------------------------------------------------------------

    def stop_accepting(self) -> None:
        """Close the socket; the sessions end now too (replies could no longer reach their
        clients, and UDP has no close handshake to wait for)."""
        self.close_all()
        if self.accepting and self._bound:
            self._bound = False
            self.loop.remove_reader(self.plane.fileno())
            self.plane.close()
            for sock in self.socks:
                sock.close()
        self.accepting = False
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
            self._sweep_handle = None

    @property
    def connections(self) -> OrderedDict[SessionKey, UdpSession]:
        return self.sessions

    async def wait_drained(self, timeout: float) -> bool:
        """UDP has no close handshake: sessions end at once on shutdown."""
        return not self.sessions

    def close_all(self, reason: object = None) -> int:
        sessions = list(self.sessions.values())
        for session in sessions:
            self.end_session(session, UdpEndReason.SHUTDOWN)
        return len(sessions)

    def close_backend(self, backend_id: str, reason: object = None) -> int:
        victims = [s for s in self.sessions.values() if s.backend_id == backend_id]
        for session in victims:
            self.end_session(session, UdpEndReason.BACKEND_UNAVAILABLE)
        return len(victims)
