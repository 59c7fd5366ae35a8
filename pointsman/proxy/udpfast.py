"""The UDP forwarding plane: known sessions' datagrams moved without the listener's policy code.

`UdpListener` (proxy/udp.py) decides everything about a session (ACL, pool, pick, limits) the
first time it sees a client, then registers the session here: (listening socket, client address)
-> the session's connected upstream socket. The plane owns an epoll set of the listening sockets
and its sessions' sockets, and the listener watches only that (one `add_reader`): one `run()` per
wake-up reads a batch from every ready socket. Client datagrams of known sessions go to their
backends here; only datagrams of unknown clients, or of sessions whose generation is stale (the
pools changed since the listener last looked at the session), come back to the listener, in one
list per wake-up. Replies of known sessions go back to their clients from the listening socket
they came in on without leaving the plane.

Counters add up here and reach the listener's stats once per wake-up (the totals, in `run()`'s
result) or once per sweep (per-session counts and last activity, `touched()`), never once per
datagram.

Two implementations share this contract: the compiled `pointsman.proxy.engine._udp.UdpPlane`
(recvmmsg/sendmmsg, a C hash table) and `PyUdpPlane` here, the reference and the fallback,
chosen with the connection engine (`POINTSMAN_ENGINE`, `new_plane`).

Slots: `add` returns a small integer naming the session in later calls; it is reused after
`remove`. Generations: `forward(lid, gen)` forwards a session's datagrams only when the
generation it was registered or validated with equals `gen`; the listener bumps its generation
whenever the pools' snapshots change, so the next datagram of every session passes through the
policy once (which may move it) before the fast path takes it again.
"""

from __future__ import annotations

import contextlib
import select
import socket
import time
from collections.abc import Callable
from typing import Any, Protocol

from pointsman.proxy.engine import engine_name
from pointsman.proxy.engine.pybatch import recv_batch, send_batch

Address = tuple[Any, ...]
Datagram = tuple[bytes, Address, int]  # payload, client address, listening socket id
# run(): what the policy must see, then the totals of the wake-up:
# (datagrams for the policy, slots whose backend refused (ICMP), slots with their first reply since
#  add, (slot, errno) of other receive errors, datagrams in, bytes in, datagrams out, bytes out,
#  datagrams dropped because a send failed)
Woken = tuple[list[Datagram], list[int], list[int], list[tuple[int, int]], int, int, int, int, int]
# touched(): (slot, last activity on the monotonic clock, datagrams in, out, bytes in, out) since
# the last touched() or remove() of that slot.
Touched = tuple[int, float, int, int, int, int]
Totals = tuple[int, int, int, int]  # datagrams in, out, bytes in, out

BATCH = 64  # datagrams per read
EVENTS = 256  # ready sockets per run()
SIZE = 65535


class Plane(Protocol):
    """What both planes offer."""

    def fileno(self) -> int: ...

    def close(self) -> None: ...

    def listen(self, sock: socket.socket) -> int: ...

    def add(self, lid: int, host: str, port: int, sock: socket.socket, gen: int) -> int: ...

    def validate(self, slot: int, gen: int) -> None: ...

    def remove(self, slot: int) -> Totals: ...

    def run(self, gen: int) -> Woken: ...

    def touched(self) -> list[Touched]: ...

    def __len__(self) -> int: ...


class _Session:
    __slots__ = ("answered", "bytes_in", "bytes_out", "client", "datagrams_in", "datagrams_out",
                 "dirty", "gen", "key", "last", "lid", "sock")

    def __init__(self, lid: int, key: tuple[int, str, int], client: Address, sock: socket.socket,
                 gen: int) -> None:
        self.lid = lid
        self.key = key
        self.client = client
        self.sock = sock
        self.gen = gen
        self.answered = False
        self.dirty = False
        self.last = 0.0
        self.datagrams_in = self.datagrams_out = self.bytes_in = self.bytes_out = 0


class PyUdpPlane:
    """The pure-Python plane: a dict for the table, recvfrom/sendto loops for the batches."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._epoll = select.epoll()
        self._events: dict[int, int] = {}  # descriptor -> slot, or -1 - listening socket id
        self._listeners: list[socket.socket] = []
        self._table: dict[tuple[int, str, int], int] = {}
        self._slots: list[_Session | None] = []
        self._free: list[int] = []
        self._dirty: list[int] = []

    def __len__(self) -> int:
        return len(self._table)

    def fileno(self) -> int:
        """The epoll set to watch: readable when a socket of the plane is."""
        return self._epoll.fileno()

    def close(self) -> None:
        self._epoll.close()

    def listen(self, sock: socket.socket) -> int:
        """Register a listening socket; its id for `add` and in `run()`'s datagrams."""
        self._listeners.append(sock)
        lid = len(self._listeners) - 1
        self._epoll.register(sock.fileno(), select.EPOLLIN)
        self._events[sock.fileno()] = -1 - lid
        return lid

    def add(self, lid: int, host: str, port: int, sock: socket.socket, gen: int) -> int:
        """Register a session (its client's datagrams on listening socket `lid` go to `sock`)."""
        key = (lid, host, port)
        if key in self._table:
            raise ValueError(f"session {host}:{port} is already registered")
        client: Address = (host, port)
        session = _Session(lid, key, client, sock, gen)
        if self._free:
            slot = self._free.pop()
            self._slots[slot] = session
        else:
            slot = len(self._slots)
            self._slots.append(session)
        self._table[key] = slot
        self._epoll.register(sock.fileno(), select.EPOLLIN)
        self._events[sock.fileno()] = slot
        return slot

    def validate(self, slot: int, gen: int) -> None:
        self._get(slot).gen = gen

    def remove(self, slot: int) -> Totals:
        """Forget a session (before its socket closes); its counts not yet taken by touched()."""
        session = self._get(slot)
        del self._table[session.key]
        self._epoll.unregister(session.sock.fileno())
        del self._events[session.sock.fileno()]
        self._slots[slot] = None
        self._free.append(slot)
        return (session.datagrams_in, session.datagrams_out, session.bytes_in, session.bytes_out)

    def _get(self, slot: int) -> _Session:
        session = self._slots[slot] if 0 <= slot < len(self._slots) else None
        if session is None:
            raise KeyError(slot)
        return session

    def _touch(self, slot: int, session: _Session, now: float) -> None:
        session.last = now
        if not session.dirty:
            session.dirty = True
            self._dirty.append(slot)

    def run(self, gen: int) -> Woken:
        """One wake-up: a batch from every ready socket (see the module docstring)."""
        slow: list[Datagram] = []
        refused: list[int] = []
        answered: list[int] = []
        errors: list[tuple[int, int]] = []
        totals = [0, 0, 0, 0, 0]  # in, bytes in, out, bytes out, failed
        for fd, _ in self._epoll.poll(0, EVENTS):
            which = self._events.get(fd)
            if which is None:
                continue
            if which < 0:
                # An error reading a listening socket: nothing to forward this time.
                with contextlib.suppress(OSError):
                    self._forward(-1 - which, gen, slow, refused, totals)
                continue
            try:
                first = self._replies(which, totals)
            except OSError as exc:
                errors.append((which, exc.errno or 0))
                continue
            if first:
                answered.append(which)
        return (slow, refused, answered, errors, totals[0], totals[1], totals[2], totals[3],
                totals[4])

    def _forward(self, lid: int, gen: int, slow: list[Datagram], refused: list[int],
                 totals: list[int]) -> None:
        """One batch from listening socket `lid`: known sessions' datagrams sent to their
        backends, the rest added to `slow` in arrival order."""
        batch = recv_batch(self._listeners[lid], BATCH, SIZE)
        if not batch:
            return
        sent = size = failed = 0
        now = self._clock()
        table, slots = self._table, self._slots
        for data, addr in batch:
            slot = table.get((lid, addr[0], addr[1]))
            session = slots[slot] if slot is not None else None
            if session is None or session.gen != gen:
                slow.append((data, addr, lid))
                continue
            assert slot is not None
            try:
                session.sock.send(data)
            except ConnectionRefusedError:
                session.gen = 0  # its next datagrams go to the policy, which moves it
                refused.append(slot)
                continue
            except OSError:  # full (would block) or another error: a drop
                failed += 1
                continue
            n = len(data)
            sent += 1
            size += n
            session.datagrams_in += 1
            session.bytes_in += n
            self._touch(slot, session, now)
        totals[0] += sent
        totals[1] += size
        totals[4] += failed

    def _replies(self, slot: int, totals: list[int]) -> bool:
        """One batch of replies on a session's socket, sent back to its client; True when they
        are its first since add. A receive error raises (ECONNREFUSED: ICMP from the backend)."""
        session = self._get(slot)
        batch = recv_batch(session.sock, BATCH, SIZE)
        if not batch:
            return False
        first = not session.answered
        session.answered = True
        out = self._listeners[session.lid]
        client = session.client
        messages = [(data, client) for data, _ in batch]
        sent = size = failed = 0
        start = 0
        while start < len(messages):
            try:
                n = send_batch(out, messages[start:])
            except OSError:
                n = 0
            for data, _ in messages[start:start + n]:
                size += len(data)
            sent += n
            start += n
            if start < len(messages):
                failed += 1
                start += 1
        if sent:
            session.datagrams_out += sent
            session.bytes_out += size
            self._touch(slot, session, self._clock())
        totals[2] += sent
        totals[3] += size
        totals[4] += failed
        return first

    def touched(self) -> list[Touched]:
        """Sessions with traffic since the last call: their last activity and counts (taken)."""
        out: list[Touched] = []
        for slot in self._dirty:
            session = self._slots[slot]
            if session is None or not session.dirty:
                continue
            session.dirty = False
            out.append((slot, session.last, session.datagrams_in, session.datagrams_out,
                        session.bytes_in, session.bytes_out))
            session.datagrams_in = session.datagrams_out = session.bytes_in = 0
            session.bytes_out = 0
        self._dirty = []
        return out


def new_plane(name: str | None = None) -> Plane:
    """The compiled plane when the compiled engine is in use and `_udp` is built, else Python."""
    if (name or engine_name()) == "cython":
        try:
            from pointsman.proxy.engine._udp import UdpPlane
        except ImportError:
            return PyUdpPlane()
        plane: Plane = UdpPlane()
        return plane
    return PyUdpPlane()
