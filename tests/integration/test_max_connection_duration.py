"""`pools[].max_connection_duration`: a connection through that pool is cut (a reset both ways)
once it is that old, however busy it is, counted as `max_connection_duration`; a connection
through a pool without a bound lives on; a reload that gives a pool a bound applies it to the
connections already open. With one process and with workers, on both engines."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from pointsman.admin.status import status
from pointsman.config.loader import load_text
from pointsman.node.runtime import Node
from pointsman.telemetry.flow import EndReason
from pointsman.telemetry.stats import ListenerStats
from tests.integration.test_proxy_protocol import client_hello
from tests.support import (
    LOOPBACK,
    connect,
    echo_backend,
    free_port,
    roundtrip,
    running,
    statistics_when,
    wait_closed,
)

BOUND = 1.0
CUT_WITHIN = 6.0  # the bound, the 0.1 s sweep, and a loaded 2-core VM
PACE = 0.05  # the client sends this often: the connection is never idle


def config(lb: int, lb2: int, backend: int, bound: str | None, log: Path) -> str:
    key = f"max_connection_duration: {bound}" if bound else ""
    return f"""
listeners:
  - {{name: lb, bind: "{LOOPBACK}:{lb}", pool: bounded}}
  - {{name: lb2, bind: "{LOOPBACK}:{lb2}", pool: free}}
pools:
  - name: bounded
    {key}
    backends: [{{address: "{LOOPBACK}:{backend}"}}]
  - name: free
    backends: [{{address: "{LOOPBACK}:{backend}"}}]
flow_log: {{path: "{log}"}}
"""


async def talk_until_cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> str:
    """Keep sending until the connection is cut; how it ended: "reset" or "eof"."""
    deadline = time.monotonic() + CUT_WITHIN
    while time.monotonic() < deadline:
        if writer.is_closing():  # the end arrived between two messages
            return await wait_closed(reader, CUT_WITHIN)
        try:
            await roundtrip(reader, writer, b"still talking\n")
        except ConnectionResetError:
            return "reset"
        except asyncio.IncompleteReadError:
            return "eof"
        await asyncio.sleep(PACE)
    raise AssertionError(f"still open after {CUT_WITHIN}s")


def pool_status(node: Node, name: str) -> dict[str, Any]:
    """The pool's entry of /api/v1/status."""
    found: dict[str, Any] = next(p for p in status(node)["pools"] if p["name"] == name)
    return found


def identity(stats: ListenerStats) -> bool:
    """accepted = rejected + ended + active."""
    return stats.accepted == sum(stats.rejected.values()) + sum(stats.ended.values()) + stats.active


async def test_a_busy_connection_is_cut_at_its_pools_bound(tmp_path: Path, workers: int,
                                                           engine: str) -> None:
    lb, lb2 = free_port(), free_port()
    async with echo_backend() as peer:
        text = config(lb, lb2, peer.port, f"{BOUND:g}s", tmp_path / "flows.log")
        async with running(text, workers=workers) as node:
            free_reader, free_writer = await connect(f"{LOOPBACK}:{lb2}")
            began = time.monotonic()
            reader, writer = await connect(f"{LOOPBACK}:{lb}")
            assert await talk_until_cut(reader, writer) == "reset"
            lived = time.monotonic() - began
            assert lived >= BOUND
            stats = await statistics_when(
                node, lambda s: s.ended[EndReason.MAX_CONNECTION_DURATION] == 1,
                what="the cut counted as max_connection_duration")
            assert sum(stats.ended.values()) == 1 and identity(stats)
            # the pool without a bound: open and working after the other was cut
            await roundtrip(free_reader, free_writer, b"still here\n")
            assert node.listeners["lb2"].statistics().active == 1
            free_writer.close()
            writer.close()
    if workers == 1:
        lines = (tmp_path / "flows.log").read_text()
        assert "max_connection_duration" in lines


async def test_a_reload_bounds_the_connections_already_open(tmp_path: Path, engine: str) -> None:
    lb, lb2 = free_port(), free_port()
    async with echo_backend() as peer:
        text = config(lb, lb2, peer.port, None, tmp_path / "flows.log")
        async with running(text) as node:
            began = time.monotonic()
            reader, writer = await connect(f"{LOOPBACK}:{lb}")
            await roundtrip(reader, writer, b"hello\n")
            assert "max_connection_duration" not in pool_status(node, "bounded")
            assert await node.apply(load_text(config(lb, lb2, peer.port, "1500ms",
                                                     tmp_path / "flows.log"), "<test>")) == []
            shown = pool_status(node, "bounded")
            assert shown["max_connection_duration"] == 1.5
            assert 0.0 < shown["oldest_connection_seconds"] < 1.5
            assert await talk_until_cut(reader, writer) == "reset"
            assert time.monotonic() - began >= 1.5  # its age counts from its accept
            await statistics_when(node, lambda s: s.ended[EndReason.MAX_CONNECTION_DURATION] == 1,
                                  what="counted as max_connection_duration")
            writer.close()


async def test_each_pool_of_one_listener_keeps_its_own_bound(engine: str) -> None:
    """One listener, two pools through TLS routes: the routed pool's bound cuts its connection,
    the default pool's connection (no bound) on the same listener lives on."""
    lb = free_port()
    async with echo_backend() as peer:
        text = f"""
listeners:
  - name: lb
    bind: "{LOOPBACK}:{lb}"
    tls_routes: [{{server_names: [bounded.example], pool: bounded}}]
    default_pool: free
pools:
  - {{name: bounded, max_connection_duration: 1s, backends: [{{address: "{LOOPBACK}:{peer.port}"}}]}}
  - {{name: free, backends: [{{address: "{LOOPBACK}:{peer.port}"}}]}}
"""
        async with running(text) as node:
            streams = {}
            for name in ("bounded.example", "other.example"):
                reader, writer = await connect(f"{LOOPBACK}:{lb}")
                hello = client_hello(name)
                writer.write(hello)
                async with asyncio.timeout(5.0):
                    assert await reader.readexactly(len(hello)) == hello  # echoed: connected
                streams[name] = (reader, writer)
            began = time.monotonic()
            assert await talk_until_cut(*streams["bounded.example"]) == "reset"
            assert time.monotonic() - began < CUT_WITHIN
            await roundtrip(*streams["other.example"], b"still here\n")
            stats = await statistics_when(
                node, lambda s: s.ended[EndReason.MAX_CONNECTION_DURATION] == 1,
                what="one connection cut")
            assert stats.active == 1 and identity(stats)
            for _, writer in streams.values():
                writer.close()
