"""Reload by SIGHUP of a `pointsman run` process (issue #8 acceptance, one process).

New connections never fail and established streams never break across 20 reloads that change
weights and add and remove a backend; a bad file is refused with its line and field named, and the
old config keeps serving; a valid file that cannot be bound changes nothing; a listener removed by
a reload stops accepting while its open connection carries on.

The test knows a reload has been applied when the process logs "config applied" once more (or
"reload refused"): every wait polls the process's stderr with a deadline.

Tests that take `workers` run as one process and as a control process with two workers
(`workers: 2`), where a reload is applied by the control process and then by every worker before
"config applied" is logged. Workers always run uvloop, so the two-worker case runs once, not once
per proxy loop; each worker rotates on its own, so exact counts become rotations (`rotated`).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from pointsman.config.loader import load_text
from pointsman.config.model import Config
from tests.integration.peers import (
    NamedBackend,
    Stream,
    ask_name,
    client_load,
    config_text,
    named_backends,
    open_named,
    open_streams,
    rotated,
    wait_more_exchanges,
)
from tests.support import (
    LOOPBACK,
    PointsmanProcess,
    close_writer,
    connect,
    free_port,
    pointsman_process_async,
    running,
    wait_for,
    with_workers,
    workers_caught_up,
)

# The proxy runs in its own process; the test side's loop only drives clients and backends.
pytestmark = pytest.mark.asyncio(loop_factories=["uvloop"])

RELOADS = 20
APPLY_TIMEOUT = 5.0  # from SIGHUP to "config applied"; a passing run takes milliseconds
APPLIED = "config applied"
REFUSED = "reload refused"


def pool_config(
    listen: str, backends: list[dict[str, Any]], *, extra_listeners: Sequence[dict[str, Any]] = (),
    workers: int = 1,
) -> str:
    return with_workers(config_text(
        [{"name": "lb", "bind": listen, "pool": "p"}, *extra_listeners],
        [{"name": "p", "algorithm": "weighted_round_robin", "backends": backends}],
        shutdown_grace="10s",
    ), workers)


def write_config(proc: PointsmanProcess, text: str) -> Path:
    """Replace the process's config file atomically (a reload never reads half a file)."""
    path = Path(proc.args[1])
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


async def sighup_and_wait(proc: PointsmanProcess, marker: str) -> None:
    """Send SIGHUP and wait until stderr shows one more `marker` line."""
    before = proc.stderr().count(marker)
    proc.signal(signal.SIGHUP)
    await wait_for(lambda: proc.stderr().count(marker) > before or proc.popen.poll() is not None,
                   APPLY_TIMEOUT, interval=0.01, what=f"{marker!r} after SIGHUP")
    assert proc.popen.poll() is None, f"pointsman exited on SIGHUP:\n{proc.stderr()}"


async def open_stream_to(address: str, backend: str, tries: int = 100) -> Stream:
    """Open connections until one reaches `backend` (the others are closed at once)."""
    for _ in range(tries):
        name, reader, writer = await open_named(address)
        if name == backend:
            stream = Stream(name, reader, writer)
            stream.task = asyncio.create_task(stream.chatter())
            return stream
        await close_writer(writer)
    raise AssertionError(f"no connection reached {backend} in {tries} tries")


# --- reloads under load ---------------------------------------------------------------------------


def small(b1: NamedBackend, b2: NamedBackend) -> list[dict[str, Any]]:
    return [b1.config(weight=1), b2.config(weight=1)]


def large(b1: NamedBackend, b2: NamedBackend, b3: NamedBackend) -> list[dict[str, Any]]:
    return [b1.config(weight=3), b2.config(weight=1), b3.config(weight=1)]


# `workers` overrides the fixture of that name: the workers run uvloop whatever the proxy loop is.
@pytest.mark.parametrize(("proxy_loop", "workers"), [("uvloop", 1), ("asyncio", 1), ("uvloop", 2)],
                         ids=["uvloop-w1", "asyncio-w1", "uvloop-w2"])
async def test_twenty_reloads_under_load_lose_no_connection(
    tmp_path: Path, proxy_loop: str, workers: int
) -> None:
    async with named_backends("b1", "b2", "b3") as (b1, b2, b3):
        listen = f"{LOOPBACK}:{free_port()}"
        config_a = pool_config(listen, small(b1, b2), workers=workers)
        config_b = pool_config(listen, large(b1, b2, b3), workers=workers)
        uvloop = proxy_loop == "uvloop"
        async with pointsman_process_async(config_a, tmp_path, uvloop=uvloop) as proc:
            streams = await open_streams(listen, 3)
            async with client_load(listen, seconds=30.0, workers=2) as load:
                await load.wait_served(50, timeout=5.0)
                for reload in range(1, RELOADS + 1):
                    load.phase = None  # connections from now on may see either config
                    write_config(proc, config_b if reload % 2 else config_a)
                    await sighup_and_wait(proc, APPLIED)
                    load.phase = reload
                    if reload == 1:  # a stream to the added backend, which later reloads remove
                        streams.append(await open_stream_to(listen, "b3"))
                    await load.wait_served(30, timeout=5.0)
                    await wait_more_exchanges(streams)
            rests = [await stream.finish() for stream in streams]
            applied = proc.stderr().count(APPLIED)

    assert load.failures == [], load.failures[:5]
    assert [s.error for s in streams] == [None] * len(streams)
    assert rests == [b""] * len(streams)
    assert min(s.exchanges for s in streams) >= 10
    assert applied == RELOADS

    def total(parity: int, name: str) -> int:
        return sum(n for (phase, who), n in load.by_phase.items()
                   if phase % 2 == parity and who == name)

    # Connections made wholly under config A never reach b3; under B they do, by weight.
    assert total(0, "b3") == 0
    assert total(1, "b3") > 0
    assert total(1, "b1") > 2 * total(1, "b2")
    assert 0.8 < total(0, "b1") / total(0, "b2") < 1.25


# --- a bad file is refused --------------------------------------------------------------------------


# One process only: the file is refused in the process that reads it (with workers, the control
# process) before anything reaches a worker, and the counts below are one rotation's.
async def test_bad_config_is_refused_with_line_and_field_and_old_config_serves(
    tmp_path: Path,
) -> None:
    async with named_backends("b1", "b2", "b3") as (b1, b2, b3):
        listen = f"{LOOPBACK}:{free_port()}"
        good = pool_config(listen, small(b1, b2))
        bad = pool_config(listen, [b1.config(), b2.config(), b3.config(weight=-5)])
        bad_line = bad.splitlines().index("    weight: -5") + 1
        async with pointsman_process_async(good, tmp_path) as proc:
            stream = (await open_streams(listen, 1))[0]
            path = write_config(proc, bad)
            await sighup_and_wait(proc, REFUSED)
            stderr = proc.stderr()
            served = [await ask_name(listen) for _ in range(20)]
            await wait_more_exchanges([stream])

            write_config(proc, pool_config(listen, large(b1, b2, b3)))
            await sighup_and_wait(proc, APPLIED)
            after_fix = [await ask_name(listen) for _ in range(10)]
            rest = await stream.finish()

    expected = f"{path}:{bad_line}: pools[0].backends[2].weight:"
    assert expected in stderr, f"no {expected!r} in stderr:\n{stderr}"
    assert APPLIED not in stderr
    assert sorted(set(served)) == ["b1", "b2"] and served.count("b1") == 10
    assert stream.error is None and rest == b""
    assert after_fix.count("b3") == 2 and after_fix.count("b1") == 6  # weights 3:1:1 now


# --- a listener removed by a reload ---------------------------------------------------------------------


async def wait_refused(address: str, timeout: float) -> None:
    """Connect until refused; a connection that still gets in is closed at once."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            _, writer = await connect(address)
        except ConnectionRefusedError:
            return
        writer.transport.abort()
        if loop.time() >= deadline:
            raise AssertionError(f"{address} still accepting {timeout}s after the reload")
        await asyncio.sleep(0.01)


async def test_removed_listener_stops_accepting_and_its_connection_carries_on(
    tmp_path: Path, workers: int
) -> None:
    async with named_backends("b1", "b2") as (b1, b2):
        listen = f"{LOOPBACK}:{free_port()}"
        other = f"{LOOPBACK}:{free_port()}"
        both = pool_config(listen, small(b1, b2),
                           extra_listeners=[{"name": "lb2", "bind": other, "pool": "p"}],
                           workers=workers)
        async with pointsman_process_async(both, tmp_path) as proc:
            streams: list[Stream] = await open_streams(other, 2)
            write_config(proc, pool_config(listen, small(b1, b2), workers=workers))
            await sighup_and_wait(proc, APPLIED)
            await wait_refused(other, timeout=2.0)
            await wait_more_exchanges(streams)
            still_served = await ask_name(listen)
            rests = [await stream.finish() for stream in streams]
            # The process is still whole: the kept listener serves after the retired one drained.
            name, _, writer = await open_named(listen)
            writer.transport.abort()

    assert [s.error for s in streams] == [None, None]
    assert rests == [b"", b""]
    assert min(s.exchanges for s in streams) >= 10
    assert still_served in {"b1", "b2"} and name in {"b1", "b2"}


ASKS = 20  # per listener after the refused reload


async def test_reload_that_cannot_bind_changes_nothing(tmp_path: Path, workers: int) -> None:
    async with named_backends("b1", "b2") as (b1, b2):
        listen = f"{LOOPBACK}:{free_port()}"
        other = f"{LOOPBACK}:{free_port()}"
        with socket.socket() as squatter:
            squatter.bind((LOOPBACK, 0))
            squatter.listen(1)
            taken = f"{LOOPBACK}:{squatter.getsockname()[1]}"
            before = pool_config(listen, small(b1, b2),
                                 extra_listeners=[{"name": "lb2", "bind": other, "pool": "p"}],
                                 workers=workers)
            # Valid, but lb2 cannot move to a port somebody else holds; the weights change too.
            after = pool_config(listen, [b1.config(weight=3), b2.config(weight=1)],
                                extra_listeners=[{"name": "lb2", "bind": taken, "pool": "p"}],
                                workers=workers)
            async with pointsman_process_async(before, tmp_path) as proc:
                streams = await open_streams(other, 2)
                write_config(proc, after)
                await sighup_and_wait(proc, "reload failed")
                via_lb = Counter([await ask_name(listen) for _ in range(ASKS)])
                via_lb2 = Counter([await ask_name(other) for _ in range(ASKS)])
                await wait_more_exchanges(streams)
                rests = [await stream.finish() for stream in streams]
                stderr = proc.stderr()

    assert APPLIED not in stderr
    # Weights 1:1 still (one process: exactly 10 and 10); 3:1 would give 15 and 5.
    for seen in (via_lb, via_lb2):
        assert sum(seen.values()) == ASKS and rotated(seen, ["b1", "b2"], workers), \
            f"the refused config was partly applied: {seen}"
    assert [s.error for s in streams] == [None, None]
    assert rests == [b"", b""]


# --- backends a reload adds, in a pool that starts its backends down ---------------------------------

# With no health check configured, the owner pool turns such a backend up at once ("health check
# removed"); the workers' mirror pools must end up in the same state. These tests run the node in
# the test's loop and apply the new config the way a reload does (`Node.apply`), with no file.
DOWN_AT_START = {"initial_state": "down"}


def added_text(listen: str, other: str, peers: list[NamedBackend], *, second: bool,
               new_pool: bool) -> str:
    """lb -> p (b1, and b2 when `second` and not `new_pool`); with `second` and `new_pool`, also
    lb2 -> q (b2), a pool that the reload adds."""
    b1, b2 = peers
    listeners: list[dict[str, Any]] = [{"name": "lb", "bind": listen, "pool": "p"}]
    in_p = [b1.config()] + ([b2.config()] if second and not new_pool else [])
    pools: list[dict[str, Any]] = [{"name": "p", "backends": in_p, **DOWN_AT_START}]
    if second and new_pool:
        listeners.append({"name": "lb2", "bind": other, "pool": "q"})
        pools.append({"name": "q", "backends": [b2.config()], **DOWN_AT_START})
    return config_text(listeners, pools)


def loaded(text: str) -> Config:
    return load_text(text, "<test>").model_copy(update={"shutdown_grace": 0.2})


async def test_backend_added_by_a_reload_to_a_pool_starting_down_serves(workers: int) -> None:
    async with named_backends("b1", "b2") as peers:
        listen, other = f"{LOOPBACK}:{free_port()}", f"{LOOPBACK}:{free_port()}"
        before = added_text(listen, other, peers, second=False, new_pool=False)
        async with running(before, workers=workers) as node:
            first = await ask_name(listen)
            after = added_text(listen, other, peers, second=True, new_pool=False)
            problems = await node.apply(loaded(after))
            node.pools["p"].drain("b1")
            await workers_caught_up(node)
            states = {m.id: m.machine.state.value for m in node.pools["p"].members()}
            served: Counter[str] = Counter()
            for _ in range(4):
                try:
                    served[await ask_name(listen)] += 1
                except (OSError, TimeoutError) as exc:  # cut: no backend is up in that worker
                    served[type(exc).__name__] += 1
    assert (first, problems) == ("b1", [])
    assert states == {"b1": "draining", "b2": "up"}
    assert served == {"b2": 4}


async def test_pool_added_by_a_reload_starting_down_serves(workers: int) -> None:
    async with named_backends("b1", "b2") as peers:
        listen, other = f"{LOOPBACK}:{free_port()}", f"{LOOPBACK}:{free_port()}"
        before = added_text(listen, other, peers, second=False, new_pool=False)
        async with running(before, workers=workers) as node:
            after = added_text(listen, other, peers, second=True, new_pool=True)
            problems = await node.apply(loaded(after))
            await wait_for(lambda: all(lst.accepting for lst in node.listeners.values()),
                           APPLY_TIMEOUT, what="lb2 served")
            states = {m.id: m.machine.state.value for m in node.pools["q"].members()}
            served: Counter[str] = Counter()
            for _ in range(4):
                try:
                    served[await ask_name(other)] += 1
                except (OSError, TimeoutError) as exc:  # cut: no backend is up in that worker
                    served[type(exc).__name__] += 1
    assert problems == []
    assert states == {"b2": "up"}
    assert served == {"b2": 4}
