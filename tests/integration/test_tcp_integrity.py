"""Byte integrity through `pointsman run` (uvloop): 64 MiB each way over 16 concurrent connections.

Each connection carries independent random data in both directions, written in random chunk sizes.
The client announces a connection number in a 4-byte header; the backend hashes everything it
receives after it and answers with its own stream, seeded by that number. Both ends compare SHA-256
digests and byte counts, so a lost, duplicated, reordered or truncated chunk fails the test.
It runs once on the transport path and once with zero copy (splice after the first MiB), each
with one process and with a control process and two workers (`workers: 2`), which share the
connections between them.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import (
    LOOPBACK,
    backend,
    close_writer,
    connect,
    free_port,
    one_pool_config,
    pointsman_process_async,
    with_workers,
)

CONNECTIONS = 16
BYTES_EACH_WAY = 4 * 1024 * 1024  # 16 x 4 MiB = 64 MiB up and 64 MiB down
MAX_CHUNK = 128 * 1024
DEADLINE = 20.0
HEADER = struct.Struct("!I")

# The proxy runs on uvloop in its own process; the test side uses uvloop too, to keep up with it.
pytestmark = [pytest.mark.asyncio(loop_factories=["uvloop"]), pytest.mark.usefixtures("engine")]


def stream(seed: int) -> bytes:
    return random.Random(seed).randbytes(BYTES_EACH_WAY)


def up_seed(conn_id: int) -> int:
    return 1_000 + conn_id


def down_seed(conn_id: int) -> int:
    return 2_000 + conn_id


async def send_in_random_chunks(writer: asyncio.StreamWriter, data: bytes, rng: random.Random) -> None:
    view = memoryview(data)
    offset = 0
    while offset < len(data):
        size = rng.randint(1, MAX_CHUNK)
        writer.write(view[offset : offset + size])
        offset += size
        await writer.drain()
    writer.write_eof()


async def hash_until_eof(reader: asyncio.StreamReader, rng: random.Random) -> tuple[str, int]:
    digest = hashlib.sha256()
    total = 0
    while data := await reader.read(rng.randint(1, MAX_CHUNK)):
        digest.update(data)
        total += len(data)
    return digest.hexdigest(), total


@dataclass
class Received:
    digest: str
    size: int


@pytest.mark.parametrize("zero_copy", ["off", "auto"], ids=["transports", "splice"])
async def test_64_mib_each_way_over_16_connections_arrives_intact(
    tmp_path: Path, zero_copy: str, workers: int
) -> None:
    received: dict[int, Received] = {}

    async def seeded_backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        (conn_id,) = HEADER.unpack(await reader.readexactly(HEADER.size))
        rng = random.Random(conn_id)
        data = stream(down_seed(conn_id))
        (digest, size), _ = await asyncio.gather(
            hash_until_eof(reader, rng), send_in_random_chunks(writer, data, rng)
        )
        received[conn_id] = Received(digest, size)

    async def client(address: str, conn_id: int) -> tuple[str, int]:
        reader, writer = await connect(address)
        rng = random.Random(-conn_id)
        data = HEADER.pack(conn_id) + stream(up_seed(conn_id))
        (digest, size), _ = await asyncio.gather(
            hash_until_eof(reader, rng), send_in_random_chunks(writer, data, rng)
        )
        await close_writer(writer)
        return digest, size

    async with backend(seeded_backend) as peer:
        listen = f"{LOOPBACK}:{free_port()}"
        config = with_workers(
            one_pool_config(listen, [peer.address], pool={"zero_copy": zero_copy}), workers)
        async with pointsman_process_async(config, tmp_path):
            async with asyncio.timeout(DEADLINE):
                results = await asyncio.gather(*(client(listen, i) for i in range(CONNECTIONS)))

    assert peer.accepted == CONNECTIONS
    assert sorted(received) == list(range(CONNECTIONS))
    for conn_id, (down_digest, down_size) in enumerate(results):
        assert down_size == BYTES_EACH_WAY, f"connection {conn_id}: backend -> client size"
        assert down_digest == hashlib.sha256(stream(down_seed(conn_id))).hexdigest(), (
            f"connection {conn_id}: backend -> client bytes differ"
        )
        up = received[conn_id]
        assert up.size == BYTES_EACH_WAY, f"connection {conn_id}: client -> backend size"
        assert up.digest == hashlib.sha256(stream(up_seed(conn_id))).hexdigest(), (
            f"connection {conn_id}: client -> backend bytes differ"
        )
