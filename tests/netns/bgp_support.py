"""A small routed lab in network namespaces for the BGP tests: a bird2 router, pointsman nodes
that announce a VIP through ExaBGP, and a client behind the router.

    client 10.0.2.x   ── 10.0.2.254 router (bird2, ECMP) 10.0.1N.254 ── 10.0.1N.1 node N (pointsman,
                                                                         VIP 10.99.0.10 on lo,
                                                                         backends on 127.0.0.1)

On each node, VIP:80 -> pool web (one backend, 9000, answering "nodeN"; the VIP follows this pool)
and VIP:81 -> pool sticky (maglev by source IP over backends b1 and b2, answering "nodeN-bK").

Every namespace, process and file belongs to one `Lab`; `Lab.close` kills the processes it started
(by pid), then whatever is left inside its namespaces, then deletes the namespaces. Waiting is
always a condition polled against a deadline.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.util
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest

VIP = "10.99.0.10"
VIP_PORT = 80
BACKEND_PORT = 9000
STICKY_PORT = 81
STICKY_BACKENDS = {"b1": 9001, "b2": 9002}
CLIENTS = ("10.0.2.1", "10.0.2.2", "10.0.2.5", "10.0.2.7")  # b2, b2, b1, b1 with xxh64 (not asserted)
ADMIN = "127.0.0.1:9900"  # each node's own loopback
ROUTER_ASN = 65000
NODE_ASN = 65001  # one AS for the whole anycast fleet: equal AS paths, so the router merges them
POLL = 0.01  # seconds between looks at the router: birdc itself takes ~3 ms
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0

T = TypeVar("T")


def skip_reason() -> str | None:
    """Why the BGP lab cannot run here, or None."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "bird", "birdc"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            return f"{tool} is not installed (Debian: apt-get install bird2 iproute2)"
    if importlib.util.find_spec("exabgp") is None:
        return "ExaBGP is not installed (pip install 'pointsman[bgp]')"
    probe = f"pmbprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def tool(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def wait_until(what: str, predicate: Callable[[], T | None], timeout: float,
               interval: float = POLL) -> T:
    """Poll `predicate` until it returns a truthy value; fail naming `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


def sh(*args: str, check: bool = True) -> str:
    result = subprocess.run(list(args), capture_output=True, text=True, timeout=20)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout


BACKEND_CODE = textwrap.dedent("""
    import socket, sys
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", int(sys.argv[2])))
    server.listen(128)
    print("ready", flush=True)
    while True:
        conn, _ = server.accept()
        with conn:
            conn.sendall(sys.argv[1].encode() + b"\\n")
""")

CLIENT_CODE = textwrap.dedent("""
    import socket, sys
    names = []
    source = (sys.argv[4], 0) if len(sys.argv) > 4 else None
    for i in range(int(sys.argv[3])):
        with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2,
                                      source_address=source) as conn:
            names.append(conn.makefile().readline().strip() or "?")
    print(" ".join(names))
""")


@dataclass
class Node:
    index: int
    ns: str
    address: str  # on the link to the router
    directory: Path
    workers: int = 1  # node 2 runs a control process and 2 workers: the announcer is the control's
    pointsman: subprocess.Popen[str] | None = None
    backend: subprocess.Popen[str] | None = None  # the web pool's only backend
    sticky: list[subprocess.Popen[str]] = field(default_factory=list)
    log_path: Path = field(init=False)
    tmp: Path = field(init=False)  # TMPDIR of pointsman: where its ExaBGP directory goes

    def __post_init__(self) -> None:
        self.log_path = self.directory / f"node{self.index}.log"
        self.tmp = self.directory / f"node{self.index}-tmp"
        self.tmp.mkdir(exist_ok=True)

    @property
    def name(self) -> str:
        return f"node{self.index}"

    def log_text(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def log_time(self, pattern: str, after: float = 0.0) -> float:
        """Wall time (epoch seconds) of the first log line matching `pattern` logged after `after`."""
        for line in self.log_text().splitlines():
            match = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ", line)
            if match and re.search(pattern, line):
                stamp = datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
                if stamp >= after - 0.001:
                    return stamp
        raise AssertionError(f"no log line matching {pattern!r} in {self.name}:\n{self.log_text()}")


class Lab:
    def __init__(self, directory: Path, nodes: int = 2) -> None:
        self.directory = directory
        tag = f"{os.getpid() % 100000}"
        self.router_ns = f"pmb{tag}r"
        self.client_ns = f"pmb{tag}c"
        self.nodes = [Node(i, f"pmb{tag}n{i}", f"10.0.1{i}.1", directory, workers=1 if i == 1 else 2)
                      for i in range(1, nodes + 1)]
        self.namespaces: list[str] = []
        self.processes: list[subprocess.Popen[str]] = []
        self.bird_socket = directory / "bird.sock"
        self.bird: subprocess.Popen[str] | None = None

    # --- building ------------------------------------------------------------------------------

    def build(self) -> None:
        for ns in (self.router_ns, self.client_ns, *(n.ns for n in self.nodes)):
            sh("ip", "netns", "add", ns)
            self.namespaces.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        r = self.router_ns
        sh("ip", "netns", "exec", r, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        # Hash on ports too, so the connections of one client spread over the ECMP next hops.
        sh("ip", "netns", "exec", r, "sysctl", "-qw", "net.ipv4.fib_multipath_hash_policy=1")
        self._link(r, "10.0.2.254/24", self.client_ns, f"{CLIENTS[0]}/24", "c")
        for extra in CLIENTS[1:]:
            sh("ip", "-n", self.client_ns, "addr", "add", f"{extra}/24",
               "dev", f"{self.router_ns.removesuffix('r')}bc")
        sh("ip", "-n", self.client_ns, "route", "add", "default", "via", "10.0.2.254")
        for node in self.nodes:
            self._link(r, f"10.0.1{node.index}.254/24", node.ns, f"{node.address}/24",
                       f"n{node.index}")
            sh("ip", "-n", node.ns, "route", "add", "default", "via", f"10.0.1{node.index}.254")
            sh("ip", "-n", node.ns, "addr", "add", f"{VIP}/32", "dev", "lo")
        self._start_bird()

    def _link(self, ns_a: str, addr_a: str, ns_b: str, addr_b: str, suffix: str) -> None:
        tag = self.router_ns.removesuffix("r")
        a, b = f"{tag}a{suffix}", f"{tag}b{suffix}"  # <= 15 characters (IFNAMSIZ)
        sh("ip", "link", "add", a, "netns", ns_a, "type", "veth", "peer", "name", b, "netns", ns_b)
        sh("ip", "-n", ns_a, "addr", "add", addr_a, "dev", a)
        sh("ip", "-n", ns_b, "addr", "add", addr_b, "dev", b)
        sh("ip", "-n", ns_a, "link", "set", a, "up")
        sh("ip", "-n", ns_b, "link", "set", b, "up")

    def _start_bird(self) -> None:
        peers = "\n".join(textwrap.dedent(f"""
            protocol bgp node{n.index} {{
                local 10.0.1{n.index}.254 as {ROUTER_ASN};
                neighbor {n.address} as {NODE_ASN};
                hold time 9;
                connect delay time 1;
                connect retry time 1;
                error wait time 1, 2;
                ipv4 {{ import all; export none; }};
            }}""") for n in self.nodes)
        config = self.directory / "bird.conf"
        config.write_text(textwrap.dedent("""
            router id 10.0.2.254;
            protocol device { scan time 10; }
            protocol kernel {
                ipv4 { import none; export all; };
                merge paths yes;
            }
        """) + peers + "\n")
        log = (self.directory / "bird.log").open("w")
        self.bird = self._spawn(self.router_ns, [tool("bird"), "-c", str(config), "-s",
                                                 str(self.bird_socket), "-f"], stdout=log)
        wait_until("bird's control socket", lambda: "ready" in self.birdc("show status"), 10.0)

    def _spawn(self, ns: str, argv: list[str], stdout: object = subprocess.DEVNULL,
               env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        """`ip netns exec` execs the command, so the Popen pid is the command's own pid."""
        process = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdin=subprocess.DEVNULL,
                                   stdout=stdout, stderr=subprocess.STDOUT, text=True, env=env,
                                   cwd=self.directory)  # type: ignore[call-overload]
        self.processes.append(process)
        return process

    # --- nodes -----------------------------------------------------------------------------------

    def node_config(self, node: Node, extra: str = "") -> Path:
        path = self.directory / f"{node.name}.yaml"
        path.write_text(textwrap.dedent(f"""
            listeners:
              - name: web
                bind: "{VIP}:{VIP_PORT}"
                pool: web
              - name: sticky
                bind: "{VIP}:{STICKY_PORT}"
                pool: sticky
            pools:
              - name: web
                backends:
                  - address: "127.0.0.1:{BACKEND_PORT}"
                health_check:
                  type: tcp
                  interval: 0.1s
                  timeout: 0.1s
                  rise: 1
                  fall: 1
                  jitter: 0
              - name: sticky
                algorithm: maglev
                maglev_table_size: 251
                backends:
                  - {{address: "127.0.0.1:{STICKY_BACKENDS['b1']}", name: b1}}
                  - {{address: "127.0.0.1:{STICKY_BACKENDS['b2']}", name: b2}}
            admin:
              bind: "{ADMIN}"
            shutdown_grace: 1s
            workers: {node.workers}
            bgp:
              asn: {NODE_ASN}
              router_id: {node.address}
              peers:
                - address: 10.0.1{node.index}.254
                  asn: {ROUTER_ASN}
                  hold_time: 9s
              vips:
                - prefix: {VIP}/32
                  pool: web
        """) + extra)
        return path

    def start_backend(self, node: Node) -> None:
        node.backend = self._backend(node, node.name, BACKEND_PORT)

    def start_sticky_backends(self, node: Node) -> None:
        node.sticky = [self._backend(node, f"{node.name}-{name}", port)
                       for name, port in STICKY_BACKENDS.items()]

    def _backend(self, node: Node, answer: str, port: int) -> subprocess.Popen[str]:
        process = self._spawn(node.ns, [sys.executable, "-c", BACKEND_CODE, answer, str(port)],
                              stdout=subprocess.PIPE)
        assert _read_line(process, "ready", START_TIMEOUT), f"{answer} did not start"
        return process

    def start_pointsman(self, node: Node) -> float:
        """Start pointsman in the node; return the wall time it was started."""
        env = {**os.environ, "TMPDIR": str(node.tmp), "PYTHONUNBUFFERED": "1"}
        started = time.time()
        log = node.log_path.open("a")
        process = self._spawn(node.ns, [sys.executable, "-m", "pointsman", "run", "--log-level",
                                        "info", str(self.node_config(node))], stdout=log, env=env)
        node.pointsman = process
        wait_until(f"{node.name} to listen",
                   lambda: "listening" in node.log_text() or process.poll() is not None,
                   START_TIMEOUT, 0.02)
        assert process.poll() is None, f"{node.name} exited:\n{node.log_text()}"
        return started

    def stop_process(self, process: subprocess.Popen[str] | None,
                     sig: signal.Signals = signal.SIGTERM) -> int | None:
        if process is None or process.poll() is not None:
            return process.returncode if process is not None else None
        process.send_signal(sig)
        try:
            return process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait(STOP_TIMEOUT)

    def pointsman_cli(self, node: Node, *args: str) -> str:
        return sh("ip", "netns", "exec", node.ns, sys.executable, "-m", "pointsman", *args,
                  "--admin", f"http://{ADMIN}")

    def readyz(self, node: Node) -> int:
        """HTTP status of the node's /readyz, fetched inside its namespace."""
        code = sh("ip", "netns", "exec", node.ns, sys.executable, "-c",
                  "import urllib.request, urllib.error\n"
                  "try:\n"
                  f"    print(urllib.request.urlopen('http://{ADMIN}/readyz', timeout=5).status)\n"
                  "except urllib.error.HTTPError as e:\n"
                  "    print(e.code)")
        return int(code.strip())

    def ns_pids(self, ns: str) -> list[int]:
        return [int(p) for p in sh("ip", "netns", "pids", ns, check=False).split()]

    def ns_commands(self, ns: str) -> list[str]:
        out = []
        for pid in self.ns_pids(ns):
            with contextlib.suppress(OSError):
                out.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode())
        return out

    # --- the router and the client -------------------------------------------------------------------

    def birdc(self, command: str) -> str:
        result = subprocess.run([tool("birdc"), "-s", str(self.bird_socket), *command.split()],
                                capture_output=True, text=True, timeout=10)
        return result.stdout

    def bird_next_hops(self) -> set[str]:
        """The next hops bird holds for the VIP (one route per node announcing it)."""
        return set(re.findall(r"via (\S+)", self.birdc(f"show route for {VIP}/32")))

    def kernel_next_hops(self) -> set[str]:
        """The next hops in the router's forwarding table (ECMP: `nexthop via` lines)."""
        out = sh("ip", "-n", self.router_ns, "route", "show", f"{VIP}/32")
        return set(re.findall(r"via (\S+)", out))

    def wait_next_hops(self, want: set[str], timeout: float) -> float:
        """Wait until bird holds exactly `want` for the VIP; return the wall time it was seen."""
        wait_until(f"next hops {sorted(want)} in bird (now {sorted(self.bird_next_hops())})",
                   lambda: self.bird_next_hops() == want, timeout)
        return time.time()

    def client_names(self, connections: int, port: int = VIP_PORT,
                     source: str | None = None) -> list[str]:
        """Connect `connections` times from the client namespace; what each backend answered."""
        args = [VIP, str(port), str(connections), *([source] if source else [])]
        out = sh("ip", "netns", "exec", self.client_ns, sys.executable, "-c", CLIENT_CODE, *args)
        return out.split()

    # --- teardown ----------------------------------------------------------------------------------

    def close(self) -> None:
        for process in reversed(self.processes):
            self.stop_process(process, signal.SIGKILL)
        for ns in self.namespaces:
            for pid in self.ns_pids(ns):  # anything our processes left behind in our namespaces
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.namespaces.clear()


def _read_line(process: subprocess.Popen[str], want: str, timeout: float) -> bool:
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while (left := deadline - time.monotonic()) > 0:
            if selector.select(left):
                line = process.stdout.readline()
                if not line:
                    return False
                if want in line:
                    return True
    return False


@contextlib.contextmanager
def lab(directory: Path, nodes: int = 2) -> Iterator[Lab]:
    reason = skip_reason()
    if reason is not None:
        pytest.skip(reason)
    the_lab = Lab(directory, nodes)
    try:
        the_lab.build()
        yield the_lab
    finally:
        the_lab.close()
