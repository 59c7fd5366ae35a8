"""Hosts made of network namespaces for tests: create, wire, enter, tear down.

- `unavailable_reason()` / `nftables_unavailable_reason()`: why a test must skip (not root, no
  `ip`, namespaces not creatable, no nf_tables or no python3-nftables), or None.
- `Netns`: one namespace (`ip netns add`), commands in it (`run`, `popen`), sockets created in it
  from this process (`socket`: setns(2) around socket(2); the socket stays in that namespace).
- `LbTopology`: client -- lb -- backends, each backend on its own veth /24, the client with many
  addresses for source-IP diversity, routes through the lb both ways, forwarding on in the lb.
- `BACKEND_SERVER`: a tiny asyncio HTTP + UDP server a backend namespace runs, answering with
  its name and the peer address it saw.
- `PointsmanInNetns`: `ip netns exec <lb> python -m pointsman run cfg.yaml`, ready when it has
  printed one "listening" line per listener.

Addresses (10.99.x.x) exist only inside the namespaces a test creates, and every namespace is
deleted by the finalizer that created it (names carry the pid, so runs never collide).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CLONE_NEWNET = 0x40000000
COMMAND_TIMEOUT = 10.0  # seconds for one `ip`/`nft` command; they take milliseconds
START_TIMEOUT = 15.0  # pointsman start in a namespace on a loaded 2-core VM
STOP_TIMEOUT = 10.0

_libc = ctypes.CDLL(None, use_errno=True)


def _command(args: Sequence[str], check: bool = True, timeout: float = COMMAND_TIMEOUT) -> str:
    done = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def unavailable_reason() -> str | None:
    """Why namespace tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "network namespace tests need root"
    if shutil.which("ip") is None:
        return "iproute2 (ip) is not installed"
    probe = f"pmprobe{os.getpid()}"
    try:
        _command(["ip", "netns", "add", probe])
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot create a network namespace: {exc}"
    _command(["ip", "netns", "del", probe], check=False)
    return None


def nftables_unavailable_reason() -> str | None:
    """Why kernel data plane tests cannot run here (namespaces, nft, the binding), or None."""
    reason = unavailable_reason()
    if reason is not None:
        return reason
    for tool in ("nft", "conntrack"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian packages nftables, conntrack)"
    try:
        from pointsman.kernel.nft import KernelUnavailable, load_binding

        load_binding()
    except KernelUnavailable as exc:
        return str(exc)
    with namespace("pmnftprobe") as ns:
        try:
            ns.run("nft", "add table inet probe; add chain inet probe c { type nat hook prerouting "
                   "priority -100; }; add rule inet probe c dnat ip to jhash ip saddr mod 2 seed 1 "
                   "map { 0 : 10.0.0.1, 1 : 10.0.0.2 }")
        except RuntimeError as exc:
            return f"nf_tables with nat and jhash is not usable: {exc}"
    return None


TC_PROBE = ("from pointsman.kernel.tcbpf import TcProgram, build_object\n"
            "program = TcProgram(build_object())\nprogram.attach('lo')\nprogram.close()\n")


def tc_unavailable_reason() -> str | None:
    """Why tc data path tests cannot run here (namespaces, clang, libbpf, BPF), or None."""
    reason = unavailable_reason()
    if reason is not None:
        return reason
    from pointsman.kernel.tcbpf import TcUnavailable, build_object

    try:
        build_object()
    except TcUnavailable as exc:
        return str(exc)
    with namespace("pmtcprobe") as ns:
        try:
            ns.run(sys.executable, "-c", TC_PROBE)
        except RuntimeError as exc:
            return f"the tc BPF program cannot be loaded and attached here: {exc}"
    return None


class Netns:
    """One network namespace, deleted by `close()`."""

    def __init__(self, name: str) -> None:
        self.name = name
        _command(["ip", "netns", "add", name])
        try:
            self.run("ip", "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    def run(self, *args: str, check: bool = True, timeout: float = COMMAND_TIMEOUT) -> str:
        return _command(["ip", "netns", "exec", self.name, *args], check=check, timeout=timeout)

    def popen(self, *args: str, **kwargs: Any) -> subprocess.Popen[bytes]:
        """A process in the namespace (`ip netns exec` execs it: the pid is the command's)."""
        return subprocess.Popen(["ip", "netns", "exec", self.name, *args], **kwargs)

    def sysctl(self, key: str, value: str) -> None:
        self.run("sysctl", "-qw", f"{key}={value}")

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """Run this thread inside the namespace for the block (only sockets made here stay)."""
        with open("/proc/thread-self/ns/net", "rb") as home, \
                open(f"/run/netns/{self.name}", "rb") as target:
            if _libc.setns(target.fileno(), CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns into {self.name} failed")
            try:
                yield
            finally:
                if _libc.setns(home.fileno(), CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns back to the test's namespace failed")

    def socket(self, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM) -> socket.socket:
        """A socket that lives in this namespace (created with the thread briefly inside it)."""
        with self.entered():
            return socket.socket(family, kind)

    def close(self) -> None:
        _command(["ip", "netns", "del", self.name], check=False)


@contextlib.contextmanager
def namespace(role: str) -> Iterator[Netns]:
    ns = Netns(f"pm{os.getpid()}-{uuid.uuid4().hex[:6]}-{role}")
    try:
        yield ns
    finally:
        ns.close()


def veth(a: Netns, a_name: str, b: Netns, b_name: str) -> None:
    """A veth pair with one end in each namespace, both up."""
    a.run("ip", "link", "add", a_name, "type", "veth", "peer", "name", b_name, "netns", b.name)
    a.run("ip", "link", "set", a_name, "up")
    b.run("ip", "link", "set", b_name, "up")


# --- client -- lb -- backends ----------------------------------------------------------------------

VIP = "10.99.100.1"  # routed to the lb, not an address of any interface
CLIENT_NET = "10.99.1"
CLIENT_SOURCES = 48  # extra client addresses 10.99.1.100 .. 10.99.1.147


@dataclass
class LbTopology:
    client: Netns
    lb: Netns
    backends: list[Netns]
    names: list[str] = field(default_factory=list)  # backend names, b1, b2, ...

    client_ip = f"{CLIENT_NET}.2"
    lb_client_side = f"{CLIENT_NET}.1"

    @staticmethod
    def backend_ip(index: int) -> str:
        return f"10.99.{11 + index}.2"

    @staticmethod
    def lb_backend_side(index: int) -> str:
        return f"10.99.{11 + index}.1"

    @staticmethod
    def client_source(index: int) -> str:
        return f"{CLIENT_NET}.{100 + index}"


@contextlib.contextmanager
def lb_topology(backends: int = 3) -> Iterator[LbTopology]:
    """Namespaces client, lb and `backends` backends, wired and routed; all deleted on exit."""
    with contextlib.ExitStack() as stack:
        client = stack.enter_context(namespace("client"))
        lb = stack.enter_context(namespace("lb"))
        nodes = [stack.enter_context(namespace(f"b{i + 1}")) for i in range(backends)]
        topo = LbTopology(client, lb, nodes, [f"b{i + 1}" for i in range(backends)])
        veth(client, "eth0", lb, "c0")
        client.run("ip", "addr", "add", f"{topo.client_ip}/24", "dev", "eth0")
        batch = "".join(f"addr add {topo.client_source(i)}/24 dev eth0\n" for i in range(CLIENT_SOURCES))
        _batch(client, batch)
        client.run("ip", "route", "add", "default", "via", topo.lb_client_side)
        lb.run("ip", "addr", "add", f"{topo.lb_client_side}/24", "dev", "c0")
        lb.sysctl("net.ipv4.ip_forward", "1")
        for i, node in enumerate(nodes):
            veth(node, "eth0", lb, f"b{i + 1}")
            node.run("ip", "addr", "add", f"{topo.backend_ip(i)}/24", "dev", "eth0")
            node.run("ip", "route", "add", "default", "via", topo.lb_backend_side(i))
            # No TIME_WAIT on the backends (they close first): with SNAT, a later test's client
            # port can map to the same 4-tuple, the TIME_WAIT socket answers its SYN with an ACK,
            # the client resets and sends its SYN again, and conntrack counts that one connection
            # as two new flows (and round robin gives it two turns).
            node.sysctl("net.ipv4.tcp_max_tw_buckets", "0")
            lb.run("ip", "addr", "add", f"{topo.lb_backend_side(i)}/24", "dev", f"b{i + 1}")
        yield topo


def _batch(ns: Netns, commands: str) -> None:
    done = subprocess.run(["ip", "netns", "exec", ns.name, "ip", "-batch", "-"], input=commands,
                          capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ip -batch in {ns.name} failed: {done.stderr.strip()}")


# --- backend servers -------------------------------------------------------------------------------

BACKEND_SERVER = r'''
import asyncio, sys
NAME, HTTP_PORT, UDP_PORT, HEALTH_PORT = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
CHUNK = 16384

async def http(reader, writer):
    peer = writer.get_extra_info("peername")
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        path = head.split(b" ", 2)[1].decode()
        if path.startswith("/stream"):
            # /stream/<bytes>/<seconds>: a long transfer paced over <seconds>
            _, _, total, seconds = path.split("/")
            total, seconds = int(total), float(seconds)
            writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\nX-Backend: %s\r\n\r\n"
                         % (total, NAME.encode()))
            chunks = max(total // CHUNK, 1)
            sent = 0
            for i in range(chunks):
                size = total - sent if i == chunks - 1 else CHUNK
                writer.write(b"x" * size)
                sent += size
                await writer.drain()
                await asyncio.sleep(seconds / chunks)
        else:
            if path == "/health-off" and health is not None:
                health.close()
            body = f"{NAME} {peer[0]}\n".encode()
            writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()

async def checked(reader, writer):
    writer.close()

class Udp(asyncio.DatagramProtocol):
    def connection_made(self, transport):
        self.transport = transport
    def datagram_received(self, data, addr):
        self.transport.sendto(f"{NAME} {addr[0]}".encode(), addr)

health = None

async def main():
    global health
    server = await asyncio.start_server(http, "0.0.0.0", HTTP_PORT, backlog=4096)
    health = await asyncio.start_server(checked, "0.0.0.0", HEALTH_PORT)
    await asyncio.get_running_loop().create_datagram_endpoint(Udp, local_addr=("0.0.0.0", UDP_PORT))
    print("ready", flush=True)
    await server.serve_forever()

asyncio.run(main())
'''

HTTP_PORT = 8080
UDP_PORT = 5353
HEALTH_PORT = 8081


class BackendServer:
    """BACKEND_SERVER running in a backend namespace."""

    def __init__(self, ns: Netns, name: str) -> None:
        self.ns = ns
        self.name = name
        self.popen = ns.popen(sys.executable, "-c", BACKEND_SERVER, name, str(HTTP_PORT), str(UDP_PORT),
                              str(HEALTH_PORT), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert self.popen.stdout is not None
        line = _read_line(self.popen, START_TIMEOUT)
        if line.strip() != "ready":
            self.kill()
            raise RuntimeError(f"backend {name} did not start: {line!r}")

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(timeout=STOP_TIMEOUT)
        if self.popen.stdout is not None:
            self.popen.stdout.close()


def _read_line(popen: subprocess.Popen[bytes], timeout: float) -> str:
    assert popen.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(popen.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            return ""
    return popen.stdout.readline().decode()


# --- pointsman in the lb namespace -----------------------------------------------------------------


class PointsmanInNetns:
    """`python -m pointsman run` inside a namespace; `lines` holds what it printed. Ready once it
    printed one "listening" line per listener, and its "admin api" line if `admin`."""

    def __init__(self, ns: Netns, config_text: str, workdir: Path, listeners: int,
                 admin: bool = False) -> None:
        self.path = workdir / "pointsman.yaml"
        self.path.write_text(config_text)
        self.stderr_path = workdir / "pointsman.stderr"
        self.lines: list[str] = []
        self._pending = b""
        with self.stderr_path.open("wb") as stderr:
            self.popen = ns.popen(sys.executable, "-m", "pointsman", "run", str(self.path),
                                  stdout=subprocess.PIPE, stderr=stderr, bufsize=0)
        assert self.popen.stdout is not None
        os.set_blocking(self.popen.stdout.fileno(), False)
        try:
            self._wait_ready(listeners, admin)
        except BaseException:
            self.close()
            raise

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def _ready(self, count: int, admin: bool) -> bool:
        listening = sum(line.startswith("listening ") for line in self.lines)
        return listening >= count and (not admin or any(line.startswith("admin api") for line in self.lines))

    def _wait_ready(self, count: int, admin: bool) -> None:
        assert self.popen.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT
        with selectors.DefaultSelector() as sel:
            sel.register(self.popen.stdout, selectors.EVENT_READ)
            while not self._ready(count, admin):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"pointsman not ready after {START_TIMEOUT}s; "
                                         f"stdout={self.lines}, stderr:\n{self.stderr()}")
                if not sel.select(remaining):
                    continue
                chunk = os.read(self.popen.stdout.fileno(), 65536)
                if not chunk:
                    self.popen.wait(timeout=STOP_TIMEOUT)
                    raise AssertionError(f"pointsman exited with {self.popen.returncode} before it "
                                         f"was ready; stdout={self.lines}, stderr:\n{self.stderr()}")
                *complete, self._pending = (self._pending + chunk).split(b"\n")
                self.lines.extend(line.decode() for line in complete)

    def reload(self) -> None:
        self.popen.send_signal(signal.SIGHUP)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM and wait; kill and fail past `timeout`."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.close()
            raise AssertionError(f"pointsman still running {timeout}s after SIGTERM; "
                                 f"stderr:\n{self.stderr()}") from None

    def close(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()
        if self.popen.stdout is not None:
            self.popen.stdout.close()


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05,
               what: str = "") -> float:
    """Poll `predicate()` until true; return the seconds it took, fail after `timeout`."""
    start = time.monotonic()
    deadline = start + timeout
    while True:
        if predicate():
            return time.monotonic() - start
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {timeout}s: {what or predicate}")
        time.sleep(interval)
