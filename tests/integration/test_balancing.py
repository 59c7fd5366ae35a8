"""Balancing algorithms through real sockets (issue #3): exact weighted counts, load-aware steering,
hash stability across processes, affinity, slow start.

Every backend greets each connection with its name and a newline, then echoes, so the client learns
which backend it reached without asking pointsman. `NamedBackend` and the client helpers below are
also used by the health, drain and reload tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from pointsman.runtime import Runtime
from pointsman.telemetry.stats import ListenerStats
from tests.support import (
    LOOPBACK,
    close_writer,
    free_port,
    hostport,
    pointsman_process_async,
    running,
    wait_for,
)

# --- peers and clients (shared with the other integration test files) ----------------------------

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


def tcp_stats(runtime: Runtime, listener: str = "lb") -> ListenerStats:
    stats = runtime.listeners[listener].stats
    assert isinstance(stats, ListenerStats)
    return stats


def listen_address() -> str:
    return f"{LOOPBACK}:{free_port()}"


# --- weighted round robin ---------------------------------------------------------------------------


async def test_weighted_round_robin_counts_are_exact() -> None:
    async with named_backends("a", "b", "c") as (a, b, c):
        listen = listen_address()
        backends = [a.config(weight=5), b.config(weight=1), c.config(weight=1)]
        config = single_pool(listen, [], algorithm="weighted_round_robin", backends=backends)
        async with running(config) as runtime:
            seen = Counter([await ask_name(listen) for _ in range(70)])
            stats = tcp_stats(runtime)
            await wait_for(lambda: stats.active == 0, 2.0, what="all connections ended")

    assert seen == {"a": 50, "b": 10, "c": 10}
    assert (a.accepted, b.accepted, c.accepted) == (50, 10, 10)
    assert stats.accepted == 70
    assert stats.retried == 0


# --- load-aware algorithms -----------------------------------------------------------------------

HELD = 20
SHORT = 30


@pytest.mark.parametrize("algorithm", ["least_connections", "power_of_two"])
async def test_load_aware_algorithms_steer_new_connections_away_from_loaded_backend(
    algorithm: str,
) -> None:
    async with named_backends("a", "b", "c") as (a, b, c):
        listen = listen_address()
        async with running(single_pool(listen, [a, b, c], algorithm=algorithm)) as runtime:
            pool = runtime.pools["p"]
            pool.drain("b")
            pool.drain("c")
            held = [await open_named(listen) for _ in range(HELD)]
            assert {name for name, _, _ in held} == {"a"}
            pool.enable("b")
            pool.enable("c")

            seen = Counter([await ask_name(listen) for _ in range(SHORT)])
            # The held connections are still served while the short ones go elsewhere.
            for i, (_, reader, writer) in enumerate(held):
                await exchange(reader, writer, f"held {i}\n".encode())
            a_active = pool.member("a").stats.active
            for _, _, writer in held:
                await close_writer(writer)
            stats = tcp_stats(runtime)
            await wait_for(lambda: stats.active == 0, 2.0, what="all connections ended")

    assert a_active == HELD
    assert seen["a"] == 0, f"{algorithm} sent {seen['a']} new connections to the loaded backend"
    assert seen["b"] + seen["c"] == SHORT
    # Both idle backends take part; neither algorithm may pin the short ones on one backend.
    assert seen["b"] >= 5 and seen["c"] >= 5, seen


# --- hash policies across processes ------------------------------------------------------------------

# 51 client addresses; a 127.0.0.0/8 address needs no setup on Linux loopback.
SOURCES = [f"127.0.0.{i}" for i in range(10, 61)]


def hash_config(peers: list[NamedBackend], maglev_port: int, hash_port: int) -> str:
    backends = [peer.config() for peer in peers]
    return config_text(
        [
            {"name": "mag", "bind": f"{LOOPBACK}:{maglev_port}", "pool": "maglev"},
            {"name": "sh", "bind": f"{LOOPBACK}:{hash_port}", "pool": "hash"},
        ],
        [
            {"name": "maglev", "algorithm": "maglev", "backends": backends},
            {"name": "hash", "algorithm": "source_hash", "backends": backends},
        ],
    )


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_hash_policies_agree_across_two_processes(tmp_path: Path) -> None:
    async with named_backends("b1", "b2", "b3") as peers:
        ports = [free_port() for _ in range(4)]
        one, two = tmp_path / "one", tmp_path / "two"
        one.mkdir()
        two.mkdir()
        async with (
            pointsman_process_async(hash_config(peers, ports[0], ports[1]), one),
            pointsman_process_async(hash_config(peers, ports[2], ports[3]), two),
        ):
            results: dict[str, dict[str, list[str]]] = {"maglev": {}, "source_hash": {}}
            for policy, first, second in (("maglev", 0, 2), ("source_hash", 1, 3)):
                for source in SOURCES:
                    results[policy][source] = [
                        await ask_name(f"{LOOPBACK}:{ports[first]}", source),
                        await ask_name(f"{LOOPBACK}:{ports[second]}", source),
                        await ask_name(f"{LOOPBACK}:{ports[first]}", source),  # new source port
                    ]

    for policy, by_source in results.items():
        moved = {src: names for src, names in by_source.items() if len(set(names)) != 1}
        assert not moved, f"{policy}: a source reached different backends: {moved}"
        spread = Counter(names[0] for names in by_source.values())
        # 51 sources over 3 backends: about 17 each; a hash that ignores the source fails this.
        assert set(spread) == {"b1", "b2", "b3"}, (policy, spread)
        assert min(spread.values()) >= 5, (policy, spread)


# --- affinity ----------------------------------------------------------------------------------------

# Five sources (not a multiple of three backends), so plain round robin would move each of them.
STICKY_SOURCES = [f"127.0.0.{i}" for i in range(20, 25)]


async def test_affinity_keeps_a_source_on_its_backend_until_that_backend_drains() -> None:
    async with named_backends("a", "b", "c") as peers:
        listen = listen_address()
        config = single_pool(
            listen, peers, algorithm="round_robin", affinity={"key": "source_ip", "timeout": "60s"}
        )
        async with running(config) as runtime:
            pool = runtime.pools["p"]
            seen: dict[str, list[str]] = {source: [] for source in STICKY_SOURCES}
            for _ in range(4):
                for source in STICKY_SOURCES:
                    seen[source].append(await ask_name(listen, source))
            assert all(len(set(names)) == 1 for names in seen.values()), seen
            home = {source: names[0] for source, names in seen.items()}
            assert len(set(home.values())) == 3, home  # first picks rotated over all three

            moved_source = STICKY_SOURCES[0]
            old = home[moved_source]
            pool.drain(old)
            after_drain = {source: await ask_name(listen, source) for source in STICKY_SOURCES}
            new = after_drain[moved_source]
            again = [await ask_name(listen, moved_source) for _ in range(3)]
            pool.enable(old)
            after_enable = [await ask_name(listen, moved_source) for _ in range(3)]
            stats = tcp_stats(runtime)
            await wait_for(lambda: stats.active == 0, 2.0, what="all connections ended")

    assert new != old
    assert again == [new] * 3, "the replaced entry does not hold"
    assert after_enable == [new] * 3, "the old backend took its source back after enable"
    for source in STICKY_SOURCES:
        if home[source] != old:
            assert after_drain[source] == home[source], f"{source} moved though its backend stayed"
        else:
            assert after_drain[source] != old


# --- slow start -----------------------------------------------------------------------------------

SLOW_START = 3.0
RAMP_RUN = 4.0
RAMP_MAX_CONNECTIONS = 20_000  # bound on the loop; ~1-3k happen in RAMP_RUN here


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_slow_start_ramps_a_newly_enabled_backend() -> None:
    async with named_backends("steady", "fresh") as peers:
        listen = listen_address()
        config = single_pool(
            listen, peers, algorithm="weighted_round_robin", slow_start=f"{SLOW_START}s"
        )
        async with running(config) as runtime:
            pool = runtime.pools["p"]
            pool.maintenance("fresh")
            pool.enable("fresh")
            enabled = time.monotonic()
            picks: list[tuple[float, str]] = []
            for _ in range(RAMP_MAX_CONNECTIONS):
                elapsed = time.monotonic() - enabled
                if elapsed >= RAMP_RUN:
                    break
                picks.append((elapsed, await ask_name(listen)))
            stats = tcp_stats(runtime)
            await wait_for(lambda: stats.active == 0, 2.0, what="all connections ended")

    def share(start: float, end: float) -> tuple[float, int]:
        names = [name for at, name in picks if start <= at < end]
        assert len(names) >= 50, f"too few connections in [{start}, {end}): {len(names)}"
        return names.count("fresh") / len(names), names.count("fresh")

    early, early_count = share(0.0, 1.0)
    late, _ = share(SLOW_START, RAMP_RUN)
    # Weight is at most 1/3 in the first second (share <= 25 %), full (50 %) after the window.
    assert early_count >= 1, "no trickle to the ramping backend"
    assert early < 0.2, f"early share {early:.2f}"
    assert late > 0.4, f"late share {late:.2f}"
    assert late > 3 * early, f"early {early:.2f} vs late {late:.2f}"
