"""Outgoing source addresses (`source: {addresses: [...]}`): connections to a backend leave from
each configured local address in turn, so one backend can take more than one address's worth of
ephemeral ports; an address that cannot be bound is counted and never hangs the client.

127.0.0.2 and 127.0.0.3 are local on Linux (all of 127.0.0.0/8 is). 192.0.2.1 (TEST-NET-1) is
not: binding it fails at once with EADDRNOTAVAIL, so no packet is ever sent to it.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from pointsman.telemetry.flow import RejectReason
from tests.support import (
    LOOPBACK,
    backend,
    close_writer,
    connect,
    free_port,
    one_pool_config,
    read_all,
    running,
    wait_for,
)

pytestmark = pytest.mark.timeout(30)

IO_TIMEOUT = 2.0
NOT_LOCAL = "192.0.2.1"
CONNECTIONS = 6


class PeerRecorder:
    """A backend that answers each connection with the address it came from."""

    def __init__(self) -> None:
        self.peers: list[str] = []

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")[0]
        self.peers.append(peer)
        writer.write(f"{peer}\n".encode())
        await writer.drain()


async def ask(listen: str) -> bytes:
    """One connection through pointsman: what the backend said, b"" if it was cut."""
    reader, writer = await connect(listen)
    try:
        return await read_all(reader, IO_TIMEOUT)
    finally:
        await close_writer(writer)


async def test_connections_leave_from_each_source_address_in_turn() -> None:
    recorder = PeerRecorder()
    async with backend(recorder) as peer:
        listen = f"{LOOPBACK}:{free_port()}"
        pool = {"source": {"addresses": ["127.0.0.2", "127.0.0.3"]}}
        async with running(one_pool_config(listen, [peer.address], pool=pool)):
            answers = [await ask(listen) for _ in range(CONNECTIONS)]
    assert answers == [f"{ip}\n".encode() for ip in recorder.peers]
    assert set(recorder.peers) == {"127.0.0.2", "127.0.0.3"}
    # Strictly alternating: each connection uses the address the previous one did not.
    assert all(a != b for a, b in zip(recorder.peers, recorder.peers[1:], strict=False)), \
        recorder.peers


async def test_an_address_that_cannot_be_bound_fails_fast_and_is_counted() -> None:
    recorder = PeerRecorder()
    async with backend(recorder) as peer, backend(recorder) as other:
        listen = f"{LOOPBACK}:{free_port()}"
        # connect_timeout is far above what a refused bind takes: a hang would show.
        pool = {"source": {"addresses": [NOT_LOCAL]}, "connect_timeout": "5s", "retries": 2}
        config = one_pool_config(listen, [peer.address, other.address], pool=pool)
        async with running(config) as runtime:
            stats = runtime.listeners["lb"].stats
            for _ in range(3):
                began = time.monotonic()
                assert await ask(listen) == b""
                assert time.monotonic() - began < 1.0
            await wait_for(lambda: stats.active == 0, IO_TIMEOUT, what="flows ended")
    assert recorder.peers == []
    # A source address we cannot use is our shortage, not the backends' (issue 14): refused as
    # local_resource, counted by op and errno, and no backend is blamed for it.
    assert stats.rejected[RejectReason.LOCAL_RESOURCE] == 3
    assert stats.connect_failed == 0 and not stats.ended
    # Each connection tried both backends (a retry), and every attempt found no source address.
    assert stats.source_port_failures == 6
    assert stats.local_resource["bind:EADDRNOTAVAIL"] == 6
    assert stats.retried == 3
    assert all(m.stats.connect_failures == 0 for m in runtime.pools["p"].members())


async def test_an_unusable_address_among_good_ones_is_skipped() -> None:
    """One address gone from the host must not take the backend down with it."""
    recorder = PeerRecorder()
    async with backend(recorder) as peer:
        listen = f"{LOOPBACK}:{free_port()}"
        pool = {"source": {"addresses": ["127.0.0.2", NOT_LOCAL, "127.0.0.3"]}}
        async with running(one_pool_config(listen, [peer.address], pool=pool)) as runtime:
            answers = [await ask(listen) for _ in range(CONNECTIONS)]
            stats = runtime.listeners["lb"].stats
    assert answers == [f"{ip}\n".encode() for ip in recorder.peers]
    assert len(recorder.peers) == CONNECTIONS
    assert set(recorder.peers) == {"127.0.0.2", "127.0.0.3"}
    assert stats.connect_failed == 0
