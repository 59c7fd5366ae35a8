"""Accept queues of listening TCP sockets, asked of the kernel over sock_diag (NETLINK_SOCK_DIAG).

Why sock_diag and not TCP_INFO on our own socket: with `workers`, the listening sockets live in
the worker processes (one per worker, SO_REUSEPORT) while /metrics is served by the control
process. A dump of the namespace's LISTEN sockets reaches all of them from any process, costs one
netlink round trip (the kernel walks only its listening hash), and answers the same two numbers
TCP_INFO gives for a listener (Linux: `tcpi_unacked` and `tcpi_sacked`):

- `idiag_rqueue`: connections that completed the handshake and wait for accept() (sk_ack_backlog);
- `idiag_wqueue`: the bound of that queue (sk_max_ack_backlog), i.e. min(backlog, somaxconn).

The kernel lets the queue hold bound + 1 entries; past that it drops handshakes and counts
ListenOverflows (see netstat.py).

Message layout (Linux include/uapi/linux/netlink.h, sock_diag.h, inet_diag.h): nlmsghdr (native
endian), then `inet_diag_req_v2` for the request and `inet_diag_msg` for each answer; ports and
addresses in the socket id are big-endian. `encode_request` and `parse_dump` are pure.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
TCP_LISTEN = 10  # include/net/tcp_states.h
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300

_NLMSGHDR = struct.Struct("=IHHII")
_REQ = struct.Struct("=BBBBI")  # family, protocol, ext, pad, states
_SOCKID = struct.Struct("!HH16s16s")  # sport, dport, src, dst (then if, cookie: native)
_SOCKID_TAIL = struct.Struct("=III")
_MSG_HEAD = struct.Struct("=BBBB")  # family, state, timer, retrans
_MSG_TAIL = struct.Struct("=IIIII")  # expires, rqueue, wqueue, uid, inode
_MSG_SIZE = _MSG_HEAD.size + _SOCKID.size + _SOCKID_TAIL.size + _MSG_TAIL.size  # 72
_NO_COOKIE = 0xFFFFFFFF  # INET_DIAG_NOCOOKIE

MAX_RECEIVES = 1000
"""Bound on recv calls per dump: one 64 KiB read holds ~800 listening sockets."""

RECV_BUFFER = 65536
TIMEOUT = 1.0  # seconds: the kernel answers in microseconds; this only bounds a kernel bug


class SockDiagError(OSError):
    """The kernel refused the dump (errno in `.errno`) or answered something malformed."""


@dataclass(frozen=True, slots=True)
class ListenSocket:
    """One listening socket: where it is bound, its accept queue now and the queue's bound."""

    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int
    queued: int
    bound: int
    inode: int


def encode_request(family: socket.AddressFamily, seq: int) -> bytes:
    """A dump request for every TCP socket of `family` in LISTEN state."""
    body = (_REQ.pack(family, socket.IPPROTO_TCP, 0, 0, 1 << TCP_LISTEN)
            + _SOCKID.pack(0, 0, bytes(16), bytes(16))
            + _SOCKID_TAIL.pack(0, _NO_COOKIE, _NO_COOKIE))
    header = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY,
                            NLM_F_REQUEST | NLM_F_DUMP, seq, 0)
    return header + body


def parse_dump(data: bytes, into: list[ListenSocket]) -> bool:
    """Append the listening sockets in one datagram of a dump to `into`; True once the dump's
    NLMSG_DONE was seen. Raises SockDiagError for an error answer or a truncated message."""
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            raise SockDiagError(f"netlink message of {length} bytes at offset {offset} is cut")
        body = data[offset + _NLMSGHDR.size:offset + length]
        if kind == NLMSG_DONE:
            return True
        if kind == NLMSG_ERROR:
            errno = -struct.unpack_from("=i", body)[0] if len(body) >= 4 else 0
            raise SockDiagError(errno, f"sock_diag dump refused (errno {errno})")
        if kind == SOCK_DIAG_BY_FAMILY:
            found = _socket(body)
            if found is not None:
                into.append(found)
        offset += (length + 3) & ~3  # NLMSG_ALIGN
    return False


def _socket(body: bytes) -> ListenSocket | None:
    if len(body) < _MSG_SIZE:
        raise SockDiagError(f"inet_diag_msg of {len(body)} bytes, expected {_MSG_SIZE}")
    family, state, _timer, _retrans = _MSG_HEAD.unpack_from(body)
    if state != TCP_LISTEN:
        return None
    sport, _dport, src, _dst = _SOCKID.unpack_from(body, _MSG_HEAD.size)
    tail = _MSG_HEAD.size + _SOCKID.size + _SOCKID_TAIL.size
    _expires, rqueue, wqueue, _uid, inode = _MSG_TAIL.unpack_from(body, tail)
    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    if family == socket.AF_INET:
        address = ipaddress.IPv4Address(src[:4])
    elif family == socket.AF_INET6:
        address = ipaddress.IPv6Address(src)
    else:
        return None
    return ListenSocket(address, sport, rqueue, wqueue, inode)


def listen_sockets(families: Iterable[socket.AddressFamily] = (socket.AF_INET, socket.AF_INET6)
                   ) -> list[ListenSocket]:
    """Every listening TCP socket of this network namespace, of the given families.
    Raises OSError (SockDiagError) when the kernel cannot answer."""
    out: list[ListenSocket] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(TIMEOUT)
        for seq, family in enumerate(families, start=1):
            nl.sendto(encode_request(family, seq), (0, 0))
            for _ in range(MAX_RECEIVES):
                if parse_dump(nl.recv(RECV_BUFFER), out):
                    break
            else:
                raise SockDiagError(f"sock_diag dump did not end within {MAX_RECEIVES} reads")
    return out
