"""The UDP forwarding plane (proxy/udpfast.py, engine/_udp.pyx): what it adds to the UDP path.

Both planes (the compiled one and the pure-Python reference) are tested directly on real
loopback sockets (table, generations, counters, refusals), and a listener in front of echo
backends is tested on both engines: exact counters, per-backend sums, a backend going down,
the idle sweep of sessions only the plane touched, and a burst past max_sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import select
import socket
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from pointsman.pool.state import BackendState
from pointsman.proxy.engine import compiled_available
from pointsman.proxy.udpfast import Plane, PyUdpPlane, Woken
from pointsman.telemetry.flow import DropReason, UdpEndReason
from tests.integration.udp_support import (
    listener_addr,
    udp_clients,
    udp_config,
    udp_echoes,
    udp_listener,
)
from tests.support import LOOPBACK, free_port, hostport, running, wait_for

pytestmark = pytest.mark.timeout(30)


def make_plane(kind: str) -> Plane:
    if kind == "python":
        return PyUdpPlane()
    if not compiled_available():
        pytest.skip("the compiled engine is not built")
    from pointsman.proxy.engine._udp import UdpPlane
    return UdpPlane()


@pytest.fixture(params=["cython", "python"])
def plane(request: pytest.FixtureRequest) -> Iterator[Plane]:
    made = make_plane(str(request.param))
    yield made
    made.close()


def udp_socket(connect: tuple[str, int] | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)  # a whole test's datagrams
    sock.bind((LOOPBACK, 0))
    if connect is not None:
        sock.connect(connect)
    sock.setblocking(False)
    return sock


def addr(sock: socket.socket) -> tuple[str, int]:
    host, port = sock.getsockname()[:2]
    return str(host), int(port)


def recv_all(sock: socket.socket, count: int, timeout: float = 2.0) -> list[bytes]:
    """Exactly `count` datagrams within the deadline (fewer: the assertion says how many)."""
    got: list[bytes] = []
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    end = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < end:
        if poller.poll(max(int((end - time.monotonic()) * 1000), 1)):
            with contextlib.suppress(BlockingIOError):
                got.append(sock.recv(65535))
    return got


def run_until(plane: Plane, gen: int, done: int, timeout: float = 2.0) -> list[Woken]:
    """Call run() until the totals of datagrams in + out reach `done` (bounded)."""
    results: list[Woken] = []
    end = time.monotonic() + timeout
    total = 0
    while total < done and time.monotonic() < end:
        select.select([plane.fileno()], [], [], 0.05)
        woken = plane.run(gen)
        results.append(woken)
        total += woken[4] + woken[6] + len(woken[0])
    return results


def totals(results: list[Woken]) -> tuple[int, int, int, int, int]:
    return (sum(r[4] for r in results), sum(r[5] for r in results), sum(r[6] for r in results),
            sum(r[7] for r in results), sum(r[8] for r in results))


# --- the plane alone ------------------------------------------------------------------------------


def test_known_sessions_go_both_ways_unknown_ones_come_back(plane: Plane) -> None:
    backend = udp_socket()
    listening = udp_socket()
    client, stranger = udp_socket(addr(listening)), udp_socket(addr(listening))
    upstream = udp_socket(addr(backend))
    lid = plane.listen(listening)
    slot = plane.add(lid, *addr(client), upstream, 7)
    try:
        payloads = [bytes([i]) * (i + 1) for i in range(10)]
        for data in payloads:
            client.send(data)
        stranger.send(b"who am i")
        results = run_until(plane, 7, 11)
        slow = [d for r in results for d in r[0]]
        assert [(d, a[:2], lid_) for d, a, lid_ in slow] == [(b"who am i", addr(stranger), lid)]
        assert totals(results) == (10, sum(map(len, payloads)), 0, 0, 0)
        assert recv_all(backend, 10) == payloads  # in order, exact bytes
        # Replies: from the backend to the upstream socket, back to the client from `listening`.
        for data in payloads[:4]:
            backend.sendto(data[::-1] + b"!", addr(upstream))
        results = run_until(plane, 7, 4)
        assert [r[2] for r in results if r[2]] == [[slot]]  # its first reply, once
        assert totals(results)[2:] == (4, sum(len(d) + 1 for d in payloads[:4]), 0)
        assert recv_all(client, 4) == [d[::-1] + b"!" for d in payloads[:4]]
        touched = plane.touched()
        assert [(t[0], *t[2:]) for t in touched] == [
            (slot, 10, 4, sum(map(len, payloads)), sum(len(d) + 1 for d in payloads[:4]))]
        assert plane.touched() == []  # taken
        assert plane.remove(slot) == (0, 0, 0, 0)
    finally:
        for sock in (backend, listening, client, stranger, upstream):
            sock.close()


def test_runs_of_equal_datagrams_keep_their_boundaries(plane: Plane) -> None:
    """The compiled plane sends a run of equal-size datagrams as one UDP GSO message: the
    receivers still get every datagram, exactly, in order (both ways)."""
    backend, listening = udp_socket(), udp_socket()
    client = udp_socket(addr(listening))
    upstream = udp_socket(addr(backend))
    lid = plane.listen(listening)
    plane.add(lid, *addr(client), upstream, 1)
    payloads = ([b"a" * 100] * 8 + [b"b" * 30] + [b"c" * 100] * 2 + [b"d" * 50, b"e" * 100]
                + [b""] + [b"f" * 1400] * 3)
    try:
        for data in payloads:
            client.send(data)
        results = run_until(plane, 1, len(payloads))
        assert totals(results)[:2] == (len(payloads), sum(map(len, payloads)))
        assert recv_all(backend, len(payloads)) == payloads
        for data in payloads:
            backend.sendto(data, addr(upstream))
        results = run_until(plane, 1, len(payloads))
        assert totals(results)[2:] == (len(payloads), sum(map(len, payloads)), 0)
        assert recv_all(client, len(payloads)) == payloads
    finally:
        for sock in (backend, listening, client, upstream):
            sock.close()


def test_a_stale_generation_sends_a_session_to_the_policy(plane: Plane) -> None:
    backend, listening = udp_socket(), udp_socket()
    client = udp_socket(addr(listening))
    upstream = udp_socket(addr(backend))
    lid = plane.listen(listening)
    slot = plane.add(lid, *addr(client), upstream, 1)
    try:
        client.send(b"a")
        results = run_until(plane, 2, 1)  # the pools changed: generation 2
        assert [d[0] for r in results for d in r[0]] == [b"a"]
        assert totals(results)[0] == 0
        plane.validate(slot, 2)
        client.send(b"b")
        assert totals(run_until(plane, 2, 1))[0] == 1
        assert recv_all(backend, 1) == [b"b"]
        remaining = plane.remove(slot)
        assert remaining == (1, 0, 1, 0)  # not taken by touched(): remove hands it over
        client.send(b"c")
        assert [d[0] for r in run_until(plane, 2, 1) for d in r[0]] == [b"c"]
    finally:
        for sock in (backend, listening, client, upstream):
            sock.close()


def test_a_refusing_backend_is_reported_and_the_rest_goes_to_the_policy(plane: Plane) -> None:
    gone = udp_socket()
    listening = udp_socket()
    client = udp_socket(addr(listening))
    upstream = udp_socket(addr(gone))
    gone.close()  # the kernel now answers with ICMP port unreachable
    lid = plane.listen(listening)
    slot = plane.add(lid, *addr(client), upstream, 1)
    try:
        client.send(b"first")
        first = run_until(plane, 1, 1)
        assert totals(first)[0] == 1  # sent: the refusal comes back afterwards, by ICMP
        end = time.monotonic() + 2.0
        refused: list[int] = []
        errors: list[tuple[int, int]] = []
        slow: list[bytes] = []
        while not (refused or errors) and time.monotonic() < end:
            client.send(b"again")
            select.select([plane.fileno()], [], [], 0.05)
            woken = plane.run(1)
            refused += woken[1]
            errors += woken[3]
            slow += [d[0] for d in woken[0]]
        # Seen on the session's socket (a pending error read there) or on the next send.
        assert refused == [slot] or [e[0] for e in errors] == [slot]
    finally:
        for sock in (listening, client, upstream):
            sock.close()


def test_the_table_keeps_every_session_through_growth_and_removals(plane: Plane) -> None:
    """Hundreds of sessions added and half removed in random order (the compiled table grows
    and shifts entries back on removal): every remaining one is still found, no removed one."""
    backend, listening = udp_socket(), udp_socket()
    lid = plane.listen(listening)
    clients = [udp_socket(addr(listening)) for _ in range(300)]
    upstreams = [udp_socket(addr(backend)) for _ in clients]
    try:
        slots = [plane.add(lid, *addr(c), u, 1) for c, u in zip(clients, upstreams, strict=True)]
        assert len(set(slots)) == len(slots) == len(plane)
        order = list(range(len(clients)))
        random.Random(18).shuffle(order)
        removed = set(order[:150])
        for i in order[:150]:
            plane.remove(slots[i])
        assert len(plane) == 150
        for i, client in enumerate(clients):
            client.send(b"%d" % i)
        results = run_until(plane, 1, 300, timeout=5.0)
        slow = {d[1][:2] for r in results for d in r[0]}
        assert slow == {addr(clients[i]) for i in removed}
        assert totals(results)[0] == 150
        assert sorted(recv_all(backend, 150)) == sorted(b"%d" % i for i in range(300)
                                                        if i not in removed)
    finally:
        for sock in (backend, listening, *clients, *upstreams):
            sock.close()


# --- through a listener, both engines ----------------------------------------------------------------


def bind() -> str:
    return hostport(LOOPBACK, free_port(LOOPBACK, socket.SOCK_DGRAM))


@pytest.mark.usefixtures("engine")
async def test_counters_add_up_exactly_per_listener_session_and_backend() -> None:
    clients_n, rounds = 6, 25
    async with udp_echoes(LOOPBACK) as backends, \
            running(udp_config(bind(), [b.address for b in backends])) as runtime:
        listener = udp_listener(runtime)
        async with udp_clients(listener_addr(runtime), clients_n) as clients:
            sizes = Counter[str]()
            for r in range(rounds):
                for i, client in enumerate(clients):
                    data = b"x" * (1 + (r * 7 + i) % 50)
                    await client.request(data)
                    sizes[str(client.local[1])] += len(data)
            sent = clients_n * rounds
            in_bytes = sum(sizes.values())
            stats = listener.stats
            assert stats.datagrams_in == sent and stats.bytes_in == in_bytes
            await wait_for(lambda: stats.datagrams_out == sent, 5.0)
            assert stats.bytes_out == in_bytes
            assert sum(stats.drops.values()) == 0
            # All but each session's first datagram went through the plane.
            assert len(listener.plane) == clients_n
            listener.sync()
            per_backend = Counter[str]()
            for session in listener.sessions.values():
                assert session.datagrams_in == session.datagrams_out == rounds
                assert session.bytes_in == session.bytes_out == sizes[str(session.client[1])]
                per_backend[session.backend_id] += session.datagrams_in
            assert per_backend == Counter({b.address: b.count for b in backends})
            assert sum(per_backend.values()) == sent


@pytest.mark.usefixtures("engine")
async def test_a_down_backend_invalidates_its_sessions_in_the_plane() -> None:
    async with udp_echoes(LOOPBACK) as backends, \
            running(udp_config(bind(), [b.address for b in backends])) as runtime:
        listener = udp_listener(runtime)
        pool = runtime.pools["p"]
        async with udp_clients(listener_addr(runtime), 4) as clients:
            for client in clients:
                await client.request(b"one")
                await client.request(b"two")  # this one through the plane
            first = {c.local: listener.sessions[c.local].backend_id for c in clients}
            down = first[clients[0].local]
            up = next(b for b in backends if b.address != down)
            pool.health_verdict(down, False, "test")
            assert pool.member(down).machine.state is BackendState.DOWN
            before = up.count
            for client in clients:
                await client.request(b"three")  # the first after the change: it moves
            assert {s.backend_id for s in listener.sessions.values()} == {up.address}
            assert up.count - before == len(clients)
            for client in clients:
                await client.request(b"four")  # and goes through the plane again
            assert up.count - before == 2 * len(clients)
            assert len(listener.plane) == len(clients)
        assert sum(listener.stats.drops.values()) == 0


@pytest.mark.usefixtures("engine")
async def test_the_sweep_sees_traffic_only_the_plane_carried() -> None:
    timeout = 0.6
    async with udp_echoes(LOOPBACK, 1) as backends:
        config = udp_config(bind(), [backends[0].address], udp={"session_timeout": f"{timeout}s"})
        async with running(config) as runtime:
            listener = udp_listener(runtime)
            async with udp_clients(listener_addr(runtime), 1) as (client,):
                await client.request(b"start")
                session = listener.sessions[client.local]
                loop = asyncio.get_running_loop()
                end = loop.time() + 3 * timeout
                while loop.time() < end:  # busy for three timeouts, through the plane only
                    await client.request(b"ping")
                    await asyncio.sleep(timeout / 6)
                assert listener.sessions.get(client.local) is session
                assert listener.stats.sessions_ended[UdpEndReason.IDLE_TIMEOUT.value] == 0
                await wait_for(lambda: client.local not in listener.sessions, 5 * timeout)
            stats = listener.stats
            assert stats.sessions_ended[UdpEndReason.IDLE_TIMEOUT.value] == 1
            assert session.datagrams_in == stats.datagrams_in == session.datagrams_out
            assert len(listener.plane) == 0


@pytest.mark.usefixtures("engine")
async def test_a_burst_from_many_sources_past_the_table_drops_and_counts() -> None:
    capacity, sources = 5, 12
    async with udp_echoes(LOOPBACK, 1) as (backend,):
        config = udp_config(bind(), [backend.address], udp={"max_sessions": capacity})
        async with running(config) as runtime:
            listener = udp_listener(runtime)
            async with udp_clients(listener_addr(runtime), sources) as clients:
                for _ in range(3):
                    for client in clients:
                        client.send(b"burst")
                await wait_for(lambda: backend.count + listener.stats.drops[DropReason.TABLE_FULL]
                               == 3 * sources, 5.0)
                stats = listener.stats
                assert backend.count == stats.datagrams_in == 3 * capacity
                assert stats.drops[DropReason.TABLE_FULL] == 3 * (sources - capacity)
                assert stats.sessions == len(listener.plane) == capacity
                served = {c.local for c in clients if c.local in listener.sessions}
                assert len(served) == capacity
                await wait_for(lambda: stats.datagrams_out == 3 * capacity, 5.0)
                await wait_for(lambda: sum(c.pending() for c in clients) == 3 * capacity, 5.0)
                for client in clients:
                    assert client.pending() == (3 if client.local in served else 0)
