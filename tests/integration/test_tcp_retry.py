"""Connect failures: a refused backend is skipped by retry; with no live backend the client is
closed promptly and the failure counted."""

from __future__ import annotations

import asyncio

import pytest

from pointsman.telemetry.flow import EndReason
from tests.support import (
    LOOPBACK,
    close_writer,
    connect,
    echo_backend,
    free_port,
    one_pool_config,
    refused_port,
    roundtrip,
    running,
    wait_closed,
    wait_for,
)

pytestmark = pytest.mark.usefixtures("engine")

CLIENTS = 20


async def test_refused_backend_is_skipped_and_every_client_is_served() -> None:
    async with echo_backend() as live:
        listen = f"{LOOPBACK}:{free_port()}"
        with refused_port() as dead:
            config = one_pool_config(listen, [f"{LOOPBACK}:{dead}", live.address])
            async with running(config) as runtime:

                async def client(i: int) -> None:
                    reader, writer = await connect(listen)
                    await roundtrip(reader, writer, f"client {i}\n".encode() * 100)
                    await close_writer(writer)

                await asyncio.gather(*(client(i) for i in range(CLIENTS)))
                stats = runtime.listeners["lb"].stats
                await wait_for(lambda: stats.active == 0, 2.0, what="all connections ended")

    assert live.accepted == CLIENTS
    assert stats.accepted == CLIENTS
    assert stats.connect_failed == 0
    assert stats.retried >= 1  # round robin sent some first attempts to the refused port
    assert stats.ended[EndReason.CONNECT_FAILED] == 0
    assert runtime.pools["p"].member(f"{LOOPBACK}:{dead}").stats.connect_failures >= 1


async def test_all_backends_refusing_closes_client_promptly_and_counts_it() -> None:
    listen = f"{LOOPBACK}:{free_port()}"
    with refused_port() as dead1, refused_port() as dead2:
        config = one_pool_config(listen, [f"{LOOPBACK}:{dead1}", f"{LOOPBACK}:{dead2}"])
        async with running(config) as runtime:
            reader, writer = await connect(listen)
            writer.write(b"anyone there?\n")
            await wait_closed(reader, timeout=1.0)
            await close_writer(writer)
            stats = runtime.listeners["lb"].stats
            await wait_for(lambda: stats.active == 0, 1.0, what="connection torn down")

    assert stats.accepted == 1
    assert stats.connect_failed == 1
    assert stats.retried == 1  # the second backend was tried after the first refused
    assert stats.ended[EndReason.CONNECT_FAILED] == 1
