"""Clean shutdown, in its written order: stop accepting at once, let open connections finish for
`shutdown_grace`, cut what is left, exit 0.

Each test also runs with a control process and two workers (`workers: 2`), where the workers do
all of that for their own connections and the control process waits for them. Workers always run
uvloop, so the subprocess tests run the two-worker case once, not once per proxy loop.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pointsman.telemetry.flow import EndReason
from tests.support import (
    LOOPBACK,
    PointsmanProcess,
    close_writer,
    connect,
    echo_backend,
    free_port,
    one_pool_config,
    pointsman_process_async,
    read_all,
    roundtrip,
    running,
    wait_closed,
    wait_for,
    with_workers,
)

pytestmark = pytest.mark.usefixtures("engine")

# The subprocess tests run the proxy on each loop; the test side's own loop does not matter there.
# `workers` overrides the fixture of that name: the workers run uvloop whatever the proxy loop is.
proxy_loops = pytest.mark.parametrize(
    ("proxy_loop", "workers"), [("uvloop", 1), ("asyncio", 1), ("uvloop", 2)],
    ids=["uvloop-w1", "asyncio-w1", "uvloop-w2"])
# One loop on the test side: uvloop, the loop tests/conftest.py runs two-worker cases on.
one_test_loop = pytest.mark.asyncio(loop_factories=["uvloop"])


async def wait_refused(address: str, timeout: float) -> None:
    """Connect until the listener refuses; connections that still get in are closed at once."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            _, writer = await connect(address)
        except ConnectionRefusedError:
            return
        except ConnectionResetError:
            pass  # queued in the backlog as the listener closed: try again, expect a refusal
        else:
            await close_writer(writer)
        if loop.time() >= deadline:
            raise AssertionError(f"{address} still accepting {timeout}s after SIGTERM")
        await asyncio.sleep(0.01)


async def wait_exit(proc: PointsmanProcess, timeout: float) -> int:
    return await asyncio.to_thread(proc.wait, timeout)


@proxy_loops
@one_test_loop
async def test_sigterm_stops_accepting_and_lets_open_connection_finish(
    tmp_path: Path, proxy_loop: str, workers: int
) -> None:
    grace = 5.0
    async with echo_backend() as peer:
        listen = f"{LOOPBACK}:{free_port()}"
        config = with_workers(one_pool_config(listen, [peer.address], shutdown_grace=grace), workers)
        async with pointsman_process_async(config, tmp_path, uvloop=proxy_loop == "uvloop") as proc:
            reader, writer = await connect(listen)
            await roundtrip(reader, writer, b"before\n")

            loop = asyncio.get_running_loop()
            proc.signal()
            signalled = loop.time()
            await wait_refused(listen, timeout=1.0)
            assert proc.popen.poll() is None, "exited although a connection is open"

            # The open connection still works, both ways, and ends normally.
            await roundtrip(reader, writer, b"during shutdown\n" * 1000)
            writer.write_eof()
            assert await read_all(reader, timeout=2.0) == b""
            await close_writer(writer)
            code = await wait_exit(proc, timeout=grace)
            finished = loop.time() - signalled

    assert code == 0, proc.stderr()
    assert finished < grace - 1.0, f"waited {finished:.1f}s although the connection had ended"


@proxy_loops
@one_test_loop
async def test_sigterm_cuts_connection_still_open_after_grace(
    tmp_path: Path, proxy_loop: str, workers: int
) -> None:
    grace = 1.0
    async with echo_backend() as peer:
        listen = f"{LOOPBACK}:{free_port()}"
        config = with_workers(one_pool_config(listen, [peer.address], shutdown_grace="1s"), workers)
        async with pointsman_process_async(config, tmp_path, uvloop=proxy_loop == "uvloop") as proc:
            reader, writer = await connect(listen)
            await roundtrip(reader, writer, b"hello\n")

            loop = asyncio.get_running_loop()
            proc.signal()
            signalled = loop.time()
            await wait_closed(reader, timeout=grace + 2.0)
            cut_after = loop.time() - signalled
            code = await wait_exit(proc, timeout=2.0)
            await close_writer(writer)

    assert code == 0, proc.stderr()
    assert grace * 0.9 <= cut_after <= grace + 1.0
    assert "shutdown: cut 1 connections" in proc.stderr()


async def refused(address: str) -> bool:
    """True if a connection to `address` is refused; one that is accepted is closed at once."""
    try:
        _, writer = await connect(address)
    except ConnectionRefusedError:
        return True
    await close_writer(writer)
    return False


async def test_in_process_shutdown_counts_cut_connections(workers: int) -> None:
    grace = 2.0  # well past the wait for "not accepting": that must come first, not at the cut
    async with echo_backend() as peer:
        listen = f"{LOOPBACK}:{free_port()}"
        async with running(one_pool_config(listen, [peer.address]), shutdown_grace=grace,
                           workers=workers) as runtime:
            reader, writer = await connect(listen)
            await roundtrip(reader, writer, b"hello\n")
            listener = runtime.listeners["lb"]
            shutdown = asyncio.ensure_future(runtime.shutdown())
            await wait_for(lambda: not listener.accepting, 1.0, what="listener stopped")
            # With workers the control process says "not accepting" as it tells them to stop;
            # each closes its sockets when the message arrives, a few ms later. A connection
            # that slips in before that is closed here at once and ends as a client close.
            deadline = asyncio.get_running_loop().time() + 1.0
            while not await refused(listen):
                assert asyncio.get_running_loop().time() < deadline, \
                    "listener still accepting 1 s into shutdown"
            await roundtrip(reader, writer, b"still served\n")  # within the grace
            await wait_closed(reader, timeout=grace + 2.0)
            await shutdown
            await close_writer(writer)

    stats = listener.statistics()  # with workers: their last reports, sent as they exited
    assert stats.ended[EndReason.SHUTDOWN] == 1
    assert stats.active == 0
