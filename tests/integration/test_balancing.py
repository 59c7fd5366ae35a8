"""Balancing algorithms through real sockets (issue #3): exact weighted counts, load-aware steering,
hash stability across processes, affinity, slow start.

Every backend greets each connection with its name and a newline, then echoes, so the client learns
which backend it reached without asking pointsman. `NamedBackend` and the client helpers below are
also used by the health, drain and reload tests.

Process models: hash policies and affinity take the `workers` fixture and must hold with a
control process and two workers as with one process, because the kernel steers each client
address to one worker (one affinity table per address; the hashes depend on the address only).
Round robin sequences, least connections and power of two choices are per worker by design (each
worker rotates and counts on its own), so their exact counts are tested with one process.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest

from tests.integration.peers import (
    NamedBackend,
    ask_name,
    config_text,
    exchange,
    listen_address,
    named_backends,
    open_named,
    single_pool,
    tcp_stats,
)
from tests.support import (
    LOOPBACK,
    REPORT_TIMEOUT,
    close_writer,
    free_port,
    pointsman_process_async,
    running,
    wait_for,
    with_workers,
    workers_caught_up,
)


# One process only: each worker runs its own weighted rotation, so exact counts are per worker.
async def test_weighted_round_robin_counts_are_exact() -> None:
    async with named_backends("a", "b", "c") as (a, b, c):
        listen = listen_address()
        backends = [a.config(weight=5), b.config(weight=1), c.config(weight=1)]
        config = single_pool(listen, [], algorithm="weighted_round_robin", backends=backends)
        async with running(config) as runtime:
            seen = Counter([await ask_name(listen) for _ in range(70)])
            stats = tcp_stats(runtime)
            await wait_for(lambda: stats.active == 0, 2.0, what="all connections ended")

    assert seen == {"a": 50, "b": 10, "c": 10}
    assert (a.accepted, b.accepted, c.accepted) == (50, 10, 10)
    assert stats.accepted == 70
    assert stats.retried == 0


# --- load-aware algorithms -----------------------------------------------------------------------

HELD = 20
SHORT = 30


# One process only: each worker counts (and steers by) the connections it holds itself.
@pytest.mark.parametrize("algorithm", ["least_connections", "power_of_two"])
async def test_load_aware_algorithms_steer_new_connections_away_from_loaded_backend(
    algorithm: str,
) -> None:
    async with named_backends("a", "b", "c") as (a, b, c):
        listen = listen_address()
        async with running(single_pool(listen, [a, b, c], algorithm=algorithm)) as runtime:
            pool = runtime.pools["p"]
            pool.drain("b")
            pool.drain("c")
            held = [await open_named(listen) for _ in range(HELD)]
            assert {name for name, _, _ in held} == {"a"}
            pool.enable("b")
            pool.enable("c")

            seen = Counter([await ask_name(listen) for _ in range(SHORT)])
            # The held connections are still served while the short ones go elsewhere.
            for i, (_, reader, writer) in enumerate(held):
                await exchange(reader, writer, f"held {i}\n".encode())
            a_active = pool.member("a").stats.active
            for _, _, writer in held:
                await close_writer(writer)
            stats = tcp_stats(runtime)
            await wait_for(lambda: stats.active == 0, 2.0, what="all connections ended")

    assert a_active == HELD
    assert seen["a"] == 0, f"{algorithm} sent {seen['a']} new connections to the loaded backend"
    assert seen["b"] + seen["c"] == SHORT
    # Both idle backends take part; neither algorithm may pin the short ones on one backend.
    assert seen["b"] >= 5 and seen["c"] >= 5, seen


# --- hash policies across processes ------------------------------------------------------------------

# 51 client addresses; a 127.0.0.0/8 address needs no setup on Linux loopback.
SOURCES = [f"127.0.0.{i}" for i in range(10, 61)]


def hash_config(peers: list[NamedBackend], maglev_port: int, hash_port: int, workers: int) -> str:
    backends = [peer.config() for peer in peers]
    text = config_text(
        [
            {"name": "mag", "bind": f"{LOOPBACK}:{maglev_port}", "pool": "maglev"},
            {"name": "sh", "bind": f"{LOOPBACK}:{hash_port}", "pool": "hash"},
        ],
        [
            {"name": "maglev", "algorithm": "maglev", "backends": backends},
            {"name": "hash", "algorithm": "source_hash", "backends": backends},
        ],
    )
    return with_workers(text, workers)


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_hash_policies_agree_across_two_processes(tmp_path: Path, workers: int) -> None:
    async with named_backends("b1", "b2", "b3") as peers:
        ports = [free_port() for _ in range(4)]
        one, two = tmp_path / "one", tmp_path / "two"
        one.mkdir()
        two.mkdir()
        # With workers, the first node is a control process and two workers: each source is
        # steered to one of them, and every one must agree with the single-process second node.
        async with (
            pointsman_process_async(hash_config(peers, ports[0], ports[1], workers), one),
            pointsman_process_async(hash_config(peers, ports[2], ports[3], 1), two),
        ):
            results: dict[str, dict[str, list[str]]] = {"maglev": {}, "source_hash": {}}
            for policy, first, second in (("maglev", 0, 2), ("source_hash", 1, 3)):
                for source in SOURCES:
                    results[policy][source] = [
                        await ask_name(f"{LOOPBACK}:{ports[first]}", source),
                        await ask_name(f"{LOOPBACK}:{ports[second]}", source),
                        await ask_name(f"{LOOPBACK}:{ports[first]}", source),  # new source port
                    ]

    for policy, by_source in results.items():
        moved = {src: names for src, names in by_source.items() if len(set(names)) != 1}
        assert not moved, f"{policy}: a source reached different backends: {moved}"
        spread = Counter(names[0] for names in by_source.values())
        # 51 sources over 3 backends: about 17 each; a hash that ignores the source fails this.
        assert set(spread) == {"b1", "b2", "b3"}, (policy, spread)
        assert min(spread.values()) >= 5, (policy, spread)


# --- affinity ----------------------------------------------------------------------------------------

# Five sources (not a multiple of three backends), so plain round robin would move each of them.
STICKY_SOURCES = [f"127.0.0.{i}" for i in range(20, 25)]


async def test_affinity_keeps_a_source_on_its_backend_until_that_backend_drains(
    workers: int,
) -> None:
    async with named_backends("a", "b", "c") as peers:
        listen = listen_address()
        config = single_pool(
            listen, peers, algorithm="round_robin", affinity={"key": "source_ip", "timeout": "60s"}
        )
        async with running(config, workers=workers) as runtime:
            pool = runtime.pools["p"]
            seen: dict[str, list[str]] = {source: [] for source in STICKY_SOURCES}
            for _ in range(4):
                for source in STICKY_SOURCES:
                    seen[source].append(await ask_name(listen, source))
            assert all(len(set(names)) == 1 for names in seen.values()), seen
            home = {source: names[0] for source, names in seen.items()}
            # First picks rotated over all three (with two workers, one of them has at least three
            # of the five sources, and its own rotation covers the three backends).
            assert len(set(home.values())) == 3, home

            moved_source = STICKY_SOURCES[0]
            old = home[moved_source]
            pool.drain(old)
            await workers_caught_up(runtime)
            after_drain = {source: await ask_name(listen, source) for source in STICKY_SOURCES}
            new = after_drain[moved_source]
            again = [await ask_name(listen, moved_source) for _ in range(3)]
            pool.enable(old)
            await workers_caught_up(runtime)
            after_enable = [await ask_name(listen, moved_source) for _ in range(3)]
            total = 4 * len(STICKY_SOURCES) + len(STICKY_SOURCES) + 3 + 3
            await wait_for(lambda: sum(tcp_stats(runtime).ended.values()) == total,
                           REPORT_TIMEOUT, what="all connections ended")
            stats = tcp_stats(runtime)

    assert stats.active == 0 and stats.accepted == total
    assert new != old
    assert again == [new] * 3, "the replaced entry does not hold"
    assert after_enable == [new] * 3, "the old backend took its source back after enable"
    for source in STICKY_SOURCES:
        if home[source] != old:
            assert after_drain[source] == home[source], f"{source} moved though its backend stayed"
        else:
            assert after_drain[source] != old


# --- slow start -----------------------------------------------------------------------------------

SLOW_START = 3.0
RAMP_RUN = 4.0
RAMP_MAX_CONNECTIONS = 20_000  # bound on the loop; ~1-3k happen in RAMP_RUN here


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_slow_start_ramps_a_newly_enabled_backend() -> None:
    async with named_backends("steady", "fresh") as peers:
        listen = listen_address()
        config = single_pool(
            listen, peers, algorithm="weighted_round_robin", slow_start=f"{SLOW_START}s"
        )
        async with running(config) as runtime:
            pool = runtime.pools["p"]
            pool.maintenance("fresh")
            pool.enable("fresh")
            enabled = time.monotonic()
            picks: list[tuple[float, str]] = []
            for _ in range(RAMP_MAX_CONNECTIONS):
                elapsed = time.monotonic() - enabled
                if elapsed >= RAMP_RUN:
                    break
                picks.append((elapsed, await ask_name(listen)))
            stats = tcp_stats(runtime)
            await wait_for(lambda: stats.active == 0, 2.0, what="all connections ended")

    def share(start: float, end: float) -> tuple[float, int]:
        names = [name for at, name in picks if start <= at < end]
        assert len(names) >= 50, f"too few connections in [{start}, {end}): {len(names)}"
        return names.count("fresh") / len(names), names.count("fresh")

    early, early_count = share(0.0, 1.0)
    late, _ = share(SLOW_START, RAMP_RUN)
    # Weight is at most 1/3 in the first second (share <= 25 %), full (50 %) after the window.
    assert early_count >= 1, "no trickle to the ramping backend"
    assert early < 0.2, f"early share {early:.2f}"
    assert late > 0.4, f"late share {late:.2f}"
    assert late > 3 * early, f"early {early:.2f} vs late {late:.2f}"
