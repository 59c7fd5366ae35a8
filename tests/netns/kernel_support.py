"""What the kernel data plane tests share: the client -- lb -- 3 backends topology, pointsman's
config, clients through the VIP, the admin API and its metrics, and what the kernel holds.

Topology (netns_support.lb_topology): client 10.99.1.2 (+ 10.99.1.100-147) -- lb -- b1 10.99.11.2,
b2 10.99.12.2, b3 10.99.13.2; the VIP 10.99.100.1 is routed to the lb and is no local address.
pointsman runs as `python -m pointsman run` inside the lb namespace, admin API on 127.0.0.1:9900
there. The backends route their replies through the lb (their default route), so both NAT modes
and `snat: none` work.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from pointsman.balance.base import Candidate
from pointsman.balance.hashing import source_key
from pointsman.balance.maglev import Maglev
from pointsman.kernel.jhash import kernel_key_hash

from .netns_support import (
    HEALTH_PORT,
    HTTP_PORT,
    VIP,
    BackendServer,
    LbTopology,
    PointsmanInNetns,
    wait_until,
)

ADMIN = ("127.0.0.1", 9900)
IO_TIMEOUT = 10.0
HEALTH_INTERVAL = 0.3
HEALTH_FALL = 3  # three misses in a row: one slow probe on a busy VM must not take a backend out
# A dead backend is seen after `fall` failed probes, each at most interval + timeout apart; the
# rest is the map transaction and a loaded VM's scheduling.
HEALTH_BOUND = HEALTH_FALL * (HEALTH_INTERVAL * 2) + 1.5
CONCURRENCY = 8  # clients in flight in the churn test: enough to overlap every update, and
# few enough to leave pointsman (2 cores shared with clients and backends) CPU to program the map


@contextlib.contextmanager
def backend_servers(topo: LbTopology) -> Iterator[dict[str, BackendServer]]:
    """A BackendServer in each backend namespace, killed at the end (for a module fixture)."""
    running = {name: BackendServer(ns, name) for ns, name in zip(topo.backends, topo.names, strict=True)}
    try:
        yield running
    finally:
        for server in running.values():
            server.kill()


def revive(topo: LbTopology, servers: dict[str, BackendServer], name: str) -> None:
    servers[name].kill()
    servers[name] = BackendServer(topo.backends[topo.names.index(name)], name)


def config(topo: LbTopology, *, algorithm: str = "maglev", hash_key: str = "source_ip_port",
           protocol: str = "tcp", bind: str = f"{VIP}:80", slots: int = 4093, snat: str = "masquerade",
           on_down: str = "keep_sessions", port: int = HTTP_PORT, grace: float = 1.0,
           nat: str = "conntrack") -> str:
    return yaml.safe_dump({
        "listeners": [{"name": "web", "bind": bind, "protocol": protocol, "pool": "web",
                       "dataplane": "kernel", "kernel": {"slots": slots, "snat": snat, "nat": nat}}],
        "pools": [{
            "name": "web", "algorithm": algorithm, "hash_key": hash_key, "on_down": on_down,
            # The pool's own userspace Maglev table is unused by a kernel listener: keep it small.
            "maglev_table_size": 13,
            "backends": [{"address": f"{topo.backend_ip(i)}:{port}", "name": name}
                         for i, name in enumerate(topo.names)],
            "health_check": {"type": "tcp", "port": HEALTH_PORT, "interval": HEALTH_INTERVAL,
                             "timeout": HEALTH_INTERVAL, "rise": 1, "fall": HEALTH_FALL, "jitter": 0},
        }],
        "admin": {"bind": f"{ADMIN[0]}:{ADMIN[1]}"},
        "shutdown_grace": grace,
    })


@contextlib.contextmanager
def pointsman(topo: LbTopology, tmp_path: Path, text: str) -> Iterator[PointsmanInNetns]:
    proc = PointsmanInNetns(topo.lb, text, tmp_path, listeners=1, admin=True)
    try:
        yield proc
        code = proc.stop()
        assert code == 0, f"pointsman exited with {code}:\n{proc.stderr()}"
        tables = topo.lb.run("nft", "list", "tables")
        assert "pointsman" not in tables, f"table left behind: {tables}"
    finally:
        proc.close()
        topo.lb.run("nft", "delete", "table", "inet", "pointsman", check=False)
        topo.lb.run("conntrack", "-F", check=False)


# --- clients -----------------------------------------------------------------------------------------


def http_get(topo: LbTopology, source: tuple[str, int] | None = None, path: str = "/") -> str:
    """GET through the VIP from the client namespace; the body (backend name and peer seen)."""
    with topo.client.socket() as sock:
        sock.settimeout(IO_TIMEOUT)
        if source is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(source)
        sock.connect((VIP, 80))
        sock.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200"), data[:200]
    return body.decode()


class Stream:
    """A long paced download through the VIP (`/stream/<bytes>/<seconds>`)."""

    def __init__(self, topo: LbTopology, total: int, seconds: float, source: tuple[str, int]) -> None:
        self.total = total
        self.sock = topo.client.socket()
        self.sock.settimeout(IO_TIMEOUT)
        self.sock.bind(source)
        self.sock.connect((VIP, 80))
        self.sock.sendall(f"GET /stream/{total}/{seconds} HTTP/1.0\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            assert chunk, "stream closed before its header"
            head += chunk
        header, _, self.body = head.partition(b"\r\n\r\n")
        self.backend = re.search(rb"X-Backend: (\S+)", header).group(1).decode()  # type: ignore[union-attr]

    def finish(self) -> int:
        """Read to the end; the number of body bytes received."""
        received = len(self.body)
        with contextlib.suppress(ConnectionError, TimeoutError):
            while chunk := self.sock.recv(65536):
                received += len(chunk)
        self.sock.close()
        return received


def admin(topo: LbTopology, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, str]:
    payload = json.dumps(body).encode() if body is not None else b""
    with topo.lb.socket() as sock:
        sock.settimeout(IO_TIMEOUT)
        sock.connect(ADMIN)
        sock.sendall(f"{method} {path} HTTP/1.0\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), rest.decode()


_SAMPLE = re.compile(r'^(\w+)(?:\{(.*)\})? (\S+)$')
_LABEL = re.compile(r'(\w+)="([^"]*)"')


class Metrics:
    """The kernel families of one /metrics scrape."""

    def __init__(self, text: str) -> None:
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for line in text.splitlines():
            match = _SAMPLE.match(line)
            if match and match.group(1).startswith(("pointsman_kernel", "pointsman_conntrack")):
                labels = frozenset(_LABEL.findall(match.group(2) or ""))
                self.samples[(match.group(1), labels)] = float(match.group(3))

    def __call__(self, name: str, **labels: str) -> float:
        """The sample of `name` with these labels (listener and pool default to "web")."""
        if not name.startswith("pointsman_conntrack"):
            labels = {"listener": "web", "pool": "web", **labels}
        return self.samples[(name, frozenset(labels.items()))]


def metrics(topo: LbTopology) -> Metrics:
    status, text = admin(topo, "GET", "/metrics")
    assert status == 200
    return Metrics(text)


METRICS_LAG = 5.0
"""Kernel counters reach /metrics through a reading taken every second (off the event loop);
a loaded VM can stretch that, so a test waits this long for a count it expects."""


def metrics_when(topo: LbTopology, ready: Callable[[Metrics], bool], what: str) -> Metrics:
    """The first scrape for which `ready` holds (polled), failing after METRICS_LAG."""
    found: list[Metrics] = []

    def check() -> bool:
        found[:] = [metrics(topo)]
        try:
            return ready(found[0])
        except KeyError:
            return False

    wait_until(check, METRICS_LAG, interval=0.1, what=what)
    return found[0]


def slot_table(topo: LbTopology) -> dict[int, str]:
    """The kernel's slot map: slot -> backend address, for either NAT mode."""
    listed = json.loads(topo.lb.run("nft", "-j", "list", "table", "inet", "pointsman"))["nftables"]
    maps = {item["map"]["name"]: item["map"].get("elem", []) for item in listed if "map" in item}
    if "l_web_slots" in maps:
        return {element[0]: element[1]["concat"][0] for element in maps["l_web_slots"]}
    # Stateless: slot -> goto the backend's chain, whose rule writes its address as a constant.
    written = {item["rule"]["chain"]: expr["mangle"]["value"] for item in listed if "rule" in item
               for expr in item["rule"]["expr"]
               if expr.get("mangle", {}).get("key", {}).get("payload", {}).get("field") == "daddr"}
    backend = {element[0]: element[1]["goto"]["target"] for element in maps["l_web_slot_to"]}
    return {slot: written[chain] for slot, chain in backend.items()}


def slot_map(topo: LbTopology) -> list[str]:
    """The backend addresses the kernel's slot map holds, one per filled slot."""
    return list(slot_table(topo).values())


def maglev_choice(topo: LbTopology, slots: int, ip: str, port: int, hash_key: str,
                  weights: tuple[float, ...] = (1.0, 1.0, 1.0)) -> str:
    """What userspace Maglev picks with the kernel's hash: the kernel must pick the same."""
    candidates = [Candidate(name, w) for name, w in zip(topo.names, weights, strict=True)]
    maglev = Maglev(candidates, slots, home_weights=list(weights), key_hash=kernel_key_hash(slots))
    index = maglev.pick(source_key(ip, port, hash_key))
    assert index is not None
    return topo.names[index]




ECHO_PORT = 7007
ECHO_SERVER = r'''
import asyncio, sys

async def echo(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
    except ConnectionError:
        pass
    finally:
        writer.close()

async def main():
    server = await asyncio.start_server(echo, "0.0.0.0", int(sys.argv[1]), backlog=1024)
    print("ready", flush=True)
    await server.serve_forever()

asyncio.run(main())
'''


@contextlib.contextmanager
def echo_servers(topo: LbTopology) -> Iterator[None]:
    """A TCP echo server on ECHO_PORT in every backend namespace (health checks still go to the
    BackendServer's HEALTH_PORT)."""
    with ready_servers([ns.popen(sys.executable, "-c", ECHO_SERVER, str(ECHO_PORT),
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
                        for ns in topo.backends], "echo server"):
        yield


@contextlib.contextmanager
def ready_servers(procs: list[subprocess.Popen[bytes]], what: str) -> Iterator[None]:
    """Servers that print "ready" once listening: wait for each, and kill them all at the end."""
    try:
        for i, proc in enumerate(procs):
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == b"ready", f"{what} {i} did not start"
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=10)
            if proc.stdout is not None:
                proc.stdout.close()


def echo_through(topo: LbTopology, source: tuple[str, int], payload: bytes,
                 vip_port: int = 80) -> tuple[bytes, tuple[str, int]]:
    """Send `payload` to the VIP's echo listener (on `vip_port`) from `source` (writing and
    reading at once); the bytes that came back and the peer address the client's socket saw."""
    with topo.client.socket() as sock:
        sock.settimeout(IO_TIMEOUT)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(source)
        sock.connect((VIP, vip_port))
        peer = sock.getpeername()

        def send() -> None:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)

        with ThreadPoolExecutor(1) as pool:
            sent = pool.submit(send)
            received = bytearray()
            while chunk := sock.recv(1 << 20):
                received += chunk
            sent.result()
    return bytes(received), peer
