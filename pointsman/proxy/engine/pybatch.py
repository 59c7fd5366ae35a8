"""UDP in batches, pure Python: the fallback for recvmmsg/sendmmsg (same signatures as the
compiled `_engine.recv_batch` / `send_batch`). A loop of recvfrom/sendto until the socket
would block; sessions stay with the caller.

Both take the socket object (what the UDP listener passes: nothing made per call) or a bare
descriptor (wrapped for the call, then detached)."""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Any

Address = tuple[Any, ...]  # (host, port) or (host, port, flowinfo, scope_id)
Sock = int | socket.socket
DATAGRAM_MAX = 65535


def recv_batch(sock: Sock, max_messages: int, size: int = DATAGRAM_MAX) -> list[tuple[bytes, Address]]:
    """Up to `max_messages` datagrams waiting on the non-blocking socket (maybe none)."""
    s = sock if isinstance(sock, socket.socket) else socket.socket(fileno=sock)
    out: list[tuple[bytes, Address]] = []
    recvfrom = s.recvfrom
    try:
        while len(out) < max_messages:
            try:
                out.append(recvfrom(size))
            except (BlockingIOError, InterruptedError):
                break
    finally:
        if s is not sock:
            s.detach()
    return out


def send_batch(sock: Sock, messages: Sequence[tuple[bytes, Address | None]]) -> int:
    """Send in order until one would block; how many went. An address of None sends on a
    connected socket. An error on the first message raises; on a later one, the count so far
    is returned (the caller retries from there and then sees the error)."""
    s = sock if isinstance(sock, socket.socket) else socket.socket(fileno=sock)
    sent = 0
    try:
        for payload, addr in messages:
            try:
                if addr is None:
                    s.send(payload)
                else:
                    s.sendto(payload, addr)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                if sent == 0:
                    raise
                break
            sent += 1
    finally:
        if s is not sock:
            s.detach()
    return sent
