"""A reset stays a reset, after exactly the bytes sent before it, in both directions, on the
copy path and the splice path; the record says which side reset."""

from __future__ import annotations

import asyncio
import random
import socket

import pytest

from pointsman.proxy.engine.api import End, Flag
from tests.integration.engine_support import (
    ENGINES,
    open_raw,
    proxy,
    raw_backend,
    recv_to_end,
    send_then_reset,
)
from tests.support import wait_for

SIZES = [0, 1, 65_537, 1 << 20]
PATHS = pytest.mark.parametrize("splice_after", [None, 0], ids=["copy", "splice"])


@pytest.mark.parametrize("engine", ENGINES)
@PATHS
@pytest.mark.parametrize("size", SIZES)
async def test_backend_reset_reaches_the_client_after_its_bytes(engine: str, splice_after: int | None,
                                                                size: int) -> None:
    data = random.Random(size).randbytes(size)

    async def reply_then_reset(conn: socket.socket) -> None:
        await asyncio.get_running_loop().sock_recv(conn, 16)  # the request
        await send_then_reset(conn, data)

    async with raw_backend(reply_then_reset) as backend, proxy(engine, [backend.port],
                                                               splice_after=splice_after) as p:
        sock = await open_raw(p.address)
        await asyncio.get_running_loop().sock_sendall(sock, b"GET")
        got, end = await recv_to_end(sock)
        sock.close()
        (record,) = await p.wait_ended(1)
    assert len(got) == size and got == data
    assert end == "reset"
    assert record.reason == End.BACKEND_RESET
    assert record.flags & Flag.BACKEND_RESET and not record.flags & Flag.CLIENT_RESET
    assert (record.bytes_in, record.bytes_out) == (3, size)


@pytest.mark.parametrize("engine", ENGINES)
@PATHS
@pytest.mark.parametrize("size", SIZES)
async def test_client_reset_reaches_the_backend_after_its_bytes(engine: str, splice_after: int | None,
                                                                size: int) -> None:
    data = random.Random(size + 1).randbytes(size)
    seen: list[tuple[bytes, str]] = []

    async def listen(conn: socket.socket) -> None:
        seen.append(await recv_to_end(conn))

    async with raw_backend(listen) as backend, proxy(engine, [backend.port],
                                                     splice_after=splice_after) as p:
        sock = await open_raw(p.address)
        await asyncio.get_running_loop().sock_sendall(sock, b"x")  # connected and relaying
        await wait_for(lambda: p.engine.listener_stats(p.lid).bytes_in == 1, 5.0)
        await send_then_reset(sock, data)
        await wait_for(lambda: bool(seen), 10.0, what="the backend saw the end")
        (record,) = await p.wait_ended(1)
    got, end = seen[0]
    assert len(got) == size + 1 and got == b"x" + data
    assert end == "reset"
    assert record.reason == End.CLIENT_RESET
    assert record.flags & Flag.CLIENT_RESET and not record.flags & Flag.BACKEND_RESET
    assert record.bytes_in == size + 1


@pytest.mark.parametrize("engine", ENGINES)
async def test_client_reset_while_connecting_resets_nothing_else(engine: str) -> None:
    """The client resets before the backend answered: the record says client_reset and the
    half-open backend connection is dropped."""
    from tests.integration.test_engine_connect import silent_port

    with silent_port() as port:
        async with proxy(engine, [port], connect_timeout=5.0) as p:
            sock = await open_raw(p.address)
            await wait_for(lambda: p.engine.active() == 1, 5.0)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
            sock.close()
            (record,) = await p.wait_ended(1)
    assert record.reason == End.CLIENT_RESET
    assert not record.flags & Flag.CONNECTED
