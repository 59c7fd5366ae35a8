"""Drain and maintenance through real sockets: open connections on the backend carry on and end
normally, new ones go elsewhere, and `is_drained` turns true once the last one has closed."""

from __future__ import annotations

from collections import Counter

from pointsman.pool.state import BackendState
from pointsman.telemetry.flow import EndReason
from tests.integration.peers import (
    MORE,
    ask_name,
    listen_address,
    named_backends,
    open_streams,
    single_pool,
    tcp_stats,
    wait_more_exchanges,
)
from tests.support import running, wait_for


async def test_drain_and_maintenance_let_open_connections_finish() -> None:
    async with named_backends("a", "b", "c") as peers:
        listen = listen_address()
        async with running(single_pool(listen, peers, algorithm="round_robin")) as runtime:
            pool = runtime.pools["p"]
            streams = await open_streams(listen, 6)
            assert Counter(s.backend for s in streams) == {"a": 2, "b": 2, "c": 2}
            on = {name: [s for s in streams if s.backend == name] for name in "abc"}
            await wait_more_exchanges(streams)

            pool.drain("a")
            after_drain = Counter([await ask_name(listen) for _ in range(20)])
            await wait_more_exchanges(streams)
            assert not pool.is_drained("a"), "drained while two connections are open"

            pool.maintenance("b")
            after_maintenance = Counter([await ask_name(listen) for _ in range(20)])
            await wait_more_exchanges(streams)
            assert not pool.is_drained("b"), "in maintenance with two connections open"

            a_rest = [await s.finish() for s in on["a"]]
            await wait_for(lambda: pool.is_drained("a"), 2.0, what="a drained")
            b_was_drained = pool.is_drained("b")
            b_rest = [await s.finish() for s in on["b"]]
            await wait_for(lambda: pool.is_drained("b"), 2.0, what="b drained")
            c_rest = [await s.finish() for s in on["c"]]
            stats = tcp_stats(runtime)
            await wait_for(lambda: stats.active == 0, 2.0, what="all connections ended")
            c_drained = pool.is_drained("c")
            states = {m.id: m.machine.state for m in pool.members()}

    assert [s.error for s in streams] == [None] * 6
    assert all(s.exchanges >= 3 * MORE for s in streams)
    assert a_rest == b_rest == c_rest == [b""] * 2
    assert after_drain == {"b": 10, "c": 10}
    assert after_maintenance == {"c": 20}
    assert not b_was_drained
    assert not c_drained  # an up backend with no connections is not "drained"
    assert states == {"a": BackendState.DRAINING, "b": BackendState.MAINTENANCE,
                      "c": BackendState.UP}
    assert stats.ended[EndReason.CLOSED_BY_OPERATOR] == 0
    assert stats.ended[EndReason.BACKEND_RESET] == stats.ended[EndReason.CLIENT_RESET] == 0
