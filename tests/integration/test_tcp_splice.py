"""The zero-copy (splice) path: same guarantees as the transport path — every byte, in order,
half-close forwarded, resets forwarded — and it really is the path taken."""

from __future__ import annotations

import asyncio
import hashlib
import random
import socket
import struct

import pytest

from tests.support import (
    LOOPBACK,
    backend,
    connect,
    free_port,
    one_pool_config,
    read_all,
    running,
    wait_closed,
    wait_for,
)

pytestmark = pytest.mark.usefixtures("engine")

SIZE = 8 * 1024 * 1024  # per direction per connection
CONNECTIONS = 4


def splice_config(listen: str, peer: str, after: int = 0) -> str:
    return one_pool_config(listen, [peer], pool={"zero_copy": "auto", "zero_copy_after": after})


async def write_random(writer: asyncio.StreamWriter, data: bytes, rng: random.Random) -> None:
    view = memoryview(data)
    while view:
        n = rng.randint(1, 256 * 1024)
        writer.write(view[:n])
        view = view[n:]
        await writer.drain()
    writer.write_eof()


async def test_bulk_both_ways_on_the_splice_path_is_byte_exact() -> None:
    """Each direction carries its own random bytes in random chunks; sha256 compared."""
    seeds = iter(range(1000))

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seed = int((await reader.readexactly(4)).hex(), 16)
        down = random.Random(seed).randbytes(SIZE)
        sender = asyncio.ensure_future(write_random(writer, down, random.Random(seed + 1)))
        received = await read_all(reader, 30.0)
        await sender
        writer.close()
        results[seed] = hashlib.sha256(received).hexdigest()

    results: dict[int, str] = {}
    async with backend(serve) as peer:
        listen = f"{LOOPBACK}:{free_port()}"
        async with running(splice_config(listen, peer.address)) as runtime:

            async def client() -> None:
                seed = next(seeds) * 10
                reader, writer = await connect(listen)
                up = random.Random(seed + 5).randbytes(SIZE)
                writer.write(seed.to_bytes(4, "big"))
                sender = asyncio.ensure_future(write_random(writer, up, random.Random(seed + 7)))
                got = await read_all(reader, 30.0)
                await sender
                writer.close()
                assert hashlib.sha256(got).digest() == hashlib.sha256(
                    random.Random(seed).randbytes(SIZE)).digest()
                await wait_for(lambda: seed in results, 10.0, what="backend digest")
                assert results[seed] == hashlib.sha256(up).hexdigest()

            await asyncio.gather(*(client() for _ in range(CONNECTIONS)))
            stats = runtime.listeners["lb"].stats
            await wait_for(lambda: stats.active == 0, 5.0, what="connections ended")
            assert stats.spliced == CONNECTIONS
            assert stats.bytes_in == CONNECTIONS * (SIZE + 4)
            assert stats.bytes_out == CONNECTIONS * SIZE


async def test_half_close_on_the_splice_path_still_delivers_the_reply() -> None:
    """The backend answers only after the client's FIN: the FIN must cross as a FIN."""

    async def reply_after_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received = await read_all(reader, 10.0)
        writer.write(hashlib.sha256(received).digest() * 1000)
        await writer.drain()
        writer.close()

    async with backend(reply_after_eof) as peer:
        listen = f"{LOOPBACK}:{free_port()}"
        async with running(splice_config(listen, peer.address)) as runtime:
            reader, writer = await connect(listen)
            payload = random.Random(3).randbytes(3 * 1024 * 1024)
            writer.write(payload)
            await writer.drain()
            writer.write_eof()
            reply = await read_all(reader, 10.0)
            writer.close()
            assert reply == hashlib.sha256(payload).digest() * 1000
            stats = runtime.listeners["lb"].stats
            await wait_for(lambda: stats.active == 0, 5.0, what="connection ended")
            assert stats.spliced == 1
            assert stats.ended["client_fin"] == 1


async def test_backend_reset_on_the_splice_path_resets_the_client() -> None:
    ready = asyncio.Event()

    async def reset_later(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(1024 * 1024)
        ready.set()
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # with linger 0: a RST, not a FIN

    async with backend(reset_later) as peer:
        listen = f"{LOOPBACK}:{free_port()}"
        async with running(splice_config(listen, peer.address, after=1)) as runtime:
            reader, writer = await connect(listen)
            writer.write(bytes(1024 * 1024))
            await writer.drain()
            await asyncio.wait_for(ready.wait(), 5.0)
            how = await wait_closed(reader, 5.0)
            writer.close()
            assert how == "reset"
            stats = runtime.listeners["lb"].stats
            await wait_for(lambda: stats.active == 0, 5.0, what="connection ended")
            assert stats.spliced == 1
            assert stats.ended["backend_reset"] == 1


@pytest.mark.parametrize("after", [0, 1 << 20])
async def test_idle_timeout_cuts_a_spliced_connection(after: int) -> None:
    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_all(reader, 10.0)
        writer.close()

    async with backend(hold) as peer:
        listen = f"{LOOPBACK}:{free_port()}"
        config = one_pool_config(listen, [peer.address], pool={
            "zero_copy": "auto", "zero_copy_after": after, "idle_timeout": "300ms"})
        async with running(config) as runtime:
            reader, writer = await connect(listen)
            writer.write(bytes(2 * 1024 * 1024))
            await writer.drain()
            await wait_closed(reader, 5.0)
            writer.close()
            stats = runtime.listeners["lb"].stats
            await wait_for(lambda: stats.active == 0, 5.0, what="connection ended")
            assert stats.ended["idle_timeout"] == 1
            assert stats.spliced == 1
