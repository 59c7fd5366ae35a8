"""Connect successes the engine does not report one by one (quiet targets, proxy/targets.py):
each is counted exactly once, while its connection is open (the backend's total and its connect
time, handed over once per engine wake-up), and not again at its end; reaches passive health
before the next failure of that backend, and stays counted when its backend leaves the pool
while the connection is open. On both engines."""

from __future__ import annotations

import asyncio
import socket
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import yaml

from pointsman.balance.hashing import source_key
from pointsman.pool.state import BackendState
from pointsman.telemetry.flow import EndReason, RejectReason
from tests.integration.peers import config_text, tcp_stats
from tests.support import (
    LOOPBACK,
    close_writer,
    connect,
    echo_backend,
    free_port,
    one_pool_config,
    roundtrip,
    running,
    wait_closed,
    wait_for,
)

pytestmark = pytest.mark.usefixtures("engine")

CONNECT_TIMEOUT = 1.0


def adds_up(runtime: object) -> None:
    stats = tcp_stats(runtime)  # type: ignore[arg-type]
    assert stats.accepted == sum(stats.rejected.values()) + sum(stats.ended.values()) + stats.active


async def test_each_success_is_counted_once_while_its_connection_is_open() -> None:
    async with echo_backend() as peer:
        listen = f"{LOOPBACK}:{free_port()}"
        async with running(one_pool_config(listen, [peer.address])) as runtime:
            pool = runtime.pools["p"]
            [backend] = runtime.backend_stats(pool)
            held = []
            for i in range(3):
                reader, writer = await connect(listen)
                await roundtrip(reader, writer, b"hello")
                held.append((reader, writer))
                # Open: the success is counted now (a long-lived connection shows at once).
                await wait_for(lambda i=i: backend.total == i + 1, 2.0, what=f"{i + 1} counted")
                assert backend.connect_time.count == i + 1
            assert backend.active == 3
            adds_up(runtime)
            for i, (_reader, writer) in enumerate(held):
                await close_writer(writer)
                await wait_for(lambda i=i: backend.active == 2 - i, 2.0, what=f"{i + 1} ended")
                assert backend.total == backend.connect_time.count == 3  # not again at its end
            await wait_for(lambda: tcp_stats(runtime).active == 0, 2.0, what="all ended")
            stats = tcp_stats(runtime)
            adds_up(runtime)
    assert backend.total == backend.connect_time.count == 3
    assert sum(backend.connect_time.counts) == 3
    # A loopback connect often completes within the engine wake-up that started it (its clock
    # is read once per wake-up): 0 s; the exact figure is tests/unit/proxy/test_fold.py's.
    assert 0.0 <= backend.connect_time.sum < 3 * CONNECT_TIMEOUT
    assert backend.active == 0
    assert backend.bytes_in == backend.bytes_out == 3 * len(b"hello")
    assert stats.ended[EndReason.CLIENT_FIN] == 3


@contextmanager
def port_that_refuses() -> Iterator[tuple[int, list[socket.socket]]]:
    """A port bound and not listening (connects are refused); the caller may listen on it."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((LOOPBACK, 0))
    holder = [sock]
    try:
        yield sock.getsockname()[1], holder
    finally:
        holder[0].close()


def refuse_again(port: int, holder: list[socket.socket]) -> None:
    holder[0].close()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((LOOPBACK, port))
    holder[0] = sock


async def test_a_success_between_two_failures_restarts_the_ejection_streak() -> None:
    """consecutive_failures 2: failure, (quiet) success, failure must not eject; one more
    failure does. A success lost, or handed to passive health after the failure that followed
    it, would eject at the second failure."""
    with port_that_refuses() as (port, holder):
        listen = f"{LOOPBACK}:{free_port()}"
        text = config_text(
            [{"name": "lb", "bind": listen, "pool": "p"}],
            [{"name": "p", "retries": 0, "connect_timeout": CONNECT_TIMEOUT,
              "health_check": {"type": "none"},
              "passive": {"consecutive_failures": 2, "base_ejection": "30s"},
              "backends": [{"name": "flaky", "address": f"{LOOPBACK}:{port}"}]}])
        async with running(text) as runtime:
            pool = runtime.pools["p"]
            member = pool.member("flaky")

            async def refused(count: int) -> None:
                reader, writer = await connect(listen)
                assert await wait_closed(reader, 2.0) in ("eof", "reset")
                await close_writer(writer)
                await wait_for(lambda: member.stats.connect_failures == count, 2.0,
                               what=f"{count} failures")

            await refused(1)
            server = holder[0]
            server.listen(4)
            server.setblocking(False)
            reader, writer = await connect(listen)
            async with asyncio.timeout(2.0):
                conn, _ = await asyncio.get_running_loop().sock_accept(server)
            conn.close()
            assert await wait_closed(reader, 2.0) in ("eof", "reset")
            await close_writer(writer)
            refuse_again(port, holder)
            await refused(2)
            assert member.machine.state is BackendState.UP
            await refused(3)
            await wait_for(lambda: member.machine.state is BackendState.EJECTED, 2.0,
                           what="ejected after two failures in a row")
            await wait_for(lambda: tcp_stats(runtime).active == 0, 2.0, what="all ended")
            [backend] = runtime.backend_stats(pool)
            adds_up(runtime)
    assert backend.total == backend.connect_time.count == 1


async def test_a_backend_removed_while_its_connection_is_open() -> None:
    async with echo_backend() as a, echo_backend() as b:
        listen = f"{LOOPBACK}:{free_port()}"
        before = one_pool_config(listen, [a.address])
        async with running(before) as runtime:
            pool = runtime.pools["p"]
            [old] = runtime.backend_stats(pool)
            reader, writer = await connect(listen)
            await roundtrip(reader, writer, b"before")
            await wait_for(lambda: old.total == 1, 2.0, what="counted while open")
            after = yaml.safe_load(before)
            after["pools"][0]["backends"] = [{"address": b.address}]
            from tests.integration.test_reload import loaded  # the reload tests' loader
            assert await runtime.apply(loaded(yaml.safe_dump(after))) == []
            await roundtrip(reader, writer, b"after")  # still served by a
            assert a.accepted == 1 and b.accepted == 0
            r2, w2 = await connect(listen)
            await roundtrip(r2, w2, b"new")
            assert b.accepted == 1
            await close_writer(writer)
            await close_writer(w2)
            await wait_for(lambda: tcp_stats(runtime).active == 0, 2.0, what="all ended")
            [new] = runtime.backend_stats(pool)
            adds_up(runtime)
    # The old backend's figures: its connection's success once (at connect), its bytes at its end.
    assert (old.total, old.connect_time.count, old.active) == (1, 1, 0)
    assert old.bytes_in == len(b"beforeafter")
    assert (new.total, new.connect_time.count, new.active) == (1, 1, 0)


# --- the fast path: the engine admits ---------------------------------------------------------------


async def test_a_plain_listener_is_admitted_by_the_engine_in_turn() -> None:
    """A round-robin pool of quiet targets behind a listener with no rule per connection: the
    first accept goes through `accepted`, which hands the engine the rotation; the others are
    admitted by the engine alone and folded in `admitted`, counted as `accepted` counts them,
    and a cut of one backend's connections finds them."""
    async with echo_backend() as a, echo_backend() as b:
        listen = f"{LOOPBACK}:{free_port()}"
        async with running(one_pool_config(listen, [a.address, b.address])) as runtime:
            listener = runtime.listeners["lb"]
            pool = runtime.pools["p"]
            held = []
            for i in range(6):
                reader, writer = await connect(listen)
                await roundtrip(reader, writer, b"x" * (i + 1))
                held.append((reader, writer))
            stats = tcp_stats(runtime)
            assert stats.active == 6 and stats.accepted == 6
            adds_up(runtime)
            assert [s.active for s in runtime.backend_stats(pool)] == [3, 3]
            assert (a.accepted, b.accepted) == (3, 3)
            assert listener.fast_admitted == 5  # type: ignore[attr-defined]
            cut = listener.close_backend(a.address, EndReason.CLOSED_BY_OPERATOR)  # type: ignore[attr-defined]
            assert cut == 3
            for _reader, writer in held:
                if not writer.is_closing():
                    await close_writer(writer)
            await wait_for(lambda: tcp_stats(runtime).active == 0, 2.0, what="all ended")
            stats = tcp_stats(runtime)
            adds_up(runtime)
            figures = [(s.total, s.connect_time.count, s.active)
                       for s in runtime.backend_stats(pool)]
    assert figures == [(3, 3, 0), (3, 3, 0)]
    assert stats.ended[EndReason.CLOSED_BY_OPERATOR] == 3
    assert sum(stats.ended.values()) == 6


async def test_a_weighted_pool_is_admitted_by_the_engine_in_its_smooth_cycle() -> None:
    """weighted_round_robin with whole weights 2 and 1: the first accept picks `a` in Python
    and hands the engine the cycle from there (b a a); the engine admits the other eight, and
    the backends see exactly 2:1."""
    async with echo_backend() as a, echo_backend() as b:
        listen = f"{LOOPBACK}:{free_port()}"
        pool = {"algorithm": "weighted_round_robin",
                "backends": [{"address": a.address, "weight": 2},
                             {"address": b.address, "weight": 1}]}
        async with running(one_pool_config(listen, [], pool=pool)) as runtime:
            listener = runtime.listeners["lb"]
            held = []
            for _ in range(9):
                reader, writer = await connect(listen)
                await roundtrip(reader, writer, b"w")
                held.append(writer)
            assert (a.accepted, b.accepted) == (6, 3)
            assert listener.fast_admitted == 8  # type: ignore[attr-defined]
            assert [s.active for s in runtime.backend_stats(runtime.pools["p"])] == [6, 3]
            adds_up(runtime)
            for writer in held:
                await close_writer(writer)
            await wait_for(lambda: tcp_stats(runtime).active == 0, 2.0, what="all ended")
            adds_up(runtime)
            assert sum(tcp_stats(runtime).ended.values()) == 9


async def test_a_least_connections_pool_is_admitted_by_the_engine_by_live_load() -> None:
    """least_connections, weights 3 and 1: the engine admits by active connections per weight
    (6:2 of 8 held); after a cut of backend a's connections, the next two go to a."""
    async with echo_backend() as a, echo_backend() as b:
        listen = f"{LOOPBACK}:{free_port()}"
        pool = {"algorithm": "least_connections",
                "backends": [{"address": a.address, "weight": 3},
                             {"address": b.address, "weight": 1}]}
        async with running(one_pool_config(listen, [], pool=pool)) as runtime:
            listener = runtime.listeners["lb"]
            stats = runtime.pools["p"]
            held = []
            for _ in range(8):
                reader, writer = await connect(listen)
                await roundtrip(reader, writer, b"l")
                held.append((reader, writer))
            assert (a.accepted, b.accepted) == (6, 2)
            assert [s.active for s in runtime.backend_stats(stats)] == [6, 2]
            cut = listener.close_backend(a.address, EndReason.CLOSED_BY_OPERATOR)  # type: ignore[attr-defined]
            assert cut == 6
            await wait_for(lambda: tcp_stats(runtime).active == 2, 2.0, what="a's cut")
            for _ in range(2):
                reader, writer = await connect(listen)
                await roundtrip(reader, writer, b"l")
                held.append((reader, writer))
            assert (a.accepted, b.accepted) == (8, 2)
            assert listener.fast_admitted == 9  # type: ignore[attr-defined]
            adds_up(runtime)
            for _reader, writer in held:
                if not writer.is_closing():
                    await close_writer(writer)
            await wait_for(lambda: tcp_stats(runtime).active == 0, 2.0, what="all ended")
            adds_up(runtime)
            assert [s.active for s in runtime.backend_stats(stats)] == [0, 0]


@pytest.mark.parametrize(("algorithm", "hash_key", "client", "weights"), [
    ("maglev", "source_ip", "127.0.0.{}", (1, 1, 1)),
    ("maglev", "source_ip_port", "127.0.0.{}", (1, 1, 1)),
    ("maglev", "source_ip_port", "::1", (1, 1, 1)),
    ("source_hash", "source_ip", "127.0.0.{}", (1, 1, 1)),
    ("source_hash", "source_ip_port", "127.0.0.{}", (1, 2, 3)),
])
async def test_a_hash_pool_is_admitted_by_the_engine_where_its_picker_sends(
        algorithm: str, hash_key: str, client: str, weights: tuple[int, ...]) -> None:
    """maglev and source_hash: the engine hashes each client's key itself (XXH64 of the packed
    address, and port) and sends it where the pool's own picker would (Maglev's slot, the
    rendezvous ranking, weighted or not): 16 clients, 3 backends."""
    async with echo_backend() as a, echo_backend() as b, echo_backend() as c:
        port = free_port()
        host = "::1" if ":" in client else LOOPBACK
        listen = f"[::1]:{port}" if ":" in client else f"{LOOPBACK}:{port}"
        pool = {"algorithm": algorithm, "hash_key": hash_key, "maglev_table_size": 251,
                "backends": [{"address": peer.address, "weight": weight}
                             for peer, weight in zip((a, b, c), weights, strict=True)]}
        text = one_pool_config(listen, [], pool=pool)
        async with running(text) as runtime:
            listener = runtime.listeners["lb"]
            snapshot = runtime.pools["p"].snapshot
            held, chosen, expected = [], [], []
            for i in range(16):
                reader, writer = await asyncio.open_connection(
                    host, port, local_addr=(client.format(20 + i), 0))
                await roundtrip(reader, writer, b"m")
                held.append(writer)
                peer = writer.get_extra_info("sockname")[:2]
                flow = next(f for f in listener.connections.values()  # type: ignore[attr-defined]
                            if f.peer == peer)
                chosen.append(flow.slot.id)
                index = snapshot.picker.pick(source_key(peer[0], peer[1], hash_key))
                expected.append(snapshot.backends[index].id)
            assert listener.fast_admitted == 15  # type: ignore[attr-defined]
            for writer in held:
                await close_writer(writer)
            await wait_for(lambda: tcp_stats(runtime).active == 0, 2.0, what="all ended")
            adds_up(runtime)
    assert chosen == expected
    assert len(set(chosen)) > 1  # the sources spread (a test that could not tell otherwise)


async def test_a_power_of_two_pool_is_admitted_by_the_engine_by_samples_and_load() -> None:
    """power_of_two over two backends samples both every time, so the less loaded per weight
    wins: weights 3 and 1, 8 held connections end 6:2 (the engine's own counts); then, with
    nothing held, three backends are chosen in proportion to weight (a tie goes to the first
    sample, drawn by weight): 400 short connections, each share within half its expected
    count of it (over 3.8 standard deviations for the smallest)."""
    async with echo_backend() as a, echo_backend() as b, echo_backend() as c:
        listen = f"{LOOPBACK}:{free_port()}"
        pool = {"algorithm": "power_of_two",
                "backends": [{"address": a.address, "weight": 3},
                             {"address": b.address, "weight": 1}]}
        async with running(one_pool_config(listen, [], pool=pool)) as runtime:
            listener = runtime.listeners["lb"]
            held = []
            for _ in range(8):
                reader, writer = await connect(listen)
                await roundtrip(reader, writer, b"p")
                held.append(writer)
            assert (a.accepted, b.accepted) == (6, 2)
            assert listener.fast_admitted == 7  # type: ignore[attr-defined]
            for writer in held:
                await close_writer(writer)
            await wait_for(lambda: tcp_stats(runtime).active == 0, 2.0, what="all ended")
            adds_up(runtime)
        pool["backends"] = [{"address": peer.address, "weight": weight}
                            for peer, weight in ((a, 1), (b, 2), (c, 5))]
        before = (a.accepted, b.accepted, c.accepted)
        async with running(one_pool_config(listen, [], pool=pool)) as runtime:
            for _ in range(400):
                reader, writer = await connect(listen)
                await roundtrip(reader, writer, b"p")
                await close_writer(writer)
                await wait_for(lambda: tcp_stats(runtime).active == 0, 2.0, what="ended")
            adds_up(runtime)
    counts = [after - first for after, first in zip((a.accepted, b.accepted, c.accepted),
                                                      before, strict=True)]
    assert sum(counts) == 400
    for count, weight in zip(counts, (1, 2, 5), strict=True):
        assert abs(count - 400 * weight / 8) <= 0.5 * 400 * weight / 8, counts


async def test_a_hash_pool_picks_as_its_picker_with_workers(workers: int) -> None:
    """The default process model: each worker's engine admits on its own table, and every
    client still lands where the pool's Maglev picker sends it, whichever worker takes it
    (12 sources held open, the backends' counts against the picker's)."""
    async with echo_backend() as a, echo_backend() as b, echo_backend() as c:
        listen = f"{LOOPBACK}:{free_port()}"
        host, _, port = listen.rpartition(":")
        text = one_pool_config(listen, [a.address, b.address, c.address],
                               pool={"algorithm": "maglev", "maglev_table_size": 251})
        async with running(text, workers=workers) as runtime:
            snapshot = runtime.pools["p"].snapshot
            expected = Counter()
            held = []
            for i in range(12):
                source = f"127.0.0.{60 + i}"
                reader, writer = await asyncio.open_connection(host, int(port),
                                                               local_addr=(source, 0))
                await roundtrip(reader, writer, b"w")
                held.append(writer)
                index = snapshot.picker.pick(source_key(source, 0, "source_ip"))
                expected[snapshot.backends[index].id] += 1
            for writer in held:
                await close_writer(writer)
    assert Counter({a.address: a.accepted, b.address: b.accepted, c.address: c.accepted}) \
        == expected
    assert len(expected) > 1


async def test_the_engine_admits_within_the_table() -> None:
    """max_connections 2: the engine's credit stops at the table's size, so a connection past
    it goes to `accepted`, which refuses it (table_full); room again, and the engine admits."""
    async with echo_backend() as peer:
        listen = f"{LOOPBACK}:{free_port()}"
        text = one_pool_config(listen, [peer.address], listener={"max_connections": 2})
        async with running(text) as runtime:
            listener = runtime.listeners["lb"]
            seen = []
            for _ in range(2):
                held = []
                for _ in range(2):  # the first through `accepted`, the second the engine's
                    reader, writer = await connect(listen)
                    await roundtrip(reader, writer, b"in")
                    held.append(writer)
                reader, writer = await connect(listen)
                assert await wait_closed(reader, 2.0) in ("eof", "reset")
                await close_writer(writer)
                seen.append(listener.fast_admitted)  # type: ignore[attr-defined]
                for writer in held:
                    await close_writer(writer)
                await wait_for(lambda: tcp_stats(runtime).active == 0, 2.0, what="all ended")
            stats = tcp_stats(runtime)
            adds_up(runtime)
    assert stats.rejected[RejectReason.TABLE_FULL] == 2
    assert stats.ended[EndReason.CLIENT_FIN] == 4
    assert seen == [1, 2]


async def test_a_listener_with_a_rule_per_connection_is_not_admitted_by_the_engine() -> None:
    async with echo_backend() as peer:
        listen = f"{LOOPBACK}:{free_port()}"
        text = one_pool_config(listen, [peer.address],
                               listener={"limits": {"max_connections_per_source": 10}})
        async with running(text) as runtime:
            for _ in range(3):
                reader, writer = await connect(listen)
                await roundtrip(reader, writer, b"x")
                await close_writer(writer)
            await wait_for(lambda: tcp_stats(runtime).active == 0, 2.0, what="all ended")
            adds_up(runtime)
            assert runtime.listeners["lb"].fast_admitted == 0  # type: ignore[attr-defined]
