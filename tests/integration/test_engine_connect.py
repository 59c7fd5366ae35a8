"""Connecting: a timeout against a port that drops SYNs, a refused backend whose failure reaches
the policy (which retries elsewhere), and our own descriptor exhaustion classified as a local
resource error, never as the backend's failure."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import resource
import socket
import sys
import textwrap
from collections.abc import Iterator

import pytest

from pointsman.balance.hashing import stable_hash64
from pointsman.proxy.engine import iter_records, new_engine
from pointsman.proxy.engine.api import Connected, Decision, End, Flag, Op, Status, iter_connected
from pointsman.proxy.engine.simple import RoundRobinPolicy
from tests.integration.engine_support import ENGINES, echo, open_raw, proxy, raw_backend, recv_to_end
from tests.support import LOOPBACK, refused_port, wait_for


@contextlib.contextmanager
def silent_port() -> Iterator[int]:
    """A port whose accept queue is full: further SYNs are dropped, so connects hang."""
    full = socket.socket()
    full.bind((LOOPBACK, 0))
    full.listen(0)
    port = full.getsockname()[1]
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex((LOOPBACK, port))
        fillers.append(s)
    try:
        yield port
    finally:
        for s in fillers:
            s.close()
        full.close()


async def ping(address: tuple[str, int]) -> tuple[bytes, str]:
    sock = await open_raw(address)
    try:
        try:
            await asyncio.get_running_loop().sock_sendall(sock, b"ping")
            sock.shutdown(socket.SHUT_WR)
        except OSError:  # already closed by the proxy: what it says comes next
            pass
        return await recv_to_end(sock)
    finally:
        sock.close()


@pytest.mark.parametrize("engine", ENGINES)
async def test_connect_timeout_then_retry_elsewhere(engine: str) -> None:
    async with raw_backend(echo) as good:
        with silent_port() as port:
            async with proxy(engine, [port, good.port], connect_timeout=0.3) as p:
                loop = asyncio.get_running_loop()
                began = loop.time()
                assert await ping(p.address) == (b"ping", "eof")
                took = loop.time() - began
                (record,) = await p.wait_ended(1)
    assert 0.29 <= took < 2.0, took
    assert p.policy.outcomes[(0, Status.BACKEND, errno.ETIMEDOUT)] == 1
    assert p.policy.outcomes[(1, Status.OK, 0)] == 1
    assert record.backend == 1 and record.reason == End.CLIENT_FIN


@pytest.mark.parametrize("engine", ENGINES)
async def test_connect_timeout_everywhere_ends_as_connect_failed(engine: str) -> None:
    with silent_port() as port:
        async with proxy(engine, [port], connect_timeout=0.2, retries=0) as p:
            got = await ping(p.address)
            (record,) = await p.wait_ended(1)
    assert got == (b"", "eof")  # the client gets a FIN: nothing was forwarded
    assert record.reason == End.CONNECT_FAILED and record.detail == errno.ETIMEDOUT


@pytest.mark.parametrize("engine", ENGINES)
async def test_refused_backend_reaches_the_policy_which_retries(engine: str) -> None:
    async with raw_backend(echo) as good:
        with refused_port() as bad:
            async with proxy(engine, [bad, good.port]) as p:
                results = [await ping(p.address) for _ in range(4)]
                records = await p.wait_ended(4)
    assert results == [(b"ping", "eof")] * 4
    # Round robin moves on after every try: each connection tried the refused port first.
    assert p.policy.outcomes[(0, Status.BACKEND, errno.ECONNREFUSED)] == 4
    assert p.policy.outcomes[(1, Status.OK, 0)] == 4
    assert {r.backend for r in records} == {1}
    p.assert_adds_up()


EMFILE_SCRIPT = textwrap.dedent("""
    import asyncio, json, resource, socket, sys
    from pointsman.proxy.engine import new_engine
    from pointsman.proxy.engine.simple import RoundRobinPolicy

    async def main(name, backend_port):
        loop = asyncio.get_running_loop()
        engine = new_engine(loop, name)
        policy = RoundRobinPolicy([engine.target(0, "127.0.0.1", backend_port)], retries=3)
        lsock = socket.socket()
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(512)
        lid = engine.add_listener(lsock, policy)
        # Clients from a child process (their descriptors are not ours): hold 80 connections.
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CLIENT, str(lsock.getsockname()[1]), "80",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))  # ours only: the child has its own
        proc.stdin.write(b"go\\n")
        await proc.stdin.drain()
        assert (await proc.stdout.readline()).strip() == b"held"
        for _ in range(200):
            await asyncio.sleep(0.01)
            if engine.statistics().local_errors or engine.statistics().accept_errors:
                break
        exhausted = engine.statistics()
        proc.stdin.write(b"close\\n")
        await proc.stdin.drain()
        await proc.wait()
        for _ in range(500):
            await asyncio.sleep(0.01)
            if engine.active() == 0:
                break
        # Every descriptor is back: the next connections succeed.
        ok = 0
        for _ in range(20):
            r, w = await asyncio.open_connection("127.0.0.1", lsock.getsockname()[1])
            w.write(b"ping"); w.write_eof()
            if await asyncio.wait_for(r.read(), 5) == b"ping":
                ok += 1
            w.close()
        stats = engine.listener_stats(lid)
        print(json.dumps({
            "local": [[op, err, n] for (op, err), n in exhausted.local_errors.items()],
            "accept": [[err, n] for err, n in exhausted.accept_errors.items()],
            "outcomes": [[b, s, e, n] for (b, s, e), n in policy.outcomes.items()],
            "ok": ok, "counters": list(stats), "records": len(policy.records)}))
        engine.shutdown(0)

    CLIENT = '''
    import socket, sys, time
    port, count = int(sys.argv[1]), int(sys.argv[2])
    sys.stdin.readline()
    socks = []
    for _ in range(count):
        s = socket.socket(); s.settimeout(5); s.connect(("127.0.0.1", port)); s.sendall(b"x"); socks.append(s)
    time.sleep(0.5)
    print("held", flush=True)
    sys.stdin.readline()
    for s in socks:
        s.close()
    '''
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
""")


@pytest.mark.parametrize("engine", ENGINES)
async def test_descriptor_exhaustion_is_local_and_passes(engine: str) -> None:
    """Under RLIMIT_NOFILE 64, 80 held connections exhaust our descriptors: the failures are
    counted as local (socket() EMFILE) or as accept errors with a backoff, the backend is never
    reported as failed, and once the connections close, new ones succeed."""
    async with raw_backend(echo) as backend:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", EMFILE_SCRIPT, engine, str(backend.port),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": os.getcwd()})
        async with asyncio.timeout(60):
            out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()[-2000:]
    result = json.loads(out.decode().strip().splitlines()[-1])
    local = {(op, e) for op, e, _ in result["local"]}
    accept = {e for e, _ in result["accept"]}
    assert local or accept, result
    assert local <= {(0, errno.EMFILE), (1, errno.EMFILE), (2, errno.EMFILE)}, result
    assert accept <= {errno.EMFILE}, result
    failures = [o for o in result["outcomes"] if o[1] == Status.BACKEND]
    assert failures == [], result
    assert result["ok"] == 20
    accepted, refused, ended, active = result["counters"][:4]
    assert accepted == refused + ended + active
    assert refused + ended == result["records"]



class ExhaustingPolicy(RoundRobinPolicy):
    """Lowers the soft RLIMIT_NOFILE to exactly the next free descriptor for the engine's
    socket() of the first connection, and restores it when the outcome arrives."""

    def __init__(self, *args: object, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.saved: tuple[int, int] | None = None

    def accepted(self, conn_id: int, host: str, port: int) -> Decision:
        if self.saved is None:
            self.saved = resource.getrlimit(resource.RLIMIT_NOFILE)
            probe = os.dup(0)
            os.close(probe)
            resource.setrlimit(resource.RLIMIT_NOFILE, (probe, self.saved[1]))
        return super().accepted(conn_id, host, port)

    def connect_result(self, conn_id: int, backend: int, status: int, err: int,
                       elapsed: float) -> Decision | None:
        if self.saved is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, self.saved)
        return super().connect_result(conn_id, backend, status, err, elapsed)


@pytest.mark.parametrize("engine", ENGINES)
async def test_socket_emfile_is_a_local_error_not_a_backend_failure(engine: str) -> None:
    async with raw_backend(echo) as backend:
        loop = asyncio.get_running_loop()
        eng = new_engine(loop, engine)
        policy = ExhaustingPolicy([eng.target(0, LOOPBACK, backend.port)], retries=3)
        lsock = socket.socket()
        lsock.bind((LOOPBACK, 0))
        lsock.listen(16)
        lid = eng.add_listener(lsock, policy)
        try:
            first = await ping(lsock.getsockname())
            second = await ping(lsock.getsockname())
            await wait_for(lambda: len(policy.records) == 2, 5.0)
            stats = eng.statistics()
        finally:
            eng.shutdown(0)
            lsock.close()
    assert first[0] == b"" and second == (b"ping", "eof")
    assert policy.outcomes[(0, Status.LOCAL, errno.EMFILE)] == 1
    assert not [o for o in policy.outcomes if o[1] == Status.BACKEND]
    assert stats.local_errors == {(Op.SOCKET, errno.EMFILE): 1}
    assert policy.records[0].reason == End.LOCAL_RESOURCE
    assert policy.records[0].detail == errno.EMFILE
    counters = eng.listener_stats(lid)
    assert (counters.accepted, counters.ended) == (2, 2)


@pytest.mark.parametrize("engine", ENGINES)
async def test_a_quiet_target_counts_its_successes_and_reports_only_failures(engine: str) -> None:
    """Through quiet targets a success is not reported: the target counts it, the record is
    flagged QUIET with the successful attempt's start; a failure still reaches connect_result,
    whose answer (a retry) is followed."""
    async with raw_backend(echo) as good:
        with refused_port() as bad:
            async with proxy(engine, [bad, good.port], quiet=True) as p:
                results = [await ping(p.address) for _ in range(3)]
                records = await p.wait_ended(3)
                counts = [target.connected for target in p.policy.targets]  # type: ignore[attr-defined]
    assert results == [(b"ping", "eof")] * 3
    assert p.policy.outcomes == {(0, Status.BACKEND, errno.ECONNREFUSED): 3}
    assert p.policy.connect_times == []
    assert counts == [0, 3]
    for record in records:
        assert record.backend == 1 and record.reason == End.CLIENT_FIN
        assert record.flags & Flag.QUIET and record.flags & Flag.CONNECTED
        # The attempt that succeeded (the engine's clock is read once per wake-up, so the
        # times may be equal), and only a connected record has one.
        assert 0 < record.started <= record.attempt <= record.connected <= record.ended
    p.assert_adds_up()


@pytest.mark.parametrize("engine", ENGINES)
async def test_a_target_that_is_not_quiet_reports_its_success(engine: str) -> None:
    async with raw_backend(echo) as good, proxy(engine, [good.port]) as p:
        assert await ping(p.address) == (b"ping", "eof")
        (record,) = await p.wait_ended(1)
    assert p.policy.outcomes == {(0, Status.OK, 0): 1}
    assert record.flags & Flag.CONNECTED and not record.flags & Flag.QUIET
    # The elapsed time connect_result got is the record's connected - attempt, to the bit.
    assert p.policy.connect_times == [(record.connected - record.attempt) / 1e9]


class Watched:
    """What the engine watches for a fast table: its `snapshot` attribute."""

    def __init__(self) -> None:
        self.snapshot = object()


class AdmittingPolicy(RoundRobinPolicy):
    """Logs every call in order, `admitted` and `connected` included."""

    def __init__(self, *args: object, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.calls: list[tuple[str, int]] = []
        self.connected_entries: list[Connected] = []

    def connected(self, entries: bytes) -> None:
        assert entries  # never called with nothing
        for entry in iter_connected(entries):
            self.calls.append(("connected", entry.conn_id))
            self.connected_entries.append(entry)

    def accepted(self, conn_id: int, host: str, port: int) -> Decision:
        self.calls.append(("accepted", conn_id))
        return super().accepted(conn_id, host, port)

    def admitted(self, batch: list[tuple[int, int, int, str, int]]) -> None:
        for conn_id, backend, started, host, port in batch:
            assert backend in (0, 1) and started > 0 and host == LOOPBACK and port > 0
            self.calls.append(("admitted", conn_id))

    def connect_result(self, conn_id: int, backend: int, status: int, err: int,
                       elapsed: float) -> Decision | None:
        self.calls.append(("connect_result", conn_id))
        super().connect_result(conn_id, backend, status, err, elapsed)
        return None if status == Status.OK else self.targets[1]  # a retry: the good one

    def ended(self, records: bytes) -> None:
        for record in iter_records(records):
            self.calls.append(("ended", record.conn_id))
        super().ended(records)


@pytest.mark.parametrize("engine", ENGINES)
async def test_fast_admission_is_handed_over_before_any_other_call(engine: str) -> None:
    """set_fast: the engine admits alone, in turn over the table, while the credit lasts and
    the watched snapshot is the table's; the policy hears of each admission in `admitted`
    before any other call about it (here a refused connect and its retry), then `accepted`
    again once the credit is spent or the snapshot moved."""
    async with raw_backend(echo) as good:
        with refused_port() as bad:
            loop = asyncio.get_running_loop()
            eng = new_engine(loop, engine)
            targets = [eng.target(0, LOOPBACK, bad, quiet=True),
                       eng.target(1, LOOPBACK, good.port, quiet=True)]
            policy = AdmittingPolicy(targets, retries=1)
            lsock = socket.socket()
            lsock.bind((LOOPBACK, 0))
            lsock.listen(16)
            lid = eng.add_listener(lsock, policy)
            watched = Watched()
            try:
                eng.set_fast(lid, targets, 0, 2, watched, watched.snapshot)
                results = [await ping(lsock.getsockname()) for _ in range(3)]
                watched.snapshot = object()
                eng.set_credit(lid, 5)
                results.append(await ping(lsock.getsockname()))
                await wait_for(lambda: policy.ended_count == 4, 5.0)
                counts = [target.connected for target in targets]
            finally:
                eng.shutdown(0)
                lsock.close()
    assert results == [(b"ping", "eof")] * 4
    first, second, third, fourth = sorted({cid for _, cid in policy.calls})
    mine = {cid: [name for name, c in policy.calls if c == cid] for cid in (first, second)}
    # The first went to the refused target: admitted, then its failure, then its record.
    # Its retry succeeded through a quiet target: `connected`, not connect_result.
    assert mine[first] == ["admitted", "connect_result", "connected", "ended"]
    assert mine[second] == ["admitted", "connected", "ended"]  # to the good one, in turn
    assert next(name for name, c in policy.calls if c == third) == "accepted"  # credit spent
    assert next(name for name, c in policy.calls if c == fourth) == "accepted"  # snapshot moved
    assert counts == [0, 4]  # every success quiet, all on the good one (the other refuses)
    assert all(r.reason == End.CLIENT_FIN and r.backend == 1 for r in policy.records)
    counters = eng.listener_stats(lid)
    assert (counters.accepted, counters.ended, counters.active) == (4, 4, 0)


@pytest.mark.parametrize("engine", ENGINES)
async def test_a_least_connections_table_admits_by_live_load_per_weight(engine: str) -> None:
    """set_fast with weights: each admission goes to the fewest active connections per weight,
    counted by the engine (a connection counts from its connect to its end; a retry moves it),
    the scan starting one past the last winner."""
    async with raw_backend(echo) as good:
        with refused_port() as bad:
            loop = asyncio.get_running_loop()
            eng = new_engine(loop, engine)
            targets = [eng.target(0, LOOPBACK, good.port, quiet=True),
                       eng.target(1, LOOPBACK, good.port, quiet=True),
                       eng.target(2, LOOPBACK, bad, quiet=True)]
            policy = AdmittingPolicy(targets[:2], retries=1)  # a failure retries to target 1
            lsock = socket.socket()
            lsock.bind((LOOPBACK, 0))
            lsock.listen(16)
            lid = eng.add_listener(lsock, policy)
            watched = Watched()
            held: list[socket.socket] = []
            try:
                eng.set_fast(lid, targets[:2], 0, 64, watched, watched.snapshot, [1.0, 2.0])
                seen = []
                for _ in range(6):
                    held.append(await open_raw(lsock.getsockname()))
                    await wait_for(lambda: len(policy.connected_entries) == len(held), 5.0)
                    seen.append(policy.connected_entries[-1].backend)
                loads = [t.active for t in targets]
                held.pop(0).close()  # a connection of target 0 ends: its load goes
                await wait_for(lambda: policy.ended_count == 1, 5.0)
                after_end = [t.active for t in targets]
                # The refusing target has the least load: admitted there, refused, retried to
                # target 1: the load moves with it.
                eng.set_fast(lid, [targets[2], targets[0]], 0, 1, watched, watched.snapshot,
                             [1.0, 1.0])
                held.append(await open_raw(lsock.getsockname()))
                await wait_for(lambda: len(policy.connected_entries) == len(held) + 1, 5.0)
                after_retry = [t.active for t in targets]
                with pytest.raises(ValueError):
                    eng.set_fast(lid, targets[:2], 0, 1, watched, watched.snapshot, [1.0])
            finally:
                for conn in held:
                    conn.close()
                eng.shutdown(0)
                lsock.close()
    # 0/1 ties 0/2: the first scanned, 0; the scan then starts at 1: 0/2 < 1/1: 1; from 0:
    # 1/2 < 1/1: 1; from 0: 1/1 ties 2/2: 0; from 1: 1; from 0: 3/2 < 2/1: 1.
    assert seen == [0, 1, 1, 0, 1, 1]
    assert loads == [2, 4, 0]
    assert after_end == [1, 4, 0]
    assert policy.connected_entries[-1].backend == 1
    assert after_retry == [1, 5, 0]


@pytest.mark.parametrize("engine", ENGINES)
async def test_a_hash_table_keys_an_ipv4_mapped_client_as_ipv4(engine: str) -> None:
    """set_fast with a lookup: on a dual-stack socket an IPv4 client is ::ffff:a.b.c.d, and
    its key is the 4-byte address (hashing.source_key), so it lands on the slot an IPv4
    listener gives it."""
    async with raw_backend(echo) as good:
        loop = asyncio.get_running_loop()
        eng = new_engine(loop, engine)
        targets = [eng.target(i, LOOPBACK, good.port, quiet=True) for i in range(3)]
        policy = AdmittingPolicy(targets, retries=0)
        lsock = socket.socket(socket.AF_INET6)
        lsock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        lsock.bind(("::ffff:127.0.0.1", 0))
        lsock.listen(16)
        port = lsock.getsockname()[1]
        lid = eng.add_listener(lsock, policy)
        watched = Watched()
        lookup = [2, 0, 1, 1, 0, 2, 0]
        expected = []
        try:
            eng.set_fast(lid, targets, 0, 64, watched, watched.snapshot, None, lookup, False)
            for i in range(12):
                source = f"127.0.0.{40 + i}"
                conn = socket.socket()
                conn.setblocking(False)
                conn.bind((source, 0))
                await loop.sock_connect(conn, (LOOPBACK, port))
                await wait_for(lambda n=i + 1: len(policy.connected_entries) == n, 5.0)
                conn.close()
                slot = stable_hash64(socket.inet_aton(source)) % len(lookup)
                expected.append(lookup[slot])
        finally:
            eng.shutdown(0)
            lsock.close()
    assert [entry.backend for entry in policy.connected_entries] == expected
    assert len(set(expected)) > 1


async def close_at_once(conn: socket.socket) -> None:
    conn.close()


@pytest.mark.parametrize("engine", ENGINES)
async def test_quiet_successes_are_handed_over_before_their_records(engine: str) -> None:
    """Each quiet success reaches `connected` once, while its connection is open, before the
    record of its end (a backend that closes at once brings both close together, often into
    one wake-up), naming the record's backend with the record's elapsed time, to the ns."""
    async with raw_backend(echo) as good, raw_backend(close_at_once) as closing:
        loop = asyncio.get_running_loop()
        eng = new_engine(loop, engine)
        targets = [eng.target(4, LOOPBACK, good.port, quiet=True),
                   eng.target(9, LOOPBACK, closing.port, quiet=True)]
        policy = AdmittingPolicy(targets, retries=0)
        lsock = socket.socket()
        lsock.bind((LOOPBACK, 0))
        lsock.listen(16)
        lid = eng.add_listener(lsock, policy)
        try:
            held = await open_raw(lsock.getsockname())  # to the good one (first in turn)
            await loop.sock_sendall(held, b"hi")
            assert await loop.sock_recv(held, 2) == b"hi"
            await wait_for(lambda: len(policy.connected_entries) == 1, 5.0, what="connected")
            assert policy.ended_count == 0  # counted while it is open
            results = [await ping(lsock.getsockname()) for _ in range(4)]
            held.shutdown(socket.SHUT_WR)
            assert await recv_to_end(held) == (b"", "eof")
            held.close()
            await wait_for(lambda: policy.ended_count == 5, 5.0, what="all ended")
            counts = [target.connected for target in targets]
            counters = eng.listener_stats(lid)
        finally:
            eng.shutdown(0)
            lsock.close()
    assert sorted(result[0] for result in results) == [b"", b"", b"ping", b"ping"]
    assert counts == [3, 2]
    assert (counters.accepted, counters.ended, counters.active) == (5, 5, 0)
    records = {record.conn_id: record for record in policy.records}
    entries = {entry.conn_id: entry for entry in policy.connected_entries}
    assert len(policy.connected_entries) == len(entries) == 5 and entries.keys() == records.keys()
    for conn_id, record in records.items():
        entry = entries[conn_id]
        assert record.flags & Flag.QUIET
        assert entry.backend == record.backend
        assert entry.elapsed == record.connected - record.attempt >= 0
        assert entry.elapsed / 1e9 == (record.connected - record.attempt) / 1e9
        calls = [name for name, c in policy.calls if c == conn_id]
        assert calls == ["accepted", "connected", "ended"]


@pytest.mark.parametrize("engine", ENGINES)
async def test_a_policy_without_connected_is_not_told(engine: str) -> None:
    """`connected` is optional: without it a quiet success is only counted on the target."""
    async with raw_backend(echo) as good, proxy(engine, [good.port], quiet=True) as p:
        assert not hasattr(p.policy, "connected")
        assert await ping(p.address) == (b"ping", "eof")
        (record,) = await p.wait_ended(1)
        assert p.policy.targets[0].connected == 1  # type: ignore[attr-defined]
    assert record.flags & Flag.QUIET
