"""Health through real sockets (issue #4): a backend killed under load, a flapping health port, an
empty pool, passive ejection from real traffic, and what `on_down` does to open connections.

Times are measured against the pool's own transition timestamps (`Transition.at`, monotonic), so
"marked down within fall x interval + timeout" is a measurement, not a sleep.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import Counter
from typing import Any

import pytest

from pointsman.pool.pool import Pool
from pointsman.pool.state import BackendState, Transition
from pointsman.telemetry.flow import EndReason, RejectReason
from tests.integration.peers import (
    ask_name,
    client_load,
    exchange,
    listen_address,
    named_backends,
    open_named,
    single_pool,
    tcp_stats,
)
from tests.support import (
    LOOPBACK,
    close_writer,
    connect,
    refused_port,
    running,
    wait_closed,
    wait_for,
)

UP = BackendState.UP
DOWN = BackendState.DOWN
EJECTED = BackendState.EJECTED

# Scheduling slack on a loaded 2-core VM: the loop runs the proxy, the backends and the clients.
SLACK = 0.3


def record_transitions(pool: Pool) -> list[Transition]:
    """Every state change of `pool` from now on, in order."""
    seen: list[Transition] = []
    pool.subscribe(lambda _pool, _backend, transition: seen.append(transition))
    return seen


def changes(transitions: list[Transition], backend: str) -> list[tuple[BackendState, BackendState]]:
    return [(t.old, t.new) for t in transitions if t.backend == backend]


def last_change(transitions: list[Transition], backend: str) -> Transition:
    return [t for t in transitions if t.backend == backend][-1]


async def wait_state(pool: Pool, backend: str, state: BackendState, timeout: float) -> None:
    member = pool.member(backend)
    await wait_for(lambda: member.machine.state is state, timeout, what=f"{backend} {state}")


# --- a backend killed under load ----------------------------------------------------------------

INTERVAL = 0.2
TIMEOUT = 0.2
RISE = 2
FALL = 2
TCP_CHECK: dict[str, Any] = {
    "type": "tcp", "interval": INTERVAL, "timeout": TIMEOUT, "rise": RISE, "fall": FALL,
    "jitter": 0,
}
NO_PASSIVE = {"consecutive_failures": 0}  # active checks alone decide in these tests


async def test_killed_backend_is_marked_down_in_time_and_no_client_fails() -> None:
    async with named_backends("a", "b", "c") as (a, b, c):
        listen = listen_address()
        config = single_pool(listen, [a, b, c], health_check=TCP_CHECK, passive=NO_PASSIVE)
        async with running(config) as runtime:
            pool = runtime.pools["p"]
            transitions = record_transitions(pool)
            async with client_load(listen, seconds=8.0) as load:
                await load.wait_served(500, timeout=5.0)

                b.stop_listening()
                killed = time.monotonic()
                await wait_state(pool, "b", DOWN, timeout=FALL * INTERVAL + TIMEOUT + 2.0)
                down_after = last_change(transitions, "b").at - killed
                await load.wait_served(300, timeout=5.0)

                b.listen()  # the same port again
                restarted = time.monotonic()
                await wait_state(pool, "b", UP, timeout=RISE * INTERVAL + TIMEOUT + 2.0)
                up_after = last_change(transitions, "b").at - restarted
                await load.wait_served(100, timeout=5.0, name="b")
            stats = tcp_stats(runtime)
            await wait_for(lambda: stats.active == 0, 2.0, what="all connections ended")
            refused = pool.member("b").stats.connect_failures

    print(f"marked down {down_after:.3f}s after the kill, up {up_after:.3f}s after the restart; "
          f"{load.ok} connections, {stats.retried} retried")
    assert load.failures == []
    assert stats.connect_failed == 0
    assert refused >= 1 and stats.retried >= refused, "no connect hit the dead backend"
    assert changes(transitions, "b") == [(UP, DOWN), (DOWN, UP)]
    assert changes(transitions, "a") == changes(transitions, "c") == []
    # One failed probe cannot do it (fall = 2); the second comes at most one interval later.
    assert (FALL - 1) * INTERVAL - 0.05 <= down_after <= FALL * INTERVAL + TIMEOUT + SLACK
    assert (RISE - 1) * INTERVAL - 0.05 <= up_after <= RISE * INTERVAL + TIMEOUT + SLACK


# --- a flapping health port ---------------------------------------------------------------------

FLAP_INTERVAL = 0.2
FLAP_CHECKS = 12


class FlappingPort:
    """A health port that alternates: it accepts one probe, then refuses for 1.5 intervals.

    With probes every interval (no jitter) the checker sees ok, fail, ok, fail, ...: the reopen
    lands half an interval away from either neighbouring probe.
    """

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.port = 0
        self.accepted = 0
        self._sock: socket.socket | None = None
        self._reopen: asyncio.TimerHandle | None = None

    def open(self) -> None:
        self._reopen = None
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((LOOPBACK, self.port))
        sock.listen(8)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        asyncio.get_running_loop().add_reader(sock.fileno(), self._accept)
        self._sock = sock

    def _accept(self) -> None:
        assert self._sock is not None
        try:
            conn, _ = self._sock.accept()
        except BlockingIOError:
            return
        conn.close()
        self.accepted += 1
        self._shut()
        self._reopen = asyncio.get_running_loop().call_later(1.5 * self.interval, self.open)

    def _shut(self) -> None:
        if self._sock is not None:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None

    def close(self) -> None:
        if self._reopen is not None:
            self._reopen.cancel()
        self._shut()


@pytest.mark.parametrize("initial", ["up", "down"])
@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_flapping_health_port_does_not_flap_the_backend(initial: str) -> None:
    flapper = FlappingPort(FLAP_INTERVAL)
    flapper.open()
    try:
        async with named_backends("a") as (a,):
            listen = listen_address()
            check = {**TCP_CHECK, "interval": FLAP_INTERVAL, "timeout": 0.1, "port": flapper.port}
            config = single_pool(listen, [a], health_check=check, initial_state=initial)
            async with running(config) as runtime:
                pool = runtime.pools["p"]
                transitions = record_transitions(pool)
                member = pool.member("a")
                states: set[BackendState] = set()

                def sampled() -> bool:
                    states.add(member.machine.state)
                    return member.checks >= FLAP_CHECKS

                await wait_for(sampled, FLAP_CHECKS * FLAP_INTERVAL + 3.0, what="probes ran")
                checks, failures = member.checks, member.check_failures
    finally:
        flapper.close()

    assert transitions == []
    assert states == {BackendState(initial)}
    # The port really flapped: about every other probe failed, never two alike in a row.
    assert checks // 2 - 1 <= failures <= checks // 2 + 1, (checks, failures)
    assert flapper.accepted == checks - failures


# --- no backend left ----------------------------------------------------------------------------------


async def test_all_backends_down_rejects_new_connections_at_once() -> None:
    listen = listen_address()
    with refused_port() as one, refused_port() as two:
        check = {**TCP_CHECK, "interval": 0.1, "timeout": 0.1, "fall": 1}
        config = single_pool(
            listen, [], health_check=check,
            backends=[{"address": f"{LOOPBACK}:{one}"}, {"address": f"{LOOPBACK}:{two}"}],
        )
        async with running(config) as runtime:
            pool = runtime.pools["p"]
            await wait_for(lambda: pool.snapshot.available == 0, 2.0, what="every backend down")
            loop = asyncio.get_running_loop()
            took = []
            for _ in range(5):
                began = loop.time()
                reader, writer = await connect(listen)
                await wait_closed(reader, timeout=1.0)
                took.append(loop.time() - began)
                await close_writer(writer)
            stats = tcp_stats(runtime)
            members = pool.members()

    assert stats.rejected[RejectReason.NO_BACKEND] == 5
    assert stats.accepted == 5 and not stats.ended  # taken from the kernel, refused, never ended
    assert all(m.stats.connect_failures == 0 for m in members), "a connect was tried anyway"
    assert max(took) < 0.2, f"closing took up to {max(took):.3f}s"


# --- passive ejection from real traffic ---------------------------------------------------------------

BASE_EJECTION = 1.0
TICK = 0.5  # Runtime.TICK_SECONDS: ejections end on the next tick after their deadline
PASSIVE = {"consecutive_failures": 3, "base_ejection": BASE_EJECTION, "max_ejection": "10s"}


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_passive_ejection_from_refused_connects_backs_off() -> None:
    async with named_backends("a", "b") as (a, b):
        listen = listen_address()
        with refused_port() as dead_port:
            backends = [a.config(), b.config(), {"name": "dead", "address": f"{LOOPBACK}:{dead_port}"}]
            config = single_pool(
                listen, [], backends=backends, health_check={"type": "none"}, passive=PASSIVE
            )
            async with running(config) as runtime:
                pool = runtime.pools["p"]
                dead = pool.member("dead")
                failures_at: list[int] = []
                pool.subscribe(lambda _p, _b, t: failures_at.append(dead.stats.connect_failures)
                               if t.new is EJECTED else None)
                transitions = record_transitions(pool)
                async with client_load(listen, seconds=10.0, workers=1):
                    await wait_for(lambda: len(changes(transitions, "dead")) >= 4,
                                   3 * BASE_EJECTION + 2 * TICK + 3.0, what="two ejections ended")
                stats = tcp_stats(runtime)
                await wait_for(lambda: stats.active == 0, 2.0, what="all connections ended")

    dead_changes = [t for t in transitions if t.backend == "dead"][:4]
    assert [(t.old, t.new) for t in dead_changes] == [(UP, EJECTED), (EJECTED, UP)] * 2
    assert failures_at[:2] == [3, 6], "ejection after exactly 3 consecutive refused connects"
    first = dead_changes[1].at - dead_changes[0].at
    second = dead_changes[3].at - dead_changes[2].at
    print(f"ejected for {first:.2f}s, then {second:.2f}s")
    assert BASE_EJECTION <= first <= BASE_EJECTION + TICK + SLACK
    assert 2 * BASE_EJECTION <= second <= 2 * BASE_EJECTION + TICK + SLACK
    assert stats.connect_failed == 0, "a client failed although retries had live backends"
    assert stats.retried >= 6
    assert changes(transitions, "a") == changes(transitions, "b") == []


# --- on_down: what happens to established connections ---------------------------------------------------


@pytest.mark.parametrize("on_down", ["keep_sessions", "close_sessions"])
async def test_on_down_keeps_or_cuts_established_connections(on_down: str) -> None:
    async with named_backends("a", "b") as (a, b):
        listen = listen_address()
        check = {**TCP_CHECK, "interval": 0.1, "timeout": 0.1}
        config = single_pool(listen, [a, b], health_check=check, passive=NO_PASSIVE, on_down=on_down)
        async with running(config) as runtime:
            pool = runtime.pools["p"]
            held = [await open_named(listen) for _ in range(6)]
            assert Counter(name for name, _, _ in held) == {"a": 3, "b": 3}

            a.stop_listening()  # checks fail; the established connections are untouched by a
            await wait_state(pool, "a", DOWN, timeout=3.0)
            new = [await ask_name(listen) for _ in range(4)]

            outcomes: dict[str, list[str]] = {"a": [], "b": []}
            for i, (name, reader, writer) in enumerate(held):
                if name == "a" and on_down == "close_sessions":
                    outcomes[name].append(await wait_closed(reader, timeout=1.0))
                else:
                    await exchange(reader, writer, f"after down {i}\n".encode())
                    outcomes[name].append("served")
            if on_down == "close_sessions":
                await wait_for(lambda: a.open_connections == 0, 1.0, what="a's side cut")
            backend_side = a.open_connections
            for _, _, writer in held:
                await close_writer(writer)
            stats = tcp_stats(runtime)
            await wait_for(lambda: stats.active == 0, 2.0, what="all connections ended")

    assert new == ["b"] * 4
    assert outcomes["b"] == ["served"] * 3
    if on_down == "close_sessions":
        assert all(outcome in ("eof", "reset") for outcome in outcomes["a"]), outcomes
        assert stats.ended[EndReason.BACKEND_DOWN] == 3
        assert backend_side == 0
    else:
        assert outcomes["a"] == ["served"] * 3
        assert stats.ended[EndReason.BACKEND_DOWN] == 0
        assert backend_side == 3
