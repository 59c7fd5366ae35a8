"""connect_timeout against a backend that never answers the handshake: the try is abandoned
after the timeout, counted as a passive failure, and retried on another backend."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests.support import LOOPBACK, connect, echo_backend, free_port, one_pool_config, read_all, running

pytestmark = pytest.mark.usefixtures("engine")


@contextmanager
def silent_backend() -> Iterator[int]:
    """A port whose accept queue is full: further SYNs are dropped, so connects hang."""
    full = socket.socket()
    full.bind((LOOPBACK, 0))
    full.listen(0)
    port = full.getsockname()[1]
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex((LOOPBACK, port))
        fillers.append(s)
    try:
        yield port
    finally:
        for s in fillers:
            s.close()
        full.close()


async def test_hanging_connect_times_out_and_the_retry_succeeds() -> None:
    async with echo_backend() as good:
        with silent_backend() as port:
            listen = f"{LOOPBACK}:{free_port()}"
            config = one_pool_config(listen, [f"{LOOPBACK}:{port}", good.address], pool={
                "connect_timeout": "300ms", "retries": 1, "algorithm": "round_robin"})
            async with running(config) as runtime:
                durations = []
                for _ in range(4):
                    began = time.perf_counter()
                    reader, writer = await connect(listen)
                    writer.write(b"ping")
                    writer.write_eof()
                    assert await read_all(reader, 5.0) == b"ping"
                    writer.close()
                    durations.append(time.perf_counter() - began)
                silent = runtime.pools["p"].member(f"{LOOPBACK}:{port}")
                stats = runtime.listeners["lb"].stats
                # Round robin starts at a random backend, so 2 or 3 of the 4 tried the silent one.
                assert silent.stats.connect_failures == stats.retried >= 2
                assert stats.connect_failed == 0
                slow = [d for d in durations if d >= 0.25]
                assert len(slow) == stats.retried, durations  # each retry waited the timeout ...
                assert all(d < 2.0 for d in slow), durations  # ... and no more


async def test_all_backends_hanging_closes_the_client_after_the_timeouts() -> None:
    with silent_backend() as port:
        listen = f"{LOOPBACK}:{free_port()}"
        config = one_pool_config(listen, [f"{LOOPBACK}:{port}"], pool={
            "connect_timeout": "200ms", "retries": 0})
        async with running(config) as runtime:
            began = time.perf_counter()
            reader, writer = await connect(listen)
            assert await asyncio.wait_for(reader.read(), 5.0) == b""
            writer.close()
            assert 0.15 <= time.perf_counter() - began < 2.0
            assert runtime.listeners["lb"].stats.connect_failed == 1
