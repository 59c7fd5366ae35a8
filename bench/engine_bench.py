"""pointsman against HAProxy 2.6 (nbthread 1), loaded side by side in one run.

    python bench/engine_bench.py [--seconds 5] [--rounds 3] [--idle 8000] [--skip-idle]
                                 [--skip-redis] [--before DIR] [--raw] [--solo] [--only NAME,...]
                                 [--cpu-only | --ka-only | --bulk-only] [--connections 32]

Proxies, each one process pinned to the same CPU:
- `cython` / `python`: the REAL `pointsman run` (one process, `workers: 1`) on the compiled and
  on the pure-Python connection engine (POINTSMAN_ENGINE), with the admin API and the flow log
  on (to a file), as operators run it; `cython-bare` / `python-bare`: the same without admin
  API and flow log;
- `before` / `before-bare` (with `--before DIR`): `pointsman run` from another source tree, e.g.
  `git archive <commit> | tar -x -C DIR` of main before the engine (the uvloop-transport path);
- `engine-cython` / `engine-python` (with `--raw`): the bare engines with the minimal round-robin
  policy of pointsman/proxy/engine/simple.py (the engine's own cost); `engine-before` (with
  `--raw --before DIR`): the compiled engine of DIR (build it there first:
  `python setup.py build_ext --inplace`), for an engine change paired against its base;
- `engine-solo` (with `--raw --solo`): the compiled bare engine on a minimal poll(2) loop
  instead of uvloop, to measure the nested epoll (never a way to run pointsman);
- `haproxy`: HAProxy with one thread; it copies (no splice option). `haproxy-splice` (named in
  `--only`): the same with `option splice-auto`. All in front of one nginx (and iperf3,
  redis-server; each proxy has an iperf3 server of its own).

Measured:
- CPU per new connection, paired: wrk (`Connection: close`, one connection per request) loads
  every proxy at the same time; user+system CPU of each proxy process (from /proc) divided by the
  connections it carried. On a shared machine this holds where throughput does not: whatever
  the neighbours take, each proxy pays its own CPU per connection. Ratio = HAProxy's / ours
  (>= 1.0: as cheap as HAProxy or cheaper). `--rounds` rounds, the start order rotating, median;
- CPU per keep-alive request, paired the same way (wrk without `Connection: close`);
- keep-alive requests/s (wrk -c64, one proxy at a time, rotating order, median) and the ratio
  to HAProxy: unpaired, so it moves with whatever the neighbours do;
- bulk Gbit/s (iperf3, one stream; pointsman splices after 1 MiB, its default); with
  `--bulk-only`, paired instead: one stream through every proxy at once, Gbit/s and CPU per MiB
  carried, ratio per round;
- memory per idle connection: RSS growth of the proxy process with `--idle` open connections;
- redis-benchmark (SET and GET, 50 keep-alive clients) through each proxy, one at a time:
  requests/s and the proxy's CPU per request.

Pinning: with two or more CPUs the proxies share CPU 1, and the load generators and backends
CPU 0 (taskset). Loopback only; every process started here is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
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

# The same bare engine without uvloop (`engine-solo`, with `--raw --solo`): a measurement of the
# nested epoll, never a way to run pointsman. Under uvloop the engine's epoll descriptor sits in
# uvloop's epoll for good, so every event on any of its sockets also wakes the outer epoll (a
# second ep_poll_callback). This loop instead waits with poll(2) on the engine's descriptor,
# which hooks the outer wait queue only while it blocks, and does the engine's call_soon and
# call_later itself.
SOLO = """
import heapq, select, socket, sys, time
from pointsman.proxy.engine import new_engine
from pointsman.proxy.engine.simple import RoundRobinPolicy

class Handle:
    __slots__ = ("when", "cb", "cancelled")
    def __init__(self, when, cb):
        self.when, self.cb, self.cancelled = when, cb, False
    def cancel(self):
        self.cancelled = True
    def __lt__(self, other):
        return self.when < other.when

class SoloLoop:
    def __init__(self):
        self.fd, self.reader, self.ready, self.timers = -1, None, [], []
    def add_reader(self, fd, cb):
        self.fd, self.reader = fd, cb
    def remove_reader(self, fd):
        self.reader = None
    def call_soon(self, cb):
        handle = Handle(0.0, cb)
        self.ready.append(handle)
        return handle
    def call_later(self, delay, cb):
        handle = Handle(time.monotonic() + delay, cb)
        heapq.heappush(self.timers, handle)
        return handle
    def run(self):
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        while self.reader is not None:
            timeout = None
            if self.ready:
                timeout = 0
            elif self.timers:
                timeout = max(0.0, (self.timers[0].when - time.monotonic()) * 1000.0)
            if poller.poll(timeout):
                self.reader()
            now = time.monotonic()
            while self.timers and self.timers[0].when <= now:
                self.ready.append(heapq.heappop(self.timers))
            ready, self.ready = self.ready, []
            for handle in ready:
                if not handle.cancelled:
                    handle.cb()

loop = SoloLoop()
engine = new_engine(loop, sys.argv[1])
ports = [int(p) for p in sys.argv[2].split(",")]
backends = [int(p) for p in sys.argv[3].split(",")]
for listen, port in zip(ports, backends):
    target = engine.target(0, "127.0.0.1", port, idle_timeout=600, splice_after=1 << 20,
                           connect_timeout=2, nodelay=sys.argv[4] == "1")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", listen))
    sock.listen(4096)
    engine.add_listener(sock, RoundRobinPolicy([target], keep_records=False),
                        nodelay=sys.argv[4] == "1")
print(engine.name, flush=True)
loop.run()
"""

POINTSMAN = """\
workers: 1
shutdown_grace: 1s
{extra}listeners:
  - {{name: http, bind: "{host}:{http}", pool: http, max_connections: 50000, backlog: 4096}}
  - {{name: bulk, bind: "{host}:{bulk}", pool: bulk}}
  - {{name: redis, bind: "{host}:{redis}", pool: redis, max_connections: 50000}}
pools:
  - {{name: http, idle_timeout: 10m, algorithm: {algorithm},
     backends: [{{address: "{host}:{backend_http}"}}]}}
  - {{name: bulk, backends: [{{address: "{host}:{backend_bulk}"}}]}}
  - {{name: redis, idle_timeout: 10m, backends: [{{address: "{host}:{backend_redis}"}}]}}
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
frontend redis
  bind {host}:{redis}
  default_backend redis
backend redis
  server s1 {host}:{backend_redis}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.2):
            return
        time.sleep(0.02)
    raise RuntimeError(f"nothing listening on {port} after {timeout}s")


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of one process.

    The total is the scheduler's run time of every thread (/proc/PID/task/*/schedstat, in ns):
    exact, where utime and stime are sampled at each clock tick and moved a per-connection figure
    by +-5 us a round on this VM. The tick-sampled split only divides that total."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    user, system = int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):  # a thread that just ended
            total += int((task / "schedstat").read_text().split()[0])
    if total == 0:  # no schedstat (a kernel without CONFIG_SCHEDSTATS): the ticks
        return user, system
    share = user / (user + system) if user + system else 1.0
    return total / 1e9 * share, total / 1e9 * (1.0 - share)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@dataclass
class Backends:
    http: int = field(default_factory=free_port)
    bulk: int = field(default_factory=free_port)
    redis: int = field(default_factory=free_port)


@dataclass
class Proxy:
    name: str
    http: int = field(default_factory=free_port)
    bulk: int = field(default_factory=free_port)
    redis: int = field(default_factory=free_port)
    pid: int = 0
    note: str = ""


@dataclass
class Procs:
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, args: list[str], cpu: str | None, **kw: object) -> subprocess.Popen[bytes]:
        if cpu is not None:
            args = ["taskset", "-c", cpu, *args]
        kw.setdefault("stderr", subprocess.DEVNULL)
        proc: subprocess.Popen[bytes] = subprocess.Popen(  # type: ignore[call-overload]
            args, stdout=subprocess.PIPE, start_new_session=True, **kw)
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


# --- the proxies --------------------------------------------------------------------------------


def start_haproxy(procs: Procs, backends: Backends, tmp: Path, cpu: str | None,
                  splice: bool = False) -> Proxy:
    """HAProxy as configured above: it copies (no splice option). `splice`: the
    `haproxy-splice` row, `option splice-auto` in the defaults (an opt-in comparison)."""
    proxy = Proxy("haproxy-splice" if splice else "haproxy")
    cfg = tmp / f"{proxy.name}.cfg"
    text = HAPROXY.format(host=HOST, http=proxy.http, bulk=proxy.bulk, redis=proxy.redis,
                          backend_http=backends.http, backend_bulk=backends.bulk,
                          backend_redis=backends.redis)
    if splice:  # its pipes count against the descriptor cap too: half the connections
        text = text.replace("  mode tcp\n", "  mode tcp\n  option splice-auto\n")
        text = text.replace("maxconn 9900", "maxconn 4900")
    cfg.write_text(text)
    proxy.pid = procs.start(["haproxy", "-f", str(cfg), "-db"], cpu).pid
    return proxy


def start_pointsman(procs: Procs, backends: Backends, tmp: Path, cpu: str | None, name: str,
                    engine: str | None, extras: str, tree: Path,
                    algorithm: str = "round_robin", shedding: bool = False) -> Proxy:
    """`pointsman run` from `tree` (this checkout, or --before's), one process; `extras`: the
    admin API ("a") and the flow log ("f") on; `algorithm`: the http pool's; `shedding`: load
    shedding on, as in docs/config.md's complete example."""
    proxy = Proxy(name)
    extra = "shedding: {max_connections: 50000, max_loop_lag: 500ms}\n" if shedding else ""
    if "a" in extras:
        extra += f'admin: {{bind: "{HOST}:{free_port()}"}}\n'
    if "f" in extras:
        extra += f'flow_log: {{path: "{tmp}/flows-{name}.jsonl"}}\n'
    if "n" in extras:  # the flow log's own cost without the file's (page cache) cost
        extra += 'flow_log: {path: "/dev/null"}\n'
    conf = tmp / f"pointsman-{name}.yaml"
    conf.write_text(POINTSMAN.format(extra=extra, algorithm=algorithm, host=HOST, http=proxy.http,
                                     bulk=proxy.bulk, redis=proxy.redis, backend_http=backends.http,
                                     backend_bulk=backends.bulk, backend_redis=backends.redis))
    env = {**os.environ, "PYTHONPATH": str(tree), "POINTSMAN_WORKERS": "1"}
    if engine is not None:
        env["POINTSMAN_ENGINE"] = engine
    log = (tmp / f"pointsman-{name}.log").open("wb")
    proc = procs.start([sys.executable, "-m", "pointsman", "run", str(conf), "--log-level",
                        "info"], cpu, env=env, cwd=str(tree), stderr=log)
    proxy.pid = proc.pid
    wait_port(proxy.http)
    lines = [line for line in (tmp / f"pointsman-{name}.log").read_text().splitlines()
             if "starting: " in line]
    proxy.note = lines[0].split("starting: ", 1)[-1] if lines else ""
    return proxy


def start_raw(procs: Procs, backends: Backends, cpu: str | None, engine: str,
              nodelay: bool, tree: Path = ROOT, name: str = "", solo: bool = False) -> Proxy:
    proxy = Proxy(name or f"engine-{engine}")
    proc = procs.start([sys.executable, "-c", SOLO if solo else SERVER, engine,
                        f"{proxy.http},{proxy.bulk},{proxy.redis}",
                        f"{backends.http},{backends.bulk},{backends.redis}",
                        "1" if nodelay else "0"], cpu, env={**os.environ, "PYTHONPATH": str(tree)},
                        cwd=str(tree))  # `-c` puts the working directory first on sys.path
    assert proc.stdout is not None
    proxy.note = f"simple policy, engine {proc.stdout.readline().decode().strip()}"
    proxy.pid = proc.pid
    return proxy


# --- load -----------------------------------------------------------------------------------------


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
                       order: int, close: bool = True,
                       connections: int = 32) -> dict[str, tuple[float, float]]:
    """All proxies under load at once; (user, system) microseconds of CPU per request for each:
    per connection with `Connection: close`, per keep-alive request without."""
    turn = proxies[order % len(proxies):] + proxies[:order % len(proxies)]
    before = {p.name: cpu_seconds(p.pid) for p in turn}
    loads = {p.name: wrk(p.http, seconds, close=close, cpu=load_cpu, connections=connections)
             for p in turn}
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


def bulk_paired(proxies: list[Proxy], seconds: float, load_cpu: str | None,
                order: int) -> dict[str, tuple[float, float, float]]:
    """One iperf3 stream through every proxy at once; for each (Gbit/s, user and system CPU
    microseconds per MiB carried). Each proxy has its own iperf3 server (own_bulk)."""
    turn = proxies[order % len(proxies):] + proxies[:order % len(proxies)]
    before = {p.name: cpu_seconds(p.pid) for p in turn}
    runs = {}
    for p in turn:
        args = ["iperf3", "-c", HOST, "-p", str(p.bulk), "-t", str(round(seconds)), "-J"]
        if load_cpu is not None:
            args = ["taskset", "-c", load_cpu, *args]
        runs[p.name] = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                        text=True)
    outs = {name: proc.communicate(timeout=seconds + 30)[0] for name, proc in runs.items()}
    after = {p.name: cpu_seconds(p.pid) for p in turn}
    result = {}
    for name, out in outs.items():
        rate = re.search(r'"sum_received":\s*{[^}]*"bits_per_second":\s*([\d.e+]+)', out)
        total = re.search(r'"sum_received":\s*{[^}]*"bytes":\s*(\d+)', out)
        mib = int(total.group(1)) / (1 << 20) if total else 0.0
        if rate is None or not mib:
            raise RuntimeError(f"iperf3 through {name} said: {out[-500:]}")
        result[name] = (float(rate.group(1)) / 1e9,
                        1e6 * (after[name][0] - before[name][0]) / mib,
                        1e6 * (after[name][1] - before[name][1]) / mib)
    return result


def redis(proxy: Proxy, requests: int, load_cpu: str | None) -> tuple[float, float, float]:
    """(SET/s, GET/s, proxy CPU microseconds per request) of one redis-benchmark run."""
    args = ["redis-benchmark", "-h", HOST, "-p", str(proxy.redis), "-t", "set,get", "-n",
            str(requests), "-c", "50", "-q", "--csv"]
    if load_cpu is not None:
        args = ["taskset", "-c", load_cpu, *args]
    before = cpu_seconds(proxy.pid)
    out = subprocess.run(args, capture_output=True, text=True, timeout=300).stdout
    after = cpu_seconds(proxy.pid)
    rates = dict(re.findall(r'"(SET|GET)","([\d.]+)"', out))
    cpu = 1e6 * (sum(after) - sum(before)) / (2 * requests)
    return float(rates.get("SET", "nan")), float(rates.get("GET", "nan")), cpu


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
    time.sleep(2.0)
    return (after - before) / count


# --- the run --------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--idle", type=int, default=8000)
    parser.add_argument("--skip-idle", action="store_true")
    parser.add_argument("--skip-redis", action="store_true")
    parser.add_argument("--redis-requests", type=int, default=100_000)
    parser.add_argument("--before", type=Path, default=None,
                        help="a source tree of pointsman before the engine (git archive of a "
                             "commit): adds the rows `before` and `before-bare`")
    parser.add_argument("--raw", action="store_true",
                        help="add the bare engines with the minimal policy (engine-cython/python)")
    parser.add_argument("--only", default="",
                        help="comma-separated rows to run (haproxy is always there); "
                             "cython-flowlog, cython-admin, before-flowlog (one extra on), "
                             "cython-flowlog-null (to /dev/null) and haproxy-splice (HAProxy "
                             "with option splice-auto) run only when named here")
    parser.add_argument("--cpu-only", action="store_true",
                        help="only the paired CPU per new connection (no keep-alive, bulk, "
                             "redis or memory runs)")
    parser.add_argument("--ka-only", action="store_true",
                        help="only the paired CPU per keep-alive request")
    parser.add_argument("--connections", type=int, default=32,
                        help="wrk connections per proxy in the paired CPU runs (default 32; "
                             "1 to 4: the wake-up pattern of a lightly loaded proxy)")
    parser.add_argument("--bulk-only", action="store_true",
                        help="only bulk, paired: one iperf3 stream through every proxy at once "
                             "(Gbit/s and CPU per MiB carried)")
    parser.add_argument("--solo", action="store_true",
                        help="with --raw: add `engine-solo`, the compiled bare engine on a "
                             "minimal poll(2) loop instead of uvloop (the nested epoll's cost)")
    parser.add_argument("--algorithm", default="round_robin",
                        help="the http pool's balancing algorithm in every pointsman row (the "
                             "engine admits for every one: docs/engine.md, Fast admission)")
    parser.add_argument("--shedding", action="store_true",
                        help="load shedding on in every pointsman row (max_connections 50000, "
                             "max_loop_lag 500ms, as in docs/config.md's complete example)")
    parser.add_argument("--no-nodelay", action="store_true",
                        help="the raw engines only: leave Nagle on (HAProxy's default)")
    args = parser.parse_args()
    for tool in ("haproxy", "nginx", "wrk", "iperf3", "redis-server", "redis-benchmark"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is missing: run scripts/setup.sh")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    two = (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None
    proxy_cpu, load_cpu = ("1", "0") if two else (None, None)
    only = {name for name in args.only.split(",") if name}
    procs = Procs()
    with tempfile.TemporaryDirectory(prefix="engine-bench-") as tmp_name:
        tmp = Path(tmp_name)
        try:
            backends = Backends()
            conf = tmp / "nginx.conf"
            conf.write_text(NGINX.format(tmp=tmp, host=HOST, port=backends.http))
            procs.start(["nginx", "-c", str(conf), "-p", str(tmp)], load_cpu)
            procs.start(["iperf3", "-s", "-B", HOST, "-p", str(backends.bulk)], load_cpu)
            procs.start(["redis-server", "--bind", HOST, "--port", str(backends.redis), "--save",
                         "", "--appendonly", "no", "--maxclients", "20000"], load_cpu)
            for port in (backends.http, backends.bulk, backends.redis):
                wait_port(port)
            proxies = start_all(procs, backends, tmp, proxy_cpu, args, only, load_cpu)
            for proxy in proxies:
                wait_port(proxy.http)
                print(f"{proxy.name}: {proxy.note or 'HAProxy, nbthread 1'}", file=sys.stderr)
            results = measure(proxies, args, load_cpu)
        finally:
            procs.stop_all()
    report(results, args)


def own_bulk(procs: Procs, backends: Backends, load_cpu: str | None) -> Backends:
    """`backends` with an iperf3 server of its own for the bulk port: one iperf3 server runs one
    test at a time, and the paired bulk run streams through every proxy at once."""
    mine = dataclasses.replace(backends, bulk=free_port())
    procs.start(["iperf3", "-s", "-B", HOST, "-p", str(mine.bulk)], load_cpu)
    wait_port(mine.bulk)
    return mine


def start_all(procs: Procs, backends: Backends, tmp: Path, cpu: str | None,
              args: argparse.Namespace, only: set[str], load_cpu: str | None) -> list[Proxy]:
    def own() -> Backends:
        return own_bulk(procs, backends, load_cpu)

    proxies = []
    rows: list[tuple[str, str | None, str, Path]] = [
        ("cython", "cython", "af", ROOT), ("cython-bare", "cython", "", ROOT),
        ("python", "python", "af", ROOT), ("python-bare", "python", "", ROOT)]
    if args.before is not None:
        rows += [("before", None, "af", args.before.resolve()),
                 ("before-bare", None, "", args.before.resolve())]
    # Only when asked for by name: one of the two extras at a time.
    opt_in = [("cython-flowlog", "cython", "f", ROOT), ("cython-admin", "cython", "a", ROOT),
              ("cython-flowlog-null", "cython", "n", ROOT)]
    if args.before is not None:
        opt_in += [("before-flowlog", None, "f", args.before.resolve())]
    rows += [row for row in opt_in if row[0] in only]
    for name, engine, extras, tree in rows:
        if not only or name in only:
            proxies.append(start_pointsman(procs, own(), tmp, cpu, name, engine, extras, tree,
                                           args.algorithm, args.shedding))
    if args.raw:
        for engine in ("cython", "python"):
            if not only or f"engine-{engine}" in only:
                proxies.append(start_raw(procs, own(), cpu, engine, not args.no_nodelay))
        if args.solo and (not only or "engine-solo" in only):
            proxies.append(start_raw(procs, own(), cpu, "cython", not args.no_nodelay,
                                     name="engine-solo", solo=True))
        if args.before is not None and (not only or "engine-before" in only):
            # The compiled engine of --before's tree (built there with build_ext --inplace).
            proxies.append(start_raw(procs, own(), cpu, "cython", not args.no_nodelay,
                                     args.before.resolve(), "engine-before"))
    if "haproxy-splice" in only:
        proxies.append(start_haproxy(procs, own(), tmp, cpu, splice=True))
    proxies.append(start_haproxy(procs, own(), tmp, cpu))
    return proxies


def measure(proxies: list[Proxy], args: argparse.Namespace,
            load_cpu: str | None) -> dict[str, dict[str, list[float]]]:
    results: dict[str, dict[str, list[float]]] = {p.name: {} for p in proxies}
    for round_ in range(args.rounds):
        if args.bulk_only:
            print(f"round {round_ + 1}: bulk (paired) ...", file=sys.stderr)
            for name, (gbps, user, system) in bulk_paired(proxies, args.seconds, load_cpu,
                                                          round_).items():
                results[name].setdefault("bulk_gbps", []).append(gbps)
                results[name].setdefault("bulk_cpu_us_per_mib", []).append(user + system)
                results[name].setdefault("user_us", []).append(user)
                results[name].setdefault("sys_us", []).append(system)
            continue
        if args.ka_only:
            print(f"round {round_ + 1}: CPU per keep-alive request (paired) ...", file=sys.stderr)
            for name, (user, system) in cpu_per_connection(proxies, args.seconds, load_cpu,
                                                           round_, close=False,
                                                           connections=args.connections).items():
                results[name].setdefault("ka_cpu_us_per_req", []).append(user + system)
                results[name].setdefault("user_us", []).append(user)
                results[name].setdefault("sys_us", []).append(system)
            continue
        print(f"round {round_ + 1}: CPU per connection (paired) ...", file=sys.stderr)
        for name, (user, system) in cpu_per_connection(proxies, args.seconds, load_cpu,
                                                       round_,
                                                       connections=args.connections).items():
            results[name].setdefault("cpu_us_per_conn", []).append(user + system)
            results[name].setdefault("user_us", []).append(user)
            results[name].setdefault("sys_us", []).append(system)
        if args.cpu_only:
            continue
        print(f"round {round_ + 1}: CPU per keep-alive request (paired) ...", file=sys.stderr)
        for name, (user, system) in cpu_per_connection(proxies, args.seconds, load_cpu, round_,
                                                       close=False).items():
            results[name].setdefault("ka_cpu_us_per_req", []).append(user + system)
        turn = proxies[round_ % len(proxies):] + proxies[:round_ % len(proxies)]
        print(f"round {round_ + 1}: keep-alive ...", file=sys.stderr)
        for proxy in turn:
            results[proxy.name].setdefault("keepalive_rps", []).append(
                keepalive(proxy, args.seconds, load_cpu))
    if args.cpu_only or args.ka_only or args.bulk_only:
        return results
    print("bulk ...", file=sys.stderr)
    for proxy in proxies:
        results[proxy.name]["bulk_gbps"] = [bulk(proxy, args.seconds, load_cpu)]
    if not args.skip_redis:
        print("redis-benchmark ...", file=sys.stderr)
        for proxy in proxies:
            sets, gets, cpu = redis(proxy, args.redis_requests, load_cpu)
            results[proxy.name]["redis_set_rps"] = [sets]
            results[proxy.name]["redis_get_rps"] = [gets]
            results[proxy.name]["redis_cpu_us_per_req"] = [cpu]
    if not args.skip_idle:
        for proxy in proxies:
            print(f"idle memory {proxy.name} ...", file=sys.stderr)
            results[proxy.name]["kib_per_idle_conn"] = [idle_memory(proxy, args.idle)]
    return results


COLUMNS = ["cpu_us_per_conn", "ka_cpu_us_per_req", "keepalive_rps", "bulk_gbps",
           "bulk_cpu_us_per_mib",
           "redis_set_rps", "redis_get_rps", "redis_cpu_us_per_req", "kib_per_idle_conn"]
# Ratios read "as good as HAProxy" at 1.0 and better above, whichever way a column runs.
LOWER_IS_BETTER = {"cpu_us_per_conn", "ka_cpu_us_per_req", "kib_per_idle_conn",
                   "redis_cpu_us_per_req", "bulk_cpu_us_per_mib"}
# Measured on every proxy at once, round by round: the ratio is the median of the rounds' ratios.
PAIRED = {"cpu_us_per_conn", "ka_cpu_us_per_req", "bulk_cpu_us_per_mib"}


def ratio(column: str, ours: list[float], haproxy: list[float], paired: bool = False) -> float:
    if column in PAIRED or (paired and len(ours) == len(haproxy)):  # per round, then median
        pairs = zip(haproxy, ours, strict=True)
        if column in LOWER_IS_BETTER:
            return statistics.median(h / v for h, v in pairs if v)
        return statistics.median(v / h for h, v in pairs if h)
    v, ref = statistics.median(ours), statistics.median(haproxy)
    if not ref or not v:
        return float("nan")
    return ref / v if column in LOWER_IS_BETTER else v / ref


def report(results: dict[str, dict[str, list[float]]], args: argparse.Namespace) -> None:
    base = results["haproxy"]
    columns = [c for c in COLUMNS if c in base]
    print("\n| | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for name, r in results.items():
        cells = []
        for c in columns:
            if c not in r:
                cells.append("-")
                continue
            v = statistics.median(r[c])
            if name == "haproxy" or c not in base:
                cells.append(f"{v:.2f}")
            else:
                cells.append(f"{v:.2f} ({ratio(c, r[c], base[c], args.bulk_only):.2f}x)")
        print(f"| {name} | " + " | ".join(cells) + " |")
    paired = ("bulk_cpu_us_per_mib" if args.bulk_only
              else "ka_cpu_us_per_req" if args.ka_only else "cpu_us_per_conn")
    print(f"\nmedians of {args.rounds} rounds; ratios vs HAProxy 2.6 nbthread 1, higher is better "
          f"(CPU and memory: HAProxy's / ours). Paired CPU rounds (per round, {paired}):")
    for name, r in results.items():
        print(f"  {name:14} " + ", ".join(f"{v:.1f}" for v in r[paired])
              + f"   (median user {statistics.median(r['user_us']):.1f}, "
              f"system {statistics.median(r['sys_us']):.1f}; ratio per round "
              + ", ".join(f"{h / v:.2f}" for h, v in zip(results["haproxy"][paired],
                                                          r[paired], strict=True))
              + ")")


if __name__ == "__main__":
    main()
