"""Our own accept loop, so every accept error is seen, counted and answered by backing off.

Why not `loop.create_server`: on EMFILE/ENFILE libuv (uvloop) accepts and closes pending
connections with a reserve descriptor and tells nobody, and on any other accept error (ENOBUFS,
ENOMEM) uvloop closes the listening handle for good; plain asyncio logs through the exception
handler and pauses for a second. Neither lets us count the error, nor refuse before the
descriptor table is full. Here the listening socket is read with `add_reader`; each accepted
socket gets its transport from `connect_accepted_socket`, whose coroutine is stepped by hand
rather than wrapped in a Task (it only waits for `connection_made`; a Task per connection costs
a few microseconds more, measured).

Backing off: an accept that fails for lack of a resource (or a listener that finds the
descriptor budget spent) stops accepting for BACKOFF_MIN, doubling up to BACKOFF_MAX while it
keeps happening; `freed()` (a connection ended, so descriptors came back) resumes at once when
`room()` says there is room again. Connections wait in the kernel's backlog meanwhile.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable, Coroutine
from typing import Any

from pointsman.proxy.resources import LOCAL_ERRNOS

log = logging.getLogger("pointsman.accept")

# Accepts per readiness callback: amortises the callback, and bounds how long one busy listener
# holds the loop (uvloop's own server loops until EAGAIN; asyncio uses the backlog).
ACCEPT_BATCH = 64
BACKOFF_MIN = 0.025
BACKOFF_MAX = 1.0
# Per connection, not the listener's fault: ignore and go on (the peer left before accept).
_TRANSIENT = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ENETDOWN,
                        errno.ENOPROTOOPT, errno.EHOSTDOWN, errno.ENONET, errno.EHOSTUNREACH,
                        errno.EOPNOTSUPP, errno.ENETUNREACH, errno.EINTR})

Accepted = Callable[[socket.socket, Any], None]
Failed = Callable[[OSError], None]


class Acceptor:
    """Accepts on one listening socket; hands each socket to `on_socket(sock, address)`."""

    __slots__ = ("_handle", "backoff", "closed", "loop", "on_error", "on_socket", "paused",
                 "reading", "room", "sock")

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 on_socket: Accepted, on_error: Failed,
                 room: Callable[[], bool] = lambda: True) -> None:
        self.loop = loop
        self.sock = sock
        self.on_socket = on_socket
        self.on_error = on_error
        self.room = room
        self.reading = False
        self.paused = False
        self.closed = False
        self.backoff = BACKOFF_MIN
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._read_on()

    def _read_on(self) -> None:
        if not self.reading and not self.closed:
            self.reading = True
            self.loop.add_reader(self.sock.fileno(), self._ready)

    def _read_off(self) -> None:
        if self.reading:
            self.reading = False
            self.loop.remove_reader(self.sock.fileno())

    def _ready(self) -> None:
        accept = self.sock.accept
        for _ in range(ACCEPT_BATCH):
            try:
                conn, address = accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _TRANSIENT:
                    continue
                self.on_error(exc)
                self.back_off()
                return
            self.backoff = BACKOFF_MIN
            self.on_socket(conn, address)
            if not self.reading:  # on_socket asked us to back off
                return

    def back_off(self) -> None:
        """Stop accepting for a while (a resource ran out); doubles while it keeps happening."""
        if self.closed or self.paused:
            return
        self._read_off()
        self.paused = True
        self._handle = self.loop.call_later(self.backoff, self._retry)
        self.backoff = min(self.backoff * 2, BACKOFF_MAX)

    def freed(self) -> None:
        """A connection ended and gave its descriptors back: accept again if there is room."""
        if self.paused and self.room():
            self._resume()

    def _retry(self) -> None:
        self._handle = None
        if self.room():
            self._resume()
        else:  # still no room: look again later (a freed() may come first)
            self._handle = self.loop.call_later(self.backoff, self._retry)
            self.backoff = min(self.backoff * 2, BACKOFF_MAX)

    def _resume(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self.paused = False
        self._read_on()

    def close(self) -> None:
        """Stop for good (the listening socket is closed by its owner)."""
        self.closed = True
        self._read_off()
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


def is_resource_error(exc: OSError) -> bool:
    return exc.errno in LOCAL_ERRNOS


def attach(loop: asyncio.AbstractEventLoop, factory: Callable[[], asyncio.Protocol],
           sock: socket.socket) -> None:
    """Give an accepted socket its transport and protocol, without a Task.

    `connect_accepted_socket` creates the transport at once and then only waits for
    `connection_made`; stepping its coroutine here and finishing it from the waiter's callback
    is what a Task would do, minus the Task."""
    coro = loop.connect_accepted_socket(factory, sock)
    try:
        waiter = coro.send(None)
    except StopIteration:
        return
    except Exception as exc:  # the transport could not be made: nothing else owns the socket
        log.debug("accepted socket dropped: %r", exc)
        sock.close()
        return
    waiter.add_done_callback(lambda _: _finish(coro))


def _finish(coro: Coroutine[Any, Any, Any]) -> None:
    try:
        coro.send(None)
    except StopIteration:
        pass
    except Exception as exc:  # connection_made raised: the loop's handler has it already
        log.debug("accepted connection failed to start: %r", exc)
