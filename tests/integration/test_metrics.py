"""The Prometheus exposition of a running Node holds the values real traffic implies: accepts,
refusals by reason, connect failures and retries, table use, bytes, histograms, backend states,
health checks and UDP datagrams. The exposition is read the way Prometheus reads it (the text
format, parsed by prometheus_client's parser), straight from the collector.

Tests that take the `workers` fixture run with one process and with a control process and two
workers; with workers the exposition sums the workers' latest reports (every 0.5 s), so a test
waits until a count has reached its value (`statistics_when`) before it scrapes.
"""

from __future__ import annotations

import socket
import time

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pointsman.admin.metrics import registry_for
from pointsman.node.runtime import Node
from tests.integration.udp_support import udp_clients, udp_config, udp_echo
from tests.support import (
    LOOPBACK,
    close_writer,
    connect,
    echo_backend,
    free_port,
    one_pool_config,
    refused_port,
    roundtrip,
    running,
    statistics_when,
    wait_closed,
    wait_for,
    workers_caught_up,
)

pytestmark = pytest.mark.usefixtures("engine")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
LB = {"listener": "lb", "pool": "p"}


def scrape(runtime: Node) -> Samples:
    text = generate_latest(registry_for(runtime)).decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def buckets(samples: Samples, name: str, **labels: str) -> list[tuple[float, float]]:
    """(upper bound, cumulative count) of one histogram, in bound order."""
    out = []
    for (sample_name, sample_labels), count in samples.items():
        got = dict(sample_labels)
        le = got.pop("le", None)
        if sample_name == f"{name}_bucket" and got == labels and le is not None:
            out.append((float(le), count))
    return sorted(out)


async def test_accepted_bytes_and_histograms_after_echo_connections(workers: int) -> None:
    async with echo_backend() as peer:
        listen = f"{LOOPBACK}:{free_port()}"
        async with running(one_pool_config(listen, [peer.address]), workers=workers) as runtime:
            for i in range(4):
                reader, writer = await connect(listen)
                await roundtrip(reader, writer, b"x" * (i + 1))
                await close_writer(writer)
            await statistics_when(runtime, lambda st: sum(st.ended.values()) == 4, what="4 ended")
            s = scrape(runtime)

    backend = {"pool": "p", "backend": peer.address}
    assert value(s, "pointsman_connections_accepted_total", **LB) == 4
    assert value(s, "pointsman_connections_ended_total", **LB, reason="client_fin") == 4
    assert value(s, "pointsman_active_connections", **LB) == 0
    assert value(s, "pointsman_bytes_total", **LB, direction="in") == 1 + 2 + 3 + 4
    assert value(s, "pointsman_bytes_total", **LB, direction="out") == 10
    assert value(s, "pointsman_backend_bytes_total", **backend, direction="in") == 10
    assert value(s, "pointsman_backend_connections_total", **backend) == 4
    assert value(s, "pointsman_backend_active_connections", **backend) == 0
    for name, labels in (("pointsman_time_to_first_byte_seconds", LB),
                         ("pointsman_connection_duration_seconds", LB),
                         ("pointsman_backend_connect_seconds", backend)):
        cumulative = buckets(s, name, **labels)
        counts = [count for _, count in cumulative]
        assert counts == sorted(counts), f"{name}: buckets not cumulative"
        assert cumulative[-1] == (float("inf"), 4), name
        assert value(s, f"{name}_count", **labels) == 4
        # >= 0, not > 0: uvloop's loop.time() has millisecond steps, and a loopback connect
        # often starts and ends within one.
        assert 0 <= value(s, f"{name}_sum", **labels) < 4 * 2.0, name


async def test_a_backend_connection_counts_while_it_is_still_open(workers: int) -> None:
    """A plain pool's connect successes reach the engine's batches, not connect_result: they
    must still count at the connect (a long-lived connection shows in the connection rate and
    connect latency at once), with workers through their reports, and not again at the end."""
    async with echo_backend() as peer:
        listen = f"{LOOPBACK}:{free_port()}"
        async with running(one_pool_config(listen, [peer.address]), workers=workers) as runtime:
            backend = {"pool": "p", "backend": peer.address}
            held = []
            for _ in range(2):
                reader, writer = await connect(listen)
                await roundtrip(reader, writer, b"open")
                held.append(writer)

            def counted(samples: Samples) -> bool:
                return (value(samples, "pointsman_backend_connections_total", **backend) == 2
                        and value(samples, "pointsman_backend_connect_seconds_count", **backend) == 2)

            await wait_for(lambda: counted(scrape(runtime)), 5.0, what="2 counted while open")
            assert value(scrape(runtime), "pointsman_backend_active_connections", **backend) == 2
            for writer in held:
                await close_writer(writer)
            await statistics_when(runtime, lambda st: sum(st.ended.values()) == 2, what="2 ended")
            s = scrape(runtime)
    assert value(s, "pointsman_backend_connections_total", **backend) == 2
    assert value(s, "pointsman_backend_connect_seconds_count", **backend) == 2
    assert value(s, "pointsman_backend_active_connections", **backend) == 0


# One process only: with workers the table is split into per-worker shares (capacity 1 each
# here), and which worker a connection meets is up to the kernel's spread.
async def test_open_connections_fill_the_table_and_the_next_is_refused() -> None:
    async with echo_backend() as peer:
        listen = f"{LOOPBACK}:{free_port()}"
        text = one_pool_config(listen, [peer.address], listener={"max_connections": 2})
        async with running(text) as runtime:
            held = [await connect(listen) for _ in range(2)]
            for reader, writer in held:
                await roundtrip(reader, writer, b"hold")
            s = scrape(runtime)
            assert value(s, "pointsman_active_connections", **LB) == 2
            assert value(s, "pointsman_connection_table_used", **LB) == 2
            assert value(s, "pointsman_connection_table_capacity", **LB) == 2
            backend = {"pool": "p", "backend": peer.address}
            assert value(s, "pointsman_backend_active_connections", **backend) == 2

            reader, writer = await connect(listen)
            await wait_closed(reader, 2.0)
            await close_writer(writer)
            s = scrape(runtime)
            for _, writer in held:
                await close_writer(writer)

    assert value(s, "pointsman_connections_rejected_total", **LB, reason="table_full") == 1
    assert value(s, "pointsman_connections_rejected_total", **LB, reason="no_backend") == 0
    # Every connection taken from the kernel, the refused one too: accepted = rejected + ended
    # + active.
    assert value(s, "pointsman_connections_accepted_total", **LB) == 3


async def test_connect_failures_and_retries_are_counted_per_listener_and_backend(
    workers: int,
) -> None:
    with refused_port() as one, refused_port() as two:
        listen = f"{LOOPBACK}:{free_port()}"
        dead = [f"{LOOPBACK}:{one}", f"{LOOPBACK}:{two}"]
        async with running(one_pool_config(listen, dead, pool={"retries": 1}),
                           workers=workers) as runtime:
            reader, writer = await connect(listen)
            await wait_closed(reader, 3.0)
            await close_writer(writer)
            await statistics_when(runtime, lambda st: sum(st.ended.values()) == 1,
                                  what="connection torn down")
            s = scrape(runtime)

    assert value(s, "pointsman_connections_accepted_total", **LB) == 1
    assert value(s, "pointsman_connections_connect_failed_total", **LB) == 1
    assert value(s, "pointsman_connections_ended_total", **LB, reason="connect_failed") == 1
    assert value(s, "pointsman_connect_retries_total", **LB) == 1
    for address in dead:
        labels = {"pool": "p", "backend": address}
        assert value(s, "pointsman_backend_connect_failures_total", **labels) == 1
        assert value(s, "pointsman_backend_connections_total", **labels) == 0


async def test_backend_state_gauges_and_no_backend_refusals(workers: int) -> None:
    async with echo_backend() as peer:
        listen = f"{LOOPBACK}:{free_port()}"
        async with running(one_pool_config(listen, [peer.address]), workers=workers) as runtime:
            labels = {"pool": "p", "backend": peer.address}
            s = scrape(runtime)
            assert value(s, "pointsman_backend_state", **labels, state="up") == 1
            assert value(s, "pointsman_pool_available_backends", pool="p") == 1
            assert value(s, "pointsman_pool_backends", pool="p") == 1

            runtime.pools["p"].drain(peer.address)
            await workers_caught_up(runtime)
            reader, writer = await connect(listen)
            await wait_closed(reader, 2.0)
            await close_writer(writer)
            await statistics_when(runtime, lambda st: sum(st.rejected.values()) == 1,
                                  what="the refusal reported")
            s = scrape(runtime)

    states = {state: value(s, "pointsman_backend_state", **labels, state=state)
              for state in ("up", "down", "ejected", "draining", "maintenance")}
    assert states == {"up": 0, "down": 0, "ejected": 0, "draining": 1, "maintenance": 0}
    assert value(s, "pointsman_pool_available_backends", pool="p") == 0
    assert value(s, "pointsman_connections_rejected_total", **LB, reason="no_backend") == 1


# Health checks run in the process that owns the pools (the single process or the control
# process) in either model, so this runs once.
async def test_health_checks_are_counted_by_result() -> None:
    check = {"health_check": {"type": "tcp", "interval": "50ms", "timeout": "50ms",
                              "rise": 1, "fall": 2, "jitter": 0}}
    async with echo_backend() as peer:
        with refused_port() as dead_port:
            listen = f"{LOOPBACK}:{free_port()}"
            dead = f"{LOOPBACK}:{dead_port}"
            text = one_pool_config(listen, [peer.address, dead], pool=check)
            async with running(text) as runtime:
                pool = runtime.pools["p"]
                await wait_for(lambda: pool.member(dead).machine.state.value == "down"
                               and pool.member(peer.address).checks >= 2, 5.0,
                               what="the dead backend marked down")
                s = scrape(runtime)

    alive = {"pool": "p", "backend": peer.address}
    gone = {"pool": "p", "backend": dead}
    assert value(s, "pointsman_health_checks_total", **alive, result="success") >= 2
    assert value(s, "pointsman_health_checks_total", **alive, result="failure") == 0
    assert value(s, "pointsman_health_checks_total", **gone, result="failure") >= 2
    assert value(s, "pointsman_health_checks_total", **gone, result="success") == 0
    assert 0 <= value(s, "pointsman_health_check_latency_seconds", **alive) < 0.5
    assert value(s, "pointsman_backend_state", **gone, state="down") == 1
    assert value(s, "pointsman_pool_available_backends", pool="p") == 1


async def test_udp_datagrams_sessions_and_table(workers: int) -> None:
    async with udp_echo() as peer:
        port = free_port(kind=socket.SOCK_DGRAM)
        text = udp_config(f"{LOOPBACK}:{port}", [peer.address], udp={"max_sessions": 10})
        async with (
            running(text, workers=workers) as runtime,
            udp_clients((LOOPBACK, port), 2) as clients,
        ):
            for client in clients:
                await client.request(b"question")
                await client.request(b"again")
            await statistics_when(runtime, lambda st: st.datagrams_out == 4, listener="u",
                                  what="four replies reported")
            s = scrape(runtime)

    u = {"listener": "u", "pool": "p"}
    assert value(s, "pointsman_udp_sessions", **u) == 2
    assert value(s, "pointsman_udp_session_table_capacity", **u) == 10
    assert value(s, "pointsman_udp_sessions_created_total", **u) == 2
    assert value(s, "pointsman_udp_datagrams_total", **u, direction="in") == 4
    assert value(s, "pointsman_udp_datagrams_total", **u, direction="out") == 4
    assert value(s, "pointsman_udp_bytes_total", **u, direction="in") == 2 * len(b"questionagain")
    assert value(s, "pointsman_udp_drops_total", **u, reason="table_full") == 0


async def test_loop_lag_flow_log_drops_and_process_metrics_are_exported(workers: int) -> None:
    # The process in the test's event loop, which the stimulus below stalls, and every process.
    here = "single" if workers == 1 else "control"
    processes = [here] + [f"worker-{i}" for i in range(workers if workers > 1 else 0)]
    listen = f"{LOOPBACK}:{free_port()}"
    with refused_port() as dead:
        async with running(one_pool_config(listen, [f"{LOOPBACK}:{dead}"]),
                           workers=workers) as runtime:
            s = scrape(runtime)
            time.sleep(0.7)  # the stimulus: a stalled event loop (not a synchronisation)
            await wait_for(lambda: runtime.loop_lag >= 0.15, 1.0, what="the late tick seen")
            lagged = scrape(runtime)  # same loop turn: before the next tick resets it
            names = {f.name for f in text_string_to_metric_families(
                generate_latest(registry_for(runtime)).decode())}

    assert value(s, "pointsman_flow_log_dropped_total") == 0  # no flow log: nothing dropped
    assert 0 <= value(s, "pointsman_event_loop_lag_seconds", process=here) < 0.15
    assert value(lagged, "pointsman_event_loop_lag_seconds", process=here) >= 0.15
    for process in processes:
        assert value(s, "pointsman_process_open_fds", process=process) > 0
        assert value(s, "pointsman_process_cpu_seconds_total", process=process) > 0
    exported = {dict(labels)["process"] for name, labels in s
                if name == "pointsman_process_open_fds"}
    assert exported == set(processes)
    # Regular names only: what the dashboards and rules in deploy/ rely on.
    assert all(name.startswith("pointsman_") for name in names), names
