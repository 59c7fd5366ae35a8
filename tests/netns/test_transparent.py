"""Client IP preservation with `source: {mode: transparent}`, in three network namespaces this
test creates and always deletes:

    client ns                 lb ns                               backend ns
    10.200.1.2, 10.200.1.3 -- 10.200.1.1 | 10.200.2.1 ------------ 10.200.2.2
    (default via .1.1)        pointsman; policy routing:           (default via .2.1)
                              iif <backend veth> -> table 100,
                              table 100: local 0.0.0.0/0 dev lo

pointsman connects to the backend from the client's own address (IP_TRANSPARENT). The backend
answers that address through its default route, the lb; the policy rule makes the lb deliver those
replies locally, to the transparent socket, instead of forwarding them to the client. (With
nftables one would mark only such packets, `socket transparent 1 meta mark set 1` plus
`ip rule add fwmark 1 lookup 100`; this host has no `nft` binary and the interface rule is enough
where the backend network only talks to the lb.) A second listener whose pool uses the default
source mode is the control: its backend sees the lb's address, so the assertion discriminates.

Everything runs as subprocesses under `ip netns exec`; every wait has a deadline.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

START_DEADLINE = 15.0
IO_TIMEOUT = 5.0
CLIENT_IPS = ("10.200.1.2", "10.200.1.3")
LB_FRONT, LB_BACK, BACKEND_IP = "10.200.1.1", "10.200.2.1", "10.200.2.2"
BACKEND_PORT = 9000
TRANSPARENT_PORT, DEFAULT_PORT = 8000, 8001
ROUTE_TABLE = "100"


def run(*args: str) -> None:
    result = subprocess.run(args, capture_output=True, text=True, timeout=10)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed: {result.stderr.strip()}")


@dataclass(frozen=True)
class Topology:
    client: str
    lb: str
    backend: str


def _require_netns() -> str:
    if os.geteuid() != 0:
        pytest.skip("needs root: creates network namespaces and uses IP_TRANSPARENT")
    ip = shutil.which("ip")
    if ip is None:
        pytest.skip("iproute2 `ip` is not installed")
    probe = f"pm-probe-{os.getpid()}"
    made = subprocess.run([ip, "netns", "add", probe], capture_output=True, text=True, timeout=10)
    if made.returncode != 0:
        pytest.skip(f"`ip netns add` does not work here: {made.stderr.strip()}")
    run(ip, "netns", "del", probe)
    return ip


@pytest.fixture
def topology() -> Iterator[Topology]:
    ip = _require_netns()
    tag = f"{os.getpid()}"
    names = Topology(f"pm-cl-{tag}", f"pm-lb-{tag}", f"pm-be-{tag}")
    created: list[str] = []
    try:
        for ns in (names.client, names.lb, names.backend):
            run(ip, "netns", "add", ns)
            created.append(ns)
            run(ip, "-n", ns, "link", "set", "lo", "up")
        # Interface names live in each namespace, so short fixed names do not collide.
        run(ip, "link", "add", "c0", "netns", names.client, "type", "veth",
            "peer", "name", "l0", "netns", names.lb)
        run(ip, "link", "add", "l1", "netns", names.lb, "type", "veth",
            "peer", "name", "b0", "netns", names.backend)
        for ns, dev, addresses in ((names.client, "c0", CLIENT_IPS), (names.lb, "l0", (LB_FRONT,)),
                                   (names.lb, "l1", (LB_BACK,)),
                                   (names.backend, "b0", (BACKEND_IP,))):
            for address in addresses:
                run(ip, "-n", ns, "addr", "add", f"{address}/24", "dev", dev)
            run(ip, "-n", ns, "link", "set", dev, "up")
        run(ip, "-n", names.client, "route", "add", "default", "via", LB_FRONT)
        run(ip, "-n", names.backend, "route", "add", "default", "via", LB_BACK)
        # Replies from the backend network to client addresses are for the lb's own sockets.
        run(ip, "-n", names.lb, "rule", "add", "iif", "l1", "lookup", ROUTE_TABLE)
        run(ip, "-n", names.lb, "route", "add", "local", "0.0.0.0/0", "dev", "lo",
            "table", ROUTE_TABLE)
        yield names
    finally:
        for ns in created:  # deleting a namespace deletes its veth ends too
            subprocess.run([ip, "netns", "del", ns], capture_output=True, timeout=10)


# --- processes inside the namespaces ------------------------------------------------------------

BACKEND = textwrap.dedent("""\
    import socket, socketserver, sys

    class Handler(socketserver.StreamRequestHandler):
        def handle(self):
            ip, port = self.client_address[:2]
            self.wfile.write(f"{ip}:{port}\\n".encode())
            while data := self.request.recv(65536):
                self.request.sendall(data)

    socketserver.ThreadingTCPServer.allow_reuse_address = True
    socketserver.ThreadingTCPServer.daemon_threads = True
    with socketserver.ThreadingTCPServer((sys.argv[1], int(sys.argv[2])), Handler) as server:
        print("ready", flush=True)
        server.serve_forever()
""")

CLIENT = textwrap.dedent("""\
    import socket, sys
    host, port, source, payload = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    with socket.create_connection((host, port), timeout=5, source_address=(source, 0)) as s:
        s.sendall(payload.encode())
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while data := s.recv(65536):
            reply += data
    print(reply.decode(), end="")
""")

CONFIG = f"""\
listeners:
  - {{name: transparent, bind: "{LB_FRONT}:{TRANSPARENT_PORT}", pool: keep_client}}
  - {{name: plain, bind: "{LB_FRONT}:{DEFAULT_PORT}", pool: own_address}}
pools:
  - name: keep_client
    source: {{mode: transparent}}
    backends: [{{address: "{BACKEND_IP}:{BACKEND_PORT}"}}]
  - name: own_address
    backends: [{{address: "{BACKEND_IP}:{BACKEND_PORT}"}}]
shutdown_grace: 1s
"""


@contextlib.contextmanager
def in_namespace(ns: str, argv: list[str], ready: str, workdir: Path, name: str,
                 count: int = 1) -> Iterator[subprocess.Popen[bytes]]:
    """Start `argv` in `ns`; wait for `count` stdout lines starting with `ready`; kill it (by
    pid) on exit."""
    stderr_path = workdir / f"{name}.stderr"
    with stderr_path.open("wb") as stderr:
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdout=subprocess.PIPE,
                                stderr=stderr, stdin=subprocess.DEVNULL, cwd=workdir)
    assert proc.stdout is not None
    try:
        lines: list[str] = []
        pending = b""
        deadline = time.monotonic() + START_DEADLINE
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while sum(line.startswith(ready) for line in lines) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or proc.poll() is not None:
                    raise AssertionError(f"{name} not ready (exit {proc.poll()}); stdout={lines}; "
                                         f"stderr:\n{stderr_path.read_text(errors='replace')}")
                if sel.select(min(remaining, 0.2)):
                    chunk = os.read(proc.stdout.fileno(), 65536)
                    *complete, pending = (pending + chunk).split(b"\n")
                    lines.extend(line.decode() for line in complete)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        proc.stdout.close()


def ask(topo: Topology, port: int, source: str, payload: str) -> str:
    """One connection from `source` in the client namespace; the backend's whole reply."""
    result = subprocess.run(
        ["ip", "netns", "exec", topo.client, sys.executable, "-c", CLIENT, LB_FRONT, str(port),
         source, payload], capture_output=True, text=True, timeout=IO_TIMEOUT * 2)
    assert result.returncode == 0, f"client from {source} failed: {result.stderr}"
    return result.stdout


def test_backend_sees_the_client_address(topology: Topology, tmp_path: Path) -> None:
    config = tmp_path / "pointsman.yaml"
    config.write_text(CONFIG)
    pointsman = [sys.executable, "-m", "pointsman", "run", str(config)]
    backend = [sys.executable, "-c", BACKEND, BACKEND_IP, str(BACKEND_PORT)]
    with in_namespace(topology.backend, backend, "ready", tmp_path, "backend"), \
            in_namespace(topology.lb, pointsman, "listening ", tmp_path, "pointsman", count=2):
        seen = {}
        for source in CLIENT_IPS:
            for round_ in range(2):
                payload = f"payload {source} {round_}\n" * 50
                reply = ask(topology, TRANSPARENT_PORT, source, payload)
                peer, _, echoed = reply.partition("\n")
                assert echoed == payload  # the connection carries data both ways
                seen.setdefault(source, set()).add(peer.rpartition(":")[0])
        control = ask(topology, DEFAULT_PORT, CLIENT_IPS[0], "x").partition("\n")[0]

    # Transparent: the backend's peer is the client itself, per client.
    assert seen == {ip: {ip} for ip in CLIENT_IPS}
    # Default source: the backend's peer is the lb's own address on the backend network.
    assert control.rpartition(":")[0] == LB_BACK
