"""The families issue 16 added, read from a running node the way Prometheus reads them: build
info, reload outcomes, the accept queue, the oldest connection's age, TLS connections no route
took, pool limits and check types, the health-check latency histogram, and the node's TcpExt
counters."""

from __future__ import annotations

import asyncio
import platform
import time
from pathlib import Path

import yaml

import pointsman
from pointsman.app import build_node
from pointsman.config.loader import load_file
from pointsman.proxy.engine import engine_name
from pointsman.telemetry import netstat
from tests.integration.test_metrics import LB, scrape, value
from tests.support import (
    LOOPBACK,
    close_writer,
    connect,
    echo_backend,
    free_port,
    one_pool_config,
    roundtrip,
    running,
    wait_for,
)
from tests.unit.protocols.hello_builder import client_hello


async def test_build_info_names_version_python_and_loop() -> None:
    async with (
        echo_backend() as peer,
        running(one_pool_config(f"{LOOPBACK}:{free_port()}", [peer.address])) as rt,
    ):
        s = scrape(rt)
    [(labels, one)] = [(dict(k[1]), v) for k, v in s.items() if k[0] == "pointsman_build_info"]
    assert one == 1
    assert labels["version"] == pointsman.__version__
    assert labels["python"] == platform.python_version()
    if "uvloop" in type(asyncio.get_running_loop()).__module__:
        assert labels["uvloop"][0].isdigit(), labels  # the installed uvloop's version
    else:
        assert labels["uvloop"] == "none"
    assert labels["engine"] == engine_name()  # the one the listener runs on


async def test_refused_and_applied_file_reloads_are_counted(tmp_path: Path) -> None:
    """A file that does not validate is refused before the composer sees it: it still counts."""
    async with echo_backend() as peer:
        path = tmp_path / "pointsman.yaml"
        good = one_pool_config(f"{LOOPBACK}:{free_port()}", [peer.address])
        path.write_text(good)
        runtime = build_node(load_file(path), config_path=path, announce=lambda line: None, workers=1)
        await runtime.start()
        try:
            s = scrape(runtime)
            assert value(s, "pointsman_config_rejected_total", source="file") == 0
            assert value(s, "pointsman_config_last_reload_success") == 1
            assert value(s, "pointsman_config_last_reload_timestamp_seconds") == runtime.started_at

            path.write_text(good.replace("connect_timeout: 1s", "connect_timeout: soon"))
            before = time.time()
            assert await runtime.reload()  # errors: refused
            s = scrape(runtime)
            assert value(s, "pointsman_config_rejected_total", source="file") == 1
            assert value(s, "pointsman_config_last_reload_success") == 0
            assert value(s, "pointsman_config_last_reload_timestamp_seconds") >= before

            path.write_text(good)
            assert await runtime.reload() == []
            s = scrape(runtime)
            assert value(s, "pointsman_config_rejected_total", source="file") == 1
            assert value(s, "pointsman_config_applied_total", source="file") == 1
            assert value(s, "pointsman_config_last_reload_success") == 1
        finally:
            await runtime.shutdown()


async def test_accept_queue_bound_is_the_listeners_backlog() -> None:
    async with echo_backend() as peer:
        text = one_pool_config(f"{LOOPBACK}:{free_port()}", [peer.address],
                               listener={"backlog": 4})
        async with running(text) as runtime:
            s = scrape(runtime)
    assert value(s, "pointsman_accept_queue_limit", **LB) == 4
    assert value(s, "pointsman_accept_queue_depth", **LB) == 0  # the loop accepts at once
    assert value(s, "pointsman_accept_queue_sockets", **LB) == 1


async def test_oldest_connection_age_grows_while_it_is_open_and_is_zero_after() -> None:
    async with echo_backend() as peer:
        listen = f"{LOOPBACK}:{free_port()}"
        async with running(one_pool_config(listen, [peer.address])) as runtime:
            assert value(scrape(runtime), "pointsman_oldest_connection_age_seconds", **LB) == 0
            reader, writer = await connect(listen)
            await roundtrip(reader, writer, b"hold")
            opened = time.perf_counter()
            first = value(scrape(runtime), "pointsman_oldest_connection_age_seconds", **LB)
            young_reader, young_writer = await connect(listen)  # younger: does not change it
            await roundtrip(young_reader, young_writer, b"young")
            await wait_for(lambda: time.perf_counter() - opened > 0.2, 2.0, what="0.2 s")
            later = value(scrape(runtime), "pointsman_oldest_connection_age_seconds", **LB)
            assert 0 < first < later
            assert later >= 0.2
            await close_writer(writer)
            await close_writer(young_writer)
            listener = runtime.listeners["lb"]
            await wait_for(lambda: not listener.connections, 2.0, what="both closed")
            assert value(scrape(runtime), "pointsman_oldest_connection_age_seconds", **LB) == 0


async def test_a_client_hello_no_route_matches_is_counted() -> None:
    async with echo_backend() as peer:
        listen = f"{LOOPBACK}:{free_port()}"
        text = yaml.safe_dump({
            "listeners": [{"name": "lb", "bind": listen, "pool": "p",
                           "tls_routes": [{"server_names": ["db.example.com"], "pool": "p"}]}],
            "pools": [{"name": "p", "backends": [{"address": peer.address}]}],
        })
        async with running(text) as runtime:
            for name in (b"db.example.com", b"other.example.com", b"third.example.net"):
                reader, writer = await connect(listen)
                hello = client_hello(server_name=name)
                writer.write(hello)
                assert await reader.readexactly(len(hello)) == hello  # the echo: it went through
                await close_writer(writer)
            s = scrape(runtime)
    assert value(s, "pointsman_tls_unrouted_total", **LB) == 2


async def test_pool_limits_check_type_state_age_and_probe_histogram() -> None:
    async with echo_backend() as peer:
        text = one_pool_config(f"{LOOPBACK}:{free_port()}", [peer.address], pool={
            "health_check": {"type": "tcp", "interval": "50ms", "timeout": "50ms", "jitter": 0}})
        async with running(text) as runtime:
            pool = runtime.pools["p"]
            await wait_for(lambda: pool.check_duration.count >= 3, 5.0, what="3 probes")
            s = scrape(runtime)
    assert value(s, "pointsman_health_check_info", pool="p", type="tcp") == 1
    assert value(s, "pointsman_backend_state_seconds", pool="p", backend=peer.address) > 0
    count = value(s, "pointsman_health_check_duration_seconds_count", pool="p")
    assert count >= 3
    assert value(s, "pointsman_health_check_duration_seconds_bucket", pool="p", le="+Inf") == count
    assert 0 < value(s, "pointsman_health_check_duration_seconds_sum", pool="p") < count * 0.05
    assert ("pointsman_pool_max_connection_duration_seconds", frozenset({("pool", "p")})) not in s


async def test_node_syn_counters_are_the_kernels() -> None:
    async with (
        echo_backend() as peer,
        running(one_pool_config(f"{LOOPBACK}:{free_port()}", [peer.address])) as rt,
    ):
        before = netstat.read()
        s = scrape(rt)
        after = netstat.read()
    assert before is not None and after is not None, "no /proc/net/netstat"
    for name, field in (("pointsman_tcp_listen_overflows_total", "listen_overflows"),
                        ("pointsman_tcp_listen_drops_total", "listen_drops"),
                        ("pointsman_tcp_syn_retransmits_total", "syn_retrans"),
                        ("pointsman_tcp_syncookies_sent_total", "syncookies_sent"),
                        ("pointsman_tcp_syncookies_received_total", "syncookies_recv"),
                        ("pointsman_tcp_syncookies_failed_total", "syncookies_failed")):
        # other processes on this host move the counters too: bracket the scrape
        assert getattr(before, field) <= value(s, name) <= getattr(after, field), name
