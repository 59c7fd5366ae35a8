"""The sock_diag request encoder and dump parser, on a message captured from a real kernel and on
messages built field by field from the uapi layout; then one live dump of a socket we fill."""

from __future__ import annotations

import ipaddress
import socket
import struct
import time

import pytest

from pointsman.telemetry import sockdiag
from pointsman.telemetry.sockdiag import ListenSocket, SockDiagError, encode_request, parse_dump

# One SOCK_DIAG_BY_FAMILY answer and the NLMSG_DONE after it, captured on Linux 6.18 from a dump
# of AF_INET LISTEN sockets (seq 7): 127.0.0.1:46231, listen(4), eight connects never accepted.
# The queue holds backlog + 1 = 5; the message carries 52 bytes of attributes after the 72-byte
# inet_diag_msg (which the parser skips).
CAPTURED_MSG = bytes.fromhex(
    "7c000000140002000700000081380000020a0000b49700007f0000010000000000000000000000000000"
    "000000000000000000000000000000000000041000000000000000000000050000000400000000000000"
    "0e4c0b00050008000000000008000f00000000000c00150001000000000000000600160052000000")
CAPTURED_DONE = bytes.fromhex("1400000003000200070000008138000000000000")


def message(family: int, state: int, port: int, address: bytes, rqueue: int, wqueue: int,
            inode: int = 1, kind: int = sockdiag.SOCK_DIAG_BY_FAMILY) -> bytes:
    body = (struct.pack("=BBBB", family, state, 0, 0)
            + struct.pack("!HH16s16s", port, 0, address.ljust(16, b"\0"), bytes(16))
            + struct.pack("=III", 0, 0, 0)
            + struct.pack("=IIIII", 0, rqueue, wqueue, 0, inode))
    return struct.pack("=IHHII", 16 + len(body), kind, 2, 1, 0) + body


def test_the_captured_answer_reads_as_a_full_queue() -> None:
    found: list[ListenSocket] = []
    assert parse_dump(CAPTURED_MSG + CAPTURED_DONE, found) is True
    assert found == [ListenSocket(ipaddress.IPv4Address("127.0.0.1"), 46231, 5, 4, 740366)]


def test_a_dump_spans_datagrams_until_done() -> None:
    found: list[ListenSocket] = []
    assert parse_dump(CAPTURED_MSG, found) is False
    assert parse_dump(CAPTURED_DONE, found) is True
    assert len(found) == 1


def test_ipv6_and_non_listen_sockets() -> None:
    v6 = ipaddress.IPv6Address("2001:db8::7")
    data = (message(socket.AF_INET6, sockdiag.TCP_LISTEN, 443, v6.packed, 3, 128)
            + message(socket.AF_INET, 1, 80, bytes([10, 0, 0, 1]), 9, 9)  # ESTABLISHED: skipped
            + message(socket.AF_INET, sockdiag.TCP_LISTEN, 80, bytes(4), 0, 4096, inode=9))
    found: list[ListenSocket] = []
    assert parse_dump(data, found) is False
    assert found == [ListenSocket(v6, 443, 3, 128, 1),
                     ListenSocket(ipaddress.IPv4Address("0.0.0.0"), 80, 0, 4096, 9)]


def test_an_error_answer_raises_with_its_errno() -> None:
    error = struct.pack("=IHHII", 36, sockdiag.NLMSG_ERROR, 0, 1, 0) + struct.pack("=i", -1) + bytes(16)
    with pytest.raises(SockDiagError) as info:
        parse_dump(error, [])
    assert info.value.errno == 1


@pytest.mark.parametrize("data", [
    CAPTURED_MSG[:60],  # header says 124 bytes
    struct.pack("=IHHII", 8, sockdiag.SOCK_DIAG_BY_FAMILY, 0, 1, 0),  # shorter than a header
    struct.pack("=IHHII", 30, sockdiag.SOCK_DIAG_BY_FAMILY, 0, 1, 0) + bytes(14),  # short body
])
def test_cut_messages_raise(data: bytes) -> None:
    with pytest.raises(SockDiagError):
        parse_dump(data, [])


def test_request_layout() -> None:
    request = encode_request(socket.AF_INET6, 42)
    length, kind, flags, seq, pid = struct.unpack_from("=IHHII", request)
    assert (length, kind, seq, pid) == (len(request), 20, 42, 0) and length == 16 + 56
    assert flags == sockdiag.NLM_F_REQUEST | sockdiag.NLM_F_DUMP
    family, protocol, ext, pad, states = struct.unpack_from("=BBBBI", request, 16)
    assert (family, protocol, ext, pad, states) == (socket.AF_INET6, socket.IPPROTO_TCP, 0, 0,
                                                   1 << 10)


def _netlink_available() -> bool:
    try:
        socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, sockdiag.NETLINK_SOCK_DIAG).close()
    except (OSError, AttributeError):
        return False
    return True


@pytest.mark.skipif(not _netlink_available(), reason="no NETLINK_SOCK_DIAG (not Linux)")
def test_a_live_listener_never_accepting_shows_backlog_plus_one() -> None:
    """listen(4) and 8 connects: 5 wait in the queue (backlog + 1), the rest are dropped.
    TCP_INFO on the socket itself reports the same two numbers (tcpi_unacked, tcpi_sacked)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(4)
        port = server.getsockname()[1]
        clients = []
        try:
            for _ in range(8):
                client = socket.socket()
                client.setblocking(False)
                clients.append(client)
                client.connect_ex(("127.0.0.1", port))

            def ours() -> ListenSocket:
                return next(s for s in sockdiag.listen_sockets([socket.AF_INET]) if s.port == port)

            deadline = time.monotonic() + 5.0
            while ours().queued < 5 and time.monotonic() < deadline:
                time.sleep(0.01)
            got = ours()
            assert (got.address, got.queued, got.bound) == (ipaddress.IPv4Address("127.0.0.1"), 5, 4)
            info = server.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
            state, *_ = struct.unpack_from("=B", info)
            unacked, sacked = struct.unpack_from("=II", info, 24)
            assert (state, unacked, sacked) == (sockdiag.TCP_LISTEN, got.queued, got.bound)
        finally:
            for client in clients:
                client.close()
