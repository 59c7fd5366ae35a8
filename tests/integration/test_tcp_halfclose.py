"""Half-close: a FIN crosses the proxy as a FIN, and the other direction keeps flowing.

`echo hi | nc host port` sends its FIN before the reply exists; a proxy that turns the FIN into a
close loses the reply. Both orders are tested: client FIN first, and backend FIN first, with one
process and with a control process and two workers.
"""

from __future__ import annotations

import asyncio
import hashlib
import random

import pytest

from pointsman.telemetry.flow import EndReason
from tests.support import (
    LOOPBACK,
    backend,
    close_writer,
    connect,
    free_port,
    one_pool_config,
    read_all,
    running,
    statistics_when,
    wait_for,
)

pytestmark = pytest.mark.usefixtures("engine")

REQUEST_SIZE = 1024 * 1024


def reply_for(request: bytes) -> bytes:
    """A reply that depends on every request byte and is bigger than one socket buffer."""
    return hashlib.sha256(request).digest() + request[::-1] * 2


async def reply_after_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Read the whole request (to EOF) and only then answer, then close."""
    request = await read_all(reader, timeout=5.0)
    writer.write(reply_for(request))
    await writer.drain()


async def test_backend_that_replies_after_eof_delivers_whole_reply(workers: int) -> None:
    request = random.Random(1).randbytes(REQUEST_SIZE)
    async with backend(reply_after_eof) as peer:
        listen = f"{LOOPBACK}:{free_port()}"
        config = one_pool_config(listen, [peer.address])
        async with running(config, workers=workers) as runtime:
            reader, writer = await connect(listen)
            writer.write(request)
            writer.write_eof()
            reply = await read_all(reader, timeout=5.0)
            await close_writer(writer)
            stats = await statistics_when(runtime, lambda s: sum(s.ended.values()) == 1,
                                          what="connection torn down")

    assert len(reply) == 32 + 2 * REQUEST_SIZE
    assert reply == reply_for(request)
    assert stats.bytes_in == REQUEST_SIZE
    assert stats.bytes_out == len(reply)
    assert stats.ended[EndReason.CLIENT_FIN] == 1
    assert stats.active == 0


async def test_backend_half_closes_first_and_client_keeps_sending(workers: int) -> None:
    greeting = random.Random(2).randbytes(300_000)
    upload = random.Random(3).randbytes(REQUEST_SIZE)
    uploaded: list[bytes] = []

    async def greet_then_listen(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(greeting)
        writer.write_eof()  # done talking; still listening
        await writer.drain()
        uploaded.append(await read_all(reader, timeout=5.0))

    async with backend(greet_then_listen) as peer:
        listen = f"{LOOPBACK}:{free_port()}"
        config = one_pool_config(listen, [peer.address])
        async with running(config, workers=workers) as runtime:
            reader, writer = await connect(listen)
            received = await read_all(reader, timeout=5.0)  # ends at the backend's FIN
            assert received == greeting
            # The proxy must still carry the client -> backend direction after that FIN.
            writer.write(upload)
            await writer.drain()
            writer.write_eof()
            await wait_for(lambda: bool(uploaded), 5.0, what="backend read the upload to EOF")
            await close_writer(writer)
            stats = await statistics_when(runtime, lambda s: sum(s.ended.values()) == 1,
                                          what="connection torn down")

    assert uploaded == [upload]
    assert stats.ended[EndReason.BACKEND_FIN] == 1
    assert stats.active == 0
    assert (stats.bytes_in, stats.bytes_out) == (len(upload), len(greeting))
