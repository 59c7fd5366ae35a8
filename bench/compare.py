"""Side by side, in one run, on the same backends: direct, HAProxy, nginx stream, pointsman.

    python bench/compare.py [--seconds 5] [--quick]

Measures HTTP keep-alive requests/s with p50/p99 (wrk, 64 connections), new connections/s (wrk
with `Connection: close`), bulk Gbit/s (iperf3, 1 and 4 streams), UDP datagrams/s (64 and 1400
bytes, against nginx stream UDP) and memory per idle connection at 9,000 open connections (the
issue asks 10,000; see IDLE_CONNECTIONS), and prints each figure's ratio to HAProxy (to nginx
for UDP). Everything runs on 127.0.0.1 and stops by itself; nothing is installed here
(scripts/setup.sh installs haproxy, nginx, wrk, iperf3). pointsman runs with metrics (admin
API) and flow logging on, as the targets require. Not part of CI: the machine is shared and
numbers vary by 10-15 %; compare ratios within a run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
NGINX_STREAM = "/usr/lib/nginx/modules/ngx_stream_module.so"
# The issue asks for 10,000; this sandbox caps every process at 20,000 descriptors (hard limit,
# not raisable), and a proxy holds two per connection, so 9,000 is the most all peers can hold.
IDLE_CONNECTIONS = 9_000


def free_port(kind: socket.SocketKind = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.2):
            return
        time.sleep(0.02)
    raise RuntimeError(f"nothing listening on {port} after {timeout}s")


@dataclass
class Ports:
    http: int = field(default_factory=free_port)  # nginx HTTP backend
    iperf: int = field(default_factory=free_port)  # iperf3 server
    udp: int = field(default_factory=lambda: free_port(socket.SOCK_DGRAM))  # UDP echo backend


@dataclass
class Target:
    name: str
    http: int  # where clients connect for HTTP
    iperf: int
    udp: int | None
    pids: list[int] = field(default_factory=list)


# --- processes ---------------------------------------------------------------------------------


class Procs:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, args: list[str], **kw: object) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True, **kw)  # type: ignore[call-overload]
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)


def tree_pids(pid: int) -> list[int]:
    """pid and all its descendants (nginx/pointsman workers)."""
    out = [pid]
    with contextlib.suppress(OSError):
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            out.extend(tree_pids(int(child)))
    return out


def rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


UDP_ECHO = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", int(sys.argv[1])))
while True:
    data, addr = s.recvfrom(65535)
    s.sendto(data, addr)
"""


def start_backends(procs: Procs, ports: Ports, work: Path) -> None:
    conf = work / "backend-nginx.conf"
    conf.write_text(f"""
worker_processes 1;
daemon off;
pid {work}/backend.pid;
error_log stderr crit;
worker_rlimit_nofile 65536;
events {{ worker_connections 30000; }}
http {{
  access_log off;
  keepalive_timeout 600s;
  keepalive_requests 100000000;
  client_body_temp_path {work}/b1; proxy_temp_path {work}/b2; fastcgi_temp_path {work}/b3;
  uwsgi_temp_path {work}/b4; scgi_temp_path {work}/b5;
  server {{ listen {HOST}:{ports.http} backlog=4096; location / {{ return 200 "hello\\n"; }} }}
}}
""")
    procs.start(["taskset", "-c", "1", "nginx", "-c", str(conf), "-p", str(work)])
    procs.start(["iperf3", "-s", "-B", HOST, "-p", str(ports.iperf)])
    procs.start([sys.executable, "-c", UDP_ECHO, str(ports.udp)])
    wait_port(ports.http)
    wait_port(ports.iperf)


def start_haproxy(procs: Procs, ports: Ports, work: Path) -> Target:
    target = Target("haproxy", free_port(), free_port(), None)
    conf = work / "haproxy.cfg"
    conf.write_text(f"""
global
  nbthread 2
  maxconn 9900
defaults
  mode tcp
  timeout connect 2s
  timeout client 10m
  timeout server 10m
frontend http
  bind {HOST}:{target.http}
  default_backend http
backend http
  server s1 {HOST}:{ports.http}
frontend iperf
  bind {HOST}:{target.iperf}
  default_backend iperf
backend iperf
  server s1 {HOST}:{ports.iperf}
""")
    proc = procs.start(["haproxy", "-f", str(conf), "-db"])
    wait_port(target.http)
    target.pids = [proc.pid]
    return target


def start_nginx(procs: Procs, ports: Ports, work: Path) -> Target:
    target = Target("nginx", free_port(), free_port(), free_port(socket.SOCK_DGRAM))
    conf = work / "nginx-stream.conf"
    conf.write_text(f"""
load_module {NGINX_STREAM};
worker_processes 2;
daemon off;
pid {work}/stream.pid;
error_log stderr crit;
worker_rlimit_nofile 65536;
events {{ worker_connections 30000; }}
stream {{
  server {{ listen {HOST}:{target.http} backlog=4096; proxy_pass {HOST}:{ports.http}; proxy_timeout 10m; }}
  server {{ listen {HOST}:{target.iperf}; proxy_pass {HOST}:{ports.iperf}; }}
  server {{ listen {HOST}:{target.udp} udp reuseport; proxy_pass {HOST}:{ports.udp}; proxy_timeout 5s; }}
}}
""")
    proc = procs.start(["nginx", "-c", str(conf), "-p", str(work)])
    wait_port(target.http)
    time.sleep(0.3)  # workers up
    target.pids = tree_pids(proc.pid)
    return target


def start_pointsman(procs: Procs, ports: Ports, work: Path, workers: int) -> Target:
    target = Target(f"pointsman w{workers}", free_port(), free_port(), free_port(socket.SOCK_DGRAM))
    admin = free_port()
    conf = work / f"pointsman-{workers}.yaml"
    conf.write_text(f"""
workers: {workers}
admin: {{bind: "{HOST}:{admin}"}}
flow_log: {{path: "{work}/flows-{workers}.jsonl"}}
listeners:
  - {{name: http, bind: "{HOST}:{target.http}", pool: http, max_connections: 50000, backlog: 4096}}
  - {{name: iperf, bind: "{HOST}:{target.iperf}", pool: iperf}}
  - {{name: udp, bind: "{HOST}:{target.udp}", protocol: udp, pool: udp,
      udp: {{session_timeout: 5s}}}}
pools:
  - {{name: http, idle_timeout: 10m, backends: [{{address: "{HOST}:{ports.http}"}}]}}
  - {{name: iperf, backends: [{{address: "{HOST}:{ports.iperf}"}}]}}
  - {{name: udp, backends: [{{address: "{HOST}:{ports.udp}"}}]}}
""")
    proc = procs.start([sys.executable, "-m", "pointsman", "run", str(conf), "--log-level", "error"])
    wait_port(target.http)
    wait_port(target.iperf)
    time.sleep(0.5)
    target.pids = tree_pids(proc.pid)
    return target


# --- measurements --------------------------------------------------------------------------------


def wrk(port: int, seconds: float, close: bool) -> tuple[float, float, float]:
    """(requests/s, p50 ms, p99 ms)."""
    args = ["wrk", "-t1", "-c64", f"-d{round(seconds)}s", "--latency", f"http://{HOST}:{port}/"]
    if close:
        args[1:1] = ["-H", "Connection: close"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 30).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]

    def pct(label: str) -> float:
        m = re.search(rf"\s{label}%\s+([\d.]+)(us|ms|s)", out)
        if not m:
            return float("nan")
        scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]
        return float(m.group(1)) * scale

    return rps, pct("50"), pct("99")


def iperf(port: int, seconds: float, streams: int) -> float:
    out = subprocess.run(["iperf3", "-c", HOST, "-p", str(port), "-t", str(round(seconds)), "-P",
                          str(streams), "-J"], capture_output=True, text=True,
                         timeout=seconds + 30).stdout
    data = json.loads(out)
    return float(data["end"]["sum_received"]["bits_per_second"]) / 1e9


async def udp_rate(port: int, size: int, seconds: float, sockets: int = 16) -> float:
    """Datagrams/s answered: each client socket keeps a window of datagrams in flight."""
    loop = asyncio.get_running_loop()
    payload = bytes(size)
    received = 0
    stop = loop.time() + seconds

    class Client(asyncio.DatagramProtocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.t = transport
            for _ in range(8):
                self.t.sendto(payload)  # type: ignore[attr-defined]

        def datagram_received(self, data: bytes, addr: object) -> None:
            nonlocal received
            received += 1
            if loop.time() < stop:
                self.t.sendto(payload)  # type: ignore[attr-defined]

        def error_received(self, exc: Exception) -> None:
            pass

    transports = []
    for _ in range(sockets):
        t, _ = await loop.create_datagram_endpoint(Client, remote_addr=(HOST, port))
        transports.append(t)
    # Datagrams can be lost under load: top the windows up every 100 ms.
    while loop.time() < stop:
        await asyncio.sleep(0.1)
        for t in transports:
            t.sendto(payload)
    for t in transports:
        t.close()
    return received / seconds


def idle_memory(target: Target, count: int) -> float:
    """KiB of proxy RSS per idle connection at `count` open connections."""
    before = rss_kib(target.pids)
    socks = []
    try:
        for _ in range(count):
            s = socket.create_connection((HOST, target.http), timeout=5)
            socks.append(s)
        for s in socks[:: max(count // 50, 1)]:  # make sure the proxy connected upstream
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            s.recv(1024)
        time.sleep(1.0)
        after = rss_kib(tree_pids(target.pids[0]) if target.pids else [])
    finally:
        for s in socks:
            s.close()
    return (after - before) / count


# --- the run -------------------------------------------------------------------------------------


def rows(targets: list[Target], seconds: float, quick: bool) -> Iterator[tuple[str, dict[str, float]]]:
    for target in targets:
        print(f"measuring {target.name} ...", file=sys.stderr, flush=True)
        r: dict[str, float] = {}
        r["keepalive_rps"], r["p50_ms"], r["p99_ms"] = wrk(target.http, seconds, close=False)
        r["newconn_rps"], _, _ = wrk(target.http, seconds, close=True)
        r["bulk1_gbps"] = iperf(target.iperf, seconds, 1)
        r["bulk4_gbps"] = iperf(target.iperf, seconds, 4)
        if target.udp is not None:
            r["udp64_pps"] = asyncio.run(udp_rate(target.udp, 64, seconds))
            r["udp1400_pps"] = asyncio.run(udp_rate(target.udp, 1400, seconds))
        if target.name != "direct" and not quick:
            r["kib_per_idle_conn"] = idle_memory(target, IDLE_CONNECTIONS)
        yield target.name, r


COLUMNS = ["keepalive_rps", "p50_ms", "p99_ms", "newconn_rps", "bulk1_gbps", "bulk4_gbps",
           "udp64_pps", "udp1400_pps", "kib_per_idle_conn"]


def print_table(results: dict[str, dict[str, float]]) -> None:
    base = results.get("haproxy", {})
    udp_base = results.get("nginx", {})
    print(f"{'':16}" + "".join(f"{c:>19}" for c in COLUMNS))
    for name, r in results.items():
        cells = []
        for c in COLUMNS:
            v = r.get(c)
            ref = (udp_base if c.startswith("udp") else base).get(c)
            if v is None:
                cells.append(f"{'-':>19}")
            elif ref:
                cells.append(f"{v:>11.1f} ({v / ref:4.2f}x)")
            else:
                cells.append(f"{v:>19.1f}")
        print(f"{name:16}" + "".join(cells))
    print("ratios: to haproxy (udp: to nginx stream); latency and memory: lower is better")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--quick", action="store_true", help="skip the 10,000-connection memory run")
    parser.add_argument("--engine", action="store_true",
                        help="run bench/engine_bench.py instead: `pointsman run` on the compiled "
                             "and the pure-Python engine (admin and flow log on and off; "
                             "--before DIR adds an older tree) against HAProxy, with paired CPU "
                             "per connection and redis-benchmark; its options follow")
    parser.add_argument("--udp", action="store_true",
                        help="run bench/udp_bench.py --paired instead: CPU per datagram of "
                             "`pointsman run` against nginx stream UDP, loaded at the same time "
                             "(--workers N, --before DIR, --repeat N follow)")
    args, rest = parser.parse_known_args()
    if args.udp:
        os.execv(sys.executable, [sys.executable, str(Path(__file__).with_name("udp_bench.py")),
                                  "--paired", "--seconds", str(args.seconds), *rest])
    if args.engine:
        os.execv(sys.executable, [sys.executable, str(Path(__file__).with_name("engine_bench.py")),
                                  "--seconds", str(args.seconds), *rest])
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    for tool in ("haproxy", "nginx", "wrk", "iperf3", "taskset"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is missing: run scripts/setup.sh")
    # 10,000 proxied connections hold 20,000+ descriptors in each proxy; root may raise the cap.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (200_000, 200_000))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    del soft
    procs = Procs()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="pointsman-bench-") as tmp:
        work = Path(tmp)
        try:
            ports = Ports()
            start_backends(procs, ports, work)
            targets = [Target("direct", ports.http, ports.iperf, ports.udp),
                       start_haproxy(procs, ports, work), start_nginx(procs, ports, work),
                       start_pointsman(procs, ports, work, 1),
                       start_pointsman(procs, ports, work, 2)]
            for name, r in rows(targets, args.seconds, args.quick):
                results[name] = r
        finally:
            procs.stop_all()
    print_table(results)


if __name__ == "__main__":
    main()
