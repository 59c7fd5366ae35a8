"""UDP sessions through a real listener: many clients, exact payloads, datagram boundaries.

Backends are echo endpoints that record every datagram with its source address. Each session has
its own upstream socket, so the source address a backend saw names the session: a client's
datagrams all arriving from its session's address at one backend means one session, one backend.

The concurrent-clients test also runs with a control process and two workers (v4 only): the
kernel hands all datagrams of one client address and port to one worker, so each client must
still keep one session. There the sessions live in the workers; the test reads them from what the
backends saw (each payload names its client) and the counters from the workers' reports.
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
from collections import Counter

import pytest

from pointsman.proxy.udp import UdpListener
from pointsman.telemetry.flow import DropReason, UdpEndReason
from tests.integration.udp_support import (
    MAX_PAYLOAD_V4,
    UdpClient,
    UdpEcho,
    bound_addr,
    family_hosts,
    listener_addr,
    max_payload,
    session_source,
    udp_clients,
    udp_config,
    udp_echo,
    udp_echoes,
    udp_listener,
)
from tests.support import (
    LOOPBACK,
    LOOPBACK6,
    free_port,
    has_ipv6,
    hostport,
    running,
    statistics_when,
)

pytestmark = [pytest.mark.timeout(30), pytest.mark.usefixtures("engine")]  # both batch paths

CLIENTS = 32
ROUNDS = 24  # datagrams per client, one in flight at a time
# One datagram per client in flight: at most CLIENTS datagrams queue on any socket at once, far
# below what a default 208 KiB receive buffer holds at these sizes (92 of 1400 bytes), so
# nothing is lost on loopback and every reply must arrive.
SMALL_SIZES = (1, 2, 3, 5, 17, 64, 255, 512, 1024, 1399, 1400)
CONCURRENT_DEADLINE = 15.0

FAMILY_PAIRS = [
    pytest.param(LOOPBACK, LOOPBACK, id="v4-v4"),
    pytest.param(LOOPBACK6, LOOPBACK6, id="v6-v6",
                 marks=pytest.mark.skipif(not has_ipv6(), reason="no IPv6 loopback")),
    pytest.param(LOOPBACK, LOOPBACK6, id="v4-v6",
                 marks=pytest.mark.skipif(not has_ipv6(), reason="no IPv6 loopback")),
    pytest.param(LOOPBACK6, LOOPBACK, id="v6-v4",
                 marks=pytest.mark.skipif(not has_ipv6(), reason="no IPv6 loopback")),
]
# Every family pair with one process; v4 to v4 with two workers as well (`workers` overrides the
# fixture of that name; the families take the same path through the workers).
FAMILIES_AND_WORKERS = [
    pytest.param(*pair.values, 1, id=f"{pair.id}-w1", marks=pair.marks) for pair in FAMILY_PAIRS
] + [pytest.param(LOOPBACK, LOOPBACK, 2, id="v4-v4-w2")]


def payload(client: int, seq: int, size: int) -> bytes:
    """Numbered payload: client and sequence number first, then a pattern, cut to `size`."""
    header = struct.pack("!HH", client, seq)
    body = bytes((client * 31 + seq + i) & 0xFF for i in range(min(size, 256)))
    return ((header + body) * (size // (len(header) + len(body)) + 1))[:size]


def bind_for(host: str) -> str:
    return hostport(host, free_port(host, socket.SOCK_DGRAM))


def sessions_seen(backends: list[UdpEcho]) -> dict[tuple[str, tuple[str, int]], list[bytes]]:
    """What each session carried, as the backends saw it: the datagrams by (backend, upstream
    source address), in arrival order."""
    seen: dict[tuple[str, tuple[str, int]], list[bytes]] = {}
    for backend in backends:
        for source, data in backend.received:
            seen.setdefault((backend.address, source), []).append(data)
    return seen


@pytest.mark.parametrize(("lb_host", "backend_host", "workers"), FAMILIES_AND_WORKERS)
async def test_concurrent_clients_each_keep_one_session_and_get_exact_replies(
    lb_host: str, backend_host: str, workers: int
) -> None:
    rng = random.Random(20240605)
    plan = [[rng.choice(SMALL_SIZES) for _ in range(ROUNDS)] for _ in range(CLIENTS)]
    async with udp_echoes(backend_host) as backends:
        config = udp_config(bind_for(lb_host), [b.address for b in backends])
        async with running(config, workers=workers) as runtime:
            async with udp_clients(bound_addr(runtime), CLIENTS) as clients:

                async def talk(index: int, client: UdpClient) -> None:
                    for seq, size in enumerate(plan[index]):
                        await client.request(payload(index, seq, size))

                async with asyncio.timeout(CONCURRENT_DEADLINE), asyncio.TaskGroup() as group:
                    for index, client in enumerate(clients):
                        group.create_task(talk(index, client))

                # One session per client, one backend per session, datagrams intact and in order,
                # as the backends saw them: every (backend, upstream source) carried exactly one
                # client's datagrams, and every client's went through one of them.
                sent = {tuple(payload(index, seq, size) for seq, size in enumerate(sizes)): index
                        for index, sizes in enumerate(plan)}
                carried = sessions_seen(backends)
                unknown = [key for key, data in carried.items() if tuple(data) not in sent]
                assert not unknown, f"sessions carried datagrams altered, reordered or mixed: {unknown}"
                assert sorted(sent[tuple(data)] for data in carried.values()) == list(range(CLIENTS))
                assert sum(b.count for b in backends) == CLIENTS * ROUNDS
                if workers == 1:  # the sessions are in this process: they say the same
                    check_sessions(udp_listener(runtime), clients, backends, plan)
                stats = await statistics_when(
                    runtime, lambda s: s.datagrams_out == CLIENTS * ROUNDS, listener="u",
                    what="every reply counted")
                assert (stats.sessions, stats.sessions_created) == (CLIENTS, CLIENTS)

            total = sum(sum(sizes) for sizes in plan)
            assert (stats.datagrams_in, stats.datagrams_out) == (CLIENTS * ROUNDS, CLIENTS * ROUNDS)
            assert (stats.bytes_in, stats.bytes_out) == (total, total)
            assert sum(stats.drops.values()) == 0


def check_sessions(listener: UdpListener, clients: list[UdpClient], backends: list[UdpEcho],
                   plan: list[list[int]]) -> None:
    """Each client's session in the listener's table names the backend its datagrams reached,
    and its upstream socket carried exactly that client's datagrams."""
    for index, client in enumerate(clients):
        session = listener.sessions[client.local]
        source = session_source(listener, client)
        owners = [b for b in backends if source in b.by_source]
        assert len(owners) == 1, f"client {index}'s session reached {len(owners)} backends"
        owner = owners[0]
        assert session.backend_id == owner.address
        seen = [data for src, data in owner.received if src == source]
        sent = [payload(index, seq, size) for seq, size in enumerate(plan[index])]
        assert seen == sent, f"backend saw client {index}'s datagrams altered or reordered"
    # Round robin over two backends: 32 sessions split 16/16 (one process: one rotation; each
    # worker rotates on its own, so this is not a figure of two workers).
    per_backend = Counter(s.backend_id for s in listener.sessions.values())
    assert sorted(per_backend.values()) == [CLIENTS // 2, CLIENTS // 2]


@pytest.mark.parametrize("host", family_hosts())
async def test_every_size_from_one_byte_to_the_largest_datagram(host: str) -> None:
    largest = max_payload(host)
    sizes = [1, 2, 3, 8, 100, 548, 1232, 1400, 1472, 1473, 4096, 8192, 9000, 16384, 32768,
             65000, largest - 1, largest]
    async with udp_echoes(host) as backends:
        config = udp_config(bind_for(host), [b.address for b in backends])
        async with running(config) as runtime:
            listener = udp_listener(runtime)
            async with udp_clients(listener_addr(runtime), 2) as clients:
                for size in sizes:
                    for index, client in enumerate(clients):
                        await client.request(payload(index, size & 0xFFFF, size))
            got = sorted(len(data) for b in backends for _, data in b.received)
            assert got == sorted(sizes * 2), "a backend saw a datagram of the wrong size"
            assert listener.stats.bytes_out == 2 * sum(sizes)
            assert sum(listener.stats.drops.values()) == 0


# Bursts sent without waiting, then read back. Each burst fits the default receive buffers of
# every socket on the way (at most three datagrams of 64 KiB fit one), so none is lost.
BURSTS = [
    [1] * 64,  # a byte-stream proxy would merge these into one read
    [1, 1400] * 16,
    [9000, 1, 8999, 2, 9001, 3],
    [MAX_PAYLOAD_V4, 1, MAX_PAYLOAD_V4 - 1],
    [0x7F] * 5 + [0x80] * 5 + [1472, 1473] * 4,
]


def random_bursts(seed: int, count: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randint(1, 3000) for _ in range(rng.randint(1, 16))] for _ in range(count)]


@pytest.mark.parametrize("host", family_hosts())
async def test_bursts_keep_datagram_boundaries(host: str) -> None:
    async with udp_echo(host) as backend:
        config = udp_config(bind_for(host), [backend.address])
        async with running(config) as runtime:
            listener = udp_listener(runtime)
            async with udp_clients(listener_addr(runtime)) as (client,):
                sent_total = 0
                for number, burst in enumerate(BURSTS + random_bursts(7, 40)):
                    datagrams = [payload(number, seq, size) for seq, size in enumerate(burst)]
                    for data in datagrams:
                        client.send(data)
                    replies = [await client.recv() for _ in datagrams]
                    assert [len(r) for r in replies] == burst, f"burst {number} merged or split"
                    assert replies == datagrams, f"burst {number} came back altered or reordered"
                    sent_total += len(datagrams)
                assert client.pending() == 0
            assert backend.count == sent_total
            assert listener.stats.datagrams_out == sent_total
            assert listener.stats.sessions_created == 1


async def test_per_packet_spreads_one_clients_datagrams_over_both_backends() -> None:
    count = 20
    async with udp_echoes(LOOPBACK) as backends:
        config = udp_config(bind_for(LOOPBACK), [b.address for b in backends],
                            udp={"per_packet": True})
        async with running(config) as runtime:
            listener = udp_listener(runtime)
            async with udp_clients(listener_addr(runtime)) as (client,):
                for seq in range(count):
                    await client.request(payload(0, seq, 100 + seq))
            # Round robin per datagram: strictly alternating, so 10 and 10.
            assert [b.count for b in backends] == [count // 2, count // 2]
            seqs = sorted(struct.unpack("!HH", d[:4])[1] for b in backends for _, d in b.received)
            assert seqs == list(range(count))
            assert listener.stats.datagrams_out == count
            # One session (one upstream socket) per backend for this client.
            assert listener.stats.sessions == 2


async def test_responses_limit_ends_the_session_after_that_many_replies() -> None:
    async with udp_echo(LOOPBACK) as backend:
        config = udp_config(bind_for(LOOPBACK), [backend.address], udp={"responses": 2})
        async with running(config) as runtime:
            listener = udp_listener(runtime)
            async with udp_clients(listener_addr(runtime)) as (client,):
                for seq in range(6):
                    await client.request(payload(0, seq, 40))
                    # The session ends in the callback that forwarded its second reply.
                    assert listener.stats.sessions == (seq + 1) % 2
            assert listener.stats.sessions_created == 3
            assert listener.stats.sessions_ended[UdpEndReason.RESPONSES.value] == 3
            assert len(backend.by_source) == 3, "each session uses its own upstream socket"


@pytest.mark.skipif(not has_ipv6(), reason="no IPv6 loopback")
async def test_datagram_too_big_for_the_backends_family_is_dropped_and_counted() -> None:
    """An IPv6 client may send 65527 bytes; an IPv4 backend cannot take more than 65507."""
    async with udp_echo(LOOPBACK) as backend:
        config = udp_config(bind_for(LOOPBACK6), [backend.address])
        async with running(config) as runtime:
            listener = udp_listener(runtime)
            async with udp_clients(listener_addr(runtime)) as (client,):
                await client.request(b"before")
                client.send(b"x" * (MAX_PAYLOAD_V4 + 1))
                await client.request(b"after")  # same session, still working
            stats = listener.stats
            assert stats.drops[DropReason.SEND_FAILED] == 1
            assert backend.count == 2
            assert (stats.datagrams_in, stats.bytes_in) == (2, len(b"before") + len(b"after"))
            assert stats.sessions_created == 1
