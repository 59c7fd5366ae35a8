"""Shared helpers for tests that use real sockets on loopback.

- ports: `free_port`, `refused_port` (bound, never listening: connects are refused), `has_ipv6`;
- peers: `backend(handler)` runs an asyncio server in the test's loop, `echo_backend()` echoes;
- pointsman: `pointsman_process` / `pointsman_process_async` run `python -m pointsman run` (uvloop)
  as a subprocess; `running(config_text, workers=N)` runs a node in the test's own event loop (with
  N > 1, a control process there and N worker processes);
- waiting: `wait_for(predicate, timeout)` polls with a deadline, `read_all` / `wait_closed` read a
  client stream to its end with a deadline.

Nothing here sleeps to synchronise: every wait has a condition and a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pointsman.app import build_node
from pointsman.config.loader import load_text
from pointsman.node.runtime import Node

LOOPBACK = "127.0.0.1"
LOOPBACK6 = "::1"

# Generous deadlines for a loaded 2-core VM; a passing run never waits this long.
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0

# --- ports ---------------------------------------------------------------------------------------


_HANDED_OUT: set[tuple[str, int, int]] = set()


def free_port(host: str = LOOPBACK, kind: socket.SocketKind = socket.SOCK_STREAM) -> int:
    """A port free on `host` now (tests use it at once), never handed out before in this run."""
    return free_range(1, host, kind)


def loopback_server(backlog: int) -> socket.socket:
    """A non-blocking TCP socket listening on LOOPBACK on a port of the kernel's choosing."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((LOOPBACK, 0))
    server.listen(backlog)
    server.setblocking(False)
    return server


def free_range(count: int, host: str = LOOPBACK,
               kind: socket.SocketKind = socket.SOCK_STREAM) -> int:
    """The first of `count` consecutive ports free on `host` now (tried, released), none handed
    out before in this run (a listener and its admin API must not get the same one).

    Searched below the ephemeral range (net.ipv4.ip_local_port_range): a port the kernel hands
    out for bind(0) is one it may give the next outgoing connection of any process too, and a
    listener then fails with EADDRINUSE (a CI run failed so on an admin API's port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    low = _ephemeral_low()
    rng = random.Random()
    for _ in range(500):
        first = rng.randrange(10_000, low - count)
        ports = range(first, first + count)
        if any((host, int(kind), port) in _HANDED_OUT for port in ports):
            continue
        if all(_bindable(family, kind, host, port) for port in ports):
            _HANDED_OUT.update((host, int(kind), port) for port in ports)
            return first
    raise AssertionError(f"no {count} free consecutive ports on {host}")


def _bindable(family: socket.AddressFamily, kind: socket.SocketKind, host: str, port: int) -> bool:
    with socket.socket(family, kind) as sock:
        if kind == socket.SOCK_STREAM:  # as a listener binds (a TIME_WAIT left on it is no bar)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


@contextlib.contextmanager
def refused_port(host: str = LOOPBACK) -> Iterator[int]:
    """A port that refuses connections: bound (so nobody else takes it) but never listening."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        yield int(sock.getsockname()[1])


def has_ipv6() -> bool:
    """True when ::1 can be bound (containers without IPv6 skip the v6 tests)."""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind((LOOPBACK6, 0))
    except OSError:
        return False
    return True


def hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --- config text ---------------------------------------------------------------------------------


def one_pool_config(
    bind: str,
    backends: list[str],
    *,
    listener: dict[str, Any] | None = None,
    pool: dict[str, Any] | None = None,
    shutdown_grace: str | float = "1s",
) -> str:
    """YAML for one TCP listener `lb` in front of one pool `p` (extra keys merge in)."""
    data = {
        "listeners": [{"name": "lb", "bind": bind, "pool": "p", **(listener or {})}],
        "pools": [
            {
                "name": "p",
                "connect_timeout": "1s",
                "backends": [{"address": address} for address in backends],
                **(pool or {}),
            }
        ],
        "shutdown_grace": shutdown_grace,
    }
    return yaml.safe_dump(data, sort_keys=False)


# --- waiting -------------------------------------------------------------------------------------


async def wait_for(
    predicate: Callable[[], bool], timeout: float, interval: float = 0.005, what: str = ""
) -> None:
    """Poll `predicate` until it is true; raise AssertionError after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() >= deadline:
            raise AssertionError(f"not true after {timeout}s: {what or predicate}")
        await asyncio.sleep(interval)


async def read_all(reader: asyncio.StreamReader, timeout: float, chunk: int = 65536) -> bytes:
    """Read until EOF, at most `timeout` seconds (TimeoutError past it)."""
    parts = []
    async with asyncio.timeout(timeout):
        while data := await reader.read(chunk):
            parts.append(data)
    return b"".join(parts)


async def wait_closed(reader: asyncio.StreamReader, timeout: float) -> str:
    """Wait until the peer ends the stream; return "eof" or "reset". Data before the end is an
    error: the callers expect a connection that is cut, not one that talks."""
    async with asyncio.timeout(timeout):
        try:
            data = await reader.read(65536)
        except ConnectionResetError:
            return "reset"
    assert data == b"", f"expected the connection to end, got {data[:64]!r}"
    return "eof"


async def connect(
    address: str, timeout: float = 2.0
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, _, port = address.rpartition(":")
    async with asyncio.timeout(timeout):
        return await asyncio.open_connection(host.strip("[]"), int(port))


async def close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


# --- backends in the test's event loop -----------------------------------------------------------

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class Backend:
    """A running test backend: where it listens, how many connections it took, what went wrong."""

    host: str
    port: int
    accepted: int = 0
    errors: list[BaseException] = field(default_factory=list)

    @property
    def address(self) -> str:
        return hostport(self.host, self.port)


@contextlib.asynccontextmanager
async def backend(handler: Handler, host: str = LOOPBACK) -> AsyncIterator[Backend]:
    """Serve `handler` on an ephemeral port. A handler exception other than a connection reset
    (the proxy may cut a connection on purpose) fails the test when the block exits."""
    info = Backend(host, 0)

    async def guarded(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        info.accepted += 1
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception as exc:  # reported at exit, not lost in the loop's log
            info.errors.append(exc)
        finally:
            writer.close()

    server = await asyncio.start_server(guarded, host, 0)
    info.port = server.sockets[0].getsockname()[1]
    try:
        yield info
    finally:
        server.close()
        await server.wait_closed()
    if info.errors:
        raise AssertionError(f"backend handler failed: {info.errors!r}") from info.errors[0]


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo until EOF, then half-close (FIN) back."""
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    if writer.can_write_eof():
        writer.write_eof()


def echo_backend(host: str = LOOPBACK) -> contextlib.AbstractAsyncContextManager[Backend]:
    return backend(echo, host)


async def roundtrip(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, message: bytes, timeout: float = 2.0
) -> None:
    """Send `message` to an echo peer and assert the same bytes come back."""
    writer.write(message)
    async with asyncio.timeout(timeout):
        await writer.drain()
        got = await reader.readexactly(len(message))
    assert got == message


# --- pointsman in the test's event loop ----------------------------------------------------------


@contextlib.asynccontextmanager
async def running(config_text: str, shutdown_grace: float | None = 0.2,
                  workers: int = 1) -> AsyncIterator[Node]:
    """A node started in the running loop; shut down on exit (`shutdown_grace` overrides the
    config's so a test that leaves a connection open does not wait long). With `workers` > 1 it
    is a control process whose workers are real processes; it is yielded once every listener is
    served by all of them."""
    config = load_text(config_text, "<test>")
    if shutdown_grace is not None:
        config = config.model_copy(update={"shutdown_grace": shutdown_grace})
    node = build_node(config, announce=lambda line: None, workers=workers)
    await node.start()
    try:
        if workers > 1:
            await wait_for(lambda: all(lst.accepting for lst in node.listeners.values()),
                           START_TIMEOUT, what="every listener served by a worker")
        yield node
    finally:
        await node.shutdown()


# --- figures of a node with workers -----------------------------------------------------------------

# With workers, the control process's figures are the sums of the workers' latest reports, which
# arrive every 0.5 s; generous for a loaded 2-core VM.
REPORT_TIMEOUT = 5.0


async def statistics_when(node: Node, predicate: Callable[[Any], bool], *, listener: str = "lb",
                          timeout: float = REPORT_TIMEOUT, what: str = "") -> Any:
    """The statistics of `listener` once `predicate(statistics)` holds.

    The statistics are read afresh on every poll and once more at the end: with workers each read
    is a new sum of reports, so holding one object across time would show stale figures. Wait for
    a count to reach its value (e.g. the ended total), not for `active == 0`, which a report from
    before the connections opened shows as well.
    """
    await wait_for(lambda: predicate(node.listeners[listener].statistics()), timeout, what=what)
    return node.listeners[listener].statistics()


async def workers_caught_up(node: Node) -> None:
    """Return once every worker has applied what the control process decided so far.

    Operator decisions (drain, enable, weights) take effect in the control process at once and
    reach the workers by message a moment later. Applying the running config again is a round
    trip through every worker's channel, which is ordered: when it returns, each worker has
    applied every decision sent before. Nothing to wait for in a single process.
    """
    if node.role != "control":
        return
    errors = await node.apply(node.config)
    assert errors == [], errors


def with_workers(config_text: str, workers: int) -> str:
    """`config_text` with the top-level `workers` set (for `pointsman run` subprocesses)."""
    data = yaml.safe_load(config_text)
    data["workers"] = workers
    return yaml.safe_dump(data, sort_keys=False)


# --- pointsman as a subprocess -------------------------------------------------------------------


class PointsmanProcess:
    """`python -m pointsman ARGS` with stdout read line by line and stderr kept in a file."""

    def __init__(self, args: list[str], workdir: Path, *, uvloop: bool = True) -> None:
        self.args = args
        self.stderr_path = workdir / "pointsman.stderr"
        self.lines: list[str] = []
        self._pending = b""
        argv = [sys.executable, "-m", "pointsman", *args]
        if not uvloop and args and args[0] == "run":
            argv.append("--no-uvloop")
        with self.stderr_path.open("wb") as stderr:
            self.popen = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr, bufsize=0)
        assert self.popen.stdout is not None
        os.set_blocking(self.popen.stdout.fileno(), False)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_lines(
        self, predicate: Callable[[list[str]], bool], timeout: float = START_TIMEOUT
    ) -> None:
        """Read stdout until `predicate(lines)` holds; fail on exit or after `timeout` seconds."""
        assert self.popen.stdout is not None
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(self.popen.stdout, selectors.EVENT_READ)
            while not predicate(self.lines):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"pointsman {self.args} not ready after {timeout}s; stdout={self.lines}, "
                        f"stderr:\n{self.stderr()}"
                    )
                if not sel.select(remaining):
                    continue
                chunk = os.read(self.popen.stdout.fileno(), 65536)
                if not chunk:
                    self.popen.wait(timeout=STOP_TIMEOUT)
                    raise AssertionError(
                        f"pointsman {self.args} exited with {self.popen.returncode} before it was "
                        f"ready; stdout={self.lines}, stderr:\n{self.stderr()}"
                    )
                *complete, self._pending = (self._pending + chunk).split(b"\n")
                self.lines.extend(line.decode() for line in complete)

    def signal(self, sig: int = signal.SIGTERM) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        """Wait for exit; kill and fail past `timeout`."""
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
            raise AssertionError(
                f"pointsman {self.args} still running {timeout}s after SIGTERM; "
                f"stderr:\n{self.stderr()}"
            ) from None

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def close(self) -> None:
        """Last resort at teardown: never leave a process behind."""
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()
        if self.popen.stdout is not None:
            self.popen.stdout.close()


def _listening_lines(count: int) -> Callable[[list[str]], bool]:
    return lambda lines: sum(line.startswith("listening ") for line in lines) >= count


def _start_run(config_text: str, workdir: Path, uvloop: bool) -> PointsmanProcess:
    listeners = len(load_text(config_text, "<test>").listeners)
    path = workdir / "pointsman.yaml"
    path.write_text(config_text)
    proc = PointsmanProcess(["run", str(path)], workdir, uvloop=uvloop)
    try:
        proc.wait_lines(_listening_lines(listeners))
    except BaseException:
        proc.close()
        raise
    return proc


def _finish(proc: PointsmanProcess) -> None:
    try:
        if proc.popen.poll() is None:
            code = proc.stop()
            assert code == 0, f"pointsman exited with {code} on SIGTERM; stderr:\n{proc.stderr()}"
    finally:
        proc.close()


@contextlib.contextmanager
def pointsman_process(
    config_text: str, workdir: Path, *, uvloop: bool = True
) -> Iterator[PointsmanProcess]:
    """`pointsman run` on `config_text`, ready once it printed one "listening" line per listener;
    SIGTERM on exit, which must end it with status 0 (unless the test already ended it)."""
    proc = _start_run(config_text, workdir, uvloop)
    try:
        yield proc
    finally:
        _finish(proc)


@contextlib.asynccontextmanager
async def pointsman_process_async(
    config_text: str, workdir: Path, *, uvloop: bool = True
) -> AsyncIterator[PointsmanProcess]:
    """As `pointsman_process`, with the blocking waits in a thread so that backends served by
    the test's own loop keep running meanwhile."""
    proc = await asyncio.to_thread(_start_run, config_text, workdir, uvloop)
    try:
        yield proc
    finally:
        await asyncio.to_thread(_finish, proc)


# --- timing-sensitive tests ----------------------------------------------------------------------


@contextlib.contextmanager
def scheduled_first() -> Iterator[bool]:
    """Run this thread, and the threads it starts, under SCHED_FIFO for the block, if allowed.

    Tests that count asyncio's slow-callback warnings measure wall time per callback. On a machine
    shared with other busy processes, the scheduler can leave a runnable loop off the CPU for tens
    of milliseconds, which says nothing about the code under test; a real-time priority keeps
    other tenants from doing that, so what remains is what the code does to the loop (waits for
    I/O, locks or the GIL). Without the privilege the block runs as usual (yields False).
    """
    try:
        policy, param = os.sched_getscheduler(0), os.sched_getparam(0)
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    except (OSError, AttributeError):
        yield False
        return
    try:
        yield True
    finally:
        os.sched_setscheduler(0, policy, param)
