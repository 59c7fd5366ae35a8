"""The connection engines against HAProxy 2.6 (nbthread 1), loaded side by side in one run.

    python bench/engine_bench.py [--seconds 5] [--rounds 3] [--idle 8000] [--skip-idle]

Proxies: the compiled engine and the pure-Python engine, each in its own process on uvloop with
a minimal round-robin policy (pointsman/proxy/engine/simple.py: the engine's cost plus a policy
that only picks), and HAProxy with one thread. All in front of one nginx serving a small body.

Measured:
- CPU per new connection, paired: wrk (`Connection: close`, one connection per request) loads
  every proxy at the same time; user+system CPU of each proxy process (from /proc) divided by the
  connections it carried. On a shared machine this holds where throughput does not: whatever
  the neighbours take, each proxy pays its own CPU per connection. Ratio = HAProxy's / ours
  (>= 1.0: as cheap as HAProxy or cheaper). `--rounds` rounds, the start order rotating, median;
- CPU per keep-alive request, paired the same way (wrk without `Connection: close`);
- keep-alive requests/s (wrk -c64, one proxy at a time, rotating order, median) and the ratio
  to HAProxy: unpaired, so it moves with whatever the neighbours do;
- bulk Gbit/s (iperf3, one stream; the engines splice after 1 MiB like pointsman's default);
- memory per idle connection: RSS growth of the proxy process with `--idle` open connections.

Pinning: with two or more CPUs the proxies share CPU 1, and the load generators and backends
CPU 0 (taskset). Loopback only; every process started here is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")

SERVER = """
import asyncio, socket, sys
import uvloop
from pointsman.proxy.engine import new_engine
from pointsman.proxy.engine.simple import RoundRobinPolicy

async def main(name, port, backends, nodelay):
    loop = asyncio.get_running_loop()
    engine = new_engine(loop, name)
    targets = [engine.target(i, "127.0.0.1", p, idle_timeout=600, splice_after=1 << 20,
                             connect_timeout=2, nodelay=nodelay) for i, p in enumerate(backends)]
    for listen, target in zip(port, targets):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", listen))
        sock.listen(4096)
        engine.add_listener(sock, RoundRobinPolicy([target], keep_records=False), nodelay=nodelay)
    print(engine.name, flush=True)
    await asyncio.Event().wait()

ports = [int(p) for p in sys.argv[2].split(",")]
backends = [int(p) for p in sys.argv[3].split(",")]
uvloop.run(main(sys.argv[1], ports, backends, sys.argv[4] == "1"))
"""

NGINX = """
worker_processes 1;
daemon off;
master_process off;
pid {tmp}/nginx.pid;
error_log stderr crit;
worker_rlimit_nofile 40000;
events {{ worker_connections 30000; }}
http {{
  access_log off;
  keepalive_timeout 600s;
  keepalive_requests 100000000;
  client_body_temp_path {tmp}/b1; proxy_temp_path {tmp}/b2; fastcgi_temp_path {tmp}/b3;
  uwsgi_temp_path {tmp}/b4; scgi_temp_path {tmp}/b5;
  server {{ listen {host}:{port} backlog=4096; location / {{ return 200 "hello\\n"; }} }}
}}
"""

HAPROXY = """
global
  nbthread 1
  maxconn 9900  # 2 x maxconn + margin must fit the 20,000-descriptor cap here
defaults
  mode tcp
  timeout connect 2s
  timeout client 10m
  timeout server 10m
frontend http
  bind {host}:{http}
  default_backend http
backend http
  server s1 {host}:{backend_http}
frontend bulk
  bind {host}:{bulk}
  default_backend bulk
backend bulk
  server s1 {host}:{backend_bulk}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.2):
            return
        time.sleep(0.02)
    raise RuntimeError(f"nothing listening on {port} after {timeout}s")


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of one process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@dataclass
class Proxy:
    name: str
    http: int
    bulk: int
    pid: int = 0


@dataclass
class Procs:
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, args: list[str], cpu: str | None, **kw: object) -> subprocess.Popen[bytes]:
        if cpu is not None:
            args = ["taskset", "-c", cpu, *args]
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                start_new_session=True, **kw)  # type: ignore[call-overload]
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)


def wrk(port: int, seconds: float, close: bool, cpu: str | None,
        connections: int = 64) -> subprocess.Popen[str]:
    args = ["wrk", "-t1", f"-c{connections}", f"-d{round(seconds)}s", f"http://{HOST}:{port}/"]
    if close:
        args[1:1] = ["-H", "Connection: close"]
    if cpu is not None:
        args = ["taskset", "-c", cpu, *args]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def wrk_result(proc: subprocess.Popen[str], seconds: float) -> tuple[int, float]:
    """(requests, requests/s) of a finished wrk."""
    out, _ = proc.communicate(timeout=seconds + 60)
    total = re.search(r"(\d+) requests in", out)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if total is None or rate is None:
        raise RuntimeError(f"wrk said: {out}")
    if errors:
        print(f"  warning: {errors.group(0)}", file=sys.stderr)
    return int(total.group(1)), float(rate.group(1))


def cpu_per_connection(proxies: list[Proxy], seconds: float, load_cpu: str | None,
                       order: int, close: bool = True) -> dict[str, tuple[float, float]]:
    """All proxies under load at once; (user, system) microseconds of CPU per request for each:
    per connection with `Connection: close`, per keep-alive request without."""
    turn = proxies[order % len(proxies):] + proxies[:order % len(proxies)]
    before = {p.name: cpu_seconds(p.pid) for p in turn}
    loads = {p.name: wrk(p.http, seconds, close=close, cpu=load_cpu, connections=32) for p in turn}
    done = {name: wrk_result(proc, seconds) for name, proc in loads.items()}
    after = {p.name: cpu_seconds(p.pid) for p in turn}
    out = {}
    for name, (requests, _) in done.items():
        n = max(requests, 1)
        out[name] = (1e6 * (after[name][0] - before[name][0]) / n,
                     1e6 * (after[name][1] - before[name][1]) / n)
    return out


def keepalive(proxy: Proxy, seconds: float, load_cpu: str | None) -> float:
    return wrk_result(wrk(proxy.http, seconds, close=False, cpu=load_cpu), seconds)[1]


def bulk(proxy: Proxy, seconds: float, load_cpu: str | None) -> float:
    args = ["iperf3", "-c", HOST, "-p", str(proxy.bulk), "-t", str(round(seconds)), "-J"]
    if load_cpu is not None:
        args = ["taskset", "-c", load_cpu, *args]
    out = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 30).stdout
    match = re.search(r'"sum_received":\s*{[^}]*"bits_per_second":\s*([\d.e+]+)', out)
    return float(match.group(1)) / 1e9 if match else float("nan")


async def _open_idle(port: int, count: int) -> list[socket.socket]:
    loop = asyncio.get_running_loop()
    socks: list[socket.socket] = []

    async def one() -> None:
        sock = socket.socket()
        sock.setblocking(False)
        await loop.sock_connect(sock, (HOST, port))
        socks.append(sock)

    for start in range(0, count, 500):
        await asyncio.gather(*(one() for _ in range(min(500, count - start))))
    for sock in socks[:: max(count // 50, 1)]:  # make sure the backend side exists
        await loop.sock_sendall(sock, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(10):
            await loop.sock_recv(sock, 1024)
    return socks


def idle_memory(proxy: Proxy, count: int) -> float:
    """KiB of proxy RSS per idle proxied connection."""
    before = rss_kib(proxy.pid)
    socks = asyncio.run(_open_idle(proxy.http, count))
    try:
        time.sleep(1.0)
        after = rss_kib(proxy.pid)
    finally:
        for sock in socks:
            sock.close()
    time.sleep(1.0)
    return (after - before) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--idle", type=int, default=8000)
    parser.add_argument("--skip-idle", action="store_true")
    parser.add_argument("--no-nodelay", action="store_true",
                        help="leave Nagle on in the engines (HAProxy's default; pointsman sets "
                             "TCP_NODELAY like uvloop does)")
    args = parser.parse_args()
    for tool in ("haproxy", "nginx", "wrk", "iperf3"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is missing: run scripts/setup.sh")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    two = (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None
    proxy_cpu, load_cpu = ("1", "0") if two else (None, None)
    procs = Procs()
    with tempfile.TemporaryDirectory(prefix="engine-bench-") as tmp:
        try:
            backend_http, backend_bulk = free_port(), free_port()
            conf = Path(tmp) / "nginx.conf"
            conf.write_text(NGINX.format(tmp=tmp, host=HOST, port=backend_http))
            procs.start(["nginx", "-c", str(conf), "-p", tmp], load_cpu)
            procs.start(["iperf3", "-s", "-B", HOST, "-p", str(backend_bulk)], load_cpu)
            wait_port(backend_http)
            wait_port(backend_bulk)
            proxies = []
            for name in ("cython", "python"):
                proxy = Proxy(f"engine-{name}", free_port(), free_port())
                proc = procs.start([sys.executable, "-c", SERVER, name, f"{proxy.http},{proxy.bulk}",
                                    f"{backend_http},{backend_bulk}",
                                    "0" if args.no_nodelay else "1"], proxy_cpu,
                                   env={**os.environ, "PYTHONPATH": str(ROOT)})
                assert proc.stdout is not None
                print(f"{proxy.name}: engine {proc.stdout.readline().decode().strip()}",
                      file=sys.stderr)
                proxy.pid = proc.pid
                proxies.append(proxy)
            ha = Proxy("haproxy", free_port(), free_port())
            cfg = Path(tmp) / "haproxy.cfg"
            cfg.write_text(HAPROXY.format(host=HOST, http=ha.http, bulk=ha.bulk,
                                          backend_http=backend_http, backend_bulk=backend_bulk))
            ha.pid = procs.start(["haproxy", "-f", str(cfg), "-db"], proxy_cpu).pid
            proxies.append(ha)
            for proxy in proxies:
                wait_port(proxy.http)
            results = measure(proxies, args, load_cpu)
        finally:
            procs.stop_all()
    report(results, args)


def measure(proxies: list[Proxy], args: argparse.Namespace,
            load_cpu: str | None) -> dict[str, dict[str, list[float]]]:
    results: dict[str, dict[str, list[float]]] = {p.name: {} for p in proxies}
    for round_ in range(args.rounds):
        print(f"round {round_ + 1}: CPU per connection (paired) ...", file=sys.stderr)
        for name, (user, system) in cpu_per_connection(proxies, args.seconds, load_cpu,
                                                       round_).items():
            results[name].setdefault("cpu_us_per_conn", []).append(user + system)
            results[name].setdefault("user_us", []).append(user)
            results[name].setdefault("sys_us", []).append(system)
        print(f"round {round_ + 1}: CPU per keep-alive request (paired) ...", file=sys.stderr)
        for name, (user, system) in cpu_per_connection(proxies, args.seconds, load_cpu, round_,
                                                       close=False).items():
            results[name].setdefault("ka_cpu_us_per_req", []).append(user + system)
        turn = proxies[round_ % len(proxies):] + proxies[:round_ % len(proxies)]
        print(f"round {round_ + 1}: keep-alive ...", file=sys.stderr)
        for proxy in turn:
            results[proxy.name].setdefault("keepalive_rps", []).append(
                keepalive(proxy, args.seconds, load_cpu))
    print("bulk ...", file=sys.stderr)
    for proxy in proxies:
        results[proxy.name]["bulk_gbps"] = [bulk(proxy, args.seconds, load_cpu)]
    if not args.skip_idle:
        for proxy in proxies:
            print(f"idle memory {proxy.name} ...", file=sys.stderr)
            results[proxy.name]["kib_per_idle_conn"] = [idle_memory(proxy, args.idle)]
    return results


def report(results: dict[str, dict[str, list[float]]], args: argparse.Namespace) -> None:
    base = {key: statistics.median(v) for key, v in results["haproxy"].items()}
    columns = ["cpu_us_per_conn", "ka_cpu_us_per_req", "keepalive_rps", "bulk_gbps",
               "kib_per_idle_conn"]
    # Ratios read "as good as HAProxy" at 1.0 and better above, whichever way a column runs.
    lower_is_better = {"cpu_us_per_conn", "ka_cpu_us_per_req", "kib_per_idle_conn"}
    print(f"\n{'':16}" + "".join(f"{c:>26}" for c in columns))
    for name, r in results.items():
        cells = []
        for c in columns:
            if c not in r:
                cells.append(f"{'-':>26}")
                continue
            v = statistics.median(r[c])
            ref = base.get(c)
            ratio = (ref / v if c in lower_is_better else v / ref) if ref and v else float("nan")
            cells.append(f"{v:>16.2f} ({ratio:5.2f}x)")
        print(f"{name:16}" + "".join(cells))
    print(f"medians of {args.rounds} rounds; ratios vs HAProxy 2.6 nbthread 1, higher is better "
          "(CPU and memory: HAProxy's / ours). Paired CPU rounds (per round, us/conn):")
    for name, r in results.items():
        print(f"  {name:14} " + ", ".join(f"{v:.1f}" for v in r["cpu_us_per_conn"])
              + f"   (median user {statistics.median(r['user_us']):.1f}, "
              f"system {statistics.median(r['sys_us']):.1f})")


if __name__ == "__main__":
    main()
