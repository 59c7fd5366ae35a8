"""Cost of listener allow/deny lists: one lookup, list compile time, and new connections per second
through one listener with its 10 000-prefix deny list in force and switched off (same run, ratios).

Run from the repository root:  python3 bench/acl_bench.py [--connections 2000] [--rounds 6]
Lookups: best of REPEATS timeit runs. Connections: sequential connect/greeting/close from one
client in the same event loop as pointsman (a per-connection cost comparison, not a throughput
figure). The same runtime serves both variants, switched with `set_acl` between rounds, so only
the check differs; medians over rounds. On a shared machine compare ratios only.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import socket
import statistics
import sys
import time
import timeit
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import yaml

from pointsman.app import build_node
from pointsman.config.loader import load_text
from pointsman.loop import run as run_loop
from pointsman.protect.acl import Acl, AclLists, PrefixSet
from pointsman.proxy.listener import TcpListener

SIZES = (10, 1_000, 10_000, 100_000)
REPEATS = 5
LOOKUPS = 20_000


def prefixes(count: int, rng: random.Random) -> list[str]:
    """A mix like a real block list: mostly /24s and single hosts, some /16s and v6 /48s."""
    out = []
    for _ in range(count):
        kind = rng.random()
        if kind < 0.5:
            out.append(f"{rng.randrange(1, 224)}.{rng.randrange(256)}.{rng.randrange(256)}.0/24")
        elif kind < 0.8:
            out.append(f"{rng.randrange(1, 224)}.{rng.randrange(256)}.{rng.randrange(256)}."
                       f"{rng.randrange(256)}")
        elif kind < 0.9:
            out.append(f"{rng.randrange(1, 224)}.{rng.randrange(256)}.0.0/16")
        else:
            out.append(f"2001:db8:{rng.randrange(65536):x}::/48")
    return out


def lookups() -> None:
    rng = random.Random(15)
    print(f"{'prefixes':>9} {'compile ms':>11} {'v4 us':>7} {'v6 us':>7} {'mapped us':>10}")
    for size in SIZES:
        listed = prefixes(size, rng)
        started = time.perf_counter()
        acl = Acl(None, PrefixSet(listed))
        compile_ms = (time.perf_counter() - started) * 1e3
        clients = {
            "v4": [f"{rng.randrange(1, 224)}.{rng.randrange(256)}.{rng.randrange(256)}."
                   f"{rng.randrange(256)}" for _ in range(1024)],
            "v6": [f"2001:db8:{rng.randrange(65536):x}::{rng.randrange(65536):x}"
                   for _ in range(1024)],
        }
        clients["mapped"] = [f"::ffff:{ip}" for ip in clients["v4"]]
        cost = {}
        for family, ips in clients.items():

            def run(ips: list[str] = ips, refuses: Callable[[str], bool] = acl.refuses) -> None:
                for ip in ips:
                    refuses(ip)

            best = min(timeit.repeat(run, number=LOOKUPS // len(ips), repeat=REPEATS))
            cost[family] = best / (LOOKUPS // len(ips) * len(ips)) * 1e6
        print(f"{size:>9} {compile_ms:>11.1f} {cost['v4']:>7.2f} {cost['v6']:>7.2f} "
              f"{cost['mapped']:>10.2f}")


async def _serve_greeting(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"hi\n")
    await writer.drain()
    await reader.read()
    writer.close()


async def connection_rate(connections: int, rounds: int) -> None:
    backend = await asyncio.start_server(_serve_greeting, "127.0.0.1", 0)
    backend_port = backend.sockets[0].getsockname()[1]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    text = yaml.safe_dump({
        "listeners": [{"name": "lb", "bind": f"127.0.0.1:{port}", "pool": "p",
                       "deny": prefixes(10_000, random.Random(16))}],
        "pools": [{"name": "p", "backends": [{"address": f"127.0.0.1:{backend_port}"}]}],
        "shutdown_grace": "0.1s"})
    runtime = build_node(load_text(text, "<bench>"), announce=lambda line: None, workers=1)
    await runtime.start()
    listener = runtime.listeners["lb"]
    assert isinstance(listener, TcpListener)
    variants = {"10k deny": listener.acl_lists, "no list": AclLists()}
    rates: dict[str, list[float]] = {label: [] for label in variants}
    try:
        for round_ in range(rounds):
            order = list(variants) if round_ % 2 == 0 else list(reversed(variants))
            for label in order:
                listener.set_acl(variants[label])
                rates[label].append(await _one_rate(port, connections))
    finally:
        await runtime.shutdown()
        backend.close()
    base = statistics.median(rates["no list"])
    for label, values in rates.items():
        median = statistics.median(values)
        print(f"{label:>9}: {median:8.0f} connections/s (median of {rounds}), "
              f"{median / base:.3f} x no list")


async def _one_rate(port: int, connections: int) -> float:
    started = time.perf_counter()
    for _ in range(connections):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await reader.readline()
        writer.close()
        await writer.wait_closed()
    return connections / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    lookups()
    lists = AclLists.from_file([], prefixes(10_000, random.Random(1)), "peer")
    started = time.perf_counter()
    lists.compile()
    print(f"reload/API compile of 10k prefixes from text: {(time.perf_counter() - started) * 1e3:.1f} ms")
    run_loop(connection_rate(args.connections, args.rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
