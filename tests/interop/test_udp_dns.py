"""A real DNS workload through the UDP proxy: two dnsmasq backends, dig and dnspython clients.

Both dnsmasq instances serve the same test zone (lb.test) on loopback ports; `who.lb.test` is the
one name they answer differently (10.9.0.1 and 10.9.0.2), which tells a test which backend
answered. Each dnsmasq runs in the foreground and is killed in the fixture's finalizer; readiness
is a query poll with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dns.asyncbackend
import dns.asyncquery
import dns.exception
import dns.message
import dns.query
import dns.rcode
import pytest

from pointsman.telemetry.flow import DropReason, UdpEndReason
from tests.integration.udp_support import udp_config, udp_listener
from tests.support import LOOPBACK, free_port, running, wait_for

pytestmark = [pytest.mark.timeout(60), pytest.mark.peer("dnsmasq"),
              pytest.mark.usefixtures("engine")]  # both UDP planes

PEER_START_DEADLINE = 10.0
QUERY_TIMEOUT = 2.0
# A stub resolver's retry interval, kept short: a query to a dead backend costs one of these.
RETRY_AFTER = 0.3

# name -> (record type, the answer both backends give)
ZONE = {
    "a.lb.test.": ("A", "10.1.2.3"),
    "b.lb.test.": ("A", "10.1.2.4"),
    "x.wild.lb.test.": ("A", "10.0.0.1"),
    "deep.er.wild.lb.test.": ("A", "10.0.0.1"),
    "txt.lb.test.": ("TXT", '"hello from dnsmasq"'),
}
WHO = "who.lb.test."


@dataclass
class Dnsmasq:
    port: int
    who: str  # this instance's answer for who.lb.test
    proc: subprocess.Popen[bytes]

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"


def dns_port() -> int:
    """A loopback port free for both UDP and TCP (dnsmasq binds both)."""
    for _ in range(20):
        port = free_port(LOOPBACK, socket.SOCK_DGRAM)
        with socket.socket() as tcp:
            try:
                tcp.bind((LOOPBACK, port))
            except OSError:
                continue
        return port
    raise AssertionError("no port free for both UDP and TCP")


def answer(response: dns.message.Message) -> str:
    assert response.rcode() == dns.rcode.NOERROR, dns.rcode.to_text(response.rcode())
    return " ".join(rdata.to_text() for rrset in response.answer for rdata in rrset)


def wait_answering(server: Dnsmasq) -> None:
    """Query the instance directly until it answers, it exits, or the deadline passes."""
    deadline = time.monotonic() + PEER_START_DEADLINE
    query = dns.message.make_query("a.lb.test.", "A")
    while True:
        if server.proc.poll() is not None:
            pytest.fail(f"dnsmasq exited with {server.proc.returncode} before answering")
        try:
            response = dns.query.udp(query, LOOPBACK, port=server.port, timeout=0.2)
        except (TimeoutError, dns.exception.Timeout, ConnectionRefusedError):
            if time.monotonic() > deadline:
                pytest.fail(f"dnsmasq on {server.port} not answering within {PEER_START_DEADLINE}s")
            continue
        assert answer(response) == "10.1.2.3"
        return


@contextlib.contextmanager
def dnsmasq(binary: str, workdir: Path, index: int) -> Iterator[Dnsmasq]:
    port = dns_port()
    args = [
        binary, "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
        "--user=root", f"--pid-file={workdir / f'dnsmasq{index}.pid'}", "--log-facility=-",
        f"--port={port}", f"--listen-address={LOOPBACK}", "--bind-interfaces",
        "--address=/wild.lb.test/10.0.0.1",
        "--host-record=a.lb.test,10.1.2.3", "--host-record=b.lb.test,10.1.2.4",
        f"--host-record=who.lb.test,10.9.0.{index}",
        "--txt-record=txt.lb.test,hello from dnsmasq",
    ]
    log = workdir / f"dnsmasq{index}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    server = Dnsmasq(port, f"10.9.0.{index}", proc)
    try:
        wait_answering(server)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(5)


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[list[Dnsmasq]]:
    binary = shutil.which("dnsmasq") or shutil.which("dnsmasq", path="/usr/sbin:/sbin")
    if binary is None:
        pytest.skip("dnsmasq is not installed (apt-get install dnsmasq)")
    with dnsmasq(binary, tmp_path, 1) as one, dnsmasq(binary, tmp_path, 2) as two:
        yield [one, two]


def lb_config(servers: list[Dnsmasq], **udp: object) -> tuple[str, int]:
    port = free_port(LOOPBACK, socket.SOCK_DGRAM)
    return udp_config(f"{LOOPBACK}:{port}", [s.address for s in servers], udp=dict(udp)), port


async def dig(port: int, name: str, rdtype: str = "A") -> str:
    """`dig +short` through pointsman, one try: its answer as text."""
    binary = shutil.which("dig")
    if binary is None:
        pytest.skip("dig is not installed (apt-get install dnsutils)")
    proc = await asyncio.create_subprocess_exec(
        binary, f"@{LOOPBACK}", "-p", str(port), name, rdtype, "+short", "+tries=1", "+time=2",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(10):
        out, err = await proc.communicate()
    assert proc.returncode == 0, f"dig failed ({proc.returncode}): {out!r} {err!r}"
    return out.decode().strip()


async def query(port: int, name: str, rdtype: str = "A", sock: object = None) -> str:
    """One dnspython query through pointsman; dnspython checks the reply's source address."""
    message = dns.message.make_query(name, rdtype)
    response = await dns.asyncquery.udp(message, LOOPBACK, timeout=QUERY_TIMEOUT, port=port,
                                        sock=sock)
    return answer(response)


async def test_dig_through_pointsman_one_session_per_query(servers: list[Dnsmasq]) -> None:
    config, port = lb_config(servers, responses=1)
    async with running(config) as runtime:
        listener = udp_listener(runtime)
        for name, (rdtype, expected) in ZONE.items():
            assert await dig(port, name, rdtype) == expected, name
        whos = [await dig(port, WHO) for _ in range(4)]
        queries = len(ZONE) + len(whos)
        # Round robin, one session per query: the four `who` queries alternate backends.
        assert sorted(whos) == sorted([s.who for s in servers] * 2)
        # responses: 1 ends each session in the callback that forwards its answer.
        stats = listener.stats
        assert stats.sessions == 0 and not listener.sessions
        assert stats.sessions_created == queries
        assert stats.sessions_ended[UdpEndReason.RESPONSES.value] == queries
        assert (stats.datagrams_in, stats.datagrams_out) == (queries, queries)
        assert sum(stats.drops.values()) == 0


async def test_concurrent_dnspython_queries_one_session_each(servers: list[Dnsmasq]) -> None:
    total, concurrency = 240, 16
    config, port = lb_config(servers, responses=1)
    names = [*ZONE, WHO]
    async with running(config) as runtime:
        listener = udp_listener(runtime)
        queue: asyncio.Queue[int] = asyncio.Queue()
        for n in range(total):
            queue.put_nowait(n)
        whos: list[str] = []

        async def worker() -> None:
            while not queue.empty():
                name = names[queue.get_nowait() % len(names)]
                got = await query(port, name, ZONE.get(name, ("A", ""))[0])
                if name == WHO:
                    whos.append(got)
                else:
                    assert got == ZONE[name][1], name

        async with asyncio.timeout(30), asyncio.TaskGroup() as group:
            for _ in range(concurrency):
                group.create_task(worker())

        assert set(whos) <= {s.who for s in servers}
        # Round robin, one session per query: each dnsmasq took half the sessions.
        pool = runtime.pools["p"]
        assert [pool.member(s.address).stats.total for s in servers] == [total // 2] * 2
        stats = listener.stats
        await wait_for(lambda: stats.sessions == 0, 2.0, what="the session table is empty")
        assert stats.sessions_created == total
        assert stats.sessions_ended[UdpEndReason.RESPONSES.value] == total
        assert (stats.datagrams_in, stats.datagrams_out) == (total, total)


async def test_a_client_socket_keeps_its_dnsmasq_for_the_whole_session(
    servers: list[Dnsmasq],
) -> None:
    clients, rounds = 8, 12
    config, port = lb_config(servers)  # responses: 0, sessions live until idle
    backend = dns.asyncbackend.get_backend("asyncio")
    async with running(config) as runtime:
        listener = udp_listener(runtime)
        sockets = [await backend.make_socket(socket.AF_INET, socket.SOCK_DGRAM, 0, (LOOPBACK, 0))
                   for _ in range(clients)]
        try:
            answers = [[await query(port, WHO, sock=sock) for _ in range(rounds)]
                       for sock in sockets]
        finally:
            for sock in sockets:
                await sock.close()
        for per_client in answers:
            assert len(set(per_client)) == 1, f"a session changed dnsmasq: {per_client}"
        assert sorted(a[0] for a in answers) == sorted([s.who for s in servers] * (clients // 2))
        assert listener.stats.sessions_created == clients
        assert listener.stats.datagrams_out == clients * rounds


async def test_killed_dnsmasq_costs_a_client_at_most_one_retry(servers: list[Dnsmasq]) -> None:
    """SIGKILL one dnsmasq, no health check: the ICMP refusal is the only signal. Each query
    gets its answer from the survivor, at worst on its one retry from the same socket."""
    queries = 12
    config, port = lb_config(servers, responses=1)
    backend = dns.asyncbackend.get_backend("asyncio")
    dead, alive = servers
    async with running(config) as runtime:
        listener = udp_listener(runtime)
        pool = runtime.pools["p"]
        assert {await query(port, WHO) for _ in range(2)} == {dead.who, alive.who}
        dead.proc.send_signal(signal.SIGKILL)
        dead.proc.wait(5)

        attempts: list[int] = []
        for n in range(queries):
            name = "a.lb.test." if n % 2 else WHO
            sock = await backend.make_socket(socket.AF_INET, socket.SOCK_DGRAM, 0, (LOOPBACK, 0))
            try:
                for attempt in (1, 2):
                    message = dns.message.make_query(name, "A")
                    try:
                        response = await dns.asyncquery.udp(message, LOOPBACK, port=port,
                                                            timeout=RETRY_AFTER, sock=sock)
                    except dns.exception.Timeout:
                        continue
                    got = answer(response)
                    assert got == (alive.who if name == WHO else "10.1.2.3")
                    attempts.append(attempt)
                    break
                else:
                    raise AssertionError(f"query {n} unanswered after one retry")
            finally:
                await sock.close()

        assert len(attempts) == queries
        refused = listener.stats.drops[DropReason.BACKEND_REFUSED]
        assert refused >= 1, "no query reached the dead dnsmasq: the test proved nothing"
        assert attempts.count(2) == refused
        assert pool.member(dead.address).stats.connect_failures == refused
