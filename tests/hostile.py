"""Hostile peers in one place: clients and backends that reset, never read, stall in the preamble
or run pointsman short of file descriptors. The next fault test is one function away.

Everything works on raw non-blocking sockets driven by the test's own event loop (asyncio or
uvloop), because stream readers drop buffered bytes once a reset is reported and the tests here
count bytes up to the reset. Every wait has a deadline; nothing sleeps to synchronise.

- sockets: `raw_connect`, `read_to_end` (bytes and "eof"/"reset"), `send_all`, `wait_sent` (the
  kernel send queue is empty: every byte reached the peer), `reset` (SO_LINGER 0, then close);
- backends: `raw_backend(handler)` with handlers `send_then_reset(n)`, `record_until_end(log)`,
  `never_read(hold)`, `echo`;
- clients: `send_then_reset`, `never_reading_client`, `junk_preamble`, `proxy_holders` (slow
  PROXY header senders);
- pointsman short of descriptors: `fd_limited_pointsman` (`pointsman run` under a lowered
  RLIMIT_NOFILE), with `admin_json` and `admin_metrics` to read it from outside;
- memory and descriptors: `rss_bytes(pid)`, `open_sockets(pid)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import socket
import struct
import sys
import termios
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support import (
    LOOPBACK,
    START_TIMEOUT,
    PointsmanProcess,
    _finish,
    _listening_lines,
    hostport,
    wait_for,
)

LINGER_RESET = struct.pack("ii", 1, 0)
CHUNK = 256 * 1024
End = str  # "eof" (a FIN) or "reset" (ECONNRESET)

# --- sockets -------------------------------------------------------------------------------------


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


async def raw_connect(address: str, timeout: float = 2.0, rcvbuf: int | None = None,
                      source: str | None = None) -> socket.socket:
    """A connected non-blocking socket (`rcvbuf` set before connecting, so the window is small;
    from the local address `source`, if given: a hash pool sees another client)."""
    host, port = split(address)
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    sock.setblocking(False)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    if source is not None:
        sock.bind((source, 0))
    try:
        async with asyncio.timeout(timeout):
            await asyncio.get_running_loop().sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return sock


async def read_to_end(sock: socket.socket, timeout: float) -> tuple[bytes, End]:
    """Read until the peer ends the stream; every byte that arrived first, then how it ended."""
    loop = asyncio.get_running_loop()
    parts: list[bytes] = []
    async with asyncio.timeout(timeout):
        while True:
            try:
                data = await loop.sock_recv(sock, CHUNK)
            except ConnectionResetError:
                return b"".join(parts), "reset"
            if not data:
                return b"".join(parts), "eof"
            parts.append(data)


async def send_all(sock: socket.socket, data: bytes, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        await asyncio.get_running_loop().sock_sendall(sock, data)


def unsent(sock: socket.socket) -> int:
    """Bytes in the kernel send queue not yet acknowledged by the peer (SIOCOUTQ)."""
    buf = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    return int(struct.unpack("i", buf)[0])


async def wait_sent(sock: socket.socket, timeout: float = 10.0) -> None:
    """Until the peer's kernel has every byte: a reset sent now loses nothing in our queue."""
    await wait_for(lambda: unsent(sock) == 0, timeout, what="send queue drained")


def reset(sock: socket.socket) -> None:
    """Close with SO_LINGER {1, 0}: the peer gets a RST instead of a FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    sock.close()


def pattern(n: int, seed: int = 0) -> bytes:
    """n bytes that are not all alike, so a lost or reordered chunk changes them."""
    block = bytes((i * 7 + seed) % 251 for i in range(251))
    return (block * (n // len(block) + 1))[:n]


# --- backends ------------------------------------------------------------------------------------

RawHandler = Callable[[socket.socket], Awaitable[None]]


@dataclass
class RawBackend:
    host: str
    port: int
    accepted: int = 0
    errors: list[BaseException] = field(default_factory=list)

    @property
    def address(self) -> str:
        return hostport(self.host, self.port)


@contextlib.asynccontextmanager
async def raw_backend(handler: RawHandler, host: str = LOOPBACK,
                      bound: socket.socket | None = None) -> AsyncIterator[RawBackend]:
    """Serve `handler(sock)` for every connection on an ephemeral port (or on `bound`, a socket
    bound and not listening yet: a port that refused connections until now). The handler owns
    the socket (closes or resets it); a handler error fails the test when the block exits."""
    loop = asyncio.get_running_loop()
    if bound is None:
        listener = socket.socket(_family(host), socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, 0))
    else:
        listener = bound
        host = listener.getsockname()[0]
    listener.listen(1024)
    listener.setblocking(False)
    info = RawBackend(host, listener.getsockname()[1])
    tasks: set[asyncio.Task[None]] = set()

    async def serve(sock: socket.socket) -> None:
        try:
            await handler(sock)
        except (ConnectionError, TimeoutError):
            pass
        except Exception as exc:  # reported at exit
            info.errors.append(exc)
        finally:
            sock.close()

    async def accept_loop() -> None:
        while True:
            sock, _ = await loop.sock_accept(listener)
            sock.setblocking(False)
            info.accepted += 1
            task = loop.create_task(serve(sock))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    acceptor = loop.create_task(accept_loop())
    try:
        yield info
    finally:
        acceptor.cancel()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(acceptor, *tasks, return_exceptions=True)
        listener.close()
    if info.errors:
        raise AssertionError(f"backend handler failed: {info.errors!r}") from info.errors[0]


def send_then_reset(n: int, read_first: int = 0) -> RawHandler:
    """Backend: read `read_first` bytes, send `n` bytes, wait until they all left, then RST."""

    async def handler(sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        got = 0
        while got < read_first:
            data = await loop.sock_recv(sock, CHUNK)
            if not data:
                return
            got += len(data)
        await send_all(sock, pattern(n))
        await wait_sent(sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)

    return handler


@dataclass
class Received:
    data: bytes
    end: End


def record_until_end(log: list[Received], timeout: float = 30.0) -> RawHandler:
    """Backend: read everything until a FIN or a reset and record both."""

    async def handler(sock: socket.socket) -> None:
        data, how = await read_to_end(sock, timeout)
        log.append(Received(data, how))

    return handler


def never_read(release: asyncio.Event) -> RawHandler:
    """Backend: accept and never read until `release` is set (its receive window fills)."""

    async def handler(sock: socket.socket) -> None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await release.wait()

    return handler


async def echo(sock: socket.socket) -> None:
    """Backend: echo until EOF, then FIN back."""
    loop = asyncio.get_running_loop()
    while data := await loop.sock_recv(sock, CHUNK):
        await loop.sock_sendall(sock, data)
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)


def stream_forever(chunk: int = 64 * 1024) -> RawHandler:
    """Backend: send as fast as the peer takes it, until the connection breaks."""

    async def handler(sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        block = pattern(chunk)
        while True:
            await loop.sock_sendall(sock, block)

    return handler


# --- clients -------------------------------------------------------------------------------------


async def client_send_then_reset(address: str, n: int) -> None:
    """Client: send `n` bytes, wait until the proxy's kernel has them all, then RST."""
    sock = await raw_connect(address)
    try:
        await send_all(sock, pattern(n, seed=3))
        await wait_sent(sock)
    finally:
        reset(sock)


@contextlib.asynccontextmanager
async def never_reading_clients(address: str, count: int, request: bytes = b"go\n"
                                ) -> AsyncIterator[list[socket.socket]]:
    """`count` clients that send `request` and never read (tiny receive windows); closed at exit."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = await raw_connect(address, rcvbuf=4096)
            socks.append(sock)
            await send_all(sock, request)
        yield socks
    finally:
        for sock in socks:
            sock.close()


async def junk_preamble(address: str, size: int, timeout: float = 5.0) -> End:
    """Client: send `size` bytes that are neither a PROXY header nor a ClientHello; how it ended."""
    sock = await raw_connect(address)
    try:
        with contextlib.suppress(ConnectionError):
            await send_all(sock, b"\x17" + pattern(size - 1), timeout)
        _, how = await read_to_end(sock, timeout)
        return how
    finally:
        sock.close()


@contextlib.asynccontextmanager
async def proxy_holders(address: str, count: int) -> AsyncIterator[list[socket.socket]]:
    """`count` clients that send the first byte of a PROXY v1 header and then nothing: each
    holds a preamble slot until the proxy gives up on it."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = await raw_connect(address)
            socks.append(sock)
            await send_all(sock, b"P")
        yield socks
    finally:
        for sock in socks:
            sock.close()


def closed_by_peer(sock: socket.socket) -> bool:
    """True once the proxy has closed `sock` (readable with EOF or a reset), without blocking."""
    try:
        data = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return False
    except OSError:
        return True
    return data == b""


# --- pointsman short of file descriptors -----------------------------------------------------------


class FdLimitedPointsman(PointsmanProcess):
    """`pointsman run` started under `prlimit --nofile=SOFT:HARD`."""

    def __init__(self, args: list[str], workdir: Path, nofile: int, soft: int | None = None
                 ) -> None:
        import os
        import subprocess

        self.args = args
        self.stderr_path = workdir / "pointsman.stderr"
        self.lines = []
        self._pending = b""
        argv = ["prlimit", f"--nofile={soft or nofile}:{nofile}", "--", sys.executable, "-m",
                "pointsman", *args]
        with self.stderr_path.open("wb") as stderr:
            self.popen = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr, bufsize=0)
        assert self.popen.stdout is not None
        os.set_blocking(self.popen.stdout.fileno(), False)


@contextlib.contextmanager
def fd_limited_pointsman(config_text: str, workdir: Path, nofile: int, soft: int | None = None,
                         listeners: int = 1) -> Iterator[FdLimitedPointsman]:
    """`pointsman run` on `config_text` with RLIMIT_NOFILE lowered to `nofile` (the soft limit to
    `soft`, if given), ready once it printed its "listening" lines (and its admin line, if it has
    an admin listener); SIGTERM at exit must end it with status 0."""
    path = workdir / "pointsman.yaml"
    path.write_text(config_text)
    proc = FdLimitedPointsman(["run", str(path)], workdir, nofile, soft)
    listening = _listening_lines(listeners)
    has_admin = "admin:" in config_text

    def ready(lines: list[str]) -> bool:
        return listening(lines) and (not has_admin or any(
            line.startswith("admin api") for line in lines))

    try:
        proc.wait_lines(ready, START_TIMEOUT)
    except BaseException:
        proc.close()
        raise
    try:
        yield proc
    finally:
        _finish(proc)


def admin_json(admin: str, path: str = "/api/v1/status") -> Any:
    with urllib.request.urlopen(f"http://{admin}{path}", timeout=5.0) as response:
        return json.loads(response.read())


def admin_metrics(admin: str) -> dict[str, float]:
    """/metrics as {"name{labels}": value} (labels as exposed, in their order)."""
    with urllib.request.urlopen(f"http://{admin}/metrics", timeout=5.0) as response:
        text = response.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def metric_sum(metrics: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the series of `name` whose labels include every `labels` item."""
    total = 0.0
    for key, value in metrics.items():
        base, _, rest = key.partition("{")
        if base != name:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
    return total


# --- memory --------------------------------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    """Resident set size of a process and its descendants (VmRSS from /proc): pointsman's
    control process and its workers, which hold the connections by default."""
    return sum(_own_rss(each) for each in _tree(pid))


def open_sockets(pid: int) -> int:
    """Sockets a process and its descendants hold open (pointsman's control process and its
    workers): what a leaked connection leaves behind."""
    count = 0
    for each in _tree(pid):
        with contextlib.suppress(OSError):  # gone meanwhile
            for fd in Path(f"/proc/{each}/fd").iterdir():
                with contextlib.suppress(OSError):
                    count += fd.readlink().name.startswith("socket:")
    return count


def _tree(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        each = todo.pop()
        found.append(each)
        for task in Path(f"/proc/{each}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                todo.extend(int(child) for child in task.read_text().split())
    return found


def _own_rss(pid: int) -> int:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:  # gone meanwhile
        return 0
    for line in lines:
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0  # a zombie
