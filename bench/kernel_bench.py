"""The kernel data plane's two NAT modes against routed direct (and HAProxy), in network namespaces.

Run as root from the repository root:  python3 bench/kernel_bench.py [--seconds 4] [--rounds 3]
                                        [--ways direct,conntrack,stateless,nft_bare,haproxy]

Namespaces (tests/netns/netns_support.py): client -- lb -- one backend. The backend runs nginx (one
worker, a 2-byte answer, keep-alive) and `iperf3 -s`, and routes its replies through the lb. Ways
through the lb namespace:

- direct: the client connects to the backend's own address; the lb only routes (no NAT, no table);
- conntrack: `pointsman run` with two `dataplane: kernel` listeners on a VIP (ports 80 and 5201),
  maglev, `nat: conntrack`, `snat: none`: nftables DNAT, conntrack, the counting chains;
- stateless: the same with `nat: stateless`: notrack both ways, the destination rewritten from
  the slot map and the source rewritten back on replies; no conntrack entry;
- tc: the same with `datapath: tc` (and `interfaces: [c0, b1]`): the stateless rewrite done by
  pointsman's tc BPF program instead of nftables;
- nft_bare: a reference, not pointsman: a hand-written table with only a DNAT rule to the backend
  (no counters, no guard, no slot map), to separate the cost of conntrack and NAT from the cost of
  pointsman's counting chains;
- nft_stateless_bare: the stateless floor, not pointsman: notrack and a constant rewrite each way
  (no slot map, no counters, no guard);
- tc_stateless: stateless NAT as a tc BPF program (pointsman/kernel/bpf/stateless.c, loaded by
  pointsman/kernel/tcbpf.py) at ingress of the lb's two interfaces, the slot map filled as
  pointsman fills the nft one (maglev, 4093 slots, source address and port): no nft table, no
  conntrack; packets to the VIP and the backend's replies are rewritten and sent straight to the
  egress interface;
- nft_ladder0 .. nft_ladder5: the stateless floor again, in an `inet` table, with pointsman's
  pieces added one per step (LADDER below; HTTP port only, so new connections only): the cost of
  each piece, read from `--perf`'s netfilter figures, not from one run's throughput;
- haproxy: HAProxy 2.6 in `mode tcp` (two threads) on the lb's own address, the same two ports;
- conntrack_base, stateless_base (with `--base-tree DIR`): conntrack and stateless with the
  pointsman package of another tree (say `git archive <commit> pointsman | tar -x -C DIR`), to
  compare two versions of the ruleset in the same run, round by round.

Both pointsman ways use `snat: none` (the backend routes replies through the lb), so they differ
only in the NAT mode. Per way: keep-alive requests/s (wrk, 64 connections), new connections/s (wrk,
32 connections, `Connection: close`), bulk Gbit/s (iperf3, one stream). wrk and the iperf3 client
run on CPU 0, nginx and the iperf3 server on CPU 1 (taskset); the kernel path and HAProxy float.
Rounds rotate the order of the ways and the medians are reported, because runs on a shared VM vary
by 10-15%: compare ratios within one run, never figures across runs.

Also measured: the slot map transaction alone (libnftables, in-process, in the lb namespace): a
4093-slot maglev map taking one of three backends out and back (diff updates) and a whole-map
replacement; with tc_stateless among the ways, the same changes as one batch of BPF map updates.

Bounded: every run lasts `--seconds`, every wait has a deadline, every process and namespace
started here is stopped or deleted at the end. Traffic stays inside the namespaces.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.netns.netns_support import (  # noqa: E402
    VIP,
    LbTopology,
    Netns,
    PointsmanInNetns,
    lb_topology,
    nftables_unavailable_reason,
)

HTTP_PORT = 80
BULK_PORT = 5201
READY_DEADLINE = 10.0
WAYS = ("direct", "conntrack", "stateless", "tc", "nft_bare", "nft_stateless_bare", "tc_stateless", "haproxy",
        "conntrack_base", "stateless_base", *(f"nft_ladder{k}" for k in range(6)))
BASE_TREE: Path | None = None
"""--base-tree: where the *_base ways import pointsman from."""
TESTS = ("keepalive_rps", "newconn_rps", "bulk_gbps")
UNITS = {"keepalive_rps": "request", "newconn_rps": "request", "bulk_gbps": "MB"}

NGINX_CONF = """
worker_processes 1;
worker_cpu_affinity 10;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/nginx.err;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path {dir};
    proxy_temp_path {dir};
    fastcgi_temp_path {dir};
    uwsgi_temp_path {dir};
    scgi_temp_path {dir};
    server {{
        listen {port} reuseport backlog=4096;
        location / {{ return 200 "ok"; }}
    }}
}}
"""

HAPROXY_CONF = """
global
    nbthread 2
    maxconn 8000
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend http
    bind {lb}:{http}
    default_backend web
frontend bulk
    bind {lb}:{bulk}
    default_backend bulk
backend web
    server b1 {backend}:{http}
backend bulk
    server b1 {backend}:{bulk}
"""


BARE_TABLE = (
    "add table ip bare\n"
    "add chain ip bare pre {{ type nat hook prerouting priority -100 ; }}\n"
    "add rule ip bare pre ip daddr {vip} tcp dport {{ {http}, {bulk} }} dnat to {backend}\n"
)


STATELESS_BARE_TABLE = (
    "add table ip sbare\n"
    "add chain ip sbare pre {{ type filter hook prerouting priority -300 ; }}\n"
    "add chain ip sbare post {{ type filter hook postrouting priority 100 ; }}\n"
    "add rule ip sbare pre ip daddr {vip} tcp dport {{ {http}, {bulk} }} notrack ip daddr set {backend}\n"
    "add rule ip sbare pre ip saddr {backend} tcp sport {{ {http}, {bulk} }} notrack\n"
    "add rule ip sbare post ip saddr {backend} tcp sport {{ {http}, {bulk} }} ip saddr set {vip}\n"
)


LADDER = ("inet bare: notrack and constants each way", "+ fib daddr type != local on replies",
          "+ named counters both ways", "+ jhash and a 4093-slot verdict map to the rewrite chain",
          "+ the VIP dispatch (port bitmap and address . protocol . port verdict map)",
          "+ replies by port bitmap, set and verdict map (pointsman's shape, one listener, no SYN test)")
"""nft_ladder<k>: the bare stateless table (step 0) plus pointsman's pieces one at a time, HTTP port
only, in an `inet` table like pointsman's: the cost of each piece is the difference of two steps
(perf's netfilter figure, `--perf`)."""


def ladder_table(step: int, vip: str, backend: str, port: int) -> str:
    """The nft text of ladder step `step` (LADDER)."""
    t = "inet ladder"
    count_in, count_out = (' counter name "cin"', ' counter name "cout"') if step >= 2 else ("", "")
    fib = " fib daddr type != local" if step >= 1 else ""
    slots = ", ".join(f"{i} : goto bsin" for i in range(4093))
    lines = [
        f"add table {t}",
        f"add chain {t} pre {{ type filter hook prerouting priority -300 ; }}",
        f"add chain {t} post {{ type filter hook postrouting priority 100 ; }}",
        f"add chain {t} bsin", f"add chain {t} brev", f"add chain {t} lsin",
        f"add counter {t} cin", f"add counter {t} cout",
        f"add set {t} ports {{ type inet_service ; }}", f"add element {t} ports {{ {port} }}",
        f"add map {t} vips4 {{ type ipv4_addr . inet_proto . inet_service : verdict ; }}",
        f"add element {t} vips4 {{ {vip} . tcp . {port} : goto lsin }}",
        f"add set {t} replies4 {{ type ipv4_addr . inet_proto . inet_service ; }}",
        f"add element {t} replies4 {{ {backend} . tcp . {port} }}",
        f"add map {t} rev4 {{ type ipv4_addr . inet_proto . inet_service : verdict ; }}",
        f"add element {t} rev4 {{ {backend} . tcp . {port} : goto brev }}",
        f"add map {t} slots {{ typeof numgen inc mod 2 : verdict ; }}",
        f"add element {t} slots {{ {slots} }}",
        f"add rule {t} bsin notrack ip daddr set {backend}{count_in} accept",
        f"add rule {t} brev{count_out} ip saddr set {vip}",
        f"add rule {t} lsin jhash ip saddr . tcp sport mod 4093 seed 0x706d616e vmap @slots",
    ]
    if step >= 4:
        lines.append(f"add rule {t} pre th dport @ports ip daddr . meta l4proto . th dport vmap @vips4")
    else:
        to = "lsin" if step >= 3 else "bsin"
        lines.append(f"add rule {t} pre ip daddr {vip} tcp dport {port} goto {to}")
    if step >= 5:
        lines += [f"add rule {t} pre th sport @ports ip saddr . meta l4proto . th sport @replies4{fib} "
                  "notrack accept",
                  f"add rule {t} post th sport @ports ip saddr . meta l4proto . th sport vmap @rev4"]
    else:
        lines += [f"add rule {t} pre ip saddr {backend} tcp sport {port}{fib} notrack accept",
                  f"add rule {t} post ip saddr {backend} tcp sport {port} goto brev"]
    return "\n".join(lines) + "\n"


def pointsman_config(backend: str, nat: str, datapath: str = "nftables") -> str:
    tc = ", datapath: tc, interfaces: [c0, b1]" if datapath == "tc" else ""
    kernel = f"{{nat: {nat}, snat: none{tc}}}"
    listeners = "".join(
        f"  - {{name: {name}, bind: '{VIP}:{port}', pool: {name}, dataplane: kernel, kernel: {kernel}}}\n"
        for name, port in (("web", HTTP_PORT), ("bulk", BULK_PORT)))
    pools = "".join(
        f"  - {{name: {name}, algorithm: maglev, hash_key: source_ip_port, "
        f"backends: [{{address: '{backend}:{port}', name: b1}}]}}\n"
        for name, port in (("web", HTTP_PORT), ("bulk", BULK_PORT)))
    return f"listeners:\n{listeners}pools:\n{pools}shutdown_grace: 1\n"


TC_SETUP = r'''
import sys
from pointsman.kernel import tcmaps
from pointsman.kernel.jhash import DEFAULT_SEED
from pointsman.kernel.plan import slot_targets
from pointsman.kernel.tcbpf import TcProgram, build_object
from pointsman.pool.snapshot import BackendView
from pointsman.pool.state import BackendState

vip, backend, interfaces, ports = sys.argv[1], sys.argv[2], sys.argv[3].split(","), sys.argv[4:]
program = TcProgram(build_object())
try:
    for listener, port in enumerate(int(p) for p in ports):
        views = [BackendView("b1", backend, port, 1, 1.0, BackendState.UP)]
        targets = slot_targets("maglev", views, 4093)
        base = listener * 4093
        for slot, value in enumerate(tcmaps.slot_values(targets, {(backend, port): listener})):
            program.write("slot_map", tcmaps.index_key(base + slot), value)
        program.write("replies", tcmaps.endpoint_key(backend, port, "tcp"),
                      tcmaps.reply_value(vip, port, listener))
        program.write("vips", tcmaps.endpoint_key(vip, port, "tcp"),
                      tcmaps.vip_value(base, 4093, DEFAULT_SEED, True, listener))
    for interface in interfaces:
        program.attach(interface)
    print("ready", flush=True)
    sys.stdin.read()
finally:
    program.close()
'''


def wait_port(ns: Netns, host: str, port: int) -> None:
    deadline = time.monotonic() + READY_DEADLINE
    while True:
        with ns.socket() as sock:
            sock.settimeout(1.0)
            if sock.connect_ex((host, port)) == 0:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{host}:{port} not listening after {READY_DEADLINE}s")
        time.sleep(0.05)


TICK = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime (fields 14 and 15)


def pids_where(test: Callable[[int, str, int], bool]) -> list[int]:
    """Processes for which test(pid, comm, ppid) holds."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm_part, rest = (entry / "stat").read_text().rsplit(")", 1)
        except OSError:
            continue
        comm = comm_part.split("(", 1)[1]
        if test(int(entry.name), comm, int(rest.split()[1])):
            found.append(int(entry.name))
    return found


class CpuMeter:
    """CPU seconds a measurement costs, whatever else runs on the machine: the load generator (a
    waited child: its rusage), the given processes (servers, a proxy) and the kernel's softirq
    threads. Without IRQ time accounting the kernel charges packet processing to the process it
    runs in (mostly the sender's) or to ksoftirqd, so the forwarding done in the lb namespace is
    in these figures."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids + pids_where(lambda pid, comm, ppid: comm.startswith("ksoftirqd/"))
        self.seconds = 0.0

    def _now(self) -> float:
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return children.ru_utime + children.ru_stime + sum(process_cpu(pid) for pid in self.pids)

    def __enter__(self) -> CpuMeter:
        self._start = self._now()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = self._now() - self._start


NETFILTER = re.compile(r"^(__)?(nf|nft|nf_ct|nf_nat)_|conntrack|^jhash|^tcp_in_window$|masquerade")
"""Kernel symbols of netfilter: nf_tables, conntrack, NAT (routing, fib_*, is not counted)."""
DATA_PATH = ("wrk", "nginx", "iperf3", "haproxy", "ksoftirqd/0", "ksoftirqd/1")


class Profile:
    """`perf record -a` around a measurement; `netfilter_share` is the fraction of the data path's
    samples (load generator, servers, proxy, softirq threads) spent in netfilter. A fraction of
    one run's own samples: it holds on a machine whose other tenants change the throughput."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.share = 0.0

    def __enter__(self) -> Profile:
        self._perf = subprocess.Popen(["perf", "record", "-a", "-F", "999", "-q", "-o", str(self.path)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.3)  # perf opens its events before the traffic starts (not a synchronisation)
        return self

    def __exit__(self, *exc: object) -> None:
        self._perf.send_signal(signal.SIGINT)
        self._perf.wait(timeout=60)
        report = subprocess.run(["perf", "report", "-i", str(self.path), "--comm", ",".join(DATA_PATH),
                                 "--no-children", "--sort", "sym", "--stdio", "-g", "none",
                                 "--percentage", "relative"], capture_output=True, text=True,
                                timeout=120, check=False).stdout
        total = netfilter = 0.0
        for line in report.splitlines():
            match = re.match(r"\s*([\d.]+)%\s+\[(k|\.)\]\s+(\S+)", line)
            if match:
                total += float(match.group(1))
                if match.group(2) == "k" and NETFILTER.search(match.group(3)):
                    netfilter += float(match.group(1))
        self.share = netfilter / total if total else 0.0
        self.path.unlink(missing_ok=True)


def wrk(topo: LbTopology, host: str, seconds: int, connections: int, close: bool) -> tuple[float, int]:
    """Requests/s and the number of requests."""
    args = ["taskset", "-c", "0", "wrk", "-t1", f"-c{connections}", f"-d{seconds}s"]
    if close:
        args += ["-H", "Connection: close"]
    out = topo.client.run(*args, f"http://{host}:{HTTP_PORT}/", timeout=seconds + 30)
    errors = re.search(r"Socket errors: (.*)", out)
    if errors:
        print(f"    wrk socket errors ({'close' if close else 'keep-alive'}): {errors.group(1)}")
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    if match is None or total is None:
        raise RuntimeError(f"no Requests/sec in wrk output:\n{out}")
    return float(match.group(1)), int(total.group(1))


def iperf(topo: LbTopology, host: str, seconds: int) -> tuple[float, int]:
    """Gbit/s and the gigabytes received (as an integer count of MB, for CPU per unit)."""
    out = topo.client.run("taskset", "-c", "0", "iperf3", "-c", host, "-p", str(BULK_PORT), "-t",
                          str(seconds), "-J", timeout=seconds + 30)
    received = json.loads(out)["end"]["sum_received"]
    return float(received["bits_per_second"]) / 1e9, max(int(received["bytes"]) // 1_000_000, 1)


@contextlib.contextmanager
def base_tree(wanted: bool) -> Iterator[None]:
    """Start processes (`python -m pointsman`) that import pointsman from BASE_TREE: `-m` puts
    the working directory first on the path, ahead of this tree's editable install."""
    if not wanted:
        yield
        return
    assert BASE_TREE is not None
    home, path = os.getcwd(), os.environ.get("PYTHONPATH")
    os.chdir(BASE_TREE)
    os.environ["PYTHONPATH"] = str(BASE_TREE)
    try:
        yield
    finally:
        os.chdir(home)
        if path is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = path


@contextlib.contextmanager
def way(name: str, topo: LbTopology, workdir: Path) -> Iterator[tuple[str, list[int]]]:
    """Set up one way through the lb; yields the address the client connects to and the processes
    that carry its traffic besides the servers (HAProxy)."""
    backend = topo.backend_ip(0)
    if name == "direct":
        yield backend, []
    elif name == "nft_bare":
        topo.lb.run("nft", BARE_TABLE.format(vip=VIP, backend=backend, http=HTTP_PORT, bulk=BULK_PORT))
        try:
            yield VIP, []
        finally:
            topo.lb.run("nft", "delete table ip bare")
            topo.lb.run("conntrack", "-F", check=False)
    elif name == "nft_stateless_bare":
        topo.lb.run("nft", STATELESS_BARE_TABLE.format(vip=VIP, backend=backend, http=HTTP_PORT,
                                                       bulk=BULK_PORT))
        try:
            yield VIP, []
        finally:
            topo.lb.run("nft", "delete table ip sbare")
    elif name == "tc_stateless":
        setup = topo.lb.popen(sys.executable, "-c", TC_SETUP, VIP, backend, "c0,b1", str(HTTP_PORT),
                              str(BULK_PORT), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            assert setup.stdout is not None and setup.stdin is not None
            line = setup.stdout.readline()
            if line.strip() != b"ready":
                raise RuntimeError(f"tc_stateless set-up failed (exit {setup.wait(timeout=10)})")
            yield VIP, []
        finally:
            if setup.stdin is not None:
                setup.stdin.close()
            setup.wait(timeout=10)
    elif name.startswith("nft_ladder"):
        (workdir / "ladder.nft").write_text(ladder_table(int(name.removeprefix("nft_ladder")), VIP, backend,
                                                         HTTP_PORT))
        topo.lb.run("nft", "-f", str(workdir / "ladder.nft"))
        try:
            yield VIP, []
        finally:
            topo.lb.run("nft", "delete table inet ladder")
    elif name in ("conntrack", "stateless", "tc", "conntrack_base", "stateless_base"):
        nat = "stateless" if name == "tc" else name.removesuffix("_base")
        text = pointsman_config(backend, nat, "tc" if name == "tc" else "nftables")
        with base_tree(name.endswith("_base")):
            proc = PointsmanInNetns(topo.lb, text, workdir, listeners=2)
        try:
            yield VIP, []
        finally:
            proc.stop()
            proc.close()
            topo.lb.run("conntrack", "-F", check=False)
    else:
        conf = workdir / "haproxy.cfg"
        conf.write_text(HAPROXY_CONF.format(lb=topo.lb_client_side, backend=backend, http=HTTP_PORT,
                                            bulk=BULK_PORT))
        log = (workdir / "haproxy.log").open("wb")
        haproxy = topo.lb.popen("haproxy", "-db", "-f", str(conf), stdout=log, stderr=log)
        try:
            if haproxy.poll() is None:
                wait_port(topo.lb, topo.lb_client_side, HTTP_PORT)
            else:
                raise RuntimeError(f"haproxy exited: {(workdir / 'haproxy.log').read_text()}")
            yield topo.lb_client_side, [haproxy.pid]
        finally:
            haproxy.terminate()
            haproxy.wait(timeout=10)
            log.close()


MAP_BENCH = r'''
import json, sys, time
from pointsman.kernel.nft import Nft
from pointsman.kernel.plan import ListenerSpec, slot_targets, slot_diff, target_of
from pointsman.kernel import ruleset
from pointsman.pool.snapshot import BackendView
from pointsman.pool.state import BackendState as S

def views(down):
    return [BackendView(f"b{i}", f"10.0.0.{i + 1}", 80, 1, 0.0 if i == down else 1.0,
                        S.DOWN if i == down else S.UP) for i in range(3)]
nft = Nft()
nft.text("add table inet pointsman\ndelete table inet pointsman\n")
out = {}
for nat in ("conntrack", "stateless"):
    spec = ListenerSpec("bench", "ip", "10.99.200.1", 80, "tcp", 4093, "maglev", "jhash", "source_ip",
                        False, nat=nat)
    current = slot_targets("maglev", views(None), 4093)
    index = {target_of(b): i for i, b in enumerate(views(None))}
    nft.text(ruleset.listener_text(spec, current, backends=index))
    diffs, full = [], []
    for k in range(40):
        new = slot_targets("maglev", views(None if k % 2 else 1), 4093)
        diff = slot_diff(current, new)
        started = time.perf_counter()
        nft.json(ruleset.slot_commands(spec, diff, index))
        diffs.append((time.perf_counter() - started, len(diff)))
        current = new
    for k in range(10):
        started = time.perf_counter()
        nft.json(ruleset.replace_slots_commands(spec, current, index))
        full.append(time.perf_counter() - started)
    nft.text("delete table inet pointsman\n")
    diffs.sort()
    full.sort()
    out[nat] = {"diff_ms": round(diffs[len(diffs) // 2][0] * 1e3, 1), "diff_slots": diffs[len(diffs) // 2][1],
                "diff_max_ms": round(diffs[-1][0] * 1e3, 1), "full_ms": round(full[len(full) // 2] * 1e3, 1)}
print(json.dumps(out))
'''


TC_MAP_BENCH = r'''
import json, statistics, time
from pointsman.kernel import tcmaps
from pointsman.kernel.plan import slot_targets
from pointsman.kernel.tcbpf import TcProgram, build_object
from pointsman.pool.snapshot import BackendView
from pointsman.pool.state import BackendState as S

def views(down):
    return [BackendView(f"b{i}", f"10.0.0.{i + 1}", 80, 1, 0.0 if i == down else 1.0,
                        S.DOWN if i == down else S.UP) for i in range(3)]
program = TcProgram(build_object())  # loaded, not attached: only its maps are used
index = {(f"10.0.0.{i + 1}", 80): i for i in range(3)}
current = tcmaps.slot_values(slot_targets("maglev", views(None), 4093), index)
keys = b"".join(tcmaps.index_key(i) for i in range(4093))
program.write_many("slot_map", keys, b"".join(current), 4093)
diffs, full = [], []
for k in range(40):
    new = tcmaps.slot_values(slot_targets("maglev", views(None if k % 2 else 1), 4093), index)
    changed = tcmaps.changed_slots(current, new)
    started = time.perf_counter()
    program.write_many("slot_map", b"".join(tcmaps.index_key(i) for i in changed),
                       b"".join(new[i] for i in changed), len(changed))
    diffs.append((time.perf_counter() - started, len(changed)))
    current = new
for k in range(10):
    started = time.perf_counter()
    program.write_many("slot_map", keys, b"".join(current), 4093)
    full.append(time.perf_counter() - started)
program.close()
diffs.sort()
middle = diffs[len(diffs) // 2]
print(json.dumps({"diff_ms": round(middle[0] * 1e3, 2), "diff_slots": middle[1],
                  "diff_max_ms": round(diffs[-1][0] * 1e3, 2),
                  "full_ms": round(statistics.median(full) * 1e3, 2)}))
'''
"""The tc data path's slot map update (BPF_MAP_UPDATE_BATCH of the changed slots), the same changes
as MAP_BENCH's."""


def tc_map_update_latency(topo: LbTopology) -> dict[str, object]:
    out = topo.lb.run(sys.executable, "-c", TC_MAP_BENCH, timeout=120)
    return dict(json.loads(out.strip().splitlines()[-1]))


def map_update_latency(topo: LbTopology) -> dict[str, object]:
    out = topo.lb.run(sys.executable, "-c", MAP_BENCH, timeout=120)
    return dict(json.loads(out.strip().splitlines()[-1]))


def run(seconds: int, rounds: int, ways: tuple[str, ...], profile: bool, tests: tuple[str, ...]) -> None:
    results: dict[str, dict[str, list[float]]] = {w: {t: [] for t in TESTS} for w in ways}
    cpu: dict[str, dict[str, list[float]]] = {w: {t: [] for t in TESTS} for w in ways}
    netfilter: dict[str, dict[str, list[float]]] = {w: {t: [] for t in TESTS} for w in ways}
    with lb_topology(backends=1) as topo, tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        node = topo.backends[0]
        (workdir / "nginx.conf").write_text(NGINX_CONF.format(dir=workdir, port=HTTP_PORT))
        nginx = node.popen("taskset", "-c", "1", "nginx", "-c", str(workdir / "nginx.conf"),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        iperf_server = node.popen("taskset", "-c", "1", "iperf3", "-s", "-p", str(BULK_PORT),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_port(node, topo.backend_ip(0), HTTP_PORT)
            wait_port(node, topo.backend_ip(0), BULK_PORT)
            servers = [nginx.pid, iperf_server.pid,
                       *pids_where(lambda pid, comm, ppid: ppid == nginx.pid)]
            print(f"map update (4093 slots, libnftables in-process): {map_update_latency(topo)}")
            if "tc_stateless" in ways:
                print("map update (4093 slots, tc: one batch of BPF map updates): "
                      f"{tc_map_update_latency(topo)}")
            for r in range(rounds):
                order = ways[r % len(ways):] + ways[:r % len(ways)]
                for name in order:
                    with way(name, topo, workdir) as (host, carriers):
                        measures: dict[str, Callable[[], tuple[float, int]]] = {
                            "keepalive_rps": lambda: wrk(topo, host, seconds, 64, close=False),
                            "newconn_rps": lambda: wrk(topo, host, seconds, 32, close=True),
                            "bulk_gbps": lambda: iperf(topo, host, seconds),
                        }
                        for test, measure in measures.items():
                            if test not in tests:
                                continue
                            perf = Profile(workdir / "perf.data")
                            with contextlib.ExitStack() as stack:
                                if profile:
                                    stack.enter_context(perf)
                                with CpuMeter(servers + carriers) as meter:
                                    value, units = measure()
                            results[name][test].append(value)
                            cpu[name][test].append(meter.seconds / units * 1e6)
                            netfilter[name][test].append(perf.share * 100)
                            print(f"  round {r + 1} {name:9} {test:14} {value:12.2f}   "
                                  f"{cpu[name][test][-1]:8.1f} us CPU per {UNITS[test]}"
                                  + (f"   netfilter {perf.share:6.1%}" if profile else ""), flush=True)
                    topo.lb.run("conntrack", "-F", check=False)
        finally:
            for proc in (nginx, iperf_server):
                proc.terminate()
                proc.wait(timeout=10)
    report(results, cpu, netfilter if profile else None, ways, tests)


RATIOS = (("conntrack", "direct"), ("stateless", "direct"), ("stateless", "conntrack"),
          ("conntrack_base", "direct"), ("stateless_base", "direct"), ("stateless", "stateless_base"),
          ("conntrack", "conntrack_base"),
          ("nft_stateless_bare", "direct"), ("stateless", "nft_stateless_bare"),
          ("tc", "direct"), ("tc", "stateless"), ("tc", "tc_stateless"),
          ("tc_stateless", "direct"), ("tc_stateless", "stateless"), ("tc_stateless", "nft_stateless_bare"),
          ("nft_bare", "direct"), ("conntrack", "nft_bare"), ("haproxy", "direct"),
          ("stateless", "haproxy"))


def report(results: dict[str, dict[str, list[float]]], cpu: dict[str, dict[str, list[float]]],
           netfilter: dict[str, dict[str, list[float]]] | None, ways: tuple[str, ...],
           tests: tuple[str, ...]) -> None:
    rounds = len(next(iter(results.values()))[tests[0]])
    print(f"\nthroughput, medians of {rounds} rounds (a shared machine: compare ratios within this "
          "run; ratios are medians of the per-round ratios)")
    table(results, ways, tests, higher_is_better=True)
    print(f"\nCPU per unit (us per request; us per MB for bulk: load generator, servers, proxy and "
          f"softirq threads), medians of {rounds} rounds; ratios are den/num (>1: cheaper than den)")
    table(cpu, ways, tests, higher_is_better=False)
    if netfilter is not None:
        print(f"\nnetfilter's share of the data path's CPU samples (perf), % , medians of {rounds} rounds")
        print(f"{'':20}" + "".join(f"{t:>16}" for t in tests))
        for w in ways:
            print(f"{w:20}" + "".join(f"{statistics.median(netfilter[w][t]):16.1f}" for t in tests))
        # The share times the round's CPU per unit: netfilter's own cost, which the other tenants
        # of a shared VM disturb far less than the whole (the TCP stack's CPU is ~90 % of it).
        cost = {w: {t: [share / 100 * c for share, c in zip(netfilter[w][t], cpu[w][t], strict=True)]
                    for t in TESTS} for w in ways}
        print(f"\nnetfilter CPU per unit (share x CPU per unit, us), medians of {rounds} rounds; "
              "ratios are den/num")
        table(cost, ways, tests, higher_is_better=False)


def table(values: dict[str, dict[str, list[float]]], ways: tuple[str, ...], tests: tuple[str, ...],
          higher_is_better: bool) -> None:
    print(f"{'':20}" + "".join(f"{t:>16}" for t in tests))
    for w in ways:
        print(f"{w:20}" + "".join(f"{statistics.median(values[w][t]):16.2f}" for t in tests))
    for num, den in RATIOS:
        if num in values and den in values:
            cells = []
            for t in tests:
                pairs = zip(values[num][t], values[den][t], strict=True)
                per_round = [a / b if higher_is_better else b / a for a, b in pairs
                             if (b if higher_is_better else a)]  # none for a way with no netfilter
                cells.append(f"{statistics.median(per_round):15.2f}x" if per_round else f"{'-':>16}")
            print(f"{num + '/' + den:20}" + "".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--perf", action="store_true",
                        help="profile each measurement (perf record -a): netfilter's share of the CPU")
    parser.add_argument("--tests", default=",".join(TESTS), help=f"comma-separated, from {', '.join(TESTS)}")
    parser.add_argument("--ways", default=",".join(w for w in WAYS if not w.endswith("_base")
                                                   and not w.startswith("nft_ladder")),
                        help=f"comma-separated, from {', '.join(WAYS)}")
    parser.add_argument("--base-tree", type=Path,
                        help="a directory holding another version's pointsman package, for the *_base ways")
    args = parser.parse_args()
    ways = tuple(w for w in args.ways.split(",") if w)
    global BASE_TREE
    BASE_TREE = args.base_tree.resolve() if args.base_tree is not None else None
    based = BASE_TREE is not None and (BASE_TREE / "pointsman").is_dir()
    if any(w.endswith("_base") for w in ways) and not based:
        sys.exit("kernel_bench: the *_base ways need --base-tree DIR with DIR/pointsman")
    tests = tuple(t for t in args.tests.split(",") if t)
    unknown = (set(ways) - set(WAYS)) | (set(tests) - set(TESTS))
    if unknown:
        sys.exit(f"kernel_bench: unknown ways or tests {sorted(unknown)}")
    reason = nftables_unavailable_reason()
    if reason is not None:
        sys.exit(f"kernel_bench: {reason}")
    socket.setdefaulttimeout(30)
    run(args.seconds, args.rounds, ways, args.perf, tests)


if __name__ == "__main__":
    main()
