"""Listening sockets made by hand, so options (reuse, v6-only, backlog) are ours to choose."""

from __future__ import annotations

import socket

from pointsman.config.addresses import HostPort


def family_of(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def listen_socket(
    address: HostPort,
    kind: socket.SocketKind = socket.SOCK_STREAM,
    backlog: int = 1024,
    reuse_port: bool = False,
) -> socket.socket:
    """Bind and (for TCP) listen, non-blocking; IPv6 sockets are v6-only so [::]:p and 0.0.0.0:p
    can be separate listeners."""
    family = family_of(address.host)
    sock = socket.socket(family, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address.host, address.port))
        if kind == socket.SOCK_STREAM:
            sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock
