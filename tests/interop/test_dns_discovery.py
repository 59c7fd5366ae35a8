"""DNS discovery against a real dnsmasq: SRV records whose targets and ports change (dnsmasq
restarted with new `--srv-host` records), A records that change (`--addn-hosts` file + SIGHUP),
re-resolution at the record TTL (1 s, `--local-ttl`) but never faster than `min_ttl`, and a DNS
outage that keeps the pool as it was.

dnsmasq logs every query (`--log-queries`), which is how the tests count re-resolutions. The
pointsman runtime runs in the test's event loop, so each check reads its pool directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import yaml

from pointsman.node.runtime import Node
from tests.integration.peers import NamedBackend, ask_name, named_backends
from tests.interop.test_udp_dns import dns_port
from tests.support import LOOPBACK, free_port, refused_port, running, wait_for

DNSMASQ = shutil.which("dnsmasq")
pytestmark = [
    pytest.mark.skipif(DNSMASQ is None, reason="dnsmasq is not installed (Debian dnsmasq-base)"),
    pytest.mark.peer("dnsmasq"),
    pytest.mark.timeout(60),
]

CHANGE_TIMEOUT = 5.0  # record change -> pool runs it: TTL 1 s + min_ttl + a restart here


class Dnsmasq:
    """dnsmasq in the foreground on one loopback port; restartable with other records."""

    def __init__(self, workdir: Path) -> None:
        self.port = dns_port()
        self.log = workdir / "dnsmasq.log"
        self.hosts = workdir / "hosts"
        self.hosts.write_text("")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *records: str) -> None:
        assert DNSMASQ is not None and self.proc is None
        argv = [DNSMASQ, "--keep-in-foreground", "--no-resolv", "--no-hosts", "--conf-file=/dev/null",
                "--user=root", f"--port={self.port}", f"--listen-address={LOOPBACK}",
                "--bind-interfaces", "--local-ttl=1", f"--addn-hosts={self.hosts}",
                "--log-queries", "--log-facility=-", *records]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log)
        deadline = time.monotonic() + 5.0
        while "started, version" not in self.log.read_text():
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, "dnsmasq did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=5)
            self.proc = None

    def reload(self) -> None:
        """SIGHUP: dnsmasq re-reads the --addn-hosts file."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)

    def queries(self, qtype: str, name: str) -> int:
        return self.log.read_text().count(f"query[{qtype}] {name} from")


@pytest.fixture
def dnsmasq(tmp_path: Path) -> Iterator[Dnsmasq]:
    server = Dnsmasq(tmp_path)
    try:
        yield server
    finally:
        server.stop()


def srv(port: int, target: str = "t1.lb.test", priority: int = 0, weight: int = 10) -> str:
    return f"--srv-host=_app._tcp.lb.test,{target},{port},{priority},{weight}"


@contextlib.asynccontextmanager
async def discovering(listen: str, placeholder: int, **dns: object) -> AsyncIterator[Node]:
    config = yaml.safe_dump({
        "listeners": [{"name": "lb", "bind": listen, "pool": "p"}],
        "pools": [{"name": "p", "algorithm": "round_robin", "connect_timeout": "1s",
                   # The seed: used until DNS answers (a port that refuses, to be sure it is gone).
                   "backends": [{"address": f"{LOOPBACK}:{placeholder}"}],
                   "discovery": {"dns": dns}}],
    })
    async with running(config) as runtime:
        yield runtime


def backends(runtime: Node) -> dict[str, int]:
    return {b.id: b.weight for b in runtime.pools["p"].config.backends}


async def count_over(seconds: float, server: Dnsmasq, qtype: str, name: str) -> int:
    before = server.queries(qtype, name)
    await asyncio.sleep(seconds)  # a measurement window, not a synchronisation
    return server.queries(qtype, name) - before


async def test_srv_records_drive_the_pool(dnsmasq: Dnsmasq) -> None:
    listen = f"{LOOPBACK}:{free_port()}"
    async with named_backends("b1", "b2", "b3") as (b1, b2, b3):
        dnsmasq.start(srv(b1.port, weight=10), srv(b2.port, weight=20), srv(b3.port, priority=5),
                      "--host-record=t1.lb.test,127.0.0.1")
        with refused_port() as placeholder:
            async with discovering(listen, placeholder, srv="_app._tcp.lb.test",
                                   resolver=f"{LOOPBACK}:{dnsmasq.port}", min_ttl="200ms") as runtime:
                # The first answer is in before the runtime serves: the lowest priority only,
                # SRV weights as backend weights.
                assert backends(runtime) == {b1.address: 10, b2.address: 20}
                assert {await ask_name(listen) for _ in range(6)} == {"b1", "b2"}

                # Re-resolved at the record's TTL (1 s), not at min_ttl (200 ms).
                assert 1 <= await count_over(2.0, dnsmasq, "SRV", "_app._tcp.lb.test") <= 3

                # New records: b1 leaves, b3 moves to the lowest priority.
                dnsmasq.stop()
                dnsmasq.start(srv(b2.port), srv(b3.port), "--host-record=t1.lb.test,127.0.0.1")
                changed = time.perf_counter()
                await wait_for(lambda: set(backends(runtime)) == {b2.address, b3.address},
                               CHANGE_TIMEOUT, interval=0.01, what="pool follows the SRV change")
                print(f"SRV change -> pool updated in {time.perf_counter() - changed:.2f} s")
                assert {await ask_name(listen) for _ in range(6)} == {"b2", "b3"}

                # DNS down: the pool keeps what it had, through several TTLs.
                dnsmasq.stop()
                await asyncio.sleep(2.5)  # a window of 2+ TTLs in which nothing may change
                assert set(backends(runtime)) == {b2.address, b3.address}
                assert {await ask_name(listen) for _ in range(4)} == {"b2", "b3"}
                assert runtime.composer is not None
                assert runtime.composer.updates["p", "dns"] == 2


async def test_a_records_on_a_port_and_min_ttl(dnsmasq: Dnsmasq) -> None:
    listen, port = f"{LOOPBACK}:{free_port()}", free_port()
    peers = [NamedBackend(f"h{i}", host=f"127.0.0.{i}") for i in (2, 3, 4)]
    try:
        for peer in peers:
            peer.port = port  # A records carry no port: every backend listens on the same one
            peer.listen()
        dnsmasq.hosts.write_text("127.0.0.2 web.lb.test\n127.0.0.3 web.lb.test\n")
        dnsmasq.start()
        with refused_port() as placeholder:
            async with discovering(listen, placeholder, name="web.lb.test", port=port,
                                   resolver=f"{LOOPBACK}:{dnsmasq.port}", min_ttl="2s") as runtime:
                assert set(backends(runtime)) == {f"127.0.0.2:{port}", f"127.0.0.3:{port}"}
                assert {await ask_name(listen) for _ in range(4)} == {"h2", "h3"}

                # TTL 1 s, min_ttl 2 s: about one query every 2 s (4 with the TTL alone).
                assert 1 <= await count_over(4.0, dnsmasq, "A", "web.lb.test") <= 3

                dnsmasq.hosts.write_text("127.0.0.3 web.lb.test\n127.0.0.4 web.lb.test\n")
                dnsmasq.reload()
                await wait_for(lambda: set(backends(runtime)) == {f"127.0.0.3:{port}",
                                                                  f"127.0.0.4:{port}"},
                               CHANGE_TIMEOUT, interval=0.01, what="pool follows the A records")
                assert {await ask_name(listen) for _ in range(4)} == {"h3", "h4"}
    finally:
        for peer in peers:
            await peer.close()
