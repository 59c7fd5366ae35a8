"""UDP datagrams/s and Mbit/s through pointsman versus straight to the echo backend.

Run from the repository root:  python3 bench/udp_bench.py [--seconds 2] [--repeat 3]

Three processes on loopback: a plain-socket UDP echo backend, `pointsman run` (uvloop, one UDP
listener in front of that one backend), and this process as the load generator. Each case keeps a
fixed number of datagrams in flight per client socket (a closed loop), counts the replies for a
fixed time, then does the same straight to the echo backend; direct and proxied alternate and the
median of the repeats is reported, because runs on a small VM vary by 10-15%.

With two or more CPUs, pointsman gets CPU 1 to itself and the load generator and the echo share
CPU 0, in both the direct and the proxied runs: the ratio then says what the proxy's own core
delivers against what the client and backend can do without it.

`--paired`: CPU per datagram against nginx stream UDP, the two proxies (and with `--before DIR`
a second pointsman from another tree, e.g. the commit before a change) loaded at the same time,
each by its own load generator process in front of its own echo backend. For every proxy the
user + system CPU of its whole process tree (from /proc) is divided by the datagrams it echoed
in the same window; rounds are repeated and the median reported, next to the datagrams/s each
proxy carried in that window. Then each proxy alone, in turn (as bench/compare.py measures
throughput): datagrams/s and the ratio to nginx. On a shared machine only the paired ratios
mean much.

Bounded: every case runs for `--seconds` (plus a short warm-up), every wait has a deadline, and
all the processes started here are stopped at the end. Loopback only.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
START_DEADLINE = 30.0  # a loaded 2-core VM starts two workers slowly
WARMUP = 0.3
# A socket with datagrams in flight and no reply for this long lost them (full receive buffer
# somewhere on the way): it counts them as lost and sends a fresh window.
STALL = 0.2
RECV_SIZE = 65535

# (client sockets, datagrams in flight per socket, payload bytes). In flight stays at or under 64
# datagrams, which the default 208 KiB receive buffers hold even at 1400 bytes (92 fit), so loss
# measures the proxy, not buffer sizing.
CASES = [
    (1, 32, 64),
    (1, 32, 1400),
    (64, 1, 64),
    (64, 1, 1400),
]


# --- the echo backend (a child process) -------------------------------------------------------


def serve_echo(port: int) -> None:
    """Echo every datagram to its sender; blocking, one socket: the cheapest backend there is."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind((HOST, port))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print("ready", flush=True)
    recvfrom, sendto = sock.recvfrom, sock.sendto
    while True:
        data, addr = recvfrom(RECV_SIZE)
        sendto(data, addr)


# --- processes -----------------------------------------------------------------------------------


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_line(proc: subprocess.Popen[bytes], prefix: str, what: str) -> None:
    """Read the child's stdout until a line starts with `prefix`; fail on exit or deadline."""
    assert proc.stdout is not None
    deadline = time.monotonic() + START_DEADLINE
    pending = b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise SystemExit(f"{what} not ready after {START_DEADLINE}s")
        ready, _, _ = select.select([proc.stdout], [], [], remaining)
        if not ready:
            continue
        chunk = os.read(proc.stdout.fileno(), 4096)
        if not chunk:
            raise SystemExit(f"{what} exited with {proc.wait()} before it was ready")
        pending += chunk
        if any(line.startswith(prefix.encode()) for line in pending.split(b"\n")):
            return


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- the load generator ---------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far (from /proc, in clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Result:
    datagrams: int
    seconds: float
    size: int
    lost: int
    cpu: float = 0.0  # CPU seconds the proxy used during the measured time

    @property
    def cpu_us(self) -> float:
        """The proxy's CPU time per datagram echoed (each one crosses it twice)."""
        return self.cpu / self.datagrams * 1e6 if self.datagrams else 0.0

    @property
    def busy(self) -> float:
        return self.cpu / self.seconds

    @property
    def rate(self) -> float:
        return self.datagrams / self.seconds

    @property
    def mbits(self) -> float:
        return self.datagrams * self.size * 8 / self.seconds / 1e6


def receive_each(sock: socket.socket, size: int) -> int:
    """Read until the socket would block; how many datagrams had the right length."""
    got = 0
    while True:
        try:
            data = sock.recv(RECV_SIZE)
        except BlockingIOError:
            return got
        if len(data) == size:
            got += 1


def send_each(sock: socket.socket, payload: bytes, count: int) -> None:
    for _ in range(count):
        sock.send(payload)


def batch_io() -> tuple[Callable[[socket.socket, int], int],
                        Callable[[socket.socket, bytes, int], None]]:
    """recvmmsg/sendmmsg from the compiled engine when it is built (a cheaper load generator
    leaves more of the machine to the proxies), else a recv/send loop."""
    try:
        from pointsman.proxy.engine._engine import recv_batch, send_batch
    except ImportError:
        return receive_each, send_each

    def receive(sock: socket.socket, size: int) -> int:
        got = 0
        while batch := recv_batch(sock, 64, RECV_SIZE):
            got += sum(1 for data, _ in batch if len(data) == size)
            if len(batch) < 64:
                break
        return got

    def send(sock: socket.socket, payload: bytes, count: int) -> None:
        if count:
            send_batch(sock, [(payload, None)] * count)

    return receive, send


def load(target: tuple[str, int], sockets: int, window: int, size: int, seconds: float,
         proxy_pid: int | None = None) -> Result:
    """Keep `window` datagrams in flight on each of `sockets` sockets for `seconds`; count replies
    whose length is right (the echo returns exactly what was sent)."""
    payload = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    receive, send = batch_io()
    socks = []
    for _ in range(sockets):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((HOST, 0))
        sock.connect(target)
        sock.setblocking(False)
        socks.append(sock)
    by_fd = {s.fileno(): s for s in socks}
    last_reply = dict.fromkeys(by_fd, time.monotonic())
    poller = select.epoll()
    for fd in by_fd:
        poller.register(fd, select.EPOLLIN)
    counted = lost = 0
    elapsed = cpu = 0.0
    try:
        for sock in socks:
            for _ in range(window):
                sock.send(payload)
        for phase_seconds, counting in ((WARMUP, False), (seconds, True)):
            received = 0
            cpu_start = cpu_seconds(proxy_pid) if proxy_pid else 0.0
            start = time.monotonic()
            end = start + phase_seconds
            next_stall_check = start + STALL
            while (now := time.monotonic()) < end:
                for fd, _ in poller.poll(min(end - now, STALL)):
                    sock = by_fd[fd]
                    try:
                        got = receive(sock, size)
                    except ConnectionRefusedError:
                        raise SystemExit(f"{target} refused: is the backend up?") from None
                    received += got
                    send(sock, payload, got)  # closed loop: one new datagram per reply
                    if got:
                        last_reply[fd] = now
                if now >= next_stall_check:
                    next_stall_check = now + STALL
                    for fd, sock in by_fd.items():
                        if now - last_reply[fd] > STALL:  # its window was lost: send a new one
                            lost += window if counting else 0
                            for _ in range(window):
                                sock.send(payload)
                            last_reply[fd] = now
            if counting:
                counted = received
                elapsed = time.monotonic() - start
                cpu = cpu_seconds(proxy_pid) - cpu_start if proxy_pid else 0.0
    finally:
        poller.close()
        for sock in socks:
            sock.close()
    return Result(counted, elapsed, size, lost, cpu)


# --- main -------------------------------------------------------------------------------------------


def pointsman_config(lb_port: int, echo_port: int) -> str:
    return (
        "listeners:\n"
        f"  - {{name: u, bind: \"{HOST}:{lb_port}\", protocol: udp, pool: p}}\n"
        "pools:\n"
        f"  - {{name: p, backends: [{{address: \"{HOST}:{echo_port}\"}}]}}\n"
        "shutdown_grace: 1s\n"
    )


NGINX_STREAM = "/usr/lib/nginx/modules/ngx_stream_module.so"
# --paired cases: (client sockets, datagrams in flight each, payload bytes)
PAIRED_CASES = [(16, 8, 64), (16, 8, 1400)]


@dataclass
class Proxy:
    name: str
    port: int
    proc: subprocess.Popen[bytes]

    def cpu(self) -> float:
        """CPU seconds of the proxy and every process under it (workers)."""
        return sum(cpu_seconds(pid) for pid in tree_pids(self.proc.pid))


def tree_pids(pid: int) -> list[int]:
    out = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return out
    for child in children:
        out.extend(tree_pids(int(child)))
    return out


def start_echo(procs: list[subprocess.Popen[bytes]]) -> int:
    port = free_udp_port()
    echo = subprocess.Popen([sys.executable, __file__, "--echo", str(port)], stdout=subprocess.PIPE)
    procs.append(echo)
    wait_line(echo, "ready", "echo backend")
    return port


def start_nginx(procs: list[subprocess.Popen[bytes]], work: Path, workers: int) -> Proxy:
    echo, port = start_echo(procs), free_udp_port()
    conf = work / "nginx.conf"
    conf.write_text(
        f"load_module {NGINX_STREAM};\nworker_processes {workers};\ndaemon off;\n"
        f"pid {work}/nginx.pid;\nerror_log stderr crit;\nevents {{ worker_connections 4096; }}\n"
        f"stream {{ server {{ listen {HOST}:{port} udp reuseport; proxy_pass {HOST}:{echo}; "
        "proxy_timeout 5s; } }\n")
    proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(work)], stdout=subprocess.PIPE)
    procs.append(proc)
    deadline = time.monotonic() + START_DEADLINE
    while len(tree_pids(proc.pid)) < workers + 1:  # the master and its workers
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("nginx did not start")
        time.sleep(0.05)
    return Proxy("nginx", port, proc)


def start_pointsman(procs: list[subprocess.Popen[bytes]], work: Path, workers: int, name: str,
                    tree: Path) -> Proxy:
    echo, port = start_echo(procs), free_udp_port()
    config = work / f"{name}.yaml"
    config.write_text(f"workers: {workers}\n" + pointsman_config(port, echo))
    env = {**os.environ, "PYTHONPATH": str(tree), "POINTSMAN_WORKERS": str(workers)}
    with (work / f"{name}.stderr").open("wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "pointsman", "run", str(config),
                                 "--log-level", "warning"], stdout=subprocess.PIPE,
                                stderr=stderr, cwd=tree, env=env)
    procs.append(proc)
    wait_line(proc, "listening udp", name)
    return Proxy(name, port, proc)


def alone_rates(proxies: list[Proxy], sockets: int, window: int, size: int,
                seconds: float) -> dict[str, float]:
    """Datagrams/s of each proxy loaded on its own, one after the other."""
    return {p.name: paired_round([p], sockets, window, size, seconds)[p.name][0] for p in proxies}


def paired_round(proxies: list[Proxy], sockets: int, window: int, size: int,
                 seconds: float) -> dict[str, tuple[float, float]]:
    """Load every proxy at once; per proxy (datagrams/s, CPU us per datagram)."""
    loaders = [subprocess.Popen([sys.executable, __file__, "--load", str(p.port), str(sockets),
                                 str(window), str(size), str(seconds)], stdout=subprocess.PIPE)
               for p in proxies]
    time.sleep(WARMUP)  # the loaders' warm-up: CPU counts from their measured window on
    before = [p.cpu() for p in proxies]
    time.sleep(seconds)
    used = [p.cpu() - b for p, b in zip(proxies, before, strict=True)]
    out = {}
    for proxy, loader, cpu in zip(proxies, loaders, used, strict=True):
        text, _ = loader.communicate(timeout=seconds + START_DEADLINE)
        datagrams = int(text.split()[0])
        out[proxy.name] = (datagrams / seconds, cpu / datagrams * 1e6 if datagrams else 0.0)
    return out


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def paired(args: argparse.Namespace) -> None:
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="udp_paired") as tmp:
        work = Path(tmp)
        try:
            proxies = [start_nginx(procs, work, args.workers),
                       start_pointsman(procs, work, args.workers, "pointsman", ROOT)]
            if args.before is not None:
                proxies.append(start_pointsman(procs, work, args.workers, "before",
                                               args.before.resolve()))
            print(f"# paired, workers {args.workers}, {os.cpu_count()} CPUs (shared machine), "
                  f"load {os.getloadavg()[0]:.2f}; {args.seconds:.1f}s x {args.repeat} rounds, "
                  "medians; ratio = nginx CPU per datagram / ours (> 1: we use less), "
                  "rate = our datagrams/s / nginx's in the same window")
            for sockets, window, size in PAIRED_CASES:
                rounds = [paired_round(proxies, sockets, window, size, args.seconds)
                          for _ in range(args.repeat)]
                parts = []
                for proxy in proxies:
                    cpu = median([r[proxy.name][1] for r in rounds])
                    rate = median([r[proxy.name][0] for r in rounds])
                    text = f"{proxy.name} {rate:,.0f}/s {cpu:.1f} us"
                    if proxy.name != "nginx":
                        cpu_ratio = median([r["nginx"][1] / r[proxy.name][1] for r in rounds])
                        rate_ratio = median([r[proxy.name][0] / r["nginx"][0] for r in rounds])
                        text += f" (CPU ratio {cpu_ratio:.2f}x, rate {rate_ratio:.2f}x)"
                    parts.append(text)
                print(f"{sockets}x{window} {size:>4} B: " + "; ".join(parts), flush=True)
                alone = [alone_rates(proxies, sockets, window, size, args.seconds)
                         for _ in range(args.repeat)]
                parts = [f"{p.name} {median([a[p.name] for a in alone]):,.0f}/s"
                         + ("" if p.name == "nginx" else
                            f" ({median([a[p.name] / a['nginx'] for a in alone]):.2f}x)")
                         for p in proxies]
                print(f"{sockets}x{window} {size:>4} B alone: " + "; ".join(parts), flush=True)
        finally:
            for proc in reversed(procs):
                stop(proc)


def median_result(results: list[Result]) -> Result:
    return sorted(results, key=lambda r: r.rate)[len(results) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="measured time per run")
    parser.add_argument("--repeat", type=int, default=3, help="runs per case; the median counts")
    parser.add_argument("--no-pin", action="store_true", help="leave CPU placement to the kernel")
    parser.add_argument("--paired", action="store_true",
                        help="CPU per datagram against nginx stream UDP, loaded at the same time")
    parser.add_argument("--workers", type=int, default=1, help="--paired: workers of each proxy")
    parser.add_argument("--before", type=Path,
                        help="--paired: also run pointsman from this tree (DIR/pointsman)")
    parser.add_argument("--echo", type=int, help=argparse.SUPPRESS)  # child mode
    parser.add_argument("--load", type=float, nargs=5, help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args()
    if args.echo is not None:
        serve_echo(args.echo)
        return
    if args.load is not None:
        port, sockets, window, size, seconds = args.load
        result = load((HOST, int(port)), int(sockets), int(window), int(size), seconds)
        print(result.datagrams, result.lost, flush=True)
        return
    if args.paired:
        paired(args)
        return

    echo_port, lb_port = free_udp_port(), free_udp_port()
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="udp_bench") as tmp:
        config = Path(tmp) / "pointsman.yaml"
        config.write_text(pointsman_config(lb_port, echo_port))
        try:
            echo = subprocess.Popen([sys.executable, __file__, "--echo", str(echo_port)],
                                    stdout=subprocess.PIPE)
            procs.append(echo)
            wait_line(echo, "ready", "echo backend")
            with (Path(tmp) / "pointsman.stderr").open("wb") as stderr:
                lb = subprocess.Popen(
                    [sys.executable, "-m", "pointsman", "run", str(config),
                     "--log-level", "warning"],
                    stdout=subprocess.PIPE, stderr=stderr, cwd=ROOT,
                )
            procs.append(lb)
            wait_line(lb, "listening udp", "pointsman")
            pinned = not args.no_pin and (os.cpu_count() or 1) >= 2
            if pinned:
                os.sched_setaffinity(0, {0})
                os.sched_setaffinity(echo.pid, {0})
                os.sched_setaffinity(lb.pid, {1})
            report(args.seconds, args.repeat, (HOST, echo_port), (HOST, lb_port), lb.pid, pinned)
        finally:
            for proc in reversed(procs):
                stop(proc)
            errors = Path(tmp) / "pointsman.stderr"
            if errors.exists() and (text := errors.read_text(errors="replace")).strip():
                print(f"# pointsman stderr:\n{text}", file=sys.stderr)


def report(seconds: float, repeat: int, direct: tuple[str, int], proxied: tuple[str, int],
           proxy_pid: int, pinned: bool) -> None:
    pinning = "pointsman on CPU 1, client and echo on CPU 0" if pinned else "no pinning"
    print(f"# {os.cpu_count()} CPUs; {pinning}; load average {os.getloadavg()[0]:.2f} at start")
    print(f"# {seconds:.1f}s per run, median of {repeat}; Mbit/s = echoed payload, one way;")
    print("# pointsman CPU = its CPU time per echoed datagram (request and reply) and its core's use")
    header = (f"{'case':<20} {'direct dgram/s':>15} {'pointsman dgram/s':>18} {'ratio':>6} "
              f"{'direct Mbit/s':>14} {'pointsman Mbit/s':>17} {'CPU us/dgram':>13} "
              f"{'CPU busy':>9} {'lost d/p':>9}")
    print(header)
    print("-" * len(header))
    for sockets, window, size in CASES:
        runs: dict[str, list[Result]] = {"direct": [], "proxied": []}
        for i in range(repeat):
            order = ["direct", "proxied"] if i % 2 == 0 else ["proxied", "direct"]
            for kind in order:
                if kind == "direct":
                    runs[kind].append(load(direct, sockets, window, size, seconds))
                else:
                    runs[kind].append(load(proxied, sockets, window, size, seconds, proxy_pid))
        d, p = median_result(runs["direct"]), median_result(runs["proxied"])
        name = f"{sockets} sock{'s' if sockets > 1 else ''} x{window}, {size} B"
        print(f"{name:<20} {d.rate:>15,.0f} {p.rate:>18,.0f} {p.rate / d.rate:>6.2f} "
              f"{d.mbits:>14,.1f} {p.mbits:>17,.1f} {p.cpu_us:>13.1f} {p.busy:>9.0%} "
              f"{f'{d.lost}/{p.lost}':>9}")


if __name__ == "__main__":
    main()
