"""The kernel data plane (nat: conntrack) end to end: pointsman programs nftables in an lb
namespace, a client namespace connects to the VIP, backend namespaces answer with their name and
the peer they saw (topology and helpers: kernel_support.py). Every test starts its own pointsman
and checks it removed its table on exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from .kernel_support import (
    CONCURRENCY,
    HEALTH_BOUND,
    IO_TIMEOUT,
    Stream,
    admin,
    backend_servers,
    config,
    http_get,
    maglev_choice,
    metrics,
    metrics_when,
    pointsman,
    revive,
    slot_map,
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


@pytest.fixture(scope="module")
def topo() -> Iterator[LbTopology]:
    with lb_topology(backends=3) as topology:
        yield topology


@pytest.fixture(scope="module")
def servers(topo: LbTopology) -> Iterator[dict[str, BackendServer]]:
    with backend_servers(topo) as running:
        yield running



def test_maglev_in_the_kernel_picks_what_userspace_picks(topo: LbTopology, servers: dict[str, BackendServer],
                                                          tmp_path: Path) -> None:
    with pointsman(topo, tmp_path, config(topo)) as proc:
        assert "[kernel data plane]" in proc.lines[0]
        seen: Counter[str] = Counter()
        for i in range(48):
            for port in (41000 + i, 42000 + i):
                source = topo.client_source(i)
                name, peer = http_get(topo, (source, port)).split()
                assert name == maglev_choice(topo, 4093, source, port, "source_ip_port"), (source, port)
                assert peer == topo.lb_backend_side(topo.names.index(name))  # masquerade
                seen[name] += 1
        assert set(seen) == set(topo.names), seen
        found = metrics_when(topo, lambda m: m("pointsman_kernel_new_connections_total") >= 96,
                             "96 new connections counted")
    assert found("pointsman_kernel_new_connections_total") == 96
    for name in topo.names:
        assert found("pointsman_kernel_backend_new_connections_total", backend=name) == seen[name]
        assert found("pointsman_kernel_backend_bytes_total", backend=name, direction="out") > 0
    assert sum(found("pointsman_kernel_backend_slots", backend=name) for name in topo.names) == 4093
    assert found("pointsman_kernel_bytes_total", direction="in") > 0
    assert found("pointsman_conntrack_entries") >= 96 and found("pointsman_conntrack_max") > 0
    assert found("pointsman_kernel_map_updates_total") >= 1


def test_source_ip_hash_keeps_a_client_on_one_backend(topo: LbTopology, servers: dict[str, BackendServer],
                                                      tmp_path: Path) -> None:
    with pointsman(topo, tmp_path, config(topo, hash_key="source_ip", slots=13)):
        for i in range(12):
            source = topo.client_source(i)
            names = {http_get(topo, (source, 43000 + k)).split()[0] for k in range(3)}
            assert names == {maglev_choice(topo, 13, source, 0, "source_ip")}


def test_round_robin_counts_are_even(topo: LbTopology, servers: dict[str, BackendServer],
                                     tmp_path: Path) -> None:
    with pointsman(topo, tmp_path, config(topo, algorithm="round_robin")) as proc:
        seen = Counter(http_get(topo).split()[0] for _ in range(150))
        assert set(seen) == set(topo.names)
        assert max(seen.values()) - min(seen.values()) <= 1, (seen, proc.stderr())


def test_no_snat_backends_see_the_client(topo: LbTopology, servers: dict[str, BackendServer],
                                         tmp_path: Path) -> None:
    # Backends route replies through the lb (their default route), so no SNAT is needed.
    with pointsman(topo, tmp_path, config(topo, algorithm="round_robin", snat="none")):
        peers = {http_get(topo, (topo.client_source(5), 44000 + k)).split()[1] for k in range(6)}
    assert peers == {topo.client_source(5)}


def test_killed_backend_leaves_the_map_and_established_flows_survive(
        topo: LbTopology, servers: dict[str, BackendServer], tmp_path: Path) -> None:
    try:
        with pointsman(topo, tmp_path, config(topo)):
            stream = Stream(topo, 6_000_000, 3.0, (topo.client_source(0), 45000))
            victim = next(name for name in topo.names if name != stream.backend)
            victim_ip = topo.backend_ip(topo.names.index(victim))
            assert victim_ip in slot_map(topo)
            servers[victim].kill()
            took = wait_until(lambda: victim_ip not in slot_map(topo), HEALTH_BOUND,
                              what=f"{victim} out of the slot map")
            print(f"\n{victim} left the slot map {took:.2f}s after it died")
            for i in range(40):
                name = http_get(topo, (topo.client_source(i), 46000 + i)).split()[0]
                assert name != victim
            assert stream.finish() == stream.total  # uninterrupted through the change
    finally:
        revive(topo, servers, victim)


def test_drained_backend_finishes_its_flows(topo: LbTopology, servers: dict[str, BackendServer],
                                            tmp_path: Path) -> None:
    with pointsman(topo, tmp_path, config(topo)):
        stream = Stream(topo, 2_000_000, 1.5, (topo.client_source(1), 47000))
        drained = stream.backend
        status, _ = admin(topo, "POST", f"/api/v1/pools/web/backends/{drained}/drain")
        assert status == 200
        drained_ip = topo.backend_ip(topo.names.index(drained))
        wait_until(lambda: drained_ip not in slot_map(topo), 2.0, what="drained backend out of the map")
        for i in range(30):
            assert http_get(topo, (topo.client_source(i), 48000 + i)).split()[0] != drained
        assert stream.finish() == stream.total


def test_no_backend_refuses_then_one_comes_back(topo: LbTopology, servers: dict[str, BackendServer],
                                               tmp_path: Path) -> None:
    with pointsman(topo, tmp_path, config(topo, slots=13)):
        for name in topo.names:
            assert admin(topo, "POST", f"/api/v1/pools/web/backends/{name}/maintenance")[0] == 200
        wait_until(lambda: not slot_map(topo), 2.0, what="an empty slot map")
        with pytest.raises(ConnectionRefusedError):  # the guard chain's TCP reset
            http_get(topo)
        found = metrics_when(topo, lambda m: m("pointsman_kernel_connections_rejected_total",
                                                reason="no_backend") >= 1, "the refusal counted")
        assert found("pointsman_kernel_connections_rejected_total", reason="no_backend") == 1
        assert admin(topo, "POST", "/api/v1/pools/web/backends/b2/enable")[0] == 200
        wait_until(lambda: len(slot_map(topo)) == 13, 2.0, what="b2 back in every slot")
        assert http_get(topo).split()[0] == "b2"


def test_close_sessions_cuts_only_the_down_backends_flows(
        topo: LbTopology, servers: dict[str, BackendServer], tmp_path: Path) -> None:
    try:
        with pointsman(topo, tmp_path, config(topo, on_down="close_sessions")):
            streams = [Stream(topo, 2_000_000, 2.0, (topo.client_source(i), 49000 + i)) for i in range(8)]
            doomed = streams[0].backend
            doomed_ip = topo.backend_ip(topo.names.index(doomed))
            others = [s for s in streams if s.backend != doomed]
            assert others, "every stream hashed to one backend; pick other sources"
            # Its health port closes; its data port (and the open streams) stay up.
            with topo.lb.socket() as sock:
                sock.settimeout(IO_TIMEOUT)
                sock.connect((doomed_ip, HTTP_PORT))
                sock.sendall(b"GET /health-off HTTP/1.0\r\n\r\n")
                while sock.recv(4096):
                    pass
            wait_until(lambda: f"src={doomed_ip} " not in topo.lb.run(
                "conntrack", "-L", "-p", "tcp", "--reply-src", doomed_ip, "--state", "ESTABLISHED"),
                HEALTH_BOUND, what=f"{doomed}'s conntrack entries deleted")
            for stream in streams:
                if stream.backend == doomed:
                    stream.sock.settimeout(2.0)
                    with contextlib.suppress(OSError):
                        stream.sock.sendall(b"more")  # the next packet meets no flow: reset
                    assert stream.finish() < stream.total
            # Read the survivors side by side: each is paced by its server while it is read.
            with ThreadPoolExecutor(len(others)) as pool:
                assert list(pool.map(Stream.finish, others)) == [s.total for s in others]

    finally:
        revive(topo, servers, doomed)


async def test_2000_connections_through_100_map_updates(topo: LbTopology, servers: dict[str, BackendServer],
                                                         tmp_path: Path) -> None:
    with pointsman(topo, tmp_path, config(topo)):
        loop = asyncio.get_running_loop()
        failures: list[str] = []
        done = 0
        updates_done = asyncio.Event()
        deadline = loop.time() + 40.0

        async def one() -> None:
            nonlocal done
            sock = topo.client.socket()
            sock.setblocking(False)
            try:
                async with asyncio.timeout(IO_TIMEOUT):
                    await loop.sock_connect(sock, (VIP, 80))
                    await loop.sock_sendall(sock, b"GET / HTTP/1.0\r\n\r\n")
                    data = b""
                    while chunk := await loop.sock_recv(sock, 65536):
                        data += chunk
                if not data.startswith(b"HTTP/1.0 200") or data.split(b"\r\n\r\n")[1].split()[0].decode() \
                        not in topo.names:
                    failures.append(f"bad answer {data[:80]!r}")
            except (OSError, TimeoutError) as exc:
                failures.append(repr(exc))
            finally:
                sock.close()
                done += 1

        async def clients() -> None:
            # At least 2000 connections, and on until every map update is through.
            async with asyncio.TaskGroup() as group:
                started = 0
                while (started < 2000 or not updates_done.is_set()) and loop.time() < deadline:
                    while started - done >= CONCURRENCY:
                        await asyncio.sleep(0.002)
                    group.create_task(one())
                    started += 1

        def applied() -> float:
            return metrics(topo)("pointsman_kernel_map_updates_total")

        def update_map() -> list[float]:
            """100 weight changes, each waited for until the kernel has it (no coalescing)."""
            seconds: list[float] = []
            first = applied()
            for k in range(100):
                start = time.monotonic()
                backend = topo.names[k % 2]
                status, _ = admin(topo, "PUT", f"/api/v1/pools/web/backends/{backend}/weight",
                                  {"weight": 2 + k % 3})
                assert status == 200
                wait_until(lambda k=k: applied() > first + k, 5.0, interval=0.002,  # type: ignore[misc]
                           what="map update applied")
                seconds.append(time.monotonic() - start)
            return seconds

        async def updater() -> list[float]:
            try:
                return await asyncio.to_thread(update_map)
            finally:
                updates_done.set()

        client_task = asyncio.create_task(clients())
        seconds = await updater()
        await client_task
        found = metrics(topo)
    assert not failures, f"{len(failures)} failures of {done}: {failures[:5]}"
    assert done >= 2000
    assert found("pointsman_kernel_map_updates_total") >= 101  # start + 100
    assert found("pointsman_kernel_map_update_failures_total") == 0
    seconds.sort()
    mean = (found("pointsman_kernel_map_update_seconds_sum")
            / found("pointsman_kernel_map_update_seconds_count"))
    print(f"\n{done} connections, 0 failures; admin call to map applied: median "
          f"{seconds[50] * 1000:.1f} ms, max {seconds[-1] * 1000:.1f} ms; publish to commit in "
          f"pointsman: mean {mean * 1000:.1f} ms")


def test_udp_through_the_kernel_to_a_local_vip(topo: LbTopology, servers: dict[str, BackendServer],
                                                tmp_path: Path) -> None:
    vip = topo.lb_client_side  # an address of the lb itself: "if local, works too"
    text = config(topo, protocol="udp", bind=f"{vip}:{UDP_PORT}", port=UDP_PORT, slots=13)
    with pointsman(topo, tmp_path, text):
        seen: Counter[str] = Counter()
        for i in range(24):
            source = (topo.client_source(i), 50000 + i)
            with topo.client.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.settimeout(IO_TIMEOUT)
                sock.bind(source)
                sock.connect((vip, UDP_PORT))  # replies must come back from the VIP
                sock.send(b"who")
                name, peer = sock.recv(2048).decode().split()
            assert name == maglev_choice(topo, 13, *source, "source_ip_port")
            assert peer == topo.lb_backend_side(topo.names.index(name))
            seen[name] += 1
        assert set(seen) == set(topo.names)
        found = metrics_when(topo, lambda m: m("pointsman_kernel_new_connections_total") >= 24,
                             "24 new flows counted")
        assert found("pointsman_kernel_new_connections_total") == 24


def test_reload_changes_algorithm_and_slots_keeping_counters(
        topo: LbTopology, servers: dict[str, BackendServer], tmp_path: Path) -> None:
    with pointsman(topo, tmp_path, config(topo, algorithm="round_robin", slots=13)) as proc:
        for _ in range(6):
            http_get(topo)
        proc.path.write_text(config(topo, algorithm="maglev", slots=7))
        proc.reload()
        wait_until(lambda: "mod 7 seed" in topo.lb.run("nft", "list", "chain", "inet", "pointsman",
                                                        "l_web_dnat"), 5.0, what="reloaded rules")
        assert len(slot_map(topo)) == 7
        source = (topo.client_source(3), 51000)
        assert http_get(topo, source).split()[0] == maglev_choice(topo, 7, *source, "source_ip_port")
        found = metrics_when(topo, lambda m: m("pointsman_kernel_new_connections_total") >= 7,
                             "7 new connections counted")
        assert found("pointsman_kernel_new_connections_total") == 7


def test_with_workers_only_the_control_process_programs_the_kernel(
        topo: LbTopology, servers: dict[str, BackendServer], tmp_path: Path) -> None:
    data = yaml.safe_load(config(topo, slots=13))
    data["workers"] = 2
    with pointsman(topo, tmp_path, yaml.safe_dump(data)):
        rules = topo.lb.run("nft", "list", "chain", "inet", "pointsman", "l_web_dnat")
        assert rules.count(" dnat ip to ") == 1
        source = (topo.client_source(7), 52000)
        assert http_get(topo, source).split()[0] == maglev_choice(topo, 13, *source, "source_ip_port")
        found = metrics_when(topo, lambda m: m("pointsman_kernel_new_connections_total") >= 1,
                             "the connection counted")
        assert found("pointsman_kernel_new_connections_total") == 1
        status, body = admin(topo, "GET", "/api/v1/status")
        assert status == 200
        (listener,) = json.loads(body)["listeners"]
        assert (listener["name"], listener["accepted"]) == ("web", 1)


def test_refuses_an_algorithm_the_kernel_cannot_run(topo: LbTopology, tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(config(topo, algorithm="least_connections"))
    import sys

    done = topo.lb.popen(sys.executable, "-m", "pointsman", "run", str(path),
                         stdout=-1, stderr=-1)
    _, err = done.communicate(timeout=30)
    assert done.returncode == 1
    assert b"cannot start" in err and b"least_connections is not available in the kernel" in err
    assert "pointsman" not in topo.lb.run("nft", "list", "tables")


TCP_CLOSE = 7  # tcpi_state of a socket a reset closed (linux/tcp_states.h)


def test_a_late_fin_of_a_forgotten_flow_counts_as_nothing(
        topo: LbTopology, servers: dict[str, BackendServer], tmp_path: Path) -> None:
    """A flow whose conntrack entry is gone (flushed here; expired, or from before a restart in
    life) sends its FIN: conntrack calls it invalid, the guard resets it and counts nothing."""
    with pointsman(topo, tmp_path, config(topo, slots=13)):
        with topo.client.socket() as sock:
            sock.settimeout(IO_TIMEOUT)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((topo.client_source(5), 53000))
            sock.connect((VIP, 80))
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            while sock.recv(65536):  # the whole answer, up to the backend's FIN
                pass
            topo.lb.run("conntrack", "-F")
            sock.shutdown(socket.SHUT_WR)  # our FIN now belongs to no flow the LB knows
            wait_until(lambda: sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == TCP_CLOSE,
                       IO_TIMEOUT, interval=0.01, what="the guard's reset closing the socket")
        found = metrics_when(topo, lambda m: m("pointsman_kernel_new_connections_total") >= 1,
                             "the connection counted")
        assert found("pointsman_kernel_new_connections_total") == 1
        assert found("pointsman_kernel_connections_rejected_total", reason="no_backend") == 0
