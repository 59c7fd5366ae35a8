"""TCP through pointsman versus straight to the backend: requests/s, connections/s, Gbit/s.

Run from the repository root:  python3 bench/tcp_bench.py [--seconds 5] [--rounds 3]

Measures, in one run and on the same backends:
- HTTP keep-alive requests/s: `wrk -c64 -t1` against nginx serving a small fixed response;
- new connections/s: the same with `Connection: close` (one TCP connection per request);
- bulk Gbit/s: `iperf3 -c` with one stream against an iperf3 server.
Each is measured direct and through `pointsman run` (uvloop, one listener per backend); direct and
proxied alternate from round to round and the median is reported, with the ratio proxied/direct,
because runs on a small VM vary by 10-15%.

With two or more CPUs, pointsman gets CPU 1 to itself; the load generator and the backends share
CPU 0, in both the direct and the proxied runs, so the ratio says what the proxy's own core
delivers against what client and backend do without it.

Bounded: each measurement lasts `--seconds`, every start-up wait has a deadline, and every process
started here is stopped at the end (SIGTERM, then SIGKILL). Loopback only. Needs wrk, nginx and
iperf3 on PATH (Debian packages).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
START_DEADLINE = 10.0
STOP_DEADLINE = 10.0
WRK_CONNECTIONS = 64
BODY = "pointsman bench: a small static response\n"  # 41 bytes, like a health endpoint

NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen {host}:{port} backlog=4096;
        location / {{
            default_type text/plain;
            return 200 "{body}";
        }}
    }}
}}
"""

POINTSMAN_CONF = """\
listeners:
  - name: http
    bind: "{host}:{http_listen}"
    pool: nginx
    backlog: 4096
  - name: bulk
    bind: "{host}:{bulk_listen}"
    pool: iperf3
pools:
  - name: nginx
    backends:
      - address: "{host}:{nginx}"
  - name: iperf3
    backends:
      - address: "{host}:{iperf3}"
shutdown_grace: 1s
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    """Poll connects until `port` accepts; fail if `proc` dies or after START_DEADLINE."""
    deadline = time.monotonic() + START_DEADLINE
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.2):
            return
        time.sleep(0.02)
    raise RuntimeError(f"{what} not listening on {port} after {START_DEADLINE}s")


# --- CPU placement ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    load: list[str]  # prefix for the load generator and the backends
    proxy: list[str]  # prefix for pointsman

    @property
    def description(self) -> str:
        if not self.proxy:
            return "not pinned (fewer than 2 CPUs or no taskset)"
        return "load generator + backends on CPU 0, pointsman on CPU 1"


def placement() -> Placement:
    cpus = sorted(os.sched_getaffinity(0))
    taskset = shutil.which("taskset")
    if len(cpus) < 2 or taskset is None:
        return Placement([], [])
    return Placement([taskset, "-c", str(cpus[0])], [taskset, "-c", str(cpus[1])])


# --- processes ----------------------------------------------------------------------------------


class Processes:
    """Every process this script starts, stopped in reverse order at the end."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.started: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
        log = (self.logdir / f"{name}.log").open("wb")
        kwargs.setdefault("stdout", log)
        proc = subprocess.Popen(argv, stderr=log, **kwargs)  # type: ignore[call-overload]
        log.close()
        self.started.append((name, proc))
        return proc

    def log(self, name: str) -> str:
        return (self.logdir / f"{name}.log").read_text(errors="replace")[-2000:]

    def stop_all(self) -> None:
        for _, proc in reversed(self.started):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _, proc in reversed(self.started):
            try:
                proc.wait(timeout=STOP_DEADLINE)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@dataclass
class Ports:
    nginx: int
    iperf3: int
    http_listen: int
    bulk_listen: int


def start_nginx(procs: Processes, tmp: Path, port: int, pin: list[str]) -> None:
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp, host=HOST, port=port, body=BODY.replace("\n", "\\n")))
    argv = [*pin, "nginx", "-p", str(tmp), "-e", str(tmp / "nginx-error.log"), "-c", str(conf)]
    proc = procs.start("nginx", argv)
    wait_port(port, proc, "nginx")


def wait_output(proc: subprocess.Popen[bytes], needle: bytes, count: int, what: str) -> None:
    """Read `proc`'s stdout until `needle` appeared `count` times; fail on exit or deadline."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + START_DEADLINE
    seen = b""
    while seen.count(needle) < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RuntimeError(f"{what} not ready after {START_DEADLINE}s: {seen!r}")
        if select.select([fd], [], [], remaining)[0]:
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError(f"{what} exited before it was ready: {seen!r}")
            seen += chunk


def start_iperf3(procs: Processes, port: int, pin: list[str]) -> None:
    # Readiness from its own "Server listening" line: a probe connection would look like a
    # broken client to iperf3. Its stdout stays a pipe nobody reads afterwards; iperf3 prints a
    # few lines per test, far under the 64 KiB a pipe holds.
    proc = procs.start(
        "iperf3-server",
        [*pin, "iperf3", "-s", "-B", HOST, "-p", str(port), "--forceflush"],
        stdout=subprocess.PIPE,
    )
    wait_output(proc, b"Server listening", 1, "iperf3 server")


def start_pointsman(procs: Processes, tmp: Path, ports: Ports, pin: list[str]) -> None:
    conf = tmp / "pointsman.yaml"
    conf.write_text(
        POINTSMAN_CONF.format(
            host=HOST,
            http_listen=ports.http_listen,
            bulk_listen=ports.bulk_listen,
            nginx=ports.nginx,
            iperf3=ports.iperf3,
        )
    )
    argv = [*pin, sys.executable, "-m", "pointsman", "run", str(conf), "--log-level", "warning"]
    proc = procs.start("pointsman", argv, cwd=ROOT, stdout=subprocess.PIPE)
    try:
        wait_output(proc, b"listening ", 2, "pointsman")  # one line per listener, once bound
    except RuntimeError as exc:
        raise RuntimeError(f"{exc}\n{procs.log('pointsman')}") from None


# --- measurements -------------------------------------------------------------------------------


class BenchError(RuntimeError):
    pass


def wrk(port: int, seconds: int, pin: list[str], close: bool) -> float:
    """Requests/s from wrk; any socket error or non-2xx response fails the measurement."""
    argv = [*pin, "wrk", f"-c{WRK_CONNECTIONS}", "-t1", f"-d{seconds}s", "--timeout", "2s"]
    if close:
        argv += ["-H", "Connection: close"]
    argv.append(f"http://{HOST}:{port}/")
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 20, check=True).stdout
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if match is None:
        raise BenchError(f"no Requests/sec in wrk output:\n{out}")
    if "Non-2xx" in out:
        raise BenchError(f"wrk got error responses:\n{out}")
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    # With Connection: close, wrk counts the server's normal close as a "read" error on some
    # versions; connects, writes and timeouts are real failures.
    if errors and (int(errors[1]) or int(errors[3]) or int(errors[4])):
        raise BenchError(f"wrk socket errors:\n{out}")
    return float(match[1])


def iperf3(port: int, seconds: int, pin: list[str]) -> float:
    """Gbit/s received by the server over one stream."""
    argv = [*pin, "iperf3", "-c", HOST, "-p", str(port), "-t", str(seconds), "-J"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 20, check=False)
    report = json.loads(result.stdout)
    if "error" in report:
        raise BenchError(f"iperf3: {report['error']}")
    return float(report["end"]["sum_received"]["bits_per_second"]) / 1e9


@dataclass
class Metric:
    name: str
    unit_format: str
    measure: Callable[[int], float]  # port -> value
    direct_port: int
    proxied_port: int
    direct: list[float]
    proxied: list[float]


def run(seconds: int, rounds: int) -> int:
    for tool in ("wrk", "nginx", "iperf3"):
        if shutil.which(tool) is None:
            print(f"{tool} not found on PATH (apt-get install {tool})", file=sys.stderr)
            return 2
    place = placement()
    with tempfile.TemporaryDirectory(prefix="pointsman-bench-") as tmpname:
        tmp = Path(tmpname)
        procs = Processes(tmp)
        ports = Ports(free_port(), free_port(), free_port(), free_port())
        try:
            start_nginx(procs, tmp, ports.nginx, place.load)
            start_iperf3(procs, ports.iperf3, place.load)
            start_pointsman(procs, tmp, ports, place.proxy)
            metrics = [
                Metric(
                    "HTTP keep-alive requests/s",
                    "{:,.0f}",
                    lambda port: wrk(port, seconds, place.load, close=False),
                    ports.nginx,
                    ports.http_listen,
                    [],
                    [],
                ),
                Metric(
                    "new connections/s",
                    "{:,.0f}",
                    lambda port: wrk(port, seconds, place.load, close=True),
                    ports.nginx,
                    ports.http_listen,
                    [],
                    [],
                ),
                Metric(
                    "bulk Gbit/s (1 stream)",
                    "{:.2f}",
                    lambda port: iperf3(port, seconds, place.load),
                    ports.iperf3,
                    ports.bulk_listen,
                    [],
                    [],
                ),
            ]
            for round_no in range(rounds):
                for metric in metrics:
                    order = [("direct", metric.direct_port), ("pointsman", metric.proxied_port)]
                    if round_no % 2:
                        order.reverse()
                    for label, port in order:
                        value = metric.measure(port)
                        (metric.direct if label == "direct" else metric.proxied).append(value)
                        print(
                            f"round {round_no + 1}/{rounds}  {metric.name:<28} {label:<9} "
                            f"{metric.unit_format.format(value)}",
                            file=sys.stderr,
                            flush=True,
                        )
        except (BenchError, RuntimeError, subprocess.SubprocessError) as exc:
            print(f"bench failed: {exc}", file=sys.stderr)
            return 1
        finally:
            procs.stop_all()
    print_table(metrics, place, seconds, rounds)
    return 0


def print_table(metrics: list[Metric], place: Placement, seconds: int, rounds: int) -> None:
    print(
        f"\npointsman TCP bench: {place.description}; uvloop; {seconds}s per measurement; "
        f"median of {rounds} round{'s' if rounds != 1 else ''}, direct/proxied order alternating"
    )
    print(f"{'metric':<28} {'direct':>12} {'pointsman':>12} {'ratio':>7}")
    for m in metrics:
        direct, proxied = statistics.median(m.direct), statistics.median(m.proxied)
        print(
            f"{m.name:<28} {m.unit_format.format(direct):>12} "
            f"{m.unit_format.format(proxied):>12} {proxied / direct:>7.2f}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5, help="length of each measurement")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, order alternating")
    args = parser.parse_args()
    if not 1 <= args.seconds <= 60 or not 1 <= args.rounds <= 10:
        parser.error("--seconds must be 1-60 and --rounds 1-10")
    return run(args.seconds, args.rounds)


if __name__ == "__main__":
    sys.exit(main())
