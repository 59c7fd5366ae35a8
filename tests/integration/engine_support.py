"""Helpers for the engine tests: both engines as a parameter, an engine with a round-robin
policy on a loopback listener, raw-socket clients and backends that can reset on purpose.

Every test that uses `ENGINES` runs once per engine (the compiled one is skipped with a reason
when it is not built), and the integration conftest runs each once more per event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from pointsman.proxy.engine import Engine, compiled_available, new_engine
from pointsman.proxy.engine.api import Ended, ReadPreamble
from pointsman.proxy.engine.simple import RoundRobinPolicy
from tests.support import LOOPBACK, loopback_server, wait_for

ENGINES = [
    "python",
    pytest.param("cython", marks=pytest.mark.skipif(
        not compiled_available(), reason="compiled engine not built (pip install -e .)")),
]
SIOCOUTQ = 0x5411  # linux/sockios.h (TIOCOUTQ): bytes in the send queue, sent or not
_LINGER_RESET = struct.pack("ii", 1, 0)


@dataclass
class Proxy:
    engine: Engine
    policy: RoundRobinPolicy
    lid: int
    port: int
    sock: socket.socket

    @property
    def address(self) -> tuple[str, int]:
        return (LOOPBACK, self.port)

    def records(self) -> list[Ended]:
        return self.policy.records

    async def wait_ended(self, count: int, timeout: float = 5.0) -> list[Ended]:
        await wait_for(lambda: len(self.policy.records) >= count, timeout,
                       what=f"{count} ended records")
        return self.policy.records

    def assert_adds_up(self) -> None:
        c = self.engine.listener_stats(self.lid)
        assert c.accepted == c.refused + c.ended + c.active, c
        assert c.refused + c.ended == len(self.policy.records), (c, len(self.policy.records))


@contextlib.asynccontextmanager
async def proxy(name: str, backends: list[int], *, retries: int = 1,
                read_preamble: ReadPreamble | None = None,
                on_preamble: Callable[[int, bytes], object] | None = None,
                **target: object) -> AsyncIterator[Proxy]:
    """An engine named `name` on the running loop, one listener, targets on LOOPBACK ports."""
    loop = asyncio.get_running_loop()
    engine = new_engine(loop, name)
    targets = [engine.target(i, LOOPBACK, port, **target) for i, port in enumerate(backends)]  # type: ignore[arg-type]
    policy = RoundRobinPolicy(targets, retries=retries, read_preamble=read_preamble,
                              on_preamble=on_preamble)  # type: ignore[arg-type]
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((LOOPBACK, 0))
    sock.listen(1024)
    lid = engine.add_listener(sock, policy)
    try:
        yield Proxy(engine, policy, lid, sock.getsockname()[1], sock)
    finally:
        engine.shutdown(0)
        sock.close()


# --- raw sockets -------------------------------------------------------------------------------


async def open_raw(address: tuple[str, int]) -> socket.socket:
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    async with asyncio.timeout(5.0):
        await loop.sock_connect(sock, address)
    return sock


async def recv_to_end(sock: socket.socket, timeout: float = 10.0) -> tuple[bytes, str]:
    """Read until the stream ends: (bytes, "eof") or (bytes, "reset"). Unlike StreamReader,
    bytes that arrived before a reset are kept."""
    loop = asyncio.get_running_loop()
    parts: list[bytes] = []
    async with asyncio.timeout(timeout):
        while True:
            try:
                data = await loop.sock_recv(sock, 1 << 20)
            except ConnectionResetError:
                return b"".join(parts), "reset"
            if not data:
                return b"".join(parts), "eof"
            parts.append(data)


def unsent(sock: socket.socket) -> int:
    """Bytes the kernel still holds in this socket's send queue (not yet acknowledged)."""
    return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), SIOCOUTQ, b"\0" * 4))[0])


def reset(sock: socket.socket) -> None:
    """Close with SO_LINGER {1, 0}: the peer gets a RST."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    sock.close()


async def send_then_reset(sock: socket.socket, data: bytes, timeout: float = 10.0) -> None:
    """Send `data`, wait until the peer's kernel has acknowledged all of it, then reset: the
    peer has every byte before the RST."""
    loop = asyncio.get_running_loop()
    if data:
        await loop.sock_sendall(sock, data)
    await wait_for(lambda: unsent(sock) == 0, timeout, what="data acknowledged before the reset")
    reset(sock)


RawHandler = Callable[[socket.socket], Awaitable[None]]


@dataclass
class RawBackend:
    port: int
    accepted: int = 0
    errors: list[BaseException] = field(default_factory=list)
    results: list[object] = field(default_factory=list)


@contextlib.asynccontextmanager
async def raw_backend(handler: RawHandler) -> AsyncIterator[RawBackend]:
    """A backend that hands each accepted raw (non-blocking) socket to `handler`; the handler
    owns closing it (so it can reset instead)."""
    loop = asyncio.get_running_loop()
    server = loopback_server(512)
    info = RawBackend(server.getsockname()[1])
    tasks: set[asyncio.Task[None]] = set()

    async def guarded(conn: socket.socket) -> None:
        try:
            await handler(conn)
        except (ConnectionError, TimeoutError):
            pass
        except Exception as exc:
            info.errors.append(exc)
        finally:
            if conn.fileno() >= 0:
                conn.close()

    async def serve() -> None:
        while True:
            conn, _ = await loop.sock_accept(server)
            conn.setblocking(False)
            info.accepted += 1
            task = asyncio.ensure_future(guarded(conn))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    acceptor = asyncio.ensure_future(serve())
    try:
        yield info
    finally:
        acceptor.cancel()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(acceptor, *tasks, return_exceptions=True)
        server.close()
    if info.errors:
        raise AssertionError(f"backend handler failed: {info.errors!r}") from info.errors[0]


async def echo(conn: socket.socket) -> None:
    """Echo to EOF, then FIN back."""
    loop = asyncio.get_running_loop()
    while data := await loop.sock_recv(conn, 1 << 16):
        await loop.sock_sendall(conn, data)
    conn.shutdown(socket.SHUT_WR)
    await recv_to_end(conn, 5.0)
