"""The preamble has its own budget: connections still reading a PROXY header or a ClientHello are
bounded by `preamble.max_pending` (default 10% of `max_connections`), apart from the connection
table, and the oldest goes first when the budget is full; per-source limits apply during the
preamble too. A crowd of clients that open a connection and stall after one byte must not stop a
client that says what it has to say."""

from __future__ import annotations

import asyncio
import socket

import pytest
import yaml

from pointsman.protocols.proxy_protocol import build_v1
from pointsman.telemetry.flow import RejectReason
from tests.hostile import closed_by_peer, proxy_holders, raw_connect, read_to_end, send_all
from tests.support import LOOPBACK, echo_backend, free_port, running, wait_for

pytestmark = [pytest.mark.timeout(90), pytest.mark.usefixtures("engine")]

HOLDERS = 300
TRIES = 250
HEADER = build_v1(("198.51.100.7", 4000), ("192.0.2.1", 80))


async def well_behaved(listen: str) -> bool:
    """One try of a client that sends its whole header and a line, and reads the echo."""
    try:
        sock = await raw_connect(listen)
    except (OSError, TimeoutError):
        return False
    try:
        await send_all(sock, HEADER + b"hi\n")
        sock.shutdown(socket.SHUT_WR)
        data, how = await read_to_end(sock, 5.0)
        return (data, how) == (b"hi\n", "eof")
    except (OSError, TimeoutError):
        return False
    finally:
        sock.close()


async def test_one_byte_proxy_holders_do_not_stop_a_well_behaved_client() -> None:
    async with echo_backend() as peer:
        listen = f"{LOOPBACK}:{free_port()}"
        config = {
            "listeners": [{"name": "lb", "bind": listen, "pool": "p", "max_connections": 300,
                           "backlog": 1024, "proxy_protocol": {"accept": "required"}}],
            "pools": [{"name": "p", "backends": [{"address": peer.address}]}],
        }
        async with running(yaml.safe_dump(config)) as runtime:
            stats = runtime.listeners["lb"].stats
            async with proxy_holders(listen, HOLDERS) as holders:
                await wait_for(lambda: stats.accepted >= HOLDERS, 10.0, what="holders accepted")
                ok = 0
                for _ in range(TRIES):
                    ok += await well_behaved(listen)
                assert ok >= 0.99 * TRIES, f"only {ok} of {TRIES} tries got through"
                evicted = stats.rejected[RejectReason.PREAMBLE_EVICTED]
                still_open = sum(not closed_by_peer(s) for s in holders)
            # The budget (30) held: every holder beyond it was closed, oldest first.
            assert evicted >= HOLDERS - 30
            assert still_open <= 30
            assert stats.rejected[RejectReason.TABLE_FULL] == 0


async def test_max_pending_is_a_listener_key_and_evicts_the_oldest() -> None:
    async with echo_backend() as peer:
        listen = f"{LOOPBACK}:{free_port()}"
        config = {
            "listeners": [{"name": "lb", "bind": listen, "pool": "p",
                           "proxy_protocol": {"accept": "required"},
                           "preamble": {"max_pending": 2}}],
            "pools": [{"name": "p", "backends": [{"address": peer.address}]}],
        }
        async with running(yaml.safe_dump(config)) as runtime:
            stats = runtime.listeners["lb"].stats
            async with proxy_holders(listen, 2) as first:
                await wait_for(lambda: stats.accepted == 2, 5.0, what="two pending")
                async with proxy_holders(listen, 1) as third:
                    await wait_for(lambda: closed_by_peer(first[0]), 5.0, what="oldest evicted")
                    assert not closed_by_peer(first[1])
                    assert not closed_by_peer(third[0])
                    assert stats.rejected == {RejectReason.PREAMBLE_EVICTED: 1}


async def test_per_source_limits_apply_during_the_preamble() -> None:
    """A TLS-routing listener: the TCP peer is the client, so its cap counts from accept."""
    async with echo_backend() as peer:
        listen = f"{LOOPBACK}:{free_port()}"
        config = {
            "listeners": [{"name": "lb", "bind": listen, "default_pool": "p",
                           "tls_routes": [{"server_names": ["a.example"], "pool": "p"}],
                           "limits": {"max_connections_per_source": 3}}],
            "pools": [{"name": "p", "backends": [{"address": peer.address}]}],
        }
        async with running(yaml.safe_dump(config)) as runtime:
            stats = runtime.listeners["lb"].stats
            socks = []
            try:
                for _ in range(5):
                    sock = await raw_connect(listen)
                    socks.append(sock)
                    await send_all(sock, b"\x16")  # the first byte of a TLS record, then nothing
                await wait_for(lambda: stats.accepted == 5, 5.0, what="five accepted")
                await wait_for(lambda: sum(map(closed_by_peer, socks)) == 2, 5.0,
                               what="two over the cap closed")
                assert stats.rejected == {RejectReason.SOURCE_CONNECTION_LIMIT: 2}
                assert [closed_by_peer(s) for s in socks] == [False, False, False, True, True]
            finally:
                for sock in socks:
                    sock.close()
            await asyncio.sleep(0)
