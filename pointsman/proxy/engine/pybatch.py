"""UDP in batches, pure Python: the fallback for recvmmsg/sendmmsg (same signatures as the
compiled `_engine.recv_batch` / `send_batch`). A loop of recvfrom/sendto until the socket
would block; sessions stay with the caller."""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Any

Address = tuple[Any, ...]  # (host, port) or (host, port, flowinfo, scope_id)
DATAGRAM_MAX = 65535


def recv_batch(fd: int, max_messages: int, size: int = DATAGRAM_MAX) -> list[tuple[bytes, Address]]:
    """Up to `max_messages` datagrams waiting on the non-blocking socket `fd` (maybe none)."""
    sock = socket.socket(fileno=fd)
    out: list[tuple[bytes, Address]] = []
    try:
        while len(out) < max_messages:
            try:
                data, addr = sock.recvfrom(size)
            except (BlockingIOError, InterruptedError):
                break
            out.append((data, addr))
    finally:
        sock.detach()
    return out


def send_batch(fd: int, messages: Sequence[tuple[bytes, Address | None]]) -> int:
    """Send in order until one would block; how many went. An address of None sends on a
    connected socket. An error on the first message raises; on a later one, the count so far
    is returned (the caller retries from there and then sees the error)."""
    sock = socket.socket(fileno=fd)
    sent = 0
    try:
        for payload, addr in messages:
            try:
                if addr is None:
                    sock.send(payload)
                else:
                    sock.sendto(payload, addr)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                if sent == 0:
                    raise
                break
            sent += 1
    finally:
        sock.detach()
    return sent
