"""Memory returns: after a burst of slow consumers closes, `pointsman run` gives its buffers back
(RSS within 10% of where it started, within a minute).

Benchmark-like, so marked slow: 100 clients that never read, each on a backend that streams as
fast as it may, zero_copy off (every byte goes through the engine's buffers), on both engines.
The connection engine holds at most one read per direction for a connection whose destination
does not take it, so the peak stays within that bound (the transport path this test was first
written for buffered up to 256 KiB per direction: 62 -> 144 MB). Prints RSS before, at the peak
and after, for the report.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pointsman.proxy.engine.api import READ_CHUNK
from tests.hostile import never_reading_clients, raw_backend, rss_bytes, stream_forever
from tests.support import LOOPBACK, free_port, one_pool_config, pointsman_process_async, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300), pytest.mark.usefixtures("engine")]

CLIENTS = 100
# What the engine may hold for the clients: one read per direction each, and the allocator's
# and the interpreter's slack around it.
HELD_BOUND = CLIENTS * 2 * READ_CHUNK + 16 * (1 << 20)
WITHIN = 0.10
RETURN_DEADLINE = 60.0


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_rss_returns_after_slow_consumers_close(tmp_path: Path) -> None:
    async with raw_backend(stream_forever()) as peer:
        listen = f"{LOOPBACK}:{free_port()}"
        text = one_pool_config(listen, [peer.address], pool={"zero_copy": "off"},
                               listener={"max_connections": 1000})
        async with pointsman_process_async(text, tmp_path) as proc:
            loop = asyncio.get_running_loop()
            # Warm up the same code paths with a few short-lived connections first.
            async with never_reading_clients(listen, 5):
                await asyncio.sleep(1.0)
            await asyncio.sleep(2.0)
            before = rss_bytes(proc.pid)
            async with never_reading_clients(listen, CLIENTS):
                await wait_for(lambda: peer.accepted >= 5 + CLIENTS, 10.0, what="all connected")
                peak = before
                settle = loop.time() + 5.0
                while loop.time() < settle:  # until the buffers stop growing
                    peak = max(peak, rss_bytes(proc.pid))
                    await asyncio.sleep(0.25)
            closed_at = loop.time()
            target = before * (1 + WITHIN)
            after = rss_bytes(proc.pid)
            while after > target and loop.time() - closed_at < RETURN_DEADLINE:
                await asyncio.sleep(0.5)
                after = rss_bytes(proc.pid)
            took = loop.time() - closed_at
            mib = 1 << 20
            print(f"\nRSS before {before / mib:.1f} MiB, peak {peak / mib:.1f} MiB, "
                  f"after {after / mib:.1f} MiB ({took:.1f}s after the clients closed)")
            assert peak > before, "the slow consumers made pointsman hold nothing"
            assert peak - before <= HELD_BOUND, f"held {(peak - before) / mib:.1f} MiB"
            assert after <= target, (
                f"RSS {after / mib:.1f} MiB {RETURN_DEADLINE:.0f}s after close, "
                f"started at {before / mib:.1f} MiB")
