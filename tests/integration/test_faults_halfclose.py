"""FIN timeouts, like HAProxy's `timeout client-fin` / `server-fin`: once one side has sent its FIN
the connection is half-closed, and a half-closed connection on which nothing moves for
`half_close_timeout` is ended (`half_close_timeout`), not left until `idle_timeout`. One that
keeps moving is left alone."""

from __future__ import annotations

import asyncio
import socket

import pytest

from pointsman.telemetry.flow import EndReason
from tests.hostile import (
    never_read,
    pattern,
    raw_backend,
    raw_connect,
    read_to_end,
    send_all,
    stream_forever,
)
from tests.support import LOOPBACK, free_port, one_pool_config, running, wait_for

pytestmark = [pytest.mark.timeout(30), pytest.mark.usefixtures("engine")]

HALF = 0.3  # half_close_timeout in these tests; idle_timeout stays at a minute


def config(listen: str, backend: str, zero_copy: str = "off") -> str:
    return one_pool_config(listen, [backend], pool={
        "half_close_timeout": f"{int(HALF * 1000)}ms", "idle_timeout": "60s",
        "zero_copy": zero_copy, "zero_copy_after": 0})


@pytest.mark.parametrize("zero_copy", ["off", "auto"])
async def test_client_fin_to_a_backend_that_never_reads_ends_after_half_close_timeout(
        zero_copy: str) -> None:
    release = asyncio.Event()
    async with raw_backend(never_read(release)) as peer:
        listen = f"{LOOPBACK}:{free_port()}"
        async with running(config(listen, peer.address, zero_copy)) as runtime:
            loop = asyncio.get_running_loop()
            sock = await raw_connect(listen)
            await send_all(sock, pattern(64 * 1024))
            sock.shutdown(socket.SHUT_WR)
            began = loop.time()
            _, how = await read_to_end(sock, 10.0)
            took = loop.time() - began
            sock.close()
            release.set()
            stats = runtime.listeners["lb"].stats
            await wait_for(lambda: stats.active == 0, 5.0, what="connection ended")
            assert dict(stats.ended) == {EndReason.HALF_CLOSE_TIMEOUT: 1}
            assert how in ("eof", "reset")
            assert took >= HALF * 0.9, f"cut after {took:.2f}s, before half_close_timeout"


async def test_backend_fin_to_a_client_that_never_reads_ends_after_half_close_timeout() -> None:
    async def flood_then_fin(sock: socket.socket) -> None:
        # More than the client's window takes, less than the proxy buffers: the proxy reads
        # through to the FIN and forwards it, then nothing moves.
        await asyncio.get_running_loop().sock_sendall(sock, pattern(128 * 1024))
        sock.shutdown(socket.SHUT_WR)
        await read_to_end(sock, 10.0)

    async with raw_backend(flood_then_fin) as peer:
        listen = f"{LOOPBACK}:{free_port()}"
        async with running(config(listen, peer.address)) as runtime:
            sock = await raw_connect(listen, rcvbuf=4096)
            stats = runtime.listeners["lb"].stats
            try:
                await wait_for(lambda: stats.active == 0, 10.0, what="connection ended")
            finally:
                sock.close()
            assert dict(stats.ended) == {EndReason.HALF_CLOSE_TIMEOUT: 1}


async def test_a_half_closed_connection_that_keeps_moving_is_not_cut() -> None:
    """Client FIN, then a reply that takes four half_close_timeouts but never pauses for one."""

    async def slow_reply(sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        await read_to_end(sock, 5.0)
        for i in range(12):
            await loop.sock_sendall(sock, pattern(1000, seed=i))
            await asyncio.sleep(HALF / 3)
        sock.shutdown(socket.SHUT_WR)

    async with raw_backend(slow_reply) as peer:
        listen = f"{LOOPBACK}:{free_port()}"
        async with running(config(listen, peer.address)) as runtime:
            sock = await raw_connect(listen)
            await send_all(sock, b"request")
            sock.shutdown(socket.SHUT_WR)
            data, how = await read_to_end(sock, 10.0)
            sock.close()
            stats = runtime.listeners["lb"].stats
            await wait_for(lambda: stats.active == 0, 5.0, what="connection ended")
            assert (len(data), how) == (12000, "eof")
            assert dict(stats.ended) == {EndReason.CLIENT_FIN: 1}


async def test_without_a_fin_idle_timeout_still_rules() -> None:
    """No FIN anywhere: a stream that keeps flowing is never cut by the FIN timeout."""
    async with raw_backend(stream_forever()) as peer:
        listen = f"{LOOPBACK}:{free_port()}"
        async with running(config(listen, peer.address)) as runtime:
            loop = asyncio.get_running_loop()
            sock = await raw_connect(listen)
            got = 0
            deadline = loop.time() + 4 * HALF
            while loop.time() < deadline:
                got += len(await loop.sock_recv(sock, 65536))
            sock.close()
            stats = runtime.listeners["lb"].stats
            await wait_for(lambda: stats.active == 0, 5.0, what="connection ended")
            assert got > 0
            assert EndReason.HALF_CLOSE_TIMEOUT not in stats.ended
