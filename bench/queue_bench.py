"""Cost of backend caps and the pool queue: new connections per second through one listener with
no cap, with a cap that is never reached (the capped pick: full backends looked up, no fast path),
and with a cap of 4 under 16 concurrent clients (12 wait in the queue at every moment: hold,
resume, the head served by every close).

Run from the repository root:  python3 bench/queue_bench.py [--connections 2000] [--rounds 5]
Each client loop connects, reads the backend's greeting and closes, in the same event loop as
pointsman (a per-connection cost comparison, not a throughput figure). One runtime serves every
variant, switched by a reload between rounds (the order alternates); medians over rounds. On a
shared machine compare ratios only.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import yaml

from pointsman.app import build_node
from pointsman.config.loader import load_text
from pointsman.loop import run as run_loop

CONCURRENCY = 16
VARIANTS: dict[str, int | None] = {"no cap": None, "cap never full": 1_000_000, "cap 4, queued": 4}


async def _serve_greeting(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"hi\n")
    await writer.drain()
    await reader.read()
    writer.close()


def _config(port: int, backend_port: int, cap: int | None) -> str:
    pool: dict[str, Any] = {"name": "p", "backends": [{"address": f"127.0.0.1:{backend_port}"}],
                            "queue": {"max": 1000, "timeout": "30s"}}
    if cap is not None:
        pool["backend_max_connections"] = cap
    return yaml.safe_dump({"listeners": [{"name": "lb", "bind": f"127.0.0.1:{port}", "pool": "p"}],
                           "pools": [pool], "shutdown_grace": "0.1s"})


async def connection_rate(connections: int, rounds: int) -> None:
    backend = await asyncio.start_server(_serve_greeting, "127.0.0.1", 0, backlog=1024)
    backend_port = backend.sockets[0].getsockname()[1]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    runtime = build_node(load_text(_config(port, backend_port, None), "<bench>"),
                         announce=lambda line: None, workers=1)
    await runtime.start()
    rates: dict[str, list[float]] = {label: [] for label in VARIANTS}
    try:
        for round_ in range(rounds):
            order = list(VARIANTS) if round_ % 2 == 0 else list(reversed(VARIANTS))
            for label in order:
                errors = await runtime.apply(load_text(
                    _config(port, backend_port, VARIANTS[label]), "<bench>"))
                assert errors == [], errors
                rates[label].append(await _one_rate(port, connections))
        queue = runtime.pools["p"].queue_stats
        print(f"queued in all: {queue.queued_total}, mean wait "
              f"{queue.queue_wait.sum / max(queue.queue_wait.count, 1) * 1e3:.2f} ms")
    finally:
        await runtime.shutdown()
        backend.close()
    base = statistics.median(rates["no cap"])
    for label, values in rates.items():
        median = statistics.median(values)
        print(f"{label:>15}: {median:8.0f} connections/s (median of {rounds}, {CONCURRENCY} "
              f"clients), {median / base:.3f} x no cap")


async def _one_rate(port: int, connections: int) -> float:
    async def loop(count: int) -> None:
        for _ in range(count):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            await reader.readline()
            writer.close()
            await writer.wait_closed()

    started = time.perf_counter()
    await asyncio.gather(*(loop(connections // CONCURRENCY) for _ in range(CONCURRENCY)))
    return connections // CONCURRENCY * CONCURRENCY / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    run_loop(connection_rate(args.connections, args.rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
