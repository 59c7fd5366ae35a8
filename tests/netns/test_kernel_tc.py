"""`kernel.datapath: tc` end to end: stateless NAT done by the tc BPF program (bpf/stateless.c)
at ingress of the lb's interfaces, in the same namespaces as the nftables modes (kernel_support.py).

What is checked: the program's choice per client is userspace Maglev's with the kernel's jhash
(so the BPF hash is nft's, bit for bit, on real packets); bytes arrive intact and replies come
from the VIP (TCP and UDP); no nftables table and no conntrack entry are made; the per-backend
counters count SYNs, packets and bytes; a backend taken out under load resets exactly the flows
of the slots that changed and no other; shutdown refuses new flows, lets a running one finish and
takes the program off the interfaces.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from pointsman.balance.hashing import source_key
from pointsman.kernel.jhash import slot_of
from pointsman.kernel.plan import slot_indices
from pointsman.pool.snapshot import BackendView
from pointsman.pool.state import BackendState

from .kernel_support import (
    ECHO_PORT,
    HEALTH_BOUND,
    IO_TIMEOUT,
    Stream,
    admin,
    backend_servers,
    config,
    echo_servers,
    echo_through,
    http_get,
    maglev_choice,
    metrics,
    metrics_when,
    pointsman,
)
from .netns_support import (
    HTTP_PORT,
    UDP_PORT,
    VIP,
    BackendServer,
    LbTopology,
    lb_topology,
    tc_unavailable_reason,
    wait_until,
)

_reason = tc_unavailable_reason()
pytestmark = pytest.mark.skipif(_reason is not None, reason=_reason or "")

SLOTS = 4093
STREAMS = 24


@pytest.fixture(scope="module")
def topo() -> Iterator[LbTopology]:
    with lb_topology(backends=3) as topology:
        yield topology


@pytest.fixture(scope="module")
def servers(topo: LbTopology) -> Iterator[dict[str, BackendServer]]:
    with backend_servers(topo) as running:
        yield running


def interfaces(topo: LbTopology) -> list[str]:
    """The lb's interfaces: c0 (clients) and b1..bN (backends)."""
    return ["c0", *topo.names]


def tc(topo: LbTopology, **overrides: object) -> str:
    values: dict[str, object] = {"nat": "stateless", "snat": "none"}
    values.update(overrides)
    text = yaml.safe_load(config(topo, **values))  # type: ignore[arg-type]
    text["listeners"][0]["kernel"].update(datapath="tc", interfaces=interfaces(topo))
    return yaml.safe_dump(text)


def attached(topo: LbTopology) -> list[str]:
    """The interfaces with a BPF filter at ingress."""
    return [name for name in interfaces(topo)
            if "bpf" in topo.lb.run("tc", "filter", "show", "dev", name, "ingress", check=False)]


def conntrack_entries(topo: LbTopology, *args: str) -> int:
    listing = topo.lb.run("conntrack", "-L", *args, check=False)
    return sum(1 for line in listing.splitlines() if line.strip())


def kernel_pick(topo: LbTopology, source: tuple[str, int], down: str | None = None) -> str:
    """The backend the slot table sends `source` to, with `down` out of it (as the listener
    computes it: effective weight 0, home weights kept, so only its slots move)."""
    views = [BackendView(name, topo.backend_ip(i), 8080, 1, 0.0 if name == down else 1.0,
                         BackendState.UP) for i, name in enumerate(topo.names)]
    table = slot_indices("maglev", views, SLOTS)
    return topo.names[table[slot_of(source_key(*source, "source_ip_port"), SLOTS)]]


def test_choice_is_userspace_maglev_counted_and_nothing_in_netfilter(
        topo: LbTopology, servers: dict[str, BackendServer], tmp_path: Path) -> None:
    with pointsman(topo, tmp_path, tc(topo)) as proc:
        assert "[kernel data plane]" in proc.lines[0]
        assert attached(topo) == interfaces(topo)
        seen: Counter[str] = Counter()
        for i in range(48):
            for port in (41000 + i, 42000 + i):
                source = topo.client_source(i)
                name, peer = http_get(topo, (source, port)).split()
                assert name == maglev_choice(topo, SLOTS, source, port, "source_ip_port"), (source, port)
                assert peer == source  # no SNAT: the backend sees the client
                seen[name] += 1
        assert set(seen) == set(topo.names), seen
        assert "pointsman" not in topo.lb.run("nft", "list", "tables")
        assert conntrack_entries(topo, "-p", "tcp", "--orig-dst", VIP) == 0
        found = metrics_when(topo, lambda m: m("pointsman_kernel_new_connections_total") >= 96,
                             "96 SYNs counted")
        assert found("pointsman_kernel_new_connections_total") == 96
        for name in topo.names:
            assert found("pointsman_kernel_backend_new_connections_total", backend=name) == seen[name]
            packets_in = found("pointsman_kernel_backend_packets_total", backend=name, direction="in")
            assert packets_in >= 3 * seen[name]  # SYN, request, ACKs and FIN per connection
            assert found("pointsman_kernel_backend_bytes_total", backend=name, direction="out") > 0
        assert sum(found("pointsman_kernel_backend_slots", backend=name) for name in topo.names) == SLOTS
        status, body = admin(topo, "PUT", "/api/v1/listeners/web/deny", ["192.0.2.0/24"])  # type: ignore[arg-type]
        assert status == 409, body  # refused, not silently ignored
    assert attached(topo) == []  # stopped: the program is off every interface


def test_bytes_arrive_intact_and_replies_come_from_the_vip(
        topo: LbTopology, servers: dict[str, BackendServer], tmp_path: Path) -> None:
    payloads = [os.urandom(2_000_000 + 7919 * i) for i in range(8)]
    with echo_servers(topo), pointsman(topo, tmp_path, tc(topo, port=ECHO_PORT)):
        sources = [(topo.client_source(i), 43000 + i) for i in range(len(payloads))]
        with ThreadPoolExecutor(len(payloads)) as pool:
            results = list(pool.map(echo_through, [topo] * len(payloads), sources, payloads))
        for payload, (received, peer) in zip(payloads, results, strict=True):
            assert peer == (VIP, 80)
            assert len(received) == len(payload)
            assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
        found = metrics_when(topo, lambda m: m("pointsman_kernel_bytes_total", direction="in")
                             >= sum(map(len, payloads)), "the payload bytes counted")
        assert found("pointsman_kernel_bytes_total", direction="out") >= sum(map(len, payloads))


def test_udp_replies_come_from_the_vip(topo: LbTopology, servers: dict[str, BackendServer],
                                       tmp_path: Path) -> None:
    text = tc(topo, protocol="udp", bind=f"{VIP}:{UDP_PORT}", port=UDP_PORT, slots=13)
    with pointsman(topo, tmp_path, text):
        seen: Counter[str] = Counter()
        for i in range(24):
            source = (topo.client_source(i), 50000 + i)
            with topo.client.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.settimeout(IO_TIMEOUT)
                sock.bind(source)
                sock.sendto(b"who", (VIP, UDP_PORT))
                data, sender = sock.recvfrom(2048)
            name, peer = data.decode().split()
            assert sender == (VIP, UDP_PORT)
            assert name == maglev_choice(topo, 13, *source, "source_ip_port")
            assert peer == source[0]
            seen[name] += 1
        assert set(seen) == set(topo.names)
        found = metrics_when(topo, lambda m: m("pointsman_kernel_packets_total", direction="out") >= 24,
                             "24 replies counted")
        assert found("pointsman_kernel_packets_total", direction="in") == 24


def test_removed_backend_under_load_resets_only_the_flows_of_its_slots(
        topo: LbTopology, servers: dict[str, BackendServer], tmp_path: Path) -> None:
    with pointsman(topo, tmp_path, tc(topo)):
        sources = [(topo.client_source(i), 53000 + i) for i in range(STREAMS)]
        streams = [Stream(topo, 3_000_000, 4.0, source) for source in sources]
        for stream, source in zip(streams, sources, strict=True):
            assert stream.backend == kernel_pick(topo, source)
        on = Counter(stream.backend for stream in streams)
        victim = on.most_common(1)[0][0]
        assert admin(topo, "POST", f"/api/v1/pools/web/backends/{victim}/maintenance")[0] == 200
        metrics_when(topo, lambda m: all(m("pointsman_kernel_backend_slots", backend=n) > 0
                                         for n in topo.names if n != victim)
                     and m("pointsman_kernel_map_updates_total") >= 2, f"{victim} out of the map")
        with ThreadPoolExecutor(len(streams)) as pool:
            received = list(pool.map(Stream.finish, streams))
        broken = {i for i, (got, s) in enumerate(zip(received, streams, strict=True)) if got != s.total}
        moved = {i for i, source in enumerate(sources)
                 if kernel_pick(topo, source, down=victim) != streams[i].backend}
        assert broken == moved, f"broken {sorted(broken)}, moved {sorted(moved)}"
        assert len(broken) == on[victim] > 0  # its slots and no other moved (Maglev's home table)
        for i in range(12):  # new flows go where the new table says
            source = (topo.client_source(i), 58000 + i)
            assert http_get(topo, source).split()[0] == kernel_pick(topo, source, down=victim)


def test_shutdown_refuses_new_flows_lets_running_ones_finish_and_detaches(
        topo: LbTopology, servers: dict[str, BackendServer], tmp_path: Path) -> None:
    with pointsman(topo, tmp_path, tc(topo, grace=8.0)) as proc:
        stream = Stream(topo, 2_000_000, 2.0, (topo.client_source(3), 56000))
        proc.popen.send_signal(15)

        def refused() -> bool:
            with topo.client.socket() as sock:
                sock.settimeout(0.3)
                sock.bind((topo.client_source(4), 0))
                return sock.connect_ex((VIP, 80)) != 0  # dropped: the connect times out

        wait_until(refused, 5.0, what="SYNs refused")
        assert stream.finish() == stream.total
        assert proc.popen.wait(timeout=8.0) == 0
    assert attached(topo) == []


RESIZED = 2039  # prime


def test_reload_resizes_the_table_and_adds_and_removes_backends(
        topo: LbTopology, servers: dict[str, BackendServer], tmp_path: Path) -> None:
    """A reload with a new slot count moves the listener to a new stretch of the shared slot
    map (the old one serves until the VIP's entry points at the new one); a backend joining
    counts exactly its connections; one leaving later takes its reply entry with it (its
    address is not rewritten to the VIP any more) while its counts stay in the listener's totals."""
    two = yaml.safe_load(tc(topo))
    two["pools"][0]["backends"] = two["pools"][0]["backends"][:2]
    with pointsman(topo, tmp_path, yaml.safe_dump(two)) as proc:
        names = {http_get(topo, (topo.client_source(i), 45000 + i)).split()[0] for i in range(12)}
        assert names == {"b1", "b2"}
        proc.path.write_text(tc(topo, slots=RESIZED))
        proc.reload()
        metrics_when(topo, lambda m: m("pointsman_kernel_backend_slots", backend="b3") > 0
                     and m("pointsman_kernel_slots") == RESIZED, "b3 in the resized table")
        seen: Counter[str] = Counter()
        for i in range(24):
            source = (topo.client_source(i), 46000 + i)
            name = http_get(topo, source).split()[0]
            assert name == maglev_choice(topo, RESIZED, *source, "source_ip_port")
            seen[name] += 1
        assert seen["b3"] > 0
        found = metrics_when(topo, lambda m: m("pointsman_kernel_backend_new_connections_total",
                                               backend="b3") >= seen["b3"], "b3's SYNs counted")
        assert found("pointsman_kernel_backend_new_connections_total", backend="b3") == seen["b3"]
        total = found("pointsman_kernel_new_connections_total")
        one_less = yaml.safe_load(tc(topo, slots=RESIZED))
        one_less["pools"][0]["backends"] = one_less["pools"][0]["backends"][1:]
        proc.path.write_text(yaml.safe_dump(one_less))
        proc.reload()
        gone = metrics_when(topo, lambda m: ("pointsman_kernel_backend_slots", frozenset(
            {("listener", "web"), ("pool", "web"), ("backend", "b1")})) not in m.samples, "b1 gone")
        assert gone("pointsman_kernel_new_connections_total") >= total  # b1's count stays
        names = {http_get(topo, (topo.client_source(i), 47000 + i)).split()[0] for i in range(12)}
        assert names == {"b2", "b3"}


def test_health_checks_on_the_backends_own_port_keep_their_replies(
        topo: LbTopology, servers: dict[str, BackendServer], tmp_path: Path) -> None:
    """Replies to the lb's own address (health checks on the port the VIP forwards to) are not
    rewritten to the VIP: were they, every check would fail and the backends leave the table."""
    text = yaml.safe_load(tc(topo))
    text["pools"][0]["health_check"]["port"] = HTTP_PORT
    with pointsman(topo, tmp_path, yaml.safe_dump(text)):
        found = metrics_when(topo, lambda m: m("pointsman_kernel_map_updates_total") >= 1, "the table")
        seen: Counter[str] = Counter()
        deadline = time.monotonic() + HEALTH_BOUND + 1.0  # long enough for every check to have failed
        while time.monotonic() < deadline:
            source = (topo.client_source(len(seen) % 24), 48000 + sum(seen.values()))
            seen[http_get(topo, source).split()[0]] += 1
        assert set(seen) == set(topo.names), seen
        found = metrics(topo)
        assert all(found("pointsman_kernel_backend_slots", backend=n) > 0 for n in topo.names)


def test_no_backend_left_drops_and_counts_the_refused(
        topo: LbTopology, servers: dict[str, BackendServer], tmp_path: Path) -> None:
    with pointsman(topo, tmp_path, tc(topo)):
        for name in topo.names:
            assert admin(topo, "POST", f"/api/v1/pools/web/backends/{name}/maintenance")[0] == 200
        metrics_when(topo, lambda m: all(name != "pointsman_kernel_backend_slots" for name, _ in m.samples),
                     "every backend out of the table")
        for i in range(3):
            with topo.client.socket() as sock:
                sock.settimeout(0.5)
                sock.bind((topo.client_source(i), 49000 + i))
                with pytest.raises(TimeoutError):  # dropped: no reset, no answer
                    sock.connect((VIP, 80))
        found = metrics_when(topo, lambda m: m("pointsman_kernel_connections_rejected_total",
                                               reason="no_backend") >= 3, "the refused SYNs")
        assert found("pointsman_kernel_new_connections_total") >= 3
        for name in topo.names:
            assert admin(topo, "POST", f"/api/v1/pools/web/backends/{name}/enable")[0] == 200


def test_an_unknown_interface_is_refused_at_start_and_nothing_stays_attached(
        topo: LbTopology, tmp_path: Path) -> None:
    text = yaml.safe_load(tc(topo))
    text["listeners"][0]["kernel"]["interfaces"] = ["c0", "nosuch0"]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(text))
    done = topo.lb.popen(sys.executable, "-m", "pointsman", "run", str(path), stdout=-1, stderr=-1)
    _, err = done.communicate(timeout=30)
    assert done.returncode == 1
    # Found by the preflight `run` makes before it binds (as `pointsman check` does), with its
    # place in the file; nothing was attached.
    assert b"cannot start" in err, err
    assert b"kernel.interfaces[1]: no network interface 'nosuch0' on this host" in err, err
    assert attached(topo) == []
