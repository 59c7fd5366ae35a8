"""Per-backend connection caps and the pool's queue, against real sockets.

A backend at `max_connections` is not picked; when every eligible backend is full a new
connection waits in the pool's queue unread, is served in arrival order as slots free, and is
refused as `queue_timeout` after `queue.timeout` or at once as `queue_full`. The backend counts
its own concurrency, so "never more than the cap" is measured where it matters.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from prometheus_client import generate_latest

from pointsman.admin.metrics import registry_for
from pointsman.admin.status import status
from pointsman.config.loader import load_text
from pointsman.telemetry.flow import EndReason, RejectReason
from tests.support import (
    LOOPBACK,
    Backend,
    backend,
    close_writer,
    free_port,
    one_pool_config,
    running,
    statistics_when,
    wait_for,
)


class Gate:
    """A slow backend: reads the client's id line, holds the connection (a fixed time, or until
    released), answers `ok <id>` and closes; it counts how many it holds at once."""

    def __init__(self, hold: float | None = None) -> None:
        self.hold = hold
        self.now = 0
        self.peak = 0
        self.order: list[bytes] = []
        self.release = asyncio.Event()

    async def handler(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.now += 1
        self.peak = max(self.peak, self.now)
        try:
            line = await reader.readline()
            self.order.append(line.strip())
            if self.hold is None:
                await self.release.wait()
            else:
                await asyncio.sleep(self.hold)
            writer.write(b"ok " + line)
            await writer.drain()
        finally:
            self.now -= 1


@contextlib.asynccontextmanager
async def gated(hold: float | None = None) -> AsyncIterator[tuple[Gate, Backend]]:
    gate = Gate(hold)
    async with backend(gate.handler) as info:
        yield gate, info


async def client(port: int, ident: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    writer.write(ident + b"\n")
    await writer.drain()
    return reader, writer


async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 timeout: float = 10.0) -> bytes:
    """Everything the proxy sends until it closes (b"" for a refusal)."""
    try:
        async with asyncio.timeout(timeout):
            data = await reader.read()
    except ConnectionResetError:
        data = b""
    await close_writer(writer)
    return data


def config(port: int, cap: int = 2, queue: dict[str, Any] | None = None, **pool: Any) -> str:
    return one_pool_config(f"{LOOPBACK}:{free_port()}", [f"{LOOPBACK}:{port}"], pool={
        "backend_max_connections": cap, "queue": queue or {"max": 100, "timeout": "10s"}, **pool})


def port_of(node: Any) -> int:
    sock = node.listeners["lb"].socket
    assert sock is not None
    return int(sock.getsockname()[1])


def adds_up(stats: Any) -> None:
    assert stats.accepted == sum(stats.rejected.values()) + sum(stats.ended.values()) + stats.active


async def test_cap_two_ten_slow_clients_served_in_arrival_order(engine: str) -> None:
    async with gated(hold=0.1) as (gate, info), running(config(info.port)) as node:
        port = port_of(node)
        lb = node.listeners["lb"]
        clients = []
        for i in range(10):
            clients.append(await client(port, b"%d" % i))
            await wait_for(lambda n=i + 1: lb.statistics().accepted == n, 5.0, what="accepted")
        pool = node.pools["p"]
        assert 1 <= pool.queue_stats.queued <= 8
        waiting = lb.statistics()  # the queued ones are open connections, not pending ones
        assert waiting.pending == 0 and waiting.active >= pool.queue_stats.queued
        adds_up(waiting)
        answers = await asyncio.gather(*(answer(r, w) for r, w in clients))
        stats = await statistics_when(node, lambda s: sum(s.ended.values()) == 10)
    assert answers == [b"ok %d\n" % i for i in range(10)]
    assert gate.order == [b"%d" % i for i in range(10)]  # arrival order
    assert gate.peak == 2 and info.accepted == 10
    assert stats.active == 0 and not stats.rejected
    adds_up(stats)
    assert pool.queue_stats.queued == 0
    assert pool.queue_stats.queued_total == pool.queue_stats.queue_wait.count >= 7


async def test_queue_timeout_refuses_without_reaching_the_backend(engine: str) -> None:
    async with gated() as (gate, info), \
            running(config(info.port, cap=1, queue={"max": 10, "timeout": "0.3s"})) as node:
        port = port_of(node)
        first = await client(port, b"first")
        await wait_for(lambda: info.accepted == 1, 5.0, what="first at the backend")
        loop = asyncio.get_running_loop()
        began = loop.time()
        waiting = await client(port, b"second")
        assert await answer(*waiting) == b""
        waited = loop.time() - began
        stats = await statistics_when(
            node, lambda s: s.rejected[RejectReason.QUEUE_TIMEOUT] == 1)
        assert info.accepted == 1 and stats.active == 1
        adds_up(stats)
        gate.release.set()
        assert await answer(*first) == b"ok first\n"
        stats = await statistics_when(node, lambda s: sum(s.ended.values()) == 1)
    assert 0.25 <= waited < 3.0, waited
    assert node.pools["p"].queue_stats.queue_wait.count == 1
    adds_up(stats)


async def test_queue_full_refuses_at_once_and_the_queued_one_is_served(engine: str) -> None:
    async with gated() as (gate, info), \
            running(config(info.port, cap=1, queue={"max": 1, "timeout": "10s"})) as node:
        port = port_of(node)
        lb = node.listeners["lb"]
        first = await client(port, b"first")
        await wait_for(lambda: info.accepted == 1, 5.0, what="first at the backend")
        second = await client(port, b"second")
        await wait_for(lambda: node.pools["p"].queue_stats.queued == 1, 5.0, what="one queued")
        third = await client(port, b"third")
        assert await answer(*third, timeout=5.0) == b""
        assert lb.statistics().rejected[RejectReason.QUEUE_FULL] == 1
        gate.release.set()
        assert await answer(*first) == b"ok first\n"
        assert await answer(*second) == b"ok second\n"
        stats = await statistics_when(node, lambda s: sum(s.ended.values()) == 2)
    assert gate.order == [b"first", b"second"] and gate.peak == 1
    adds_up(stats)


async def test_a_client_that_leaves_the_queue_ends_cleanly(engine: str) -> None:
    async with gated() as (gate, info), running(config(info.port, cap=1)) as node:
        port = port_of(node)
        pool = node.pools["p"]
        first = await client(port, b"first")
        await wait_for(lambda: info.accepted == 1, 5.0, what="first at the backend")
        leaver = await client(port, b"leaver")
        await wait_for(lambda: pool.queue_stats.queued == 1, 5.0, what="one queued")
        await close_writer(leaver[1])
        stats = await statistics_when(node, lambda s: s.ended[EndReason.CLIENT_FIN] == 1)
        assert pool.queue_stats.queued == 0 and stats.active == 1
        gate.release.set()
        assert await answer(*first) == b"ok first\n"
        after = await client(port, b"after")
        assert await answer(*after) == b"ok after\n"
        stats = await statistics_when(node, lambda s: sum(s.ended.values()) == 3)
    assert gate.order == [b"first", b"after"]  # the one that left never reached the backend
    adds_up(stats)


async def test_reload_raising_the_cap_serves_the_queue(engine: str) -> None:
    async with gated() as (gate, info), running(config(info.port, cap=1)) as node:
        port = port_of(node)
        pool = node.pools["p"]
        first = await client(port, b"first")
        await wait_for(lambda: info.accepted == 1, 5.0, what="first at the backend")
        second = await client(port, b"second")
        await wait_for(lambda: pool.queue_stats.queued == 1, 5.0, what="one queued")
        new = load_text(config(info.port, cap=2), "<reload>")
        errors = await node.apply(new.model_copy(update={"listeners": node.config.listeners}))
        assert errors == []
        await wait_for(lambda: info.accepted == 2, 5.0, what="the queued one served")
        assert pool.queue_stats.queued == 0
        gate.release.set()
        assert [await answer(*c) for c in (first, second)] == [b"ok first\n", b"ok second\n"]
        stats = await statistics_when(node, lambda s: sum(s.ended.values()) == 2)
    assert gate.peak == 2
    adds_up(stats)


@pytest.mark.parametrize("algorithm", ["round_robin", "least_connections", "source_hash",
                                       "maglev", "power_of_two", "weighted_round_robin"])
async def test_a_full_backend_is_not_picked(algorithm: str) -> None:
    """Two backends, one capped at 1 and held: every other connection goes to the other one,
    whatever the algorithm (hash policies fall back to their next choice)."""
    async with gated() as (held_gate, held), gated(hold=0.0) as (_, other):
        text = one_pool_config(f"{LOOPBACK}:{free_port()}", [], pool={
            "algorithm": algorithm, "hash_key": "source_ip_port", "backends": [
                {"address": f"{LOOPBACK}:{held.port}", "max_connections": 1},
                {"address": f"{LOOPBACK}:{other.port}"}]})
        async with running(text) as node:
            port = port_of(node)
            opened = []
            while held.accepted == 0 and len(opened) < 30:  # until one lands on the capped one
                opened.append(await client(port, b"probe"))
                count = len(opened)
                await wait_for(lambda n=count: held.accepted + other.accepted >= n, 5.0,
                               what="at a backend")
            assert held.accepted == 1
            for _ in range(8):
                assert await answer(*await client(port, b"x")) == b"ok x\n"
            assert held.accepted == 1 and held_gate.peak == 1
            held_gate.release.set()
            for each in opened:
                assert (await answer(*each)).startswith(b"ok")


# --- with workers: each enforces its share of the cap; figures summed in the control process ---


async def test_workers_share_the_cap_and_report_the_queue(workers: int) -> None:
    """Cap 2 over the node: with two workers each holds at most 1 (its share), so the backend
    never sees more than 2; the queue's figures reach the control process's sums."""
    async with gated(hold=0.1) as (gate, info), \
            running(config(info.port), workers=workers) as node:
        port = port_of_config(node)
        clients = await asyncio.gather(*(client(port, b"%d" % i) for i in range(8)))
        answers = await asyncio.gather(*(answer(r, w) for r, w in clients))
        stats = await statistics_when(node, lambda s: sum(s.ended.values()) == 8)
        pool = node.pools["p"]
        await wait_for(lambda: node.pool_stats(pool).queue_wait.count >= 6
                       and node.pool_stats(pool).queued == 0, 5.0, what="queue figures reported")
        figures = node.pool_stats(pool)
        document = status(node)
        metrics = generate_latest(registry_for(node)).decode()
    assert sorted(answers) == sorted(b"ok %d\n" % i for i in range(8))
    (shown,) = document["pools"]
    assert shown["queue"] == {"length": 0, "max": 100, "timeout": 10.0,
                              "queued_total": figures.queued_total}
    assert [b["max_connections"] for b in shown["backends"]] == [2]  # the node's cap
    assert 'pointsman_pool_queue_length{pool="p"} 0.0' in metrics
    assert f'pointsman_pool_queue_wait_seconds_count{{pool="p"}} {figures.queue_wait.count}.0' \
        in metrics
    assert f'pointsman_pool_queued_connections_total{{pool="p"}} {figures.queued_total}.0' \
        in metrics
    assert 1 <= gate.peak <= 2 and info.accepted == 8
    assert figures.queued_total == figures.queue_wait.count
    adds_up(stats)


async def test_workers_queue_timeout_counted_once(workers: int) -> None:
    """Every connection that did not get one of the node's 2 slots times out; the refusals and
    the wait times add up across workers."""
    async with gated() as (gate, info), running(
            config(info.port, queue={"max": 10, "timeout": "0.4s"}), workers=workers) as node:
        port = port_of_config(node)
        clients = await asyncio.gather(*(client(port, b"%d" % i) for i in range(5)))
        stats = await statistics_when(
            node, lambda s: s.rejected[RejectReason.QUEUE_TIMEOUT] + s.active == 5
            and s.rejected[RejectReason.QUEUE_TIMEOUT] >= 3, what="the rest timed out")
        timed_out = stats.rejected[RejectReason.QUEUE_TIMEOUT]
        assert info.accepted == 5 - timed_out <= 2
        pool = node.pools["p"]
        await wait_for(lambda: node.pool_stats(pool).queue_wait.count == timed_out, 5.0,
                       what="wait times reported")
        gate.release.set()
        answers = await asyncio.gather(*(answer(r, w) for r, w in clients))
        stats = await statistics_when(node, lambda s: sum(s.ended.values()) == 5 - timed_out)
    assert sorted(answers)[:timed_out] == [b""] * timed_out
    assert gate.peak <= 2
    adds_up(stats)


def port_of_config(node: Any) -> int:
    return int(node.config.listeners[0].bind[0].first)


async def test_workers_reload_raising_the_cap_serves_every_queue(workers: int) -> None:
    async with gated() as (gate, info), running(config(info.port), workers=workers) as node:
        port = port_of_config(node)
        pool = node.pools["p"]
        clients = await asyncio.gather(*(client(port, b"%d" % i) for i in range(4)))
        await wait_for(lambda: node.pool_stats(pool).queued + info.accepted == 4
                       and node.pool_stats(pool).queued >= 2, 5.0, what="the rest queued")
        assert info.accepted <= 2
        new = load_text(config(info.port, cap=10), "<reload>")
        assert await node.apply(new.model_copy(update={"listeners": node.config.listeners})) == []
        await wait_for(lambda: info.accepted == 4, 5.0, what="every queued one served")
        gate.release.set()
        answers = await asyncio.gather(*(answer(r, w) for r, w in clients))
        stats = await statistics_when(node, lambda s: sum(s.ended.values()) == 4)
    assert sorted(answers) == sorted(b"ok %d\n" % i for i in range(4))
    assert gate.peak == 4
    adds_up(stats)


async def test_queued_after_a_proxy_header_keeps_its_client(engine: str) -> None:
    """A connection that read a PROXY header first waits the same way (Hold after the preamble);
    once served, the header it came with is consumed and the pool's own header names the client
    it carried."""
    async with gated() as (gate, info):
        config_text = config(info.port, cap=1, proxy_protocol={"send": "v1"}).replace(
            "pool: p\n", "pool: p\n  proxy_protocol:\n    accept: required\n", 1)
        async with running(config_text) as node:
            port = port_of(node)
            pool = node.pools["p"]
            first = await client(port, b"PROXY TCP4 203.0.113.1 127.0.0.1 1111 80\r\nfirst")
            await wait_for(lambda: info.accepted == 1, 5.0, what="first at the backend")
            second = await client(port, b"PROXY TCP4 203.0.113.2 127.0.0.1 2222 80\r\nsecond")
            await wait_for(lambda: pool.queue_stats.queued == 1, 5.0, what="second queued")
            gate.release.set()
            assert await answer(*first) == b"ok PROXY TCP4 203.0.113.1 127.0.0.1 1111 80\r\n"
            assert await answer(*second) == b"ok PROXY TCP4 203.0.113.2 127.0.0.1 2222 80\r\n"
            stats = await statistics_when(node, lambda s: sum(s.ended.values()) == 2)
    assert gate.order == [b"PROXY TCP4 203.0.113.1 127.0.0.1 1111 80",
                          b"PROXY TCP4 203.0.113.2 127.0.0.1 2222 80"]
    assert stats.pending == 0
    adds_up(stats)
