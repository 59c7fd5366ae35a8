"""RSS stays flat through the whole TCP listener (slow, out of CI): `pointsman run` with the admin
API and the flow log on, 5,000 short connections to warm up, then 20,000 more (or
POINTSMAN_SOAK_CONNECTIONS: the 1,000,000 of docs/engine.md), on each engine.
What the policy keeps per connection (its flow, per-source state, targets, counters, flow-log
records) must all be given back: growth under 0.1 KiB per connection."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
import yaml

from tests.hostile import rss_bytes
from tests.support import LOOPBACK, echo_backend, free_port, pointsman_process_async, wait_for

WARM, AT_ONCE = 5_000, 100
TOTAL = int(os.environ.get("POINTSMAN_SOAK_CONNECTIONS", "20000"))

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600 + TOTAL // 200),
              pytest.mark.asyncio(loop_factories=["uvloop"])]


async def one(port: int) -> None:
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    writer.write(b"x" * 64)
    writer.write_eof()
    data = await reader.read()
    writer.close()
    assert data == b"x" * 64


async def run(port: int, count: int) -> None:
    for _ in range(0, count, AT_ONCE):
        async with asyncio.timeout(30):
            await asyncio.gather(*(one(port) for _ in range(AT_ONCE)))


async def test_rss_is_flat_over_many_connections(engine: str, tmp_path: Path) -> None:
    async with echo_backend() as peer:
        port = free_port()
        text = yaml.safe_dump({
            "admin": {"bind": f"{LOOPBACK}:{free_port()}"},
            "flow_log": {"path": str(tmp_path / "flows.jsonl")},
            "listeners": [{"name": "lb", "bind": f"{LOOPBACK}:{port}", "pool": "p",
                           "limits": {"max_connections_per_source": 1000}}],
            "pools": [{"name": "p", "backends": [{"address": peer.address}]}],
        })
        async with pointsman_process_async(text, tmp_path) as proc:
            await run(port, WARM)
            await asyncio.sleep(1.0)  # the flow log's writer catches up
            before = rss_bytes(proc.pid)
            await run(port, TOTAL)
            log = tmp_path / "flows.jsonl"
            await wait_for(lambda: log.read_bytes().count(b"\n") >= WARM + TOTAL, 30.0,
                           interval=0.25, what="every connection's flow record written")
            after = rss_bytes(proc.pid)
    growth = after - before
    print(f"\n{engine}: RSS {before >> 10} KiB -> {after >> 10} KiB over {TOTAL} connections")
    assert growth < TOTAL * 100, f"{growth / TOTAL:.0f} bytes per connection"
