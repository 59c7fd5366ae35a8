"""Faults on the engine's fast admission (docs/engine.md, "Fast admission"), for every pool
algorithm whose engine path differs from round robin's: the weighted cycle, the engine's own
least-connections and power-of-two counts (moved on a retry, dropped at the end), Maglev's and
source hash's client key hashed in C, and load shedding's credit lent to the engine.

- backends that reset (right after accept, and mid-stream after a reply) and one that refuses:
  every client gets its bytes intact or a clean cut, a refused connect is retried (never a client
  error while another backend can be tried), and /metrics adds up: accepted = rejected + ended +
  active, per backend connections + connect failures = what the backend accepted;
- least connections and power of two: after a storm of resets the engine's count of every target
  is 0 again, and the next held connections split as the picker says (a leaked count skews it);
  a retry off a refusing backend moves its count, so when that backend comes back it takes the
  next connections until it has caught up; the count is the backend's, whichever listener or
  whichever target (one made before a reload) a connection went through;
- out of descriptors with a hash or a weighted pool: in `pointsman run` (the descriptor budget
  keeps it off EMFILE) nobody blamed, no socket left open, the listener serves again and the
  counters add up; in the test's own process, a real EMFILE on a connection the engine admitted
  is our shortage, not the backend's, and the engine admits on its table again after;
- load shedding with `workers: 2` (least connections, source hash): never more open than the
  process's bound;
- a reset found by a write towards the reset side (not by a read) still delivers what that side
  sent before it.

The real `pointsman` process (what operators run) is read through its admin API; where the engine's
own per-target counts are looked at, the node runs in the test's loop (one process; with two
workers the same test reads the control process's sums).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from pointsman.config.loader import load_text
from pointsman.telemetry.flow import EndReason
from tests.hostile import (
    LINGER_RESET,
    admin_json,
    admin_metrics,
    client_send_then_reset,
    echo,
    metric_sum,
    pattern,
    raw_backend,
    raw_connect,
    read_to_end,
    reset,
    send_all,
    send_then_reset,
    unsent,
)
from tests.support import (
    LOOPBACK,
    REPORT_TIMEOUT,
    free_port,
    loopback_server,
    pointsman_process_async,
    refused_port,
    running,
    statistics_when,
    wait_for,
)

pytestmark = [pytest.mark.timeout(90), pytest.mark.usefixtures("engine")]

# The algorithms whose engine path is not round robin's (test_quiet_connect.py and the other
# fault suites cover round robin).
ALGORITHMS = ["weighted_round_robin", "least_connections", "power_of_two", "maglev", "source_hash"]
LOAD_AWARE = ["least_connections", "power_of_two"]

REQUEST = 3000  # what each client sends before its FIN
REPLY = 5000  # what a mid-stream resetter sends before its RST
IO_TIMEOUT = 10.0
CLIENTS = 24
SOURCES = [f"127.0.0.{100 + i}" for i in range(CLIENTS)]  # a hash pool spreads them


def pool_config(algorithm: str, backends: list[dict[str, Any]], **pool: Any) -> dict[str, Any]:
    """A pool that blames nobody on its own (no probes, no passive ejection), so the faults
    under test are what moves the connections; retries as by default (2)."""
    return {"name": "p", "algorithm": algorithm, "connect_timeout": "2s",
            "maglev_table_size": 251, "health_check": {"type": "none"},
            "passive": {"consecutive_failures": 0}, "backends": backends, **pool}


def node_config(listen: str, pool: dict[str, Any], *, admin: str | None = None,
                workers: int | None = None, **top: Any) -> str:
    data: dict[str, Any] = {
        "listeners": [{"name": "lb", "bind": listen, "pool": "p"}],
        "pools": [pool],
        "shutdown_grace": "1s",
        **top,
    }
    if admin is not None:
        data["admin"] = {"bind": admin}
    if workers is not None:
        data["workers"] = workers
    return yaml.safe_dump(data, sort_keys=False)


# --- peers ---------------------------------------------------------------------------------------


async def reset_at_once(sock: socket.socket) -> None:
    """Backend: a RST right after the accept (SO_LINGER 0; the caller closes)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)


def greeter(name: str) -> Any:
    """Backend: its one-letter name, then an echo (a held client learns where it is)."""

    async def handler(sock: socket.socket) -> None:
        await send_all(sock, name.encode())
        await echo(sock)

    return handler


@dataclass
class Switch:
    """A backend whose behaviour the test changes: resetting (read the request, send REPLY
    bytes, then a RST) or, once `resets` is off, a greeter."""

    name: str
    resets: bool = True

    async def __call__(self, sock: socket.socket) -> None:
        if self.resets:
            await send_then_reset(REPLY, read_first=REQUEST)(sock)
        else:
            await greeter(self.name)(sock)


@dataclass
class Outcomes:
    """How the clients' connections ended, as the clients saw them."""

    intact: int = 0  # the request echoed back whole (after a greeter's name), then a FIN
    cut_after_reply: int = 0  # the resetter's whole reply, then a RST
    cut: int = 0  # a RST before any byte
    odd: list[tuple[int, str]] = field(default_factory=list)  # anything else: (bytes, how)


async def exchange(listen: str, source: str | None, seed: int, outcomes: Outcomes) -> None:
    """One client: REQUEST bytes, a FIN, then read to the end; its outcome counted."""
    sock = await raw_connect(listen, timeout=IO_TIMEOUT, source=source)
    try:
        request = pattern(REQUEST, seed=seed)
        await send_all(sock, request)
        sock.shutdown(socket.SHUT_WR)
        data, how = await read_to_end(sock, IO_TIMEOUT)
    finally:
        sock.close()
    if how == "eof" and data[-REQUEST:] == request and len(data) - REQUEST in (0, 1):
        outcomes.intact += 1  # after the backend's one-letter name, if it greets
    elif (data, how) == (pattern(REPLY), "reset"):
        outcomes.cut_after_reply += 1
    elif (data, how) == (b"", "reset"):
        outcomes.cut += 1
    else:
        outcomes.odd.append((len(data), how))


async def metrics_when(admin: str, predicate: Any, what: str) -> dict[str, float]:
    """/metrics once `predicate(metrics)` holds (with workers the control process sums their
    reports, which come every 0.5 s); read in a thread: the backends run in this loop."""
    found: dict[str, float] = {}

    async def check() -> bool:
        nonlocal found
        try:
            found = await asyncio.to_thread(admin_metrics, admin)
        except OSError:  # the admin API is not up yet (it starts after the listeners)
            return False
        return bool(predicate(found))

    loop = asyncio.get_running_loop()
    deadline = loop.time() + REPORT_TIMEOUT + 5.0
    while not await check():
        if loop.time() >= deadline:
            raise AssertionError(f"not true after the reports: {what}; metrics: {found}")
        await asyncio.sleep(0.1)
    return found


def total(metrics: dict[str, float], name: str, **labels: str) -> int:
    return int(metric_sum(metrics, name, **labels))


def assert_adds_up(metrics: dict[str, float]) -> None:
    accepted = total(metrics, "pointsman_connections_accepted_total")
    rejected = total(metrics, "pointsman_connections_rejected_total")
    ended = total(metrics, "pointsman_connections_ended_total")
    active = total(metrics, "pointsman_active_connections")
    assert accepted == rejected + ended + active, (accepted, rejected, ended, active)


# --- resets and a refusing backend, every algorithm, one and two workers ---------------------------


@pytest.mark.asyncio(loop_factories=["uvloop"])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
async def test_resets_and_a_refusing_backend_leave_every_client_whole_and_counts_adding_up(
        algorithm: str, workers: int, tmp_path: Path) -> None:
    """Four backends: one echoes, one resets at accept, one resets after its reply, one refuses.
    24 clients from 24 sources at once. Each gets its request back whole, or the resetter's
    reply whole then a RST, or a RST; the refusing backend costs nobody anything (a retry); the
    backends' own accept counts are what /metrics says they took, and nothing stays open."""
    outcomes = Outcomes()
    async with (raw_backend(echo) as good, raw_backend(reset_at_once) as early,
                raw_backend(send_then_reset(REPLY, read_first=REQUEST)) as late):
        with refused_port() as dead_port:
            dead = f"{LOOPBACK}:{dead_port}"
            backends = [{"name": "good", "address": good.address, "weight": 3},
                        {"name": "early", "address": early.address, "weight": 1},
                        {"name": "late", "address": late.address, "weight": 2},
                        {"name": "dead", "address": dead, "weight": 1}]
            listen = f"{LOOPBACK}:{free_port()}"
            admin = f"{LOOPBACK}:{free_port()}"
            text = node_config(listen, pool_config(algorithm, backends), admin=admin,
                               workers=workers)
            async with pointsman_process_async(text, tmp_path):
                await asyncio.gather(*(exchange(listen, source, i, outcomes)
                                       for i, source in enumerate(SOURCES)))
                metrics = await metrics_when(
                    admin, lambda m: total(m, "pointsman_connections_ended_total") == CLIENTS
                    and total(m, "pointsman_backend_connect_failures_total", backend="dead") > 0,
                    what=f"{CLIENTS} connections ended")
                status = await asyncio.to_thread(admin_json, admin)

    assert outcomes.odd == [], f"clients neither whole nor cleanly cut: {outcomes.odd}"
    assert outcomes.intact + outcomes.cut_after_reply + outcomes.cut == CLIENTS
    assert outcomes.intact == good.accepted
    assert outcomes.cut_after_reply == late.accepted
    # A reset at accept cuts the client, or, seen before the connect completed, is retried.
    assert outcomes.cut <= early.accepted
    assert_adds_up(metrics)
    assert total(metrics, "pointsman_connections_accepted_total") == CLIENTS
    assert total(metrics, "pointsman_active_connections") == 0
    assert total(metrics, "pointsman_connections_rejected_total") == 0
    assert total(metrics, "pointsman_connections_connect_failed_total") == 0, \
        "a client lost to a refused connect while another backend could be tried"
    assert total(metrics, "pointsman_connections_ended_total", reason="client_fin") \
        == outcomes.intact
    assert total(metrics, "pointsman_connections_ended_total", reason="backend_reset") \
        == outcomes.cut_after_reply + outcomes.cut
    accepted_by = {"good": good.accepted, "early": early.accepted, "late": late.accepted,
                   "dead": 0}
    for name, accepted in accepted_by.items():
        connections = total(metrics, "pointsman_backend_connections_total", backend=name)
        failures = total(metrics, "pointsman_backend_connect_failures_total", backend=name)
        assert connections + failures == accepted if name != "dead" else connections == 0, \
            (name, connections, failures, accepted)
        assert total(metrics, "pointsman_backend_active_connections", backend=name) == 0, name
    failures = sum(total(metrics, "pointsman_backend_connect_failures_total", backend=name)
                   for name in accepted_by)
    assert total(metrics, "pointsman_connect_retries_total") == failures
    [pool] = status["pools"]
    assert {b["id"]: b["active"] for b in pool["backends"]} == dict.fromkeys(accepted_by, 0)
    assert status["transitions"] == [], "a fault changed a backend's state"


# --- least connections and power of two: the engine's own counts -----------------------------------

STORM = 42  # a third reset by the client, the rest served or reset by their backend
HELD = 16


def engine_counts(runtime: Any) -> dict[str, int]:
    """The engine's own count of each target's connections (what its least-connections scan and
    power-of-two comparison read), by backend id; one process only."""
    listener = runtime.listeners["lb"]
    slots = listener._targets_of(runtime.pools["p"]).slots
    return {slot.id: int(slot.target.active) for slot in slots if slot is not None}


def backend_active(runtime: Any) -> dict[str, int]:
    """The policy's count per backend (with workers: the sum of their reports)."""
    pool = runtime.pools["p"]
    return {member.id: stats.active
            for member, stats in zip(pool.members(), runtime.backend_stats(pool), strict=True)}


async def counts_settle(runtime: Any, workers: int, expected: dict[str, int]) -> None:
    """Every backend's count is `expected`, in the policy and (one process) in the engine."""
    await wait_for(lambda: backend_active(runtime) == expected, REPORT_TIMEOUT,
                   what=f"backends' active counts {expected}")
    if workers == 1:
        assert engine_counts(runtime) == expected


async def hold(listen: str, count: int) -> tuple[list[socket.socket], Counter[str]]:
    """Open `count` connections one after another, each greeted by its backend before the
    next opens (so each counts on its backend when the next is picked); how many each reached."""
    loop = asyncio.get_running_loop()
    socks: list[socket.socket] = []
    split: Counter[str] = Counter()
    try:
        for _ in range(count):
            sock = await raw_connect(listen, timeout=IO_TIMEOUT)
            socks.append(sock)
            async with asyncio.timeout(IO_TIMEOUT):
                split[(await loop.sock_recv(sock, 1)).decode()] += 1
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks, split


def ended_total(stats: Any) -> int:
    return sum(stats.rejected.values()) + sum(stats.ended.values())


@pytest.mark.asyncio(loop_factories=["uvloop"])
@pytest.mark.parametrize("algorithm", LOAD_AWARE)
async def test_after_a_reset_storm_the_engine_counts_are_zero_and_the_split_is_even(
        algorithm: str, workers: int) -> None:
    """Two equal backends; one resets every connection after its reply while 42 clients come
    at once, a third of which reset themselves. Then each count is 0 again, in the policy and in
    the engine, and 16 held connections split 8:8 (one process: exactly as the picker says; a
    count leaked by any of those endings would send more to the other backend); with two
    workers each splits its own share so, within one each."""
    flaky = Switch("a")
    async with raw_backend(flaky) as a, raw_backend(greeter("b")) as b:
        listen = f"{LOOPBACK}:{free_port()}"
        backends = [{"name": "a", "address": a.address}, {"name": "b", "address": b.address}]
        async with running(node_config(listen, pool_config(algorithm, backends)),
                           workers=workers) as runtime:
            outcomes = Outcomes()
            await asyncio.gather(*(
                client_send_then_reset(listen, REQUEST) if i % 3 == 0 else
                exchange(listen, None, i, outcomes) for i in range(STORM)))
            stats = await statistics_when(runtime, lambda s: ended_total(s) == STORM,
                                          what="the storm's connections ended")
            assert stats.accepted == STORM and stats.active == 0
            assert outcomes.odd == [] and outcomes.cut == 0
            assert outcomes.intact + outcomes.cut_after_reply == STORM - len(range(0, STORM, 3))
            assert stats.ended["backend_reset"] >= outcomes.cut_after_reply >= 1
            await counts_settle(runtime, workers, {"a": 0, "b": 0})

            flaky.resets = False
            socks, split = await hold(listen, HELD)
            try:
                if workers == 1:
                    assert split == {"a": HELD // 2, "b": HELD // 2}
                else:
                    assert abs(split["a"] - split["b"]) <= workers, split
                await counts_settle(runtime, workers, {"a": split["a"], "b": split["b"]})
            finally:
                for sock in socks:
                    sock.close()
            stats = await statistics_when(runtime, lambda s: ended_total(s) == STORM + HELD,
                                          what="the held connections ended")
            assert stats.accepted == STORM + HELD and stats.active == 0
            await counts_settle(runtime, workers, {"a": 0, "b": 0})


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_a_retry_moves_the_least_connections_count(workers: int) -> None:
    """Least connections over a refusing backend and two live ones: the engine picks the
    refusing one (no connections), the connect is refused and retried on the less loaded live
    one, and the engine's count moves with it. 12 held connections split 6:6 between the live
    ones; then the refusing backend comes up and, counting 0, takes the next 6 (one process:
    all of them; a count left behind by the retries would send them elsewhere)."""
    dead = socket.socket()
    dead.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    dead.bind((LOOPBACK, 0))
    first, later = 12, 6
    try:
        async with raw_backend(greeter("b")) as b, raw_backend(greeter("c")) as c:
            listen = f"{LOOPBACK}:{free_port()}"
            backends = [{"name": "a", "address": f"{LOOPBACK}:{dead.getsockname()[1]}"},
                        {"name": "b", "address": b.address},
                        {"name": "c", "address": c.address}]
            text = node_config(listen, pool_config("least_connections", backends))
            async with running(text, workers=workers) as runtime:
                socks, split = await hold(listen, first)
                try:
                    if workers == 1:
                        assert split == {"b": first // 2, "c": first // 2}
                    else:
                        assert abs(split["b"] - split["c"]) <= workers, split
                    assert set(split) == {"b", "c"}
                    await counts_settle(runtime, workers, {"a": 0, "b": split["b"], "c": split["c"]})
                    stats = await statistics_when(
                        runtime, lambda s: s.retried == backend_failures(runtime, "a")
                        and s.retried > 0, what="the retries reported")
                    assert stats.connect_failed == 0 and stats.active == first
                    async with raw_backend(greeter("a"), bound=dead):
                        more, moved = await hold(listen, later)
                        socks += more
                        if workers == 1:
                            assert moved == {"a": later}
                        else:
                            assert sum(moved.values()) == later, moved
                        await counts_settle(runtime, workers, {
                            name: split[name] + moved[name] for name in "abc"})
                finally:
                    for sock in socks:
                        sock.close()
                stats = await statistics_when(
                    runtime, lambda s: ended_total(s) == first + later, what="all ended")
                assert stats.active == 0 and stats.connect_failed == 0
                await counts_settle(runtime, workers, {"a": 0, "b": 0, "c": 0})
    finally:
        dead.close()


def backend_failures(runtime: Any, name: str) -> int:
    pool = runtime.pools["p"]
    return next(stats.connect_failures for member, stats in
                zip(pool.members(), runtime.backend_stats(pool), strict=True) if member.id == name)


@pytest.mark.asyncio(loop_factories=["uvloop"])
@pytest.mark.parametrize("algorithm", LOAD_AWARE)
async def test_the_engine_counts_a_backend_through_every_listener_and_across_a_reload(
        algorithm: str) -> None:
    """The engine compares what the picker compares: every connection to a backend in the
    process. Backend b drained, 4 held on listener lb all reach a; b back, 2 held on a second
    listener of the same pool both go to b (a has 4); the pool reloaded with a new idle timeout
    (its targets are remade while the 6 stay open), 2 more on lb go to b again (4 against 2).
    One process: the engine's counts are its own, exactly the policy's."""
    async with raw_backend(greeter("a")) as a, raw_backend(greeter("b")) as b:
        first, second = (f"{LOOPBACK}:{free_port()}" for _ in range(2))
        backends = [{"name": "a", "address": a.address}, {"name": "b", "address": b.address}]
        data = yaml.safe_load(node_config(first, pool_config(algorithm, backends)))
        data["listeners"].append({"name": "lb2", "bind": second, "pool": "p"})
        async with running(yaml.safe_dump(data)) as runtime:
            pool = runtime.pools["p"]
            socks: list[socket.socket] = []
            try:
                pool.drain("b")
                held, split = await hold(first, 4)
                socks += held
                assert split == {"a": 4}
                pool.enable("b")
                held, split = await hold(second, 2)
                socks += held
                assert split == {"b": 2}, "the other listener's connections were not counted"
                await counts_settle(runtime, 1, {"a": 4, "b": 2})
                data["pools"][0]["idle_timeout"] = "100s"
                assert await runtime.apply(load_text(yaml.safe_dump(data), "<reload>")) == []
                held, split = await hold(first, 2)
                socks += held
                assert split == {"b": 2}, "the connections before the reload were not counted"
                await counts_settle(runtime, 1, {"a": 4, "b": 4})
            finally:
                for sock in socks:
                    sock.close()
            await wait_for(lambda: backend_active(runtime) == {"a": 0, "b": 0}, REPORT_TIMEOUT,
                           what="every connection ended")
            assert engine_counts(runtime) == {"a": 0, "b": 0}



# --- out of descriptors with a hash or a weighted pool ----------------------------------------------


@pytest.mark.asyncio(loop_factories=["uvloop"])
@pytest.mark.parametrize(("algorithm", "workers"), [
    ("source_hash", 1), ("source_hash", 2), ("weighted_round_robin", 2)])
async def test_out_of_descriptors_with_a_keyed_or_weighted_pool(
        algorithm: str, workers: int, tmp_path: Path) -> None:
    """As test_faults_resources' run short of descriptors (`prlimit --nofile=256`, 400 clients
    held), with the engine admitting on a hash or weighted table, each client from its own
    address: the limit is hit and counted, nobody is blamed, then 100 clients are all served at
    once, /metrics adds up with nothing open, and the process holds no more sockets than before
    the flood (a connection leaked on the way out of the shortage would keep two)."""
    from tests.hostile import fd_limited_pointsman, open_sockets
    from tests.integration.test_faults_resources import (
        AFTER,
        NOFILE,
        assert_no_backend_blamed,
        echo_once,
    )
    from tests.integration.test_faults_resources import HELD as FLOOD

    sources = [f"127.0.{i // 200}.{10 + i % 200}" for i in range(FLOOD)]
    async with raw_backend(echo) as a, raw_backend(echo) as b, raw_backend(echo) as c:
        listen = f"{LOOPBACK}:{free_port()}"
        admin = f"{LOOPBACK}:{free_port()}"
        backends = [{"name": name, "address": peer.address, "weight": weight}
                    for name, peer, weight in (("a", a, 3), ("b", b, 2), ("c", c, 1))]
        pool = pool_config(algorithm, backends)
        pool["passive"] = {}  # passive ejection on, as by default: a shortage must not trip it
        text = node_config(listen, pool, admin=admin, workers=workers)
        with fd_limited_pointsman(text, tmp_path, NOFILE) as proc:
            await metrics_when(admin, lambda m: True, what="the admin API answers")
            baseline = open_sockets(proc.pid)

            def limit_was_hit(m: dict[str, float]) -> bool:
                return (metric_sum(m, "pointsman_local_resource_errors_total")
                        + metric_sum(m, "pointsman_accept_errors_total")) > 0

            held = []
            try:
                for i, source in enumerate(sources):
                    sock = await raw_connect(listen, timeout=5.0, source=source)
                    held.append(sock)
                    with contextlib.suppress(OSError):
                        sock.send(b"held %d\n" % i)
                await metrics_when(admin, limit_was_hit, what="the descriptor limit hit, counted")
            finally:
                for sock in held:
                    sock.close()
            results = await asyncio.gather(
                *(echo_once(listen, b"after %d\n" % i) for i in range(AFTER)),
                return_exceptions=True)
            failures = [r for r in results if isinstance(r, BaseException)]
            assert not failures, f"{len(failures)} of {AFTER} failed, first: {failures[0]!r}"
            final = await metrics_when(
                admin, lambda m: total(m, "pointsman_active_connections") == 0
                and total(m, "pointsman_connections_accepted_total") >= AFTER,
                what="every connection over")
            await asyncio.to_thread(assert_no_backend_blamed, admin)
            await wait_for(lambda: open_sockets(proc.pid) <= baseline, 5.0,
                           what=f"back to the {baseline} sockets held before the flood")
    assert_adds_up(final)
    for name in "abc":
        assert total(final, "pointsman_backend_active_connections", backend=name) == 0, name
    assert total(final, "pointsman_connections_rejected_total", reason="local_resource") \
        <= total(final, "pointsman_local_resource_errors_total")


# --- load shedding with two workers -------------------------------------------------------------------

SHED_BOUND = 6  # each of the two workers sheds at its share: 3
SHED_ATTEMPTS = 14  # one worker meets at least 7 of them: past its share whatever the spread


async def served(sock: socket.socket) -> bool:
    """True when a line comes back through pointsman, False when it cut the connection."""
    loop = asyncio.get_running_loop()
    try:
        await send_all(sock, b"ping\n", IO_TIMEOUT)
        async with asyncio.timeout(IO_TIMEOUT):
            got = b""
            while len(got) < 5:
                data = await loop.sock_recv(sock, 64)
                if not data:
                    return False
                got += data
    except ConnectionError:
        return False
    assert got == b"ping\n"
    return True


@pytest.mark.asyncio(loop_factories=["uvloop"])
@pytest.mark.parametrize("algorithm", ["least_connections", "source_hash"])
async def test_shedding_bound_holds_with_two_workers_and_a_load_aware_or_keyed_pool(
        algorithm: str, tmp_path: Path) -> None:
    """`shedding.max_connections: 6` over two listeners on one pool, `workers: 2`: 14 clients
    from 14 addresses held open, alternating listeners. Each worker lends its engine credit
    within its share, so never more than 6 are served (and the backends never see more), at
    least one worker's share (3) is, every other one is shed and counted so; once they close,
    a new client is served again and /metrics adds up with nothing open."""
    async with raw_backend(echo) as a, raw_backend(echo) as b:
        first, second = (f"{LOOPBACK}:{free_port()}" for _ in range(2))
        admin = f"{LOOPBACK}:{free_port()}"
        backends = [{"name": "a", "address": a.address, "weight": 2},
                    {"name": "b", "address": b.address, "weight": 1}]
        data = yaml.safe_load(node_config(first, pool_config(algorithm, backends), admin=admin,
                                          workers=2, shedding={"max_connections": SHED_BOUND}))
        data["listeners"].append({"name": "lb2", "bind": second, "pool": "p"})
        async with pointsman_process_async(yaml.safe_dump(data), tmp_path):
            held: list[socket.socket] = []
            outcomes: list[bool] = []
            try:
                for i in range(SHED_ATTEMPTS):
                    sock = await raw_connect((first, second)[i % 2], timeout=IO_TIMEOUT,
                                             source=f"127.0.1.{20 + i}")
                    held.append(sock)
                    outcomes.append(await served(sock))
                opened = a.accepted + b.accepted
            finally:
                for sock in held:
                    sock.close()
            metrics = await metrics_when(
                admin, lambda m: total(m, "pointsman_connections_accepted_total")
                == SHED_ATTEMPTS and total(m, "pointsman_active_connections") == 0,
                what="every held connection over")
            sock = await raw_connect(first, timeout=IO_TIMEOUT, source="127.0.1.99")
            try:
                again = await served(sock)
            finally:
                sock.close()
    count = outcomes.count(True)
    assert SHED_BOUND // 2 <= count <= SHED_BOUND, outcomes
    assert opened == count, "a backend saw a connection the client was not served on"
    assert total(metrics, "pointsman_connections_rejected_total", reason="shed_connections") \
        == SHED_ATTEMPTS - count
    assert_adds_up(metrics)
    assert again, "not served once the shed connections' room was free again"


@pytest.mark.asyncio(loop_factories=["uvloop"])
@pytest.mark.parametrize("algorithm", ["source_hash", "weighted_round_robin", "least_connections"])
async def test_emfile_on_a_connection_the_engine_admitted(algorithm: str) -> None:
    """Real EMFILE in the node's own process (test_faults_resources' descriptors_exhausted:
    pointsman's descriptor budget keeps a subprocess from reaching it). A connection the
    engine admits on its table finds no descriptor for its backend's socket: refused as
    local_resource, counted with its op and errno, nobody blamed, its count dropped; then the
    accept itself fails, and once descriptors are back that client is served, and the engine
    admits the next ones on its table again. The counters add up, in the policy and the engine."""
    from pointsman.telemetry.flow import RejectReason
    from tests.integration.test_faults_resources import descriptors_exhausted, echo_once

    async with raw_backend(echo) as a, raw_backend(echo) as b, raw_backend(echo) as c:
        listen = f"{LOOPBACK}:{free_port()}"
        backends = [{"name": name, "address": peer.address, "weight": weight}
                    for name, peer, weight in (("a", a, 3), ("b", b, 2), ("c", c, 1))]
        pool = pool_config(algorithm, backends)
        pool["passive"] = {"consecutive_failures": 1}  # one blamed failure would eject
        async with running(node_config(listen, pool)) as runtime:
            loop = asyncio.get_running_loop()
            listener = runtime.listeners["lb"]
            stats = listener.stats
            port = int(listen.rpartition(":")[2])
            await echo_once(listen, b"the first, picked in Python, sets the table\n")
            admitted = listener.fast_admitted  # type: ignore[attr-defined]

            refused, late = socket.socket(), socket.socket()
            try:
                refused.setblocking(False)
                with descriptors_exhausted() as fillers:
                    os.close(fillers.pop())  # room for the accept, none for the backend's socket
                    with contextlib.suppress(BlockingIOError):
                        refused.connect((LOOPBACK, port))
                    await wait_for(lambda: stats.rejected[RejectReason.LOCAL_RESOURCE] == 1,
                                   5.0, what="refused as local_resource")
                assert listener.fast_admitted == admitted + 1, "not the engine's admission"
                _, how = await read_to_end(refused, 5.0)
                assert how in ("eof", "reset")

                late.setblocking(False)
                with descriptors_exhausted():
                    with contextlib.suppress(BlockingIOError):
                        late.connect((LOOPBACK, port))
                    await wait_for(lambda: stats.accept_errors["EMFILE"] >= 1, 5.0,
                                   what="accept EMFILE counted")
                await loop.sock_sendall(late, b"late but served\n")
                late.shutdown(socket.SHUT_WR)
                assert await read_to_end(late, 5.0) == (b"late but served\n", "eof")
            finally:
                refused.close()
                late.close()
            before = listener.fast_admitted
            for i in range(8):
                await echo_once(listen, b"after %d\n" % i)
            assert listener.fast_admitted > before, "the engine admits on its table no more"
            await wait_for(lambda: stats.active == 0, 5.0, what="every connection ended")
            assert stats.accepted == sum(stats.rejected.values()) + sum(stats.ended.values())
            assert dict(stats.rejected) == {RejectReason.LOCAL_RESOURCE: 1}
            assert sum(v for k, v in stats.local_resource.items() if k.endswith("EMFILE")) == 1
            engine = listener.engine
            for lid in listener.lids:
                counters = engine.listener_stats(lid)
                assert counters.accepted == counters.refused + counters.ended + counters.active
                assert counters.active == 0
            assert engine_counts(runtime) == {"a": 0, "b": 0, "c": 0}
            assert backend_active(runtime) == {"a": 0, "b": 0, "c": 0}
            assert backend_failures(runtime, "a") + backend_failures(runtime, "b") \
                + backend_failures(runtime, "c") == 0
            assert not runtime.transitions, "a shortage of ours blamed a backend"


# --- a reset found by a write ------------------------------------------------------------------------

SPLICE_AFTER = 1024
PATHS = {"transport": {"zero_copy": "off"},
         "splice": {"zero_copy": "auto", "zero_copy_after": SPLICE_AFTER}}


def wait_acked(sock: socket.socket, timeout: float = 5.0) -> None:
    """Block until the peer's kernel has every byte `sock` sent (the test's loop is blocked on
    purpose meanwhile, so this cannot await)."""
    deadline = time.monotonic() + timeout
    while unsent(sock):
        if time.monotonic() > deadline:
            raise AssertionError("the peer's kernel did not take the bytes")
        time.sleep(0.001)


@pytest.mark.asyncio(loop_factories=["uvloop"])
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("dead", ["backend", "client"])
async def test_a_reset_found_by_a_write_still_delivers_what_came_before_it(
        dead: str, path: str) -> None:
    """One side sends bytes and then a reset while the engine is not looking (the test's loop,
    which runs the node, is blocked on purpose), after the other side sent something the engine
    will write to it first. The engine learns of the reset from that write failing, not from a
    read; the bytes the dead side sent before its reset are still in the kernel, and must reach
    the survivor before the reset does (the reset stays a reset, after every byte)."""
    loop = asyncio.get_running_loop()
    server = loopback_server(8)
    listen = f"{LOOPBACK}:{free_port()}"
    backends = [{"name": "a", "address": f"{LOOPBACK}:{server.getsockname()[1]}"}]
    text = node_config(listen, pool_config("least_connections", backends, **PATHS[path]))
    last = pattern(REPLY, seed=5)  # what the dead side sends just before its reset
    try:
        async with running(text) as runtime:
            stats = runtime.listeners["lb"].stats
            client = await raw_connect(listen)
            backend: socket.socket | None = None
            try:
                await send_all(client, pattern(REQUEST))
                async with asyncio.timeout(IO_TIMEOUT):
                    backend, _ = await loop.sock_accept(server)
                    got = b""
                    while len(got) < REQUEST:
                        got += await loop.sock_recv(backend, 65536)
                await send_all(backend, b"ok")  # past zero_copy_after both ways, too
                async with asyncio.timeout(IO_TIMEOUT):
                    assert await loop.sock_recv(client, 2) == b"ok"
                if path == "splice":
                    await wait_for(lambda: stats.spliced == 1, 5.0, what="moved to splice")
                # The engine does not run until the end of this block: the survivor's bytes
                # are ready first, then the dead side's bytes and reset.
                survivor, doomed = (client, backend) if dead == "backend" else (backend, client)
                survivor.send(b"first")
                wait_acked(survivor)
                doomed.send(last)
                wait_acked(doomed)
                reset(doomed)
                if dead == "backend":
                    backend = None
                else:
                    client = backend  # the survivor, read below
                data, how = await read_to_end(survivor, IO_TIMEOUT)
            finally:
                client.close()
                if backend is not None:
                    backend.close()
            await wait_for(lambda: stats.active == 0, 5.0, what="connection ended")
    finally:
        server.close()
    assert (len(data), how) == (len(last), "reset")
    assert data == last
    reason = EndReason.BACKEND_RESET if dead == "backend" else EndReason.CLIENT_RESET
    assert dict(stats.ended) == {reason: 1}
