"""Peers and clients shared by the integration tests: backends that greet with their name then
echo (so a client learns which backend it reached without asking pointsman), bounded client
loads, long-lived streams, and config builders."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from pointsman.node.runtime import Node
from pointsman.pool.state import BackendState
from pointsman.telemetry.stats import ListenerStats
from tests.support import (
    LOOPBACK,
    close_writer,
    free_port,
    hostport,
    read_all,
    wait_for,
)

# Deadline for one client step (connect and read the greeting) on a loaded 2-core VM.
STEP_TIMEOUT = 5.0


class NamedBackend:
    """A backend that writes `name\\n` on every connection, then echoes until EOF.

    It owns its listening socket, so a test can stop listening (new connects are refused, open
    connections carry on) and listen again on the same port. `stop_listening` first accepts what
    the kernel already queued: closing a listening socket resets its queued connections, and a
    proxy that saw its connect succeed would then lose that client. With pointsman and the backend
    in one event loop, stopping is therefore race-free, as a test of "no client fails" needs.
    """

    def __init__(self, name: str, host: str = LOOPBACK) -> None:
        self.name = name
        self.host = host
        self.port = 0
        self.accepted = 0
        self.errors: list[BaseException] = []
        self._sock: socket.socket | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def address(self) -> str:
        return hostport(self.host, self.port)

    @property
    def listening(self) -> bool:
        return self._sock is not None

    @property
    def open_connections(self) -> int:
        return len(self._writers)

    def config(self, **extra: Any) -> dict[str, Any]:
        """This backend as a pool's `backends` entry (named, so hash policies see a stable id)."""
        return {"name": self.name, "address": self.address, **extra}

    def listen(self) -> None:
        """Listen on `port` (an ephemeral one the first time, the same one after a stop)."""
        assert self._sock is None, "already listening"
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(128)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        asyncio.get_running_loop().add_reader(sock.fileno(), self._accept_all)
        self._sock = sock

    def stop_listening(self) -> None:
        sock = self._sock
        if sock is None:
            return
        asyncio.get_running_loop().remove_reader(sock.fileno())
        self._accept_all()
        sock.close()
        self._sock = None

    def _accept_all(self) -> None:
        assert self._sock is not None
        while True:
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            self.accepted += 1
            task = asyncio.get_running_loop().create_task(self._serve(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        try:
            reader, writer = await asyncio.open_connection(sock=conn)
        except OSError:
            conn.close()
            return
        self._writers.add(writer)
        try:
            writer.write(f"{self.name}\n".encode())
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except ConnectionError:
            pass  # health probes abort; a proxy may cut a connection on purpose
        except OSError as exc:
            # A reset that lands after the peer's FIN and before our own (a health probe that
            # closes before our greeting arrives) leaves shutdown() nothing to shut: ENOTCONN.
            if exc.errno != errno.ENOTCONN:
                self.errors.append(exc)
        except Exception as exc:  # reported when the test's backends close
            self.errors.append(exc)
        finally:
            self._writers.discard(writer)
            writer.close()

    def cut_connections(self) -> None:
        """Abort every open connection (what a crashed backend process does to them)."""
        for writer in list(self._writers):
            writer.transport.abort()

    async def close(self) -> None:
        self.stop_listening()
        self.cut_connections()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@contextlib.asynccontextmanager
async def named_backends(*names: str) -> AsyncIterator[list[NamedBackend]]:
    """Listening `NamedBackend`s; a handler error in any of them fails the test at exit."""
    peers = [NamedBackend(name) for name in names]
    try:
        for peer in peers:
            peer.listen()
        yield peers
    finally:
        for peer in peers:
            await peer.close()
    errors = [exc for peer in peers for exc in peer.errors]
    if errors:
        raise AssertionError(f"backend handler failed: {errors!r}") from errors[0]


async def open_named(
    address: str, source: str | None = None, timeout: float = STEP_TIMEOUT
) -> tuple[str, asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect (from `source`, an address in 127.0.0.0/8, if given) and read the greeting."""
    host, _, port = address.rpartition(":")
    local = (source, 0) if source is not None else None
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(host.strip("[]"), int(port), local_addr=local)
    try:
        async with asyncio.timeout(timeout):
            line = await reader.readline()
        if not line.endswith(b"\n"):
            raise ConnectionError(f"no greeting from {address}: {line!r}")
    except BaseException:
        writer.transport.abort()
        raise
    return line.decode().strip(), reader, writer


async def ask_name(address: str, source: str | None = None) -> str:
    """One short connection: which backend served it."""
    name, _, writer = await open_named(address, source)
    await close_writer(writer)
    return name


async def exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, message: bytes
) -> None:
    """Send `message` through an open greeting-echo connection; assert it comes back intact."""
    writer.write(message)
    async with asyncio.timeout(STEP_TIMEOUT):
        await writer.drain()
        got = await reader.readexactly(len(message))
    assert got == message


@dataclass
class ClientLoad:
    """Short connections in a loop: connect, read the greeting, echo a few bytes, close.

    Bounded both ways: at most `max_connections` per worker and never past `deadline` (loop time).
    Every failure is recorded with its exception, so a test can assert there were none. `phase`
    is a label the test moves forward (say, per config reload), setting it to None while a change
    is in flight; `by_phase` counts the backends reached by connections that began and ended in
    one phase, so each count belongs to one config for sure.
    """

    address: str
    deadline: float
    max_connections: int = 20_000
    ok: int = 0
    seen: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    phase: int | None = 0
    by_phase: Counter[tuple[int, str]] = field(default_factory=Counter)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def worker(self, number: int) -> None:
        loop = asyncio.get_running_loop()
        for i in range(self.max_connections):
            if self.stop.is_set() or loop.time() >= self.deadline:
                return
            phase = self.phase
            try:
                name, reader, writer = await open_named(self.address)
                await exchange(reader, writer, f"worker {number} connection {i}\n".encode())
                await close_writer(writer)
            except (OSError, TimeoutError, EOFError, AssertionError) as exc:
                self.failures.append(f"worker {number} connection {i}: {exc!r}")
                continue
            self.ok += 1
            self.seen[name] += 1
            if phase is not None and phase == self.phase:
                self.by_phase[phase, name] += 1

    async def wait_served(self, count: int, timeout: float, name: str | None = None) -> None:
        """Wait until `count` more connections succeed (to backend `name`, if given)."""
        start = self.seen[name] if name is not None else self.ok
        await wait_for(
            lambda: (self.seen[name] if name is not None else self.ok) >= start + count,
            timeout,
            what=f"{count} more connections served{f' by {name}' if name else ''}",
        )


@contextlib.asynccontextmanager
async def client_load(
    address: str, seconds: float, workers: int = 3
) -> AsyncIterator[ClientLoad]:
    """Run `workers` ClientLoad loops for at most `seconds`; stopped and awaited on exit."""
    load = ClientLoad(address, asyncio.get_running_loop().time() + seconds)
    tasks = [asyncio.create_task(load.worker(n)) for n in range(workers)]
    try:
        yield load
    finally:
        load.stop.set()
        await asyncio.gather(*tasks)


def config_text(
    listeners: list[dict[str, Any]], pools: list[dict[str, Any]], **top: Any
) -> str:
    """YAML for any number of listeners and pools (pools get a 1 s connect timeout by default)."""
    data: dict[str, Any] = {
        "listeners": listeners,
        "pools": [{"connect_timeout": "1s", **pool} for pool in pools],
        "shutdown_grace": "1s",
        **top,
    }
    return yaml.safe_dump(data, sort_keys=False)


def single_pool(listen: str, peers: list[NamedBackend], **pool: Any) -> str:
    """Listener `lb` on `listen` -> pool `p` over `peers` (pool keys as keyword arguments)."""
    backends = pool.pop("backends", None) or [peer.config() for peer in peers]
    return config_text(
        [{"name": "lb", "bind": listen, "pool": "p"}],
        [{"name": "p", "backends": backends, **pool}],
    )


def tcp_stats(runtime: Node, listener: str = "lb") -> ListenerStats:
    """The listener's counters now (with workers: the sum of their latest reports, so read it
    afresh after a wait instead of holding it)."""
    stats = runtime.listeners[listener].statistics()
    assert isinstance(stats, ListenerStats)
    return stats


def backend_active(runtime: Node, pool: str, backend: str) -> int:
    """Open connections to one backend, as the node counts them (the admin API's figure)."""
    owner = runtime.pools[pool]
    by_id = dict(zip((m.id for m in owner.members()), runtime.backend_stats(owner), strict=True))
    return by_id[backend].active


def backend_drained(runtime: Node, pool: str, backend: str) -> bool:
    """`Pool.is_drained` as the node sees it: not up and no connection open. With workers the
    connections are theirs, and so are the counts: the owner pool's own are always zero."""
    member = runtime.pools[pool].member(backend)
    return member.machine.state is not BackendState.UP and backend_active(runtime, pool, backend) == 0


def rotated(seen: Counter[str], names: Sequence[str], workers: int) -> bool:
    """`seen` is what rotations over `names` with equal weights give: every worker rotates on its
    own and is off by at most one per backend, so one process splits exactly evenly (given a
    count that divides) and two workers are at most two apart."""
    counts = [seen[name] for name in names]
    return set(seen) <= set(names) and max(counts) - min(counts) <= workers


def listen_address() -> str:
    return f"{LOOPBACK}:{free_port()}"


# --- weighted round robin ---------------------------------------------------------------------------



# --- long-lived streams -------------------------------------------------------------------------

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


