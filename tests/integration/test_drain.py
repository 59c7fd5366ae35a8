"""Drain and maintenance through real sockets: open connections on the backend carry on and end
normally, new ones go elsewhere, and `is_drained` turns true once the last one has closed."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field

from pointsman.pool.state import BackendState
from pointsman.telemetry.flow import EndReason
from tests.integration.test_balancing import (
    ask_name,
    exchange,
    listen_address,
    named_backends,
    open_named,
    single_pool,
    tcp_stats,
)
from tests.support import close_writer, read_all, running, wait_for

PACE = 0.01  # between two exchanges of one long-lived stream (pacing, not synchronisation)
MAX_EXCHANGES = 2_000  # bound per stream; a passing run makes a few hundred
MORE = 10  # exchanges each stream must make after a state change


@dataclass
class Stream:
    """A long-lived connection that keeps exchanging lines with its echo backend."""

    backend: str
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    exchanges: int = 0
    error: BaseException | None = None
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    async def chatter(self) -> None:
        try:
            for i in range(MAX_EXCHANGES):
                if self.stop.is_set():
                    return
                await exchange(self.reader, self.writer, f"{self.backend} line {i}\n".encode())
                self.exchanges += 1
                await asyncio.sleep(PACE)
        except Exception as exc:  # asserted on by the test
            self.error = exc

    async def finish(self) -> bytes:
        """Stop chatting, half-close, read to the end: a normal, client-initiated end."""
        self.stop.set()
        assert self.task is not None
        await self.task
        self.writer.write_eof()
        rest = await read_all(self.reader, timeout=2.0)
        await close_writer(self.writer)
        return rest


async def open_streams(address: str, count: int) -> list[Stream]:
    streams = []
    for _ in range(count):
        name, reader, writer = await open_named(address)
        stream = Stream(name, reader, writer)
        stream.task = asyncio.create_task(stream.chatter())
        streams.append(stream)
    return streams


async def wait_more_exchanges(streams: list[Stream], timeout: float = 3.0) -> None:
    marks = [s.exchanges for s in streams]
    await wait_for(
        lambda: all(s.exchanges >= m + MORE for s, m in zip(streams, marks, strict=True))
        or any(s.error is not None for s in streams),
        timeout,
        what=f"{MORE} more exchanges on every stream",
    )


async def test_drain_and_maintenance_let_open_connections_finish() -> None:
    async with named_backends("a", "b", "c") as peers:
        listen = listen_address()
        async with running(single_pool(listen, peers, algorithm="round_robin")) as runtime:
            pool = runtime.pools["p"]
            streams = await open_streams(listen, 6)
            assert Counter(s.backend for s in streams) == {"a": 2, "b": 2, "c": 2}
            on = {name: [s for s in streams if s.backend == name] for name in "abc"}
            await wait_more_exchanges(streams)

            pool.drain("a")
            after_drain = Counter([await ask_name(listen) for _ in range(20)])
            await wait_more_exchanges(streams)
            assert not pool.is_drained("a"), "drained while two connections are open"

            pool.maintenance("b")
            after_maintenance = Counter([await ask_name(listen) for _ in range(20)])
            await wait_more_exchanges(streams)
            assert not pool.is_drained("b"), "in maintenance with two connections open"

            a_rest = [await s.finish() for s in on["a"]]
            await wait_for(lambda: pool.is_drained("a"), 2.0, what="a drained")
            b_was_drained = pool.is_drained("b")
            b_rest = [await s.finish() for s in on["b"]]
            await wait_for(lambda: pool.is_drained("b"), 2.0, what="b drained")
            c_rest = [await s.finish() for s in on["c"]]
            stats = tcp_stats(runtime)
            await wait_for(lambda: stats.active == 0, 2.0, what="all connections ended")
            c_drained = pool.is_drained("c")
            states = {m.id: m.machine.state for m in pool.members()}

    assert [s.error for s in streams] == [None] * 6
    assert all(s.exchanges >= 3 * MORE for s in streams)
    assert a_rest == b_rest == c_rest == [b""] * 2
    assert after_drain == {"b": 10, "c": 10}
    assert after_maintenance == {"c": 20}
    assert not b_was_drained
    assert not c_drained  # an up backend with no connections is not "drained"
    assert states == {"a": BackendState.DRAINING, "b": BackendState.MAINTENANCE,
                      "c": BackendState.UP}
    assert stats.ended[EndReason.CLOSED_BY_OPERATOR] == 0
    assert stats.ended[EndReason.BACKEND_RESET] == stats.ended[EndReason.CLIENT_RESET] == 0
