"""Per-connection limits: the idle timeout (reset by traffic either way) and the connection table
bound (`max_connections`).

The idle close also runs with a control process and two workers (the `workers` fixture): the
timer lives in the worker that holds the connection, and the count reaches the control process
by report. What resets the timer is the same code either way, so those tests run once."""

from __future__ import annotations

import asyncio

import pytest

from pointsman.telemetry.flow import EndReason, RejectReason
from tests.support import (
    LOOPBACK,
    backend,
    close_writer,
    connect,
    echo_backend,
    free_port,
    one_pool_config,
    roundtrip,
    running,
    statistics_when,
    wait_closed,
    wait_for,
)

pytestmark = pytest.mark.usefixtures("engine")

IDLE = 0.3
TICK = 0.1  # traffic every 100 ms for 1 s: ten times inside the idle timeout
TICKS = 10
IDLE_POOL = {"idle_timeout": f"{IDLE * 1000:.0f}ms"}


async def test_idle_connection_is_closed_after_idle_timeout(workers: int) -> None:
    async with echo_backend() as peer:
        listen = f"{LOOPBACK}:{free_port()}"
        config = one_pool_config(listen, [peer.address], pool=IDLE_POOL)
        async with running(config, workers=workers) as runtime:
            reader, writer = await connect(listen)
            await roundtrip(reader, writer, b"ping\n")  # connected; the idle timer is armed
            loop = asyncio.get_running_loop()
            quiet_since = loop.time()
            await wait_closed(reader, timeout=IDLE + 1.0)
            waited = loop.time() - quiet_since
            await close_writer(writer)
            stats = await statistics_when(runtime, lambda s: sum(s.ended.values()) == 1,
                                          what="connection torn down")

    assert IDLE * 0.9 <= waited <= IDLE + 0.5
    assert stats.ended[EndReason.IDLE_TIMEOUT] == 1
    assert stats.active == 0


async def test_client_traffic_alone_resets_the_idle_timer() -> None:
    received: list[bytes] = []

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Reads and never answers, so only the client's bytes count as activity."""
        while data := await reader.read(65536):
            received.append(data)

    async with backend(sink) as peer:
        listen = f"{LOOPBACK}:{free_port()}"
        config = one_pool_config(listen, [peer.address], pool=IDLE_POOL)
        async with running(config) as runtime:
            stats = runtime.listeners["lb"].stats
            _, writer = await connect(listen)
            sent = b""
            for i in range(TICKS):
                tick = f"tick {i}\n".encode()
                writer.write(tick)
                sent += tick
                await wait_for(lambda sent=sent: b"".join(received) == sent, 1.0, what=f"tick {i} arrived")
                await asyncio.sleep(TICK)  # the traffic pattern under test, not a synchronisation
            assert stats.active == 1
            assert stats.ended[EndReason.IDLE_TIMEOUT] == 0
            await close_writer(writer)
            await wait_for(lambda: stats.active == 0, 1.0, what="connection torn down")

    assert b"".join(received) == sent
    assert stats.ended[EndReason.IDLE_TIMEOUT] == 0


async def test_backend_traffic_alone_resets_the_idle_timer() -> None:
    async def ticker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for i in range(TICKS):
            writer.write(f"tick {i}\n".encode())
            await writer.drain()
            await asyncio.sleep(TICK)
        writer.write(b"done\n")
        await reader.read()

    async with backend(ticker) as peer:
        listen = f"{LOOPBACK}:{free_port()}"
        config = one_pool_config(listen, [peer.address], pool=IDLE_POOL)
        async with running(config) as runtime:
            reader, writer = await connect(listen)
            async with asyncio.timeout(TICK * TICKS + 2.0):
                lines = [await reader.readline() for _ in range(TICKS + 1)]
            stats = runtime.listeners["lb"].stats
            assert stats.ended[EndReason.IDLE_TIMEOUT] == 0
            await close_writer(writer)
            await wait_for(lambda: stats.active == 0, 1.0, what="connection torn down")

    assert lines == [f"tick {i}\n".encode() for i in range(TICKS)] + [b"done\n"]
    assert stats.ended[EndReason.IDLE_TIMEOUT] == 0


# One process only: with workers, `max_connections` is split into per-worker shares (the kernel
# spreads connections), so which connection finds its worker's share full is up to the spread;
# tests/integration/test_limits.py checks the process-wide bound with workers through shedding.
async def test_connections_past_max_connections_are_rejected() -> None:
    async with echo_backend() as peer:
        listen = f"{LOOPBACK}:{free_port()}"
        config = one_pool_config(listen, [peer.address], listener={"max_connections": 3})
        async with running(config) as runtime:
            stats = runtime.listeners["lb"].stats
            admitted = [await connect(listen) for _ in range(3)]
            for i, (reader, writer) in enumerate(admitted):
                await roundtrip(reader, writer, f"admitted {i}\n".encode())

            reader, writer = await connect(listen)  # the kernel accepts; the proxy cuts it
            writer.write(b"let me in\n")
            await wait_closed(reader, timeout=1.0)
            await close_writer(writer)
            assert stats.rejected[RejectReason.TABLE_FULL] == 1
            assert stats.active == 3
            for i, (reader, writer) in enumerate(admitted):  # the admitted ones are untouched
                await roundtrip(reader, writer, f"still here {i}\n".encode())

            # A freed slot admits the next connection.
            await close_writer(admitted[0][1])
            await wait_for(lambda: stats.active == 2, 1.0, what="slot freed")
            reader, writer = await connect(listen)
            await roundtrip(reader, writer, b"my turn\n")
            await close_writer(writer)
            for _, other in admitted[1:]:
                await close_writer(other)
            await wait_for(lambda: stats.active == 0, 1.0, what="all connections ended")

    assert stats.accepted == 5  # every connection taken from the kernel, the refused one too
    assert stats.rejected == {RejectReason.TABLE_FULL: 1}
    assert peer.accepted == 4  # the rejected connection never reached a backend
