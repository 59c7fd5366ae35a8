"""Forwarding a reset as a reset, after every byte that came before it.

A RST from one peer must reach the other peer as a RST (SO_LINGER {1, 0}, then close), or a
truncated reply looks complete. But a close with linger 0 discards whatever the kernel still holds
in the socket's send queue, so the RST waits until that queue has been sent: when it is empty
already (the usual case) the reset goes at once; otherwise TCP_NOTSENT_LOWAT = 1 makes the socket
report writable exactly when nothing is left unsent, and a duplicate descriptor is watched for
that (the loop refuses to watch a descriptor a transport owns). The connection's own FIN timer
bounds the wait for a peer that does not read.

Bytes already sent but not yet acknowledged are not waited for: on a lossy path a retransmission
could still lose the race with the RST.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
import struct
from collections.abc import Callable

LINGER_RESET = struct.pack("ii", 1, 0)
SIOCOUTQNSD = 0x894B  # linux/sockios.h: bytes in the send queue not yet sent
TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)
_INT = b"\0\0\0\0"


def unsent(fd: int) -> int:
    """Bytes the kernel holds for `fd` and has not sent yet (0 if it cannot tell)."""
    try:
        return int(struct.unpack("i", fcntl.ioctl(fd, SIOCOUTQNSD, _INT))[0])
    except OSError:
        return 0


def set_linger_reset(fd: int) -> None:
    """The next (last) close of this socket sends a RST instead of a FIN."""
    sock = socket.socket(fileno=fd)
    try:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    finally:
        sock.detach()


def reset_and_close(fd: int) -> None:
    """Close with SO_LINGER 0, so the peer gets a RST."""
    set_linger_reset(fd)
    os.close(fd)


class ResetWhenSent:
    """Watches `fd` (ours to close) until its send queue is sent, then `finish()` and a reset.

    `finish` closes whatever else refers to the socket (a transport); the RST leaves with the
    last close, which is ours. `cancel()` resets at once (the connection is being cut)."""

    __slots__ = ("done", "fd", "finish", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, finish: Callable[[], None]) -> None:
        self.loop = loop
        self.fd = fd
        self.finish = finish
        self.done = False
        sock = socket.socket(fileno=fd)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, 1)
        except OSError:
            pass
        finally:
            sock.detach()
        loop.add_writer(fd, self._writable)

    def _writable(self) -> None:
        # Writable under NOTSENT_LOWAT 1: nothing unsent. Also woken by an error on the socket
        # (the peer went away meanwhile): reset then too.
        self.cancel()

    def cancel(self) -> None:
        if self.done:
            return
        self.done = True
        self.loop.remove_writer(self.fd)
        set_linger_reset(self.fd)
        try:
            self.finish()
        finally:
            os.close(self.fd)


def reset_transport(loop: asyncio.AbstractEventLoop, transport: asyncio.Transport
                    ) -> ResetWhenSent | None:
    """Reset the peer of `transport` once the kernel has sent what it holds for it.

    Call when the transport's own write buffer is empty. Returns the watcher when it has to wait
    (None when the reset went at once)."""
    sock = transport.get_extra_info("socket")
    fd = sock.fileno() if sock is not None else -1
    if fd < 0:
        transport.abort()
        return None
    if unsent(fd) == 0:
        set_linger_reset(fd)
        transport.abort()
        return None
    try:
        dup = os.dup(fd)
    except OSError:  # out of descriptors: reset now, losing what is unsent
        set_linger_reset(fd)
        transport.abort()
        return None
    return ResetWhenSent(loop, dup, transport.abort)
