"""The UDP session table: a full table drops and counts, idle sessions expire, shutdown ends all.

Expiry is observed by polling the table with a deadline; the only timed waits are the session
timeout itself (300 ms) and a backend pushing on a fixed period, both bounded in count.
"""

from __future__ import annotations

import asyncio
import socket

import pytest

from pointsman.telemetry.flow import DropReason, UdpEndReason
from tests.integration.udp_support import (
    REPLY_TIMEOUT,
    listener_addr,
    session_source,
    udp_clients,
    udp_config,
    udp_echo,
    udp_echoes,
    udp_listener,
)
from tests.support import LOOPBACK, free_port, hostport, running, wait_for

pytestmark = [pytest.mark.timeout(30), pytest.mark.usefixtures("engine")]  # both UDP planes

SESSION_TIMEOUT = 0.3
# The sweeper runs every timeout/4, so a session ends between 1x and 1.25x the timeout after its
# last datagram; the deadline leaves room for a loaded VM.
EXPIRY_DEADLINE = SESSION_TIMEOUT * 1.25 + 1.5


def bind() -> str:
    return hostport(LOOPBACK, free_port(LOOPBACK, socket.SOCK_DGRAM))


async def test_full_table_drops_new_clients_until_idle_sessions_expire() -> None:
    async with udp_echo(LOOPBACK) as backend:
        config = udp_config(bind(), [backend.address],
                            udp={"max_sessions": 2, "session_timeout": f"{SESSION_TIMEOUT}s"})
        async with running(config) as runtime:
            listener = udp_listener(runtime)
            stats = listener.stats
            async with udp_clients(listener_addr(runtime), 3) as (one, two, three):
                await one.request(b"one")
                await two.request(b"two")
                for n in range(3):
                    three.send(b"three %d" % n)
                await wait_for(lambda: stats.drops[DropReason.TABLE_FULL] == 3, REPLY_TIMEOUT,
                               what="the third client's datagrams are dropped")
                await one.request(b"one again")  # the sessions in the table still work
                assert three.pending() == 0
                assert backend.count == 3, "a dropped datagram reached the backend"
                assert stats.sessions == 2

                await wait_for(lambda: stats.sessions == 0, EXPIRY_DEADLINE,
                               what="idle sessions expire")
                assert stats.sessions_ended[UdpEndReason.IDLE_TIMEOUT.value] == 2
                await three.request(b"three, later")
                assert stats.sessions == 1
            assert stats.drops[DropReason.TABLE_FULL] == 3
            assert stats.sessions_created == 3


async def test_idle_sessions_expire_after_the_timeout_and_not_before() -> None:
    clients = 4
    async with udp_echoes(LOOPBACK) as backends:
        config = udp_config(bind(), [b.address for b in backends],
                            udp={"session_timeout": f"{SESSION_TIMEOUT}s"})
        async with running(config) as runtime:
            listener = udp_listener(runtime)
            pool = runtime.pools["p"]
            loop = asyncio.get_running_loop()
            async with udp_clients(listener_addr(runtime), clients) as group:
                for i, client in enumerate(group):
                    await client.request(b"ping %d" % i)
                last = loop.time()
                assert listener.stats.sessions == clients
                assert sum(m.stats.active for m in pool.members()) == clients

                await wait_for(lambda: listener.stats.sessions == 0, EXPIRY_DEADLINE,
                               what="idle sessions expire")
                assert loop.time() - last >= SESSION_TIMEOUT * 0.95, "expired before the timeout"
                assert listener.stats.sessions_ended[UdpEndReason.IDLE_TIMEOUT.value] == clients
                assert sum(m.stats.active for m in pool.members()) == 0
                assert not listener.sessions


async def test_backend_traffic_keeps_a_session_alive_without_delaying_other_expiries() -> None:
    """The idle timer resets on traffic either way: a backend that pushes keeps its session.
    Another session, idle behind it in the table, must still expire on time."""
    period = 0.05
    pushes = int(3 * SESSION_TIMEOUT / period)  # bounded: 18 pushes, about 0.9 s
    async with udp_echo(LOOPBACK) as backend:
        config = udp_config(bind(), [backend.address],
                            udp={"session_timeout": f"{SESSION_TIMEOUT}s"})
        async with running(config) as runtime:
            listener = udp_listener(runtime)
            stats = listener.stats
            async with udp_clients(listener_addr(runtime), 2) as (pushed, idle):
                await pushed.request(b"subscribe")  # first in the table
                await idle.request(b"hello")
                upstream = session_source(listener, pushed)

                expired_after = None
                for n in range(pushes):
                    backend.push(b"push %d" % n, upstream)
                    assert await pushed.recv() == b"push %d" % n
                    if expired_after is None and stats.sessions_ended["idle_timeout"] == 1:
                        expired_after = n
                    await asyncio.sleep(period)  # the push rate, not a synchronisation

                assert expired_after is not None, "the idle session never expired"
                assert expired_after * period <= SESSION_TIMEOUT * 1.25 + 0.3
                assert list(listener.sessions) == [pushed.local]
                assert idle.local not in listener.sessions


async def test_shutdown_ends_every_session_and_closes_upstream_sockets() -> None:
    async with udp_echoes(LOOPBACK) as backends:
        config = udp_config(bind(), [b.address for b in backends])
        async with running(config) as runtime:
            listener = udp_listener(runtime)
            async with udp_clients(listener_addr(runtime), 5) as group:
                for i, client in enumerate(group):
                    await client.request(b"x %d" % i)
                sessions = list(listener.sessions.values())
                assert len(sessions) == 5
        assert listener.stats.sessions == 0
        assert listener.stats.sessions_ended[UdpEndReason.SHUTDOWN.value] == 5
        assert all(s.sock is None for s in sessions)
        assert sum(m.stats.active for m in runtime.pools["p"].members()) == 0
