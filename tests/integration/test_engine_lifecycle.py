"""Timers (idle, half-close, preamble), the preamble protocol, operator cuts, shutdown, and the
counter identity accepted == refused + ended + active after a mix of every ending."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import pytest

from pointsman.proxy.engine.api import ENGINE_ERROR, Connect, Decision, End, Flag, ReadPreamble, Refuse
from tests.integration.engine_support import (
    ENGINES,
    echo,
    open_raw,
    proxy,
    raw_backend,
    recv_to_end,
    reset,
)
from tests.support import wait_for

TIMEOUT_CODE, OVERFLOW_CODE, BAD_CODE = 21, 22, 23


async def sink(conn: socket.socket) -> None:
    """Reads nothing and says nothing until the other side ends."""
    await asyncio.Event().wait()


async def drain_to_end(conn: socket.socket) -> None:
    await recv_to_end(conn, 30.0)


@pytest.mark.parametrize("engine", ENGINES)
async def test_idle_timeout_closes_as_tcp_closes(engine: str) -> None:
    """An idle connection gets a FIN (as the transport path did, and as
    test_faults_counters pins for pointsman): a reset is for forwarding one."""
    async with raw_backend(drain_to_end) as backend, proxy(engine, [backend.port],
                                                           idle_timeout=0.3) as p:
        sock = await open_raw(p.address)
        loop = asyncio.get_running_loop()
        began = loop.time()
        await loop.sock_sendall(sock, b"hello")
        got, end = await recv_to_end(sock)
        took = loop.time() - began
        sock.close()
        (record,) = await p.wait_ended(1)
    assert (got, end) == (b"", "eof")
    assert 0.29 <= took < 2.0, took
    assert record.reason == End.IDLE_TIMEOUT and record.bytes_in == 5


@pytest.mark.parametrize("engine", ENGINES)
async def test_half_close_timeout_ends_a_backend_that_never_answers(engine: str) -> None:
    """The client sent FIN; the backend neither reads nor closes: half_close_timeout (not the
    long idle timeout) ends it."""
    async with raw_backend(sink) as backend, proxy(engine, [backend.port], idle_timeout=60,
                                                   half_close_timeout=0.3) as p:
        sock = await open_raw(p.address)
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(sock, b"request")
        sock.shutdown(socket.SHUT_WR)
        began = loop.time()
        _, end = await recv_to_end(sock)
        took = loop.time() - began
        sock.close()
        (record,) = await p.wait_ended(1)
    assert end == "reset"
    assert 0.25 <= took < 2.0, took
    assert record.reason == End.HALF_CLOSE_TIMEOUT
    assert record.flags & Flag.CLIENT_FIN and not record.flags & Flag.BACKEND_FIN


def header_policy(engine_targets: list[object]) -> object:
    """A toy preamble: b"TO <n>\\n" picks target n; anything else without a newline waits."""

    def decide(conn_id: int, data: bytes) -> Decision | None:
        line, newline, _ = data.partition(b"\n")
        if not newline:
            return None
        if not line.startswith(b"TO "):
            return Refuse(BAD_CODE)
        return Connect(engine_targets[int(line[3:])], send_first=b"[hdr]",  # type: ignore[arg-type]
                       consume=len(line) + 1)

    return decide


@pytest.mark.parametrize("engine", ENGINES)
async def test_preamble_routes_strips_and_prepends(engine: str) -> None:
    preamble = ReadPreamble(64, 1.0, TIMEOUT_CODE, OVERFLOW_CODE)
    async with raw_backend(echo) as backend, proxy(engine, [backend.port], read_preamble=preamble) as p:
        p.policy.on_preamble = header_policy(p.policy.targets)  # type: ignore[assignment]
        loop = asyncio.get_running_loop()
        sock = await open_raw(p.address)
        for piece in (b"T", b"O 0", b"\npay", b"load"):  # the header arrives in pieces
            await loop.sock_sendall(sock, piece)
            await asyncio.sleep(0.02)
        sock.shutdown(socket.SHUT_WR)
        got = await recv_to_end(sock)
        sock.close()
        (record,) = await p.wait_ended(1)
    assert got == (b"[hdr]payload", "eof")
    assert record.reason == End.CLIENT_FIN
    assert record.bytes_in == len(b"TO 0\npayload")


@pytest.mark.parametrize("engine", ENGINES)
async def test_preamble_refusals_timeout_overflow_and_fin(engine: str) -> None:
    preamble = ReadPreamble(16, 0.3, TIMEOUT_CODE, OVERFLOW_CODE)
    async with raw_backend(echo) as backend, proxy(engine, [backend.port], read_preamble=preamble) as p:
        p.policy.on_preamble = header_policy(p.policy.targets)  # type: ignore[assignment]
        loop = asyncio.get_running_loop()
        silent = await open_raw(p.address)  # says nothing: timeout
        flood = await open_raw(p.address)
        await loop.sock_sendall(flood, b"x" * 40)  # no newline in 16 bytes: overflow
        bad = await open_raw(p.address)
        await loop.sock_sendall(bad, b"HELLO\n")  # refused by the policy
        quitter = await open_raw(p.address)
        await loop.sock_sendall(quitter, b"TO")
        quitter.shutdown(socket.SHUT_WR)  # FIN before a decision: ended, not refused
        ends = [await recv_to_end(s) for s in (silent, flood, bad, quitter)]
        for s in (silent, flood, bad, quitter):
            s.close()
        records = await p.wait_ended(4)
        p.assert_adds_up()
        counters = p.engine.listener_stats(p.lid)
    # A refusal closes as TCP closes: a FIN, unless bytes were left unread (the flood's 24
    # bytes past the 16 read), which makes the kernel send a reset.
    assert [e for _, e in ends] == ["eof", "reset", "eof", "eof"]
    by_detail = sorted((r.reason, r.detail) for r in records)
    assert by_detail == sorted([(End.REFUSED, TIMEOUT_CODE), (End.REFUSED, OVERFLOW_CODE),
                                (End.REFUSED, BAD_CODE), (End.CLIENT_FIN, 0)])
    assert (counters.refused, counters.ended) == (3, 1)
    assert backend.accepted == 0


@pytest.mark.parametrize("engine", ENGINES)
async def test_close_by_id_by_backend_and_shutdown(engine: str) -> None:
    async with (raw_backend(drain_to_end) as one, raw_backend(drain_to_end) as two,
                proxy(engine, [one.port, two.port]) as p):
        loop = asyncio.get_running_loop()
        socks = [await open_raw(p.address) for _ in range(6)]
        for s in socks:
            await loop.sock_sendall(s, b"hi")
        await wait_for(lambda: p.engine.listener_stats(p.lid).bytes_in == 12, 5.0)
        assert p.engine.close_backend(0, 7) == 3
        ids = p.engine.connections()
        assert len(ids) == 3
        assert p.engine.close(ids[0], 8) is True
        assert p.engine.close(ids[0], 8) is False  # already gone
        assert p.engine.shutdown(9) == 2
        ends = [await recv_to_end(s) for s in socks]
        for s in socks:
            s.close()
        records = p.records()
        p.assert_adds_up()
    assert [e for _, e in ends] == ["reset"] * 6
    assert sorted(r.detail for r in records) == [7, 7, 7, 8, 9, 9]
    assert all(r.reason == End.CLOSED for r in records)
    assert sorted(r.backend for r in records if r.detail == 7) == [0, 0, 0]


@pytest.mark.parametrize("engine", ENGINES)
async def test_counters_add_up_after_every_kind_of_ending(engine: str) -> None:
    preamble = ReadPreamble(16, 0.3, TIMEOUT_CODE, OVERFLOW_CODE)
    async with raw_backend(echo) as backend, proxy(engine, [backend.port], idle_timeout=0.3) as p:
        loop = asyncio.get_running_loop()
        # normal
        s = await open_raw(p.address)
        await loop.sock_sendall(s, b"a")
        s.shutdown(socket.SHUT_WR)
        await recv_to_end(s)
        s.close()
        # client reset
        s = await open_raw(p.address)
        await loop.sock_sendall(s, b"b")
        await wait_for(lambda: p.engine.listener_stats(p.lid).bytes_in == 2, 5.0)
        reset(s)
        # idle timeout
        s = await open_raw(p.address)
        await recv_to_end(s)
        s.close()
        # refused at accept, then preamble timeout
        p.policy.refuse_all = 5
        with contextlib.suppress(ConnectionResetError):  # the RST may beat connect()
            s = await open_raw(p.address)
            await recv_to_end(s)
            s.close()
        await p.wait_ended(4)
        p.policy.refuse_all = None
        p.policy.read_preamble = preamble
        s = await open_raw(p.address)
        await recv_to_end(s)
        s.close()
        # still open at the end, then shutdown
        p.policy.read_preamble = None
        s = await open_raw(p.address)
        await loop.sock_sendall(s, b"c")
        await wait_for(lambda: p.engine.active(p.lid) == 1, 5.0)
        await p.wait_ended(5)
        p.assert_adds_up()
        before = p.engine.listener_stats(p.lid)
        p.engine.shutdown(1)
        s.close()
        p.assert_adds_up()
        after = p.engine.listener_stats(p.lid)
    assert (before.accepted, before.refused, before.ended, before.active) == (6, 2, 3, 1)
    assert (after.accepted, after.refused, after.ended, after.active) == (6, 2, 4, 0)
    reasons = sorted(r.reason for r in p.records())
    assert reasons == sorted([End.CLIENT_FIN, End.CLIENT_RESET, End.IDLE_TIMEOUT, End.REFUSED,
                              End.REFUSED, End.CLOSED])


@pytest.mark.parametrize("engine", ENGINES)
async def test_source_address_and_sockname(engine: str) -> None:
    """A target's source address is the backend's view of the peer; `sockname` tells the
    policy where the client connected (a PROXY header's destination)."""
    peers: list[str] = []
    names: list[tuple[str, int] | None] = []

    async def record_peer(conn: socket.socket) -> None:
        peers.append(conn.getpeername()[0])
        await echo(conn)

    async with raw_backend(record_peer) as backend, proxy(
            engine, [backend.port], source="127.0.0.2",
            read_preamble=ReadPreamble(2, 1.0, TIMEOUT_CODE, OVERFLOW_CODE)) as p:

        def decide(conn_id: int, data: bytes) -> Decision | None:
            names.append(p.engine.sockname(conn_id))
            return p.policy.targets[0]

        p.policy.on_preamble = decide
        sock = await open_raw(p.address)
        await asyncio.get_running_loop().sock_sendall(sock, b"hi")
        sock.shutdown(socket.SHUT_WR)
        assert await recv_to_end(sock) == (b"hi", "eof")
        sock.close()
        await p.wait_ended(1)
    assert peers == ["127.0.0.2"]
    assert names == [p.address]


@pytest.mark.parametrize("engine", ENGINES)
async def test_a_bad_decision_cuts_only_its_connection(engine: str) -> None:
    """A policy bug (a non-integer `consume`) raises inside the engine: that connection is cut
    (detail ENGINE_ERROR, logged) and the next one is served as usual. A bytearray
    `send_first` is taken as bytes."""
    preamble = ReadPreamble(64, 1.0, TIMEOUT_CODE, OVERFLOW_CODE)
    async with raw_backend(echo) as backend, proxy(engine, [backend.port],
                                                   read_preamble=preamble) as p:

        def decide(conn_id: int, data: bytes) -> Decision | None:
            consume: object = "3" if data.startswith(b"bad") else 3
            return Connect(p.policy.targets[0], send_first=bytearray(b"<"),  # type: ignore[arg-type]
                           consume=consume)  # type: ignore[arg-type]

        p.policy.on_preamble = decide
        loop = asyncio.get_running_loop()
        ends = []
        for line in (b"bad", b"ok!fine"):
            sock = await open_raw(p.address)
            await loop.sock_sendall(sock, line)
            sock.shutdown(socket.SHUT_WR)
            ends.append(await recv_to_end(sock))
            sock.close()
        records = await p.wait_ended(2)
        p.assert_adds_up()
    assert ends == [(b"", "reset"), (b"<fine", "eof")]
    assert (records[0].reason, records[0].detail) == (End.CLOSED, ENGINE_ERROR)
    assert records[1].reason == End.CLIENT_FIN


@pytest.mark.parametrize("engine", ENGINES)
async def test_a_bad_decision_spares_the_rest_of_its_batch(engine: str) -> None:
    """Three preambles arrive before the engine's next wake-up (sent with no await between
    them), so one poll returns the three, the bad one first (epoll reports in arrival order):
    its connection is cut and the two events after it in the same batch are still handled."""
    preamble = ReadPreamble(64, 5.0, TIMEOUT_CODE, OVERFLOW_CODE)
    async with raw_backend(echo) as backend, proxy(engine, [backend.port],
                                                   read_preamble=preamble) as p:

        def decide(conn_id: int, data: bytes) -> Decision | None:
            consume: object = "3" if data.startswith(b"bad") else 3
            return Connect(p.policy.targets[0], consume=consume)  # type: ignore[arg-type]

        p.policy.on_preamble = decide
        socks = [await open_raw(p.address) for _ in range(3)]
        await wait_for(lambda: p.engine.active() == 3, 5.0, what="three connections accepted")
        for sock, line in zip(socks, (b"bad", b"ok!one", b"ok!two"), strict=True):
            assert sock.send(line) == len(line)
            sock.shutdown(socket.SHUT_WR)
        ends = [await recv_to_end(sock) for sock in socks]
        for sock in socks:
            sock.close()
        records = await p.wait_ended(3)
        p.assert_adds_up()
    assert ends == [(b"", "reset"), (b"one", "eof"), (b"two", "eof")]
    assert sorted((r.reason, r.detail) for r in records) == sorted(
        [(End.CLOSED, ENGINE_ERROR), (End.CLIENT_FIN, 0), (End.CLIENT_FIN, 0)])
