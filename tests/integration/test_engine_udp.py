"""recv_batch/send_batch: recvmmsg/sendmmsg when compiled, a loop otherwise; same results."""

from __future__ import annotations

import socket

import pytest

from pointsman.proxy.engine import batch_functions
from tests.integration.engine_support import ENGINES
from tests.support import LOOPBACK, has_ipv6


def pair(host: str = LOOPBACK) -> tuple[socket.socket, socket.socket]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    a = socket.socket(family, socket.SOCK_DGRAM)
    b = socket.socket(family, socket.SOCK_DGRAM)
    for s in (a, b):
        s.bind((host, 0))
        s.setblocking(False)
    return a, b


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("host", [LOOPBACK, pytest.param("::1", marks=pytest.mark.skipif(
    not has_ipv6(), reason="no IPv6 loopback"))])
def test_batches_round_trip_in_order(engine: str, host: str) -> None:
    recv_batch, send_batch = batch_functions(engine)
    a, b = pair(host)
    try:
        target = b.getsockname()
        messages = [(bytes([i]) * (i + 1), target) for i in range(100)]
        assert send_batch(a.fileno(), messages) == 100
        got = recv_batch(b.fileno(), 64)
        got += recv_batch(b.fileno(), 64)
        assert recv_batch(b.fileno(), 64) == []  # nothing left: no block, no error
        assert [payload for payload, _ in got] == [payload for payload, _ in messages]
        assert {addr[:2] for _, addr in got} == {a.getsockname()[:2]}
        # Replies to the addresses as received, and a connected socket with no address.
        assert send_batch(b.fileno(), [(b"re:" + p, addr) for p, addr in got[:3]]) == 3
        a.connect(target)
        assert send_batch(a.fileno(), [(b"connected", None)]) == 1
        assert [p for p, _ in recv_batch(a.fileno(), 10)] == [b"re:\0", b"re:\1\1", b"re:\2\2\2"]
        assert recv_batch(b.fileno(), 10)[0][0] == b"connected"
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("engine", ENGINES)
def test_send_error_on_first_message_raises(engine: str) -> None:
    _, send_batch = batch_functions(engine)
    a, b = pair()
    port = b.getsockname()[1]
    b.close()
    a.connect((LOOPBACK, port))
    try:
        send_batch(a.fileno(), [(b"x", None)])  # ICMP port unreachable comes back ...
        with pytest.raises(ConnectionRefusedError):
            for _ in range(100):  # ... as ECONNREFUSED on a later send
                send_batch(a.fileno(), [(b"x", None)])
    finally:
        a.close()
