"""The compiled engine waits for uvloop in its own epoll (docs/engine.md, "The engine waits for
uvloop"): while it blocks there, the loop must still get every turn it needs, for its timers, its
own sockets, other threads, signals and a second engine, idle or under load.

An engine that kept the loop waiting would hang the loop for good (even the suite's timeout
signal is only read by the loop), so each scenario runs in a child process with a deadline. The
scenarios set no timers of their own beyond what they test: a timer would end the engine's wait
and hide what should have ended it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import uvloop

from pointsman.proxy.engine import compiled_available, new_engine
from tests.integration.engine_support import proxy
from tests.support import LOOPBACK, backend, echo, roundtrip

pytestmark = pytest.mark.skipif(not compiled_available(), reason="compiled engine not built")
ROOT = Path(__file__).parents[2]
SCENARIOS: dict[str, Callable[[], Awaitable[None]]] = {}


def scenario(fn: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
    SCENARIOS[fn.__name__] = fn
    return fn


def run_isolated(name: str) -> None:
    """Run SCENARIOS[name] under uvloop in a child process; it must succeed within a minute."""
    try:
        done = subprocess.run([sys.executable, "-m", __name__, name], cwd=ROOT, timeout=60,
                              capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{name}: the loop never got its turn (the child hung)")
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_the_first_engine_on_a_loop_waits_for_it_and_a_second_keeps_the_add_reader() -> None:
    loop = asyncio.get_running_loop()
    first, second = new_engine(loop, "cython"), new_engine(loop, "cython")
    assert first.waits_for_loop and not second.waits_for_loop
    first.shutdown(0)
    third = new_engine(loop, "cython")  # the loop is free again
    assert third.waits_for_loop
    second.shutdown(0)
    third.shutdown(0)


@pytest.mark.asyncio(loop_factories=["asyncio"])
async def test_on_plain_asyncio_the_engine_keeps_the_add_reader() -> None:
    engine = new_engine(asyncio.get_running_loop(), "cython")
    assert not engine.waits_for_loop
    engine.shutdown(0)


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_pointsman_engine_wait_loop_keeps_the_add_reader(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POINTSMAN_ENGINE_WAIT", "loop")
    engine = new_engine(asyncio.get_running_loop(), "cython")
    assert not engine.waits_for_loop
    engine.shutdown(0)


async def idle_connection(address: tuple[str, int]) -> tuple[asyncio.StreamReader,
                                                              asyncio.StreamWriter]:
    """A relayed connection left open: the engine then has timers and waits with a timeout."""
    reader, writer = await asyncio.open_connection(*address)
    await roundtrip(reader, writer, b"ping")
    return reader, writer


async def timers_fire(connections: int) -> None:
    """Ten sleeps in a row, nothing else to end the engine's wait: each needs its timer."""
    async with backend(echo) as server, proxy("cython", [server.port]) as p:
        assert p.engine.waits_for_loop
        opened = [await idle_connection(p.address) for _ in range(connections)]
        for _ in range(10):
            await asyncio.sleep(0.02)
        for _, writer in opened:
            writer.close()


@scenario
async def timers_fire_with_no_connection() -> None:
    await timers_fire(0)


@scenario
async def timers_fire_with_an_idle_connection() -> None:  # the engine has timers of its own
    await timers_fire(1)


@scenario
async def a_thread_and_the_executor_wake_the_loop_while_the_engine_waits() -> None:
    loop = asyncio.get_running_loop()
    async with backend(echo) as server, proxy("cython", [server.port]) as p:
        assert p.engine.waits_for_loop
        for _ in range(3):
            woken = loop.create_future()
            timer = threading.Timer(0.02, loop.call_soon_threadsafe, (woken.set_result, 1))
            timer.start()
            assert await woken == 1
            # The thread needs the GIL to finish: the engine releases it while it waits.
            assert await loop.run_in_executor(None, sum, [1, 2]) == 3


@scenario
async def a_signal_handler_runs_while_the_engine_waits() -> None:
    loop = asyncio.get_running_loop()
    caught = asyncio.Event()
    loop.add_signal_handler(signal.SIGUSR1, caught.set)
    try:
        async with backend(echo) as server, proxy("cython", [server.port]) as p:
            assert p.engine.waits_for_loop
            threading.Timer(0.02, os.kill, (os.getpid(), signal.SIGUSR1)).start()
            await caught.wait()
    finally:
        loop.remove_signal_handler(signal.SIGUSR1)


@scenario
async def the_loops_own_sockets_and_a_second_engine_are_served_meanwhile() -> None:
    async with backend(echo) as server, proxy("cython", [server.port]) as first, \
            proxy("cython", [server.port]) as second:
        assert first.engine.waits_for_loop and not second.engine.waits_for_loop
        idle = await idle_connection(first.address)
        direct = await asyncio.open_connection(LOOPBACK, server.port)  # the loop's own socket
        through = await asyncio.open_connection(*second.address)  # the second engine's
        for n in range(50):
            await roundtrip(*direct, b"direct %d" % n)
            await roundtrip(*through, b"second %d" % n)
            await roundtrip(*idle, b"first %d" % n)
        for _, writer in (idle, direct, through):
            writer.close()


def _stream(address: tuple[str, int], total: int, done: threading.Event) -> None:
    """A blocking client in its own thread: send `total` bytes, read the echo back."""
    with socket.create_connection(address, timeout=10) as sock:
        sender = threading.Thread(target=sock.sendall, args=(b"x" * total,))
        sender.start()
        got = 0
        while got < total:
            chunk = sock.recv(1 << 16)
            assert chunk
            got += len(chunk)
        sender.join()
    done.set()


def _echo_server(listener: socket.socket) -> None:
    conn, _ = listener.accept()
    with conn:
        while data := conn.recv(1 << 16):
            conn.sendall(data)


@scenario
async def the_loop_gets_its_turns_while_the_engine_is_busy() -> None:
    """Client and backend in threads: only the engine and a timer use the loop. A timer every
    5 ms must keep running while the engine relays without a pause."""
    loop = asyncio.get_running_loop()
    listener = socket.create_server((LOOPBACK, 0))
    threading.Thread(target=_echo_server, args=(listener,), daemon=True).start()
    ticks: list[float] = []

    def tick() -> None:
        ticks.append(time.monotonic())
        handle[0] = loop.call_later(0.005, tick)

    handle = [loop.call_later(0.005, tick)]
    try:
        async with proxy("cython", [listener.getsockname()[1]]) as p:
            assert p.engine.waits_for_loop
            done = threading.Event()
            started = time.monotonic()
            threading.Thread(target=_stream, args=(p.address, 64 << 20, done),
                             daemon=True).start()
            while not done.is_set():
                await asyncio.sleep(0.05)
                assert time.monotonic() - started < 60, "the stream did not finish"
            during = [t for t in ticks if t >= started]
            elapsed = time.monotonic() - started
            # 5 ms timers over the stream: at least a quarter of them, whatever the machine.
            assert len(during) >= max(2, int(elapsed / 0.005 / 4)), (len(during), elapsed)
    finally:
        handle[0].cancel()
        listener.close()


@scenario
async def debug_mode_logs_no_slow_callback() -> None:
    """uvloop's debug mode times callbacks, the engine's turn included: its wait stays under
    the mark (and would otherwise be logged as one long callback)."""
    loop = asyncio.get_running_loop()
    slow: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            slow.append(record.getMessage())

    logging.getLogger("asyncio").addHandler(Catch(logging.WARNING))
    async with backend(echo) as server, proxy("cython", [server.port]) as p:
        assert p.engine.waits_for_loop
        loop.set_debug(True)
        loop.slow_callback_duration = 0.05
        await asyncio.sleep(0.5)  # the engine waits for this timer, idle
        await roundtrip(*await idle_connection(p.address), b"after")
        loop.set_debug(False)
    assert not [message for message in slow if "took" in message], slow


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_the_loop_gets_its_turn(name: str) -> None:
    run_isolated(name)


if __name__ == "__main__":
    uvloop.run(SCENARIOS[sys.argv[1]]())
