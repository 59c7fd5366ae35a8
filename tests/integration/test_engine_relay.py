"""The engines relay bytes exactly: integrity under random chunking (copy and splice paths),
half-close in both orders, and memory bounded by a client that never reads."""

from __future__ import annotations

import asyncio
import hashlib
import random
import socket
import struct

import pytest

from pointsman.proxy.engine import new_engine
from pointsman.proxy.engine.api import READ_CHUNK, Connect, End, Flag, ReadPreamble
from pointsman.proxy.engine.simple import RoundRobinPolicy
from tests.integration.engine_support import (
    ENGINES,
    echo,
    open_raw,
    proxy,
    raw_backend,
    recv_to_end,
)
from tests.support import LOOPBACK6, has_ipv6, wait_for

CONNECTIONS = 16
TCP_INFO_SIZE, SEGS_IN_AT = 144, 140  # struct tcp_info: its size up to tcpi_segs_in, and where
SIZE = 2 * 1024 * 1024


async def send_chunked(sock: socket.socket, data: bytes, rng: random.Random) -> None:
    loop = asyncio.get_running_loop()
    view = memoryview(data)
    offset = 0
    while offset < len(data):
        step = rng.choice((1, 7, 1000, 4096, 65536, 300_000))
        await loop.sock_sendall(sock, view[offset:offset + step])
        offset += step
    sock.shutdown(socket.SHUT_WR)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("splice_after", [None, 64 * 1024], ids=["copy", "splice"])
async def test_sixteen_connections_carry_every_byte(engine: str, splice_after: int | None) -> None:
    async with raw_backend(echo) as backend, proxy(engine, [backend.port],
                                                   splice_after=splice_after) as p:

        async def one(seed: int) -> tuple[bytes, bytes, str]:
            rng = random.Random(seed)
            data = rng.randbytes(SIZE)
            sock = await open_raw(p.address)
            try:
                sender = asyncio.ensure_future(send_chunked(sock, data, rng))
                got, end = await recv_to_end(sock, 30.0)
                await sender
            finally:
                sock.close()
            return hashlib.sha256(data).digest(), hashlib.sha256(got).digest(), end

        results = await asyncio.gather(*(one(seed) for seed in range(CONNECTIONS)))
        records = await p.wait_ended(CONNECTIONS)

    for sent, got, end in results:
        assert got == sent
        assert end == "eof"
    assert len(records) == CONNECTIONS
    for record in records:
        assert record.reason == End.CLIENT_FIN
        assert record.bytes_in == record.bytes_out == SIZE
        assert record.flags & Flag.CONNECTED
        assert record.connected >= record.started and record.ended >= record.first_byte > 0
        assert bool(record.flags & Flag.SPLICED) == (splice_after is not None)
    counters = p.engine.listener_stats(p.lid)
    assert counters.bytes_in == counters.bytes_out == CONNECTIONS * SIZE
    assert counters.spliced == (CONNECTIONS if splice_after is not None else 0)
    p.assert_adds_up()


async def reply_after_eof(conn: socket.socket) -> None:
    """`echo hi | nc`: read the whole request (its FIN first), then answer and close."""
    request, _ = await recv_to_end(conn)
    await asyncio.get_running_loop().sock_sendall(conn, hashlib.sha256(request).digest() * 4096)
    conn.close()


@pytest.mark.parametrize("engine", ENGINES)
async def test_client_fin_first_still_gets_the_reply(engine: str) -> None:
    request = random.Random(1).randbytes(300_000)
    async with raw_backend(reply_after_eof) as backend, proxy(engine, [backend.port]) as p:
        sock = await open_raw(p.address)
        await asyncio.get_running_loop().sock_sendall(sock, request)
        sock.shutdown(socket.SHUT_WR)
        reply, end = await recv_to_end(sock)
        sock.close()
        (record,) = await p.wait_ended(1)
    assert reply == hashlib.sha256(request).digest() * 4096
    assert end == "eof"
    assert record.reason == End.CLIENT_FIN
    assert record.flags & Flag.CLIENT_FIN and record.flags & Flag.BACKEND_FIN
    assert (record.bytes_in, record.bytes_out) == (len(request), len(reply))


@pytest.mark.parametrize("engine", ENGINES)
async def test_backend_fin_first_and_client_keeps_sending(engine: str) -> None:
    greeting = random.Random(2).randbytes(200_000)
    upload = random.Random(3).randbytes(1_000_000)
    uploaded: list[bytes] = []

    async def greet_then_listen(conn: socket.socket) -> None:
        await asyncio.get_running_loop().sock_sendall(conn, greeting)
        conn.shutdown(socket.SHUT_WR)
        data, _ = await recv_to_end(conn)
        uploaded.append(data)

    async with raw_backend(greet_then_listen) as backend, proxy(engine, [backend.port]) as p:
        sock = await open_raw(p.address)
        received, end = await recv_to_end(sock)  # ends at the backend's FIN
        await asyncio.get_running_loop().sock_sendall(sock, upload)
        sock.shutdown(socket.SHUT_WR)
        (record,) = await p.wait_ended(1)
        await wait_for(lambda: bool(uploaded), 5.0, what="the backend read to its EOF")
        sock.close()
    assert (received, end) == (greeting, "eof")
    assert uploaded == [upload]
    assert record.reason == End.BACKEND_FIN


def segments_in(sock: socket.socket) -> int:
    """TCP segments the socket has received (struct tcp_info's tcpi_segs_in, Linux 4.2+)."""
    return int(struct.unpack_from("I", sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO,
                                                       TCP_INFO_SIZE), SEGS_IN_AT)[0])


@pytest.mark.parametrize("engine", ENGINES)
async def test_the_last_data_and_the_fin_go_on_in_one_segment(engine: str) -> None:
    """A reply and the backend's FIN that come together go to the client together, as HAProxy
    sends them: the FIN rides on the data's segment (MSG_MORE, then the shutdown), which saves
    a segment and the client's ACK of it. The client hears the SYN-ACK and that one segment."""
    greeting = b"220 ready\r\n"

    async def greet_and_close(conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
        conn.send(greeting)
        conn.shutdown(socket.SHUT_WR)  # corked: the greeting and the FIN leave in one segment
        await recv_to_end(conn, 5.0)

    async with raw_backend(greet_and_close) as backend, proxy(engine, [backend.port]) as p:
        seen = []
        for _ in range(8):
            sock = await open_raw(p.address)
            received, end = await recv_to_end(sock)
            seen.append((received, end, segments_in(sock)))
            sock.close()
        records = await p.wait_ended(8)
    assert seen == [(greeting, "eof", 2)] * 8
    assert [r.reason for r in records] == [End.BACKEND_FIN] * 8
    assert [r.bytes_out for r in records] == [len(greeting)] * 8
    p.assert_adds_up()


@pytest.mark.parametrize("engine", ENGINES)
async def test_a_request_and_its_fin_held_for_the_connect_go_on_in_one_segment(engine: str) -> None:
    """A client whose preamble, request and FIN come at once: the engine holds them while the
    policy decides and the backend connects, then sends them with MSG_MORE, so the FIN rides on
    their segment. The backend's socket hears the SYN, the handshake's ACK and that segment."""
    request = b"TO 0\nQUIT\r\n"
    heard: list[tuple[bytes, str, int]] = []

    async def take(conn: socket.socket) -> None:
        data, end = await recv_to_end(conn, 5.0)
        heard.append((data, end, segments_in(conn)))

    loop = asyncio.get_running_loop()
    preamble = ReadPreamble(64, 5.0, 1, 2)
    async with raw_backend(take) as backend, proxy(engine, [backend.port],
                                                   read_preamble=preamble) as p:
        p.policy.on_preamble = lambda conn_id, data: (  # type: ignore[assignment]
            Connect(p.policy.targets[0]) if b"\n" in data else None)
        for _ in range(8):
            sock = await open_raw(p.address)
            await loop.sock_sendall(sock, request)
            sock.shutdown(socket.SHUT_WR)  # in the client's kernel before the engine reads
            assert await recv_to_end(sock) == (b"", "eof")
            sock.close()
        records = await p.wait_ended(8)
    assert heard == [(request, "eof", 3)] * 8
    assert [r.bytes_in for r in records] == [len(request)] * 8
    p.assert_adds_up()


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("splice_after", [None, 0], ids=["copy", "splice"])
async def test_client_that_never_reads_holds_bounded_memory(engine: str, splice_after: int | None) -> None:
    """The backend offers 64 MiB to a client that reads nothing: the engine stops reading the
    backend once the client side is full, holding at most one read (copy) or one pipe (splice)
    per direction, and the backend sees its writes block."""
    offered = 64 * 1024 * 1024
    sent: list[int] = []
    stalled = asyncio.Event()

    async def firehose(conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        chunk = bytes(1 << 20)
        total = 0
        while total < offered:
            try:
                async with asyncio.timeout(0.5):
                    await loop.sock_sendall(conn, chunk)
            except TimeoutError:
                break
            total += len(chunk)
        sent.append(total)
        stalled.set()
        await recv_to_end(conn)

    async with raw_backend(firehose) as backend, proxy(engine, [backend.port],
                                                       splice_after=splice_after) as p:
        sock = await open_raw(p.address)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        await asyncio.get_running_loop().sock_sendall(sock, b"go")
        async with asyncio.timeout(30):
            await stalled.wait()
        (conn_id,) = p.engine.connections()
        held = p.engine.buffered(conn_id)
        assert held is not None
        counters = p.engine.listener_stats(p.lid)
        sock.close()
    assert sent[0] < offered, "the backend was never held back"
    bound = READ_CHUNK if splice_after is None else 1 << 20
    assert held[1] <= bound, held
    # Everything the proxy read is either held or went to the client's (small) socket buffers.
    assert counters.bytes_out <= sent[0]


@pytest.mark.skipif(not has_ipv6(), reason="no IPv6 loopback")
@pytest.mark.parametrize("engine", ENGINES)
async def test_ipv6_listener_and_backend(engine: str) -> None:
    loop = asyncio.get_running_loop()
    server = socket.socket(socket.AF_INET6)
    server.bind((LOOPBACK6, 0))
    server.listen(8)
    server.setblocking(False)
    eng = new_engine(loop, engine)
    policy = RoundRobinPolicy([eng.target(0, LOOPBACK6, server.getsockname()[1])])
    lsock = socket.socket(socket.AF_INET6)
    lsock.bind((LOOPBACK6, 0))
    lsock.listen(8)
    eng.add_listener(lsock, policy)
    try:
        client = socket.socket(socket.AF_INET6)
        client.setblocking(False)
        await loop.sock_connect(client, lsock.getsockname()[:2])
        backend_side, _ = await loop.sock_accept(server)
        backend_side.setblocking(False)
        await loop.sock_sendall(client, b"over v6")
        client.shutdown(socket.SHUT_WR)
        assert await recv_to_end(backend_side) == (b"over v6", "eof")
        backend_side.close()
        assert await recv_to_end(client) == (b"", "eof")
        client.close()
        await wait_for(lambda: len(policy.records) == 1, 5.0)
    finally:
        eng.shutdown(0)
        lsock.close()
        server.close()
    assert policy.records[0].reason == End.CLIENT_FIN


async def recv_exactly(sock: socket.socket, size: int, timeout: float = 5.0) -> bytes:
    loop = asyncio.get_running_loop()
    got = bytearray()
    async with asyncio.timeout(timeout):
        while len(got) < size:
            data = await loop.sock_recv(sock, size - len(got))
            assert data, f"stream ended after {len(got)} of {size} bytes"
            got += data
    return bytes(got)


@pytest.mark.parametrize("engine", ENGINES)
async def test_small_exchanges_on_the_splice_path(engine: str) -> None:
    """Request/response rounds smaller than a page on a spliced connection (a keep-alive client
    past zero_copy_after): each round trips, none waits for the next arrival to move."""
    loop = asyncio.get_running_loop()
    async with raw_backend(echo) as backend, proxy(engine, [backend.port], splice_after=0) as p:
        sock = await open_raw(p.address)
        with sock:
            for i in range(300):
                message = f"GET /{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
                await loop.sock_sendall(sock, message)
                assert await recv_exactly(sock, len(message)) == message
            sock.shutdown(socket.SHUT_WR)
            _, end = await recv_to_end(sock)
            assert end == "eof"
        records = await p.wait_ended(1)
    assert records[0].flags & Flag.SPLICED
    assert records[0].bytes_in == records[0].bytes_out


@pytest.mark.parametrize("engine", ENGINES)
async def test_more_segments_than_the_pipe_has_buffers_all_arrive(engine: str) -> None:
    """Thousands of one-byte segments queued at once on spliced connections: a splice that
    fills the pipe's buffers moves fewer bytes than asked although more are waiting, so it must
    not be taken for a drained socket (edge-triggered: nothing else would wake it). Two
    connections take turns byte by byte, so no two bytes of one are adjacent in the sender's
    pages and the receiver cannot merge them into one buffer."""
    loop = asyncio.get_running_loop()
    async with raw_backend(echo) as backend, proxy(engine, [backend.port], splice_after=0) as p:
        socks = [await open_raw(p.address) for _ in range(2)]
        try:
            for sock in socks:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                await loop.sock_sendall(sock, b"hello")
                assert await recv_exactly(sock, 5) == b"hello"  # spliced from here on
            data = [random.Random(seed).randbytes(3000) for seed in range(2)]
            for i in range(3000):  # no await: all queued before the engine runs
                for sock, payload in zip(socks, data, strict=True):
                    assert sock.send(payload[i:i + 1]) == 1
            for sock, payload in zip(socks, data, strict=True):
                assert await recv_exactly(sock, len(payload)) == payload
        finally:
            for sock in socks:
                sock.close()
        records = await p.wait_ended(2)
    assert all(record.flags & Flag.SPLICED for record in records)
