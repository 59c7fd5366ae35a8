"""`kernel.nat: stateless` end to end, in the same namespaces as the conntrack mode
(kernel_support.py): notrack both ways, destinations rewritten from the slot map, replies
rewritten back to the VIP by the load balancer the backends route through.

What is checked: the kernel's choice per client is userspace Maglev's (the conntrack mode's,
too); bytes arrive intact and replies come from the VIP; no conntrack entry is made; a change of
the slot map under load resets exactly the flows of the slots that changed (the bound
docs/kernel.md states), nothing else; shutdown refuses new flows and lets running ones finish;
a reload switching conntrack -> stateless keeps a running flow; UDP; next to a conntrack
listener in the same table and behind a host firewall that takes only tracked replies, the
stateless flows make no entry either way while health-check replies stay tracked.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

from pointsman.balance.hashing import source_key
from pointsman.kernel.jhash import slot_of

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
    metrics_when,
    pointsman,
    revive,
    slot_table,
)
from .netns_support import (
    HTTP_PORT,
    UDP_PORT,
    VIP,
    BackendServer,
    LbTopology,
    lb_topology,
    nftables_unavailable_reason,
    wait_until,
)

_reason = nftables_unavailable_reason()
pytestmark = pytest.mark.skipif(_reason is not None, reason=_reason or "")

SLOTS = 4093
ECHO_VIP_PORT = 81  # the conntrack listener next to the stateless one (VIP:80)
STREAMS = 24  # long flows in flight while the map changes: about 8 per backend


@pytest.fixture(scope="module")
def topo() -> Iterator[LbTopology]:
    with lb_topology(backends=3) as topology:
        yield topology


@pytest.fixture(scope="module")
def servers(topo: LbTopology) -> Iterator[dict[str, BackendServer]]:
    with backend_servers(topo) as running:
        yield running


def stateless(topo: LbTopology, **overrides: object) -> str:
    values: dict[str, object] = {"nat": "stateless", "snat": "none"}
    values.update(overrides)
    return config(topo, **values)  # type: ignore[arg-type]


def conntrack_entries(topo: LbTopology, *args: str) -> int:
    listing = topo.lb.run("conntrack", "-L", *args, check=False)
    return sum(1 for line in listing.splitlines() if line.strip())


def start_streams(topo: LbTopology, base_port: int, total: int = 3_000_000,
                  seconds: float = 4.0) -> list[tuple[Stream, int]]:
    """STREAMS paced downloads from distinct sources, each with the kernel slot it hashes to."""
    streams = []
    for i in range(STREAMS):
        source = (topo.client_source(i), base_port + i)
        slot = slot_of(source_key(*source, "source_ip_port"), SLOTS)
        streams.append((Stream(topo, total, seconds, source), slot))
    return streams


def finish_all(streams: list[tuple[Stream, int]]) -> list[bool]:
    """Read every stream to its end side by side; True for each that arrived whole."""
    with ThreadPoolExecutor(len(streams)) as pool:
        received = list(pool.map(lambda pair: pair[0].finish(), streams))
    return [got == stream.total for got, (stream, _) in zip(received, streams, strict=True)]


def broken_matches_changed_slots(streams: list[tuple[Stream, int]], intact: list[bool],
                                 before: dict[int, str], after: dict[int, str]) -> tuple[int, int]:
    """Assert the flows that broke are exactly those whose slot changed backend; the counts."""
    changed = {slot for slot in before if before[slot] != after.get(slot)}
    broken = {i for i, ok in enumerate(intact) if not ok}
    moved = {i for i, (_, slot) in enumerate(streams) if slot in changed}
    assert broken == moved, f"broken {sorted(broken)}, on changed slots {sorted(moved)}"
    return len(broken), len(changed)


# --- choice, integrity, no state ---------------------------------------------------------------------


def test_kernel_choice_is_userspace_maglev_and_nothing_is_tracked(
        topo: LbTopology, servers: dict[str, BackendServer], tmp_path: Path) -> None:
    with pointsman(topo, tmp_path, stateless(topo)) as proc:
        assert "[kernel data plane]" in proc.lines[0]
        seen: Counter[str] = Counter()
        for i in range(48):
            for port in (41000 + i, 42000 + i):
                source = topo.client_source(i)
                name, peer = http_get(topo, (source, port)).split()
                # the same pick as the conntrack mode (test_kernel_dataplane asserts the same function)
                assert name == maglev_choice(topo, SLOTS, source, port, "source_ip_port"), (source, port)
                assert peer == source  # no SNAT: the backend sees the client
                seen[name] += 1
        assert set(seen) == set(topo.names), seen
        assert conntrack_entries(topo, "-p", "tcp", "--orig-dst", VIP) == 0
        for i in range(len(topo.names)):
            assert conntrack_entries(topo, "-p", "tcp", "--orig-src", topo.backend_ip(i),
                                     "--orig-port-src", "8080") == 0
        found = metrics_when(topo, lambda m: m("pointsman_kernel_new_connections_total") >= 96,
                             "96 SYNs counted")
    assert found("pointsman_kernel_new_connections_total") == 96
    for name in topo.names:
        assert found("pointsman_kernel_backend_new_connections_total", backend=name) == seen[name]
        assert found("pointsman_kernel_backend_bytes_total", backend=name, direction="out") > 0
        assert found("pointsman_kernel_backend_packets_total", backend=name, direction="in") > 0
    assert sum(found("pointsman_kernel_backend_slots", backend=name) for name in topo.names) == SLOTS
    assert found("pointsman_kernel_bytes_total", direction="in") > 0
    assert found("pointsman_kernel_bytes_total", direction="out") > 0


def test_bytes_arrive_intact_and_replies_come_from_the_vip(
        topo: LbTopology, servers: dict[str, BackendServer], tmp_path: Path) -> None:
    payloads = [os.urandom(2_000_000 + 7919 * i) for i in range(8)]
    with echo_servers(topo), pointsman(topo, tmp_path, stateless(topo, port=ECHO_PORT)):
        sources = [(topo.client_source(i), 43000 + i) for i in range(len(payloads))]
        with ThreadPoolExecutor(len(payloads)) as pool:
            results = list(pool.map(echo_through, [topo] * len(payloads), sources, payloads))
        for payload, (received, peer) in zip(payloads, results, strict=True):
            assert peer == (VIP, 80)  # the client's socket only accepts segments from the VIP
            assert len(received) == len(payload)
            assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
        backends = {maglev_choice(topo, SLOTS, *source, "source_ip_port") for source in sources}
        assert len(backends) > 1, "every flow hashed to one backend; pick other sources"


def test_udp_replies_come_from_the_vip(topo: LbTopology, servers: dict[str, BackendServer],
                                       tmp_path: Path) -> None:
    for vip in (VIP, topo.lb_client_side):  # routed, and an address of the lb itself
        text = stateless(topo, protocol="udp", bind=f"{vip}:{UDP_PORT}", port=UDP_PORT, slots=13)
        with pointsman(topo, tmp_path, text):
            seen: Counter[str] = Counter()
            for i in range(24):
                source = (topo.client_source(i), 50000 + i)
                with topo.client.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                    sock.settimeout(IO_TIMEOUT)
                    sock.bind(source)
                    sock.sendto(b"who", (vip, UDP_PORT))  # unconnected: recvfrom shows the sender
                    data, sender = sock.recvfrom(2048)
                name, peer = data.decode().split()
                assert sender == (vip, UDP_PORT)
                assert name == maglev_choice(topo, 13, *source, "source_ip_port")
                assert peer == source[0]
                seen[name] += 1
            assert set(seen) == set(topo.names)
            assert conntrack_entries(topo, "-p", "udp", "--orig-dst", vip) == 0
            found = metrics_when(topo, lambda m: m("pointsman_kernel_packets_total", direction="out") >= 24,
                                 "24 replies counted")
            assert found("pointsman_kernel_packets_total", direction="in") == 24
            assert found("pointsman_kernel_new_connections_total") == 0  # UDP: no SYN to count


HOST_FIREWALL = """
table inet hostfw {
    chain input {
        type filter hook input priority 0; policy drop;
        ct state established,related accept
        iif lo accept
    }
}
"""
"""A host firewall as common as they come: this host takes only replies conntrack tracked (and
loopback). It also makes conntrack run in the lb namespace, so "no entry" means something."""


def tracked_replies(topo: LbTopology, backend: int) -> int:
    """Flows from the lb to a backend's HTTP port whose replies conntrack saw (health checks)."""
    listing = topo.lb.run("conntrack", "-L", "-p", "tcp", "--orig-dst", topo.backend_ip(backend),
                          "--orig-port-dst", str(HTTP_PORT), check=False)
    return sum(1 for line in listing.splitlines() if "dport=" in line and "[UNREPLIED]" not in line)


def test_next_to_conntrack_in_one_table_behind_a_host_firewall(
        topo: LbTopology, servers: dict[str, BackendServer], tmp_path: Path) -> None:
    """Both modes in one table, conntrack running: the stateless listener's flows (either
    direction) make no entry, the conntrack listener's do, and health checks on the stateless
    backends' own port keep their replies tracked (the `fib daddr type != local` test), which the
    host firewall needs: without it the checks would fail and the backends leave the map."""
    both = yaml.safe_load(stateless(topo))
    both["pools"][0]["health_check"]["port"] = HTTP_PORT  # replies from the stateless backend port
    echo = yaml.safe_load(config(topo, bind=f"{VIP}:{ECHO_VIP_PORT}", port=ECHO_PORT))
    echo["listeners"][0].update(name="echo", pool="echo")
    echo["pools"][0]["name"] = "echo"
    both["listeners"] += echo["listeners"]
    both["pools"] += echo["pools"]
    (tmp_path / "hostfw.nft").write_text(HOST_FIREWALL)
    topo.lb.run("nft", "-f", str(tmp_path / "hostfw.nft"))
    try:
        with echo_servers(topo), pointsman(topo, tmp_path, yaml.safe_dump(both)):
            wait_until(lambda: all(tracked_replies(topo, i) > 0 for i in range(len(topo.names))),
                       5.0 + HEALTH_BOUND, what="a tracked health check reply from every backend")
            payload = os.urandom(200_000)
            received, peer = echo_through(topo, (topo.client_source(3), 46000), payload, ECHO_VIP_PORT)
            assert received == payload and peer == (VIP, ECHO_VIP_PORT)
            assert conntrack_entries(topo, "-p", "tcp", "--orig-dst", VIP,
                                     "--orig-port-dst", str(ECHO_VIP_PORT)) >= 1
            seen: Counter[str] = Counter()
            for i in range(24):  # every backend still in the map: the health checks passed
                source = (topo.client_source(i), 46100 + i)
                name, peer_seen = http_get(topo, source).split()
                assert name == maglev_choice(topo, SLOTS, *source, "source_ip_port"), source
                assert peer_seen == source[0]
                seen[name] += 1
            assert set(seen) == set(topo.names)
            assert conntrack_entries(topo, "-p", "tcp", "--orig-dst", VIP, "--orig-port-dst", "80") == 0
            for i in range(len(topo.names)):  # no reply picked up mid-flow either
                assert conntrack_entries(topo, "-p", "tcp", "--orig-src", topo.backend_ip(i),
                                         "--orig-port-src", str(HTTP_PORT)) == 0
    finally:
        topo.lb.run("nft", "delete", "table", "inet", "hostfw", check=False)


# --- the slot map changes under load -----------------------------------------------------------------


def test_removed_backend_resets_only_the_flows_of_its_slots(
        topo: LbTopology, servers: dict[str, BackendServer], tmp_path: Path) -> None:
    with pointsman(topo, tmp_path, stateless(topo)):
        before = slot_table(topo)
        streams = start_streams(topo, 53000)
        on = Counter(stream.backend for stream, _ in streams)
        victim = on.most_common(1)[0][0]
        status, _ = admin(topo, "POST", f"/api/v1/pools/web/backends/{victim}/maintenance")
        assert status == 200
        victim_ip = topo.backend_ip(topo.names.index(victim))
        wait_until(lambda: victim_ip not in slot_table(topo).values(), 5.0, what=f"{victim} out of the map")
        after = slot_table(topo)
        intact = finish_all(streams)
        broken, changed = broken_matches_changed_slots(streams, intact, before, after)
        assert broken == on[victim] > 0  # its own slots and no other moved (Maglev's home table)
        print(f"\nmaintenance of {victim}: {changed} slots changed, {broken} of {STREAMS} flows reset "
              f"(all on {victim}), {STREAMS - broken} intact")
        found = metrics_when(topo, lambda m: m("pointsman_kernel_map_updates_total") >= 2, "the update")
        assert found("pointsman_kernel_map_updates_total") >= 2


def test_returning_backend_takes_back_exactly_its_slots(
        topo: LbTopology, servers: dict[str, BackendServer], tmp_path: Path) -> None:
    with pointsman(topo, tmp_path, stateless(topo)):
        home = slot_table(topo)
        assert admin(topo, "POST", "/api/v1/pools/web/backends/b2/maintenance")[0] == 200
        b2 = topo.backend_ip(1)
        wait_until(lambda: b2 not in slot_table(topo).values(), 5.0, what="b2 out of the map")
        before = slot_table(topo)
        streams = start_streams(topo, 54000)
        assert admin(topo, "POST", "/api/v1/pools/web/backends/b2/enable")[0] == 200
        wait_until(lambda: slot_table(topo) == home, 5.0, what="b2 back in its own slots")
        intact = finish_all(streams)
        broken, changed = broken_matches_changed_slots(streams, intact, before, home)
        assert changed == sum(1 for address in home.values() if address == b2)
        print(f"\nb2 returned: {changed} slots changed, {broken} of {STREAMS} flows reset")


def test_killed_backend_under_load(topo: LbTopology, servers: dict[str, BackendServer],
                                   tmp_path: Path) -> None:
    victim = ""
    try:
        with pointsman(topo, tmp_path, stateless(topo)):
            before = slot_table(topo)
            streams = start_streams(topo, 55000, total=4_000_000, seconds=5.0)
            on = Counter(stream.backend for stream, _ in streams)
            victim = on.most_common(1)[0][0]
            victim_ip = topo.backend_ip(topo.names.index(victim))
            servers[victim].kill()
            took = wait_until(lambda: victim_ip not in slot_table(topo).values(), HEALTH_BOUND,
                              what=f"{victim} out of the slot map")
            after = slot_table(topo)
            intact = finish_all(streams)
            broken, changed = broken_matches_changed_slots(streams, intact, before, after)
            assert broken == on[victim]
            print(f"\n{victim} killed: left the map after {took:.2f}s; {changed} slots changed, "
                  f"{broken} of {STREAMS} flows broke (all on {victim}), {STREAMS - broken} intact")
    finally:
        if victim:
            revive(topo, servers, victim)


# --- stop, reload ------------------------------------------------------------------------------------


def test_shutdown_refuses_new_flows_and_lets_running_ones_finish(
        topo: LbTopology, servers: dict[str, BackendServer], tmp_path: Path) -> None:
    with pointsman(topo, tmp_path, stateless(topo, grace=8.0)) as proc:
        stream = Stream(topo, 2_000_000, 2.0, (topo.client_source(3), 56000))
        proc.popen.send_signal(15)
        refusing = 'syn / syn,ack counter name "l_web_new" counter name "l_web_rejected"'
        wait_until(lambda: refusing in topo.lb.run("nft", "list", "chain", "inet", "pointsman", "l_web_sin",
                                                   check=False), 5.0, what="SYNs refused")
        with pytest.raises(ConnectionRefusedError):  # the guard's reset
            http_get(topo, (topo.client_source(4), 56001))
        assert stream.finish() == stream.total
        # drained: the stream ended, then DRAIN_QUIET_SECONDS without a packet; well within grace
        assert proc.popen.wait(timeout=8.0) == 0


def test_reload_from_conntrack_to_stateless_keeps_a_running_flow_and_back(
        topo: LbTopology, servers: dict[str, BackendServer], tmp_path: Path) -> None:
    with pointsman(topo, tmp_path, config(topo, snat="none")) as proc:
        source = (topo.client_source(6), 57000)
        stream = Stream(topo, 3_000_000, 3.0, source)
        assert stream.backend == maglev_choice(topo, SLOTS, *source, "source_ip_port")
        proc.path.write_text(stateless(topo))
        proc.reload()
        wait_until(lambda: "l_web_syn" in topo.lb.run("nft", "list", "table", "inet", "pointsman"),
                   5.0, what="the stateless rules")
        rules = json.loads(topo.lb.run("nft", "-j", "list", "table", "inet", "pointsman"))["nftables"]
        assert not any(item.get("chain", {}).get("name") == "l_web_dnat" for item in rules)
        assert stream.finish() == stream.total  # same slot, same backend: the switch is invisible
        new_source = (topo.client_source(7), 57001)
        name = http_get(topo, new_source).split()[0]
        assert name == maglev_choice(topo, SLOTS, *new_source, "source_ip_port")
        assert conntrack_entries(topo, "-p", "tcp", "--orig-src", new_source[0]) == 0
        # and back: the slot maps go before the backends' chains they jump to
        proc.path.write_text(config(topo, snat="none"))
        proc.reload()
        wait_until(lambda: "l_web_b0_sin" not in topo.lb.run("nft", "list", "table", "inet", "pointsman"),
                   5.0, what="the stateless objects removed")
        back_source = (topo.client_source(8), 57002)
        assert http_get(topo, back_source).split()[0] == maglev_choice(topo, SLOTS, *back_source,
                                                                        "source_ip_port")
        assert conntrack_entries(topo, "-p", "tcp", "--orig-src", back_source[0]) == 1


RESIZED = 2039  # prime


def test_reload_adds_and_removes_backends_with_their_chains(
        topo: LbTopology, servers: dict[str, BackendServer], tmp_path: Path) -> None:
    """A backend joining a running stateless listener, in a reload that also changes the slot
    count (the listener's rules are rewritten: the shared dispatch's entries of the backends
    held are taken out first, the joining one's written once its chains exist), counts exactly
    its connections; one leaving later (a slot diff: its chains and counters in JSON) takes its
    chains with it."""
    ips = [topo.backend_ip(i) for i in range(len(topo.names))]
    two = yaml.safe_load(stateless(topo))
    two["pools"][0]["backends"] = two["pools"][0]["backends"][:2]
    with pointsman(topo, tmp_path, yaml.safe_dump(two)) as proc:
        assert set(slot_table(topo).values()) == set(ips[:2])
        proc.path.write_text(stateless(topo, slots=RESIZED))
        proc.reload()
        wait_until(lambda: set(slot_table(topo).values()) == set(ips) and len(slot_table(topo)) == RESIZED,
                   5.0 + HEALTH_BOUND, what="b3 in the resized slot map")
        seen: Counter[str] = Counter()
        for i in range(24):
            source = (topo.client_source(i), 46000 + i)
            name = http_get(topo, source).split()[0]
            assert name == maglev_choice(topo, RESIZED, *source, "source_ip_port")
            seen[name] += 1
        assert seen["b3"] > 0

        def new(m: Any, name: str) -> float:
            return float(m("pointsman_kernel_backend_new_connections_total", backend=name))

        found = metrics_when(topo, lambda m: all(new(m, n) >= seen[n] for n in topo.names),
                             "the SYNs counted")
        assert {n: new(found, n) for n in topo.names} == {n: float(seen[n]) for n in topo.names}
        one_less = yaml.safe_load(stateless(topo, slots=RESIZED))
        one_less["pools"][0]["backends"] = one_less["pools"][0]["backends"][1:]
        proc.path.write_text(yaml.safe_dump(one_less))
        proc.reload()
        wait_until(lambda: "l_web_b0_" not in topo.lb.run("nft", "list", "table", "inet", "pointsman"),
                   5.0 + HEALTH_BOUND, what="b1's chains and counters removed")
        assert set(slot_table(topo).values()) == set(ips[1:])
        names = {http_get(topo, (topo.client_source(i), 47000 + i)).split()[0] for i in range(12)}
        assert names == {"b2", "b3"}


# --- the shared dispatch -----------------------------------------------------------------------------


def udp_who(topo: LbTopology, i: int) -> str | None:
    """The backend a UDP datagram from client source i reached (None: no answer in time)."""
    with topo.client.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.5)
        sock.bind((topo.client_source(i), 51000 + i))
        sock.sendto(b"who", (VIP, UDP_PORT))
        try:
            data, sender = sock.recvfrom(2048)
        except TimeoutError:
            return None
    assert sender == (VIP, UDP_PORT)
    return data.decode().split()[0]


def test_two_listeners_share_the_dispatch_and_one_leaves_it_alone(
        topo: LbTopology, servers: dict[str, BackendServer], tmp_path: Path) -> None:
    web = yaml.safe_load(stateless(topo))
    both = yaml.safe_load(stateless(topo))
    dns = yaml.safe_load(stateless(topo, protocol="udp", bind=f"{VIP}:{UDP_PORT}", port=UDP_PORT, slots=13))
    dns["listeners"][0].update(name="dns", pool="dns")
    dns["pools"][0]["name"] = "dns"
    both["listeners"] += dns["listeners"]
    both["pools"] += dns["pools"]

    def dispatch() -> str:
        return "".join(topo.lb.run("nft", "list", "map", "inet", "pointsman", name)
                       for name in ("stateless_vips4", "stateless_rev4"))

    with pointsman(topo, tmp_path, yaml.safe_dump(both)) as proc:
        wait_until(lambda: udp_who(topo, 0) is not None, 5.0, what="the UDP listener answering")
        assert {udp_who(topo, i) for i in range(12)} == set(topo.names)
        assert {http_get(topo, (topo.client_source(i), 44000 + i)).split()[0] for i in range(12)} == \
            set(topo.names)
        entries = dispatch()
        assert "goto l_web_sin" in entries and "goto l_dns_sin" in entries
        assert len(re.findall(r"goto l_web_b\d+_rev", entries)) == len(topo.names)
        assert len(re.findall(r"goto l_dns_b\d+_rev", entries)) == len(topo.names)
        proc.path.write_text(yaml.safe_dump(web))
        proc.reload()
        wait_until(lambda: "l_dns" not in topo.lb.run("nft", "list", "table", "inet", "pointsman"),
                   5.0 + HEALTH_BOUND, what="the UDP listener's objects and entries removed")
        entries = dispatch()
        assert "goto l_web_sin" in entries
        assert len(re.findall(r"goto l_web_b\d+_rev", entries)) == len(topo.names)
        assert " udp " not in entries
        assert udp_who(topo, 0) is None  # nothing forwards it now
        for i in range(12):
            source = (topo.client_source(i), 45000 + i)
            assert http_get(topo, source).split()[0] == maglev_choice(topo, SLOTS, *source, "source_ip_port")
