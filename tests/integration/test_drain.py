"""Drain and maintenance through real sockets: open connections on the backend carry on and end
normally, new ones go elsewhere, and the backend counts as drained once the last one has closed.

It runs with one process and with a control process and two workers (the `workers` fixture):
there the operator's calls change the owner pool in the control process and reach the workers by
message (`workers_caught_up` waits for that), the connections and their counts are the workers'
(read through the node, fresh after each wait), and each worker rotates round robin on its own.
"""

from __future__ import annotations

from collections import Counter

from pointsman.pool.state import BackendState
from pointsman.telemetry.flow import EndReason
from tests.integration.peers import (
    MORE,
    ask_name,
    backend_drained,
    listen_address,
    named_backends,
    open_streams,
    rotated,
    single_pool,
    wait_more_exchanges,
)
from tests.support import REPORT_TIMEOUT, running, statistics_when, wait_for, workers_caught_up

STREAMS = 6  # two per backend with one process
SHORT = 20  # short connections after each operator call


async def test_drain_and_maintenance_let_open_connections_finish(workers: int) -> None:
    async with named_backends("a", "b", "c") as peers:
        listen = listen_address()
        config = single_pool(listen, peers, algorithm="round_robin")
        async with running(config, workers=workers) as runtime:
            pool = runtime.pools["p"]
            streams = await open_streams(listen, STREAMS)
            opened = Counter(s.backend for s in streams)
            on = {name: [s for s in streams if s.backend == name] for name in "abc"}
            await wait_more_exchanges(streams)

            pool.drain("a")
            await workers_caught_up(runtime)
            after_drain = Counter([await ask_name(listen) for _ in range(SHORT)])
            await wait_more_exchanges(streams)
            # Every connection so far is counted (with workers: reported), so the figures are now.
            await statistics_when(runtime, lambda s: s.accepted == STREAMS + SHORT,
                                  what="connections reported")
            a_drained_early = backend_drained(runtime, "p", "a")

            pool.maintenance("b")
            await workers_caught_up(runtime)
            after_maintenance = Counter([await ask_name(listen) for _ in range(SHORT)])
            await wait_more_exchanges(streams)
            await statistics_when(runtime, lambda s: s.accepted == STREAMS + 2 * SHORT,
                                  what="connections reported")
            b_drained_early = backend_drained(runtime, "p", "b")

            a_rest = [await s.finish() for s in on["a"]]
            await wait_for(lambda: backend_drained(runtime, "p", "a"), REPORT_TIMEOUT,
                           what="a drained")
            b_was_drained = backend_drained(runtime, "p", "b")
            b_rest = [await s.finish() for s in on["b"]]
            await wait_for(lambda: backend_drained(runtime, "p", "b"), REPORT_TIMEOUT,
                           what="b drained")
            c_rest = [await s.finish() for s in on["c"]]
            stats = await statistics_when(
                runtime, lambda s: sum(s.ended.values()) == STREAMS + 2 * SHORT,
                what="all connections ended")
            c_drained = backend_drained(runtime, "p", "c")
            states = {m.id: m.machine.state for m in pool.members()}

    assert rotated(opened, "abc", workers), opened
    assert [s.error for s in streams] == [None] * STREAMS
    assert all(s.exchanges >= 3 * MORE for s in streams)
    assert a_rest + b_rest + c_rest == [b""] * STREAMS
    assert sum(after_drain.values()) == SHORT and rotated(after_drain, "bc", workers), after_drain
    assert after_maintenance == {"c": SHORT}
    assert not a_drained_early, "drained while connections are open"
    assert not b_drained_early, "in maintenance with connections open"
    assert not b_was_drained
    assert not c_drained  # an up backend with no connections is not "drained"
    assert states == {"a": BackendState.DRAINING, "b": BackendState.MAINTENANCE,
                      "c": BackendState.UP}
    assert stats.active == 0
    assert stats.ended[EndReason.CLOSED_BY_OPERATOR] == 0
    assert stats.ended[EndReason.BACKEND_RESET] == stats.ended[EndReason.CLIENT_RESET] == 0
