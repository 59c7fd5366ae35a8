"""Backpressure: a slow reader on one side stops the proxy reading the other side.

32 MiB go from a fast writer to a slow reader through a runtime in the test's loop. While it runs,
the proxy's own buffering for the connection (what the connection engine holds for it, per
direction, `engine.buffered`) is sampled; it must stay under the bound the watermarks promise,
and every byte must arrive. Without crossed watermarks the proxy would buffer most of the 32 MiB.
Runs on both engines.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import Awaitable, Callable

import pytest

from pointsman.node.runtime import Node
from pointsman.proxy.engine.api import READ_CHUNK
from pointsman.proxy.listener import TcpListener
from tests.support import (
    LOOPBACK,
    backend,
    close_writer,
    connect,
    free_port,
    one_pool_config,
    running,
    wait_for,
)

pytestmark = pytest.mark.usefixtures("engine")

TOTAL = 32 * 1024 * 1024
# The engine reads a source again only once its destination took everything (crossed
# watermarks, high = one read): per direction at most one read; summed over both directions.
BUFFER_BOUND = 2 * READ_CHUNK
SLOW_READ = 32 * 1024
SLOW_PAUSE = 0.001  # the slow reader's pace: one 32 KiB read per millisecond at most
DEADLINE = 30.0


def payload() -> bytes:
    return random.Random(32).randbytes(TOTAL)


async def fast_write(writer: asyncio.StreamWriter, data: bytes) -> None:
    view = memoryview(data)
    for offset in range(0, len(data), 1024 * 1024):
        writer.write(view[offset : offset + 1024 * 1024])
        await writer.drain()
    writer.write_eof()


async def slow_read(reader: asyncio.StreamReader) -> tuple[str, int]:
    digest = hashlib.sha256()
    total = 0
    while data := await reader.read(SLOW_READ):
        digest.update(data)
        total += len(data)
        await asyncio.sleep(SLOW_PAUSE)  # pacing the reader, not waiting for an event
    return digest.hexdigest(), total


def buffered(listener: TcpListener, conn_id: int) -> int:
    assert listener.engine is not None
    held = listener.engine.buffered(conn_id)
    return sum(held) if held is not None else 0


async def sample_until(done: Callable[[], bool], runtime: Node, samples: list[int]) -> None:
    listener = runtime.listeners["lb"]
    assert isinstance(listener, TcpListener)
    while not done():
        samples.extend(buffered(listener, conn_id) for conn_id in list(listener.connections))
        await asyncio.sleep(0.001)


Side = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[object]]


@pytest.mark.parametrize("direction", ["backend_to_slow_client", "client_to_slow_backend"])
async def test_slow_reader_bounds_proxy_buffers_and_loses_nothing(direction: str) -> None:
    data = payload()
    backend_result: list[tuple[str, int]] = []

    async def backend_side(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if direction == "backend_to_slow_client":
            await fast_write(writer, data)
            await reader.read()  # until the client's FIN
        else:
            backend_result.append(await slow_read(reader))

    async with backend(backend_side) as peer:
        listen = f"{LOOPBACK}:{free_port()}"
        # Copy path: the watermarks are what is measured (the splice path holds nothing in user
        # space; its bound is the pipe size, tested in test_tcp_splice.py).
        config = one_pool_config(listen, [peer.address], pool={"zero_copy": "off"})
        async with running(config) as runtime:
            reader, writer = await connect(listen)
            samples: list[int] = []
            transfer: asyncio.Future[object]
            if direction == "backend_to_slow_client":
                transfer = asyncio.ensure_future(slow_read(reader))
            else:
                transfer = asyncio.ensure_future(fast_write(writer, data))
            async with asyncio.timeout(DEADLINE):
                await sample_until(transfer.done, runtime, samples)
                result = await transfer
                if direction == "backend_to_slow_client":
                    client_result = result
                    writer.write_eof()
                else:
                    await wait_for(lambda: bool(backend_result), DEADLINE, what="backend done")
                    client_result = backend_result[0]
            await close_writer(writer)

    assert client_result == (hashlib.sha256(data).hexdigest(), TOTAL)
    assert len(samples) > 100, "the transfer was too fast to sample"
    # The slow side really was slow: the proxy had to hold bytes for it ...
    assert max(samples) > 0, max(samples)
    # ... and never buffered more than the watermarks allow.
    assert max(samples) <= BUFFER_BOUND, f"{max(samples)} > {BUFFER_BOUND}"
