"""A UDP backend dies: sessions move on their next datagram, ICMP refusals are passive failures.

Killing a backend here is closing its socket: the kernel then answers datagrams to its port with
ICMP port unreachable, which pointsman's connected upstream socket reports as ECONNREFUSED.
"""

from __future__ import annotations

import asyncio
import socket
from collections import Counter

import pytest

from pointsman.pool.state import BackendState
from pointsman.telemetry.flow import DropReason, UdpEndReason
from tests.integration.udp_support import (
    REPLY_TIMEOUT,
    UdpClient,
    UdpEcho,
    listener_addr,
    session_source,
    start_echo,
    udp_clients,
    udp_config,
    udp_echoes,
    udp_listener,
)
from tests.support import LOOPBACK, free_port, hostport, running, wait_for

pytestmark = [pytest.mark.timeout(30), pytest.mark.usefixtures("engine")]  # both batch paths

CLIENTS = 8
# A client's reply timeout before its one retry: what a DNS stub or game client does, short.
RETRY_AFTER = 0.3


def bind() -> str:
    return hostport(LOOPBACK, free_port(LOOPBACK, socket.SOCK_DGRAM))


def owner(backends: list[UdpEcho], backend_id: str) -> UdpEcho:
    return next(b for b in backends if b.address == backend_id)


async def request_with_retry(client: UdpClient, data: bytes, retries: int = 1) -> int:
    """Send `data`, resend after RETRY_AFTER without a reply; return the attempts it took."""
    for attempt in range(1, retries + 2):
        client.send(data)
        try:
            got = await client.recv(RETRY_AFTER)
        except TimeoutError:
            continue
        assert got == data
        return attempt
    raise AssertionError(f"no reply to {data!r} after {retries + 1} attempts")


@pytest.mark.parametrize("on_down", ["keep_sessions", "close_sessions"])
async def test_sessions_of_a_down_backend_move_on_their_next_datagram(on_down: str) -> None:
    async with udp_echoes(LOOPBACK) as backends:
        config = udp_config(bind(), [b.address for b in backends], pool={"on_down": on_down})
        async with running(config) as runtime:
            listener = udp_listener(runtime)
            pool = runtime.pools["p"]
            async with udp_clients(listener_addr(runtime), CLIENTS) as clients:
                for i, client in enumerate(clients):
                    await client.request(b"first %d" % i)
                first = {c.local: listener.sessions[c.local].backend_id for c in clients}
                dead = owner(backends, first[clients[0].local])
                alive = next(b for b in backends if b is not dead)
                movers = [c for c in clients if first[c.local] == dead.address]
                assert len(movers) == CLIENTS // 2

                await dead.kill()
                pool.health_verdict(dead.address, False, "test")
                assert pool.member(dead.address).machine.state is BackendState.DOWN
                before = alive.count
                for i, client in enumerate(clients):
                    await client.request(b"second %d" % i)  # first try: no loss, no retry

                assert {s.backend_id for s in listener.sessions.values()} == {alive.address}
                assert alive.count - before == CLIENTS
                for client in movers:
                    assert alive.by_source[session_source(listener, client)] == 1
            stats = listener.stats
            assert sum(stats.drops.values()) == 0
            assert pool.member(dead.address).stats.active == 0
            assert pool.member(dead.address).stats.connect_failures == 0
            if on_down == "keep_sessions":
                # The same sessions, moved: none ended, none created.
                assert stats.sessions_created == CLIENTS
                assert stats.sessions_ended[UdpEndReason.BACKEND_UNAVAILABLE.value] == 0
            else:
                # Cut when the backend went down; the next datagram opened a new session.
                assert stats.sessions_created == CLIENTS + len(movers)
                assert stats.sessions_ended[UdpEndReason.BACKEND_UNAVAILABLE.value] == len(movers)
            assert stats.sessions == CLIENTS


@pytest.mark.parametrize("consecutive_failures", [0, 1, 5])
async def test_refused_backend_is_a_passive_failure_and_one_retry_reaches_the_other(
    consecutive_failures: int,
) -> None:
    """No health check here: only the ICMP refusal tells pointsman. Whether or not passive
    ejection takes the backend out (0: off, 1: at once, 5: not within this test), every client
    of the dead backend gets its answer from the other one, and none waits past one retry."""
    async with udp_echoes(LOOPBACK) as backends:
        pool_extra = {"passive": {"consecutive_failures": consecutive_failures,
                                  "base_ejection": "30s"}}
        config = udp_config(bind(), [b.address for b in backends], pool=pool_extra)
        async with running(config) as runtime:
            listener = udp_listener(runtime)
            pool = runtime.pools["p"]
            async with udp_clients(listener_addr(runtime), CLIENTS) as clients:
                for i, client in enumerate(clients):
                    await client.request(b"hello %d" % i)
                first = {c.local: listener.sessions[c.local].backend_id for c in clients}
                dead = owner(backends, first[clients[0].local])
                alive = next(b for b in backends if b is not dead)
                victims = sum(1 for c in clients if first[c.local] == dead.address)
                before = alive.count
                await dead.kill()

                async with asyncio.timeout(REPLY_TIMEOUT + 2 * RETRY_AFTER * CLIENTS):
                    attempts = await asyncio.gather(
                        *(request_with_retry(c, b"again %d" % i) for i, c in enumerate(clients))
                    )

                assert max(attempts) <= 2, f"a client waited past one retry: {attempts}"
                # The clients whose datagram went to the dead backend needed their one retry.
                assert Counter(attempts) == {1: CLIENTS - victims, 2: victims}
                assert alive.count - before == CLIENTS  # every "again" ended at the live one
                assert {s.backend_id for s in listener.sessions.values()} == {alive.address}
            stats = listener.stats
            assert stats.drops[DropReason.BACKEND_REFUSED] == victims
            # The refused sessions moved to the live backend: none ended, none was created.
            assert stats.sessions_created == CLIENTS
            assert stats.sessions_ended[UdpEndReason.BACKEND_REFUSED.value] == 0
            assert pool.member(dead.address).stats.connect_failures == victims
            state = pool.member(dead.address).machine.state
            if consecutive_failures and victims >= consecutive_failures:
                assert state is BackendState.EJECTED
            else:
                assert state is BackendState.UP


async def test_a_refusal_is_forgotten_once_the_backend_answers_again() -> None:
    """Passive ejection counts *consecutive* failures: replies from a backend are successes and
    reset the count, as a TCP connect does."""
    async with udp_echoes(LOOPBACK, 1) as (backend,):
        config = udp_config(bind(), [backend.address],
                            pool={"passive": {"consecutive_failures": 2, "base_ejection": "30s"}})
        async with running(config) as runtime:
            listener = udp_listener(runtime)
            pool = runtime.pools["p"]
            port = backend.port
            async with udp_clients(listener_addr(runtime)) as (client,):
                for round_ in range(3):
                    await client.request(b"up %d" % round_)
                    await backend.kill()  # the backend restarts: one refusal ...
                    client.send(b"lost %d" % round_)
                    await wait_for(
                        lambda r=round_: listener.stats.drops[DropReason.BACKEND_REFUSED] == r + 1,
                        REPLY_TIMEOUT, what="the refusal is counted")
                    backend = await start_echo(LOOPBACK, port)  # ... and is back on its port
                    await client.request(b"back %d" % round_)
                await backend.kill()
            member = pool.member(backend.address)
            assert member.stats.connect_failures == 3
            # Nowhere to move: each refused session ended, and the next datagram opened a new one.
            assert listener.stats.sessions_ended[UdpEndReason.BACKEND_REFUSED.value] == 3
            assert listener.stats.sessions_created == 4
            assert member.machine.state is BackendState.UP, "three failures, never two in a row"
