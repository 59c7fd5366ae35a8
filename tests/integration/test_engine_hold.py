"""`Hold` and `engine.resume`: a held connection is neither read nor connected until the policy
resumes it (a target, Connect or Refuse); a held client that hangs up ends at once; the counter
identity holds throughout. Both engines."""

from __future__ import annotations

import asyncio
import socket

import pytest

from pointsman.proxy.engine.api import HOLD, Connect, Decision, End, Flag, ReadPreamble, Refuse
from tests.integration.engine_support import (
    ENGINES,
    Proxy,
    echo,
    open_raw,
    proxy,
    raw_backend,
    recv_to_end,
    reset,
)
from tests.support import wait_for

QUEUED_CODE = 31


class Held:
    """Holds every new connection of a proxy and remembers their ids in arrival order."""

    def __init__(self, p: Proxy) -> None:
        self.ids: list[int] = []
        self.p = p
        p.policy.on_accept = self.accepted

    def accepted(self, conn_id: int, host: str, port: int) -> Decision:
        self.ids.append(conn_id)
        return HOLD

    async def wait_held(self, count: int) -> None:
        await wait_for(lambda: len(self.ids) >= count, 5.0, what=f"{count} held connections")


@pytest.mark.parametrize("engine", ENGINES)
async def test_held_connection_is_not_read_until_resumed(engine: str) -> None:
    async with raw_backend(echo) as backend, proxy(engine, [backend.port]) as p:
        held = Held(p)
        loop = asyncio.get_running_loop()
        sock = await open_raw(p.address)
        await loop.sock_sendall(sock, b"queued bytes")
        await held.wait_held(1)
        # A connection that is served meanwhile proves the engine went round its loop.
        p.policy.on_accept = lambda *_: p.policy.targets[0]
        other = await open_raw(p.address)
        await loop.sock_sendall(other, b"x")
        other.shutdown(socket.SHUT_WR)
        assert await recv_to_end(other) == (b"x", "eof")
        other.close()
        await p.wait_ended(1)
        assert p.engine.listener_stats(p.lid).bytes_in == 1  # the held one's bytes: unread
        assert backend.accepted == 1
        assert p.engine.buffered(held.ids[0]) == (0, 0)
        assert p.engine.resume(held.ids[0], p.policy.targets[0])
        sock.shutdown(socket.SHUT_WR)
        assert await recv_to_end(sock) == (b"queued bytes", "eof")
        sock.close()
        records = await p.wait_ended(2)
    record = records[1]
    assert record.reason in (End.CLIENT_FIN, End.BACKEND_FIN)
    assert record.backend == 0 and record.bytes_in == len(b"queued bytes")
    assert record.flags & Flag.CONNECTED
    p.assert_adds_up()


@pytest.mark.parametrize("engine", ENGINES)
async def test_resume_with_connect_and_refuse(engine: str) -> None:
    async with raw_backend(echo) as backend, proxy(engine, [backend.port]) as p:
        held = Held(p)
        loop = asyncio.get_running_loop()
        first, second = await open_raw(p.address), await open_raw(p.address)
        await held.wait_held(2)
        assert p.engine.resume(held.ids[1], Refuse(QUEUED_CODE))
        assert await recv_to_end(second) == (b"", "eof")
        assert p.engine.resume(held.ids[0], Connect(p.policy.targets[0], b"hi ", 0))
        await loop.sock_sendall(first, b"there")
        first.shutdown(socket.SHUT_WR)
        assert await recv_to_end(first) == (b"hi there", "eof")
        for sock in (first, second):
            sock.close()
        records = await p.wait_ended(2)
        assert not p.engine.resume(held.ids[0], Refuse(QUEUED_CODE))  # not held any more
        assert not p.engine.resume(12345, Refuse(QUEUED_CODE))
    refused = next(r for r in records if r.conn_id == held.ids[1])
    assert (refused.reason, refused.detail, refused.backend) == (End.REFUSED, QUEUED_CODE, -1)
    counters = p.engine.listener_stats(p.lid)
    assert (counters.refused, counters.ended, counters.active) == (1, 1, 0)
    p.assert_adds_up()


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("how", ["fin", "reset"])
async def test_held_client_that_leaves_ends_at_once(engine: str, how: str) -> None:
    async with raw_backend(echo) as backend, proxy(engine, [backend.port]) as p:
        held = Held(p)
        sock = await open_raw(p.address)
        await held.wait_held(1)
        assert p.engine.active(p.lid) == 1
        if how == "fin":
            sock.shutdown(socket.SHUT_WR)
        else:
            reset(sock)
        (record,) = await p.wait_ended(1)
        assert not p.engine.resume(held.ids[0], p.policy.targets[0])
        if how == "fin":
            sock.close()
    assert record.reason == (End.CLIENT_FIN if how == "fin" else End.CLIENT_RESET)
    assert record.backend == -1 and not record.flags & Flag.CONNECTED
    assert backend.accepted == 0
    p.assert_adds_up()


@pytest.mark.parametrize("engine", ENGINES)
async def test_hold_after_a_preamble_and_operator_close(engine: str) -> None:
    """Hold is a valid answer to `preamble`; the bytes read so far go out once resumed; a held
    connection can be cut like any other."""
    ids: dict[bytes, int] = {}

    def on_preamble(conn_id: int, data: bytes) -> Decision | None:
        if b"\n" not in data:
            return None
        ids[data] = conn_id
        return HOLD

    async with raw_backend(echo) as backend, proxy(
            engine, [backend.port], read_preamble=ReadPreamble(1024, 0.3, 1, 2),
            on_preamble=on_preamble) as p:
        loop = asyncio.get_running_loop()
        first, second = await open_raw(p.address), await open_raw(p.address)
        await loop.sock_sendall(first, b"one\n")
        await loop.sock_sendall(second, b"two\n")
        await wait_for(lambda: len(ids) == 2, 5.0, what="both held after their preamble")
        await asyncio.sleep(0.5)  # past the preamble timeout: a held connection has no timer
        assert p.engine.active(p.lid) == 2
        assert p.engine.close(ids[b"two\n"], QUEUED_CODE)
        assert p.engine.resume(ids[b"one\n"], p.policy.targets[0])
        await loop.sock_sendall(first, b"tail")
        first.shutdown(socket.SHUT_WR)
        assert await recv_to_end(first) == (b"one\ntail", "eof")
        assert (await recv_to_end(second))[0] == b""
        for sock in (first, second):
            sock.close()
        records = await p.wait_ended(2)
    closed = next(r for r in records if r.conn_id == ids[b"two\n"])
    assert (closed.reason, closed.detail) == (End.CLOSED, QUEUED_CODE)
    p.assert_adds_up()
