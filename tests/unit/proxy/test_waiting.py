"""The waiting line (proxy/waiting.py): serving the head while its owner finds a slot, the one
deadline timer, clients that leave, limits from new snapshots. Owners here are recording
stand-ins for the listener policy (the line's contract is the `Owner` protocol); the timer is
the running loop's."""

from __future__ import annotations

import asyncio

from pointsman.config.model import PoolConfig
from pointsman.pool.pool import Pool
from pointsman.proxy.engine.api import Decision, Refuse
from pointsman.proxy.waiting import existing_line, line_for
from tests.support import wait_for

SERVED = Refuse(1)  # any decision will do: the line only passes it on


class Owner:
    def __init__(self) -> None:
        self.free = 0  # slots it may hand out
        self.resumed: list[int] = []
        self.expired_ids: list[int] = []
        self.asked: list[int] = []

    def dequeued(self, conn_id: int) -> Decision | None:
        self.asked.append(conn_id)
        if self.free <= 0:
            return None
        self.free -= 1
        return SERVED

    def resume(self, conn_id: int, decision: Decision) -> bool:
        self.resumed.append(conn_id)
        return True

    def expired(self, conn_id: int) -> None:
        self.expired_ids.append(conn_id)


def pool(max: int = 10, timeout: float = 5.0) -> Pool:
    return Pool(PoolConfig.model_validate({
        "name": "p", "backend_max_connections": 1, "queue": {"max": max, "timeout": timeout},
        "backends": [{"address": "127.0.0.1:9"}]}))


async def test_serves_in_arrival_order_across_owners_and_stops_at_a_full_head() -> None:
    p = pool()
    assert existing_line(p) is None
    line = line_for(p, asyncio.get_running_loop())
    assert line_for(p, asyncio.get_running_loop()) is line is existing_line(p)
    a, b = Owner(), Owner()
    for key, owner in ((1, a), (2, b), (3, a), (4, b)):
        assert line.push(key, owner)
    assert p.queue_stats.queued == 4 and p.queue_stats.queued_total == 4
    a.free = 5  # a has room, b's head (2) does not: 2 keeps its place, nobody overtakes
    line.serve()
    assert a.resumed == [1] and b.asked == [2] and len(line) == 3
    b.free = 1
    line.serve()
    assert (a.resumed, b.resumed) == ([1, 3], [2]) and b.asked == [2, 2, 4]
    assert len(line) == 1 and p.queue_stats.queued == 1
    assert p.queue_stats.queue_wait.count == 3


async def test_full_queue_refuses_and_leavers_go() -> None:
    p = pool(max=2)
    line = line_for(p, asyncio.get_running_loop())
    owner = Owner()
    assert line.push(1, owner) and line.push(2, owner)
    assert not line.push(3, owner)
    line.leave(1)
    line.leave(99)  # not queued: nothing happens
    assert len(line) == 1 and p.queue_stats.queued == 1 and p.queue_stats.queue_wait.count == 1
    assert line.push(3, owner)


async def test_deadlines_expire_through_one_timer() -> None:
    p = pool(timeout=0.05)
    line = line_for(p, asyncio.get_running_loop())
    owner = Owner()
    line.push(1, owner)
    line.push(2, owner)
    await wait_for(lambda: owner.expired_ids == [1, 2], 2.0, what="both expired")
    assert len(line) == 0 and p.queue_stats.queued == 0
    assert p.queue_stats.queue_wait.count == 2 and p.queue_stats.queue_wait.sum >= 0.1


async def test_a_new_snapshot_applies_limits_and_serves_the_head() -> None:
    p = pool(max=1)
    line = line_for(p, asyncio.get_running_loop())
    owner = Owner()
    assert line.push(1, owner) and not line.push(2, owner)
    owner.free = 1
    p.reconfigure(p.config.model_copy(update={
        "queue": p.config.queue.model_copy(update={"max": 5})}))
    await wait_for(lambda: owner.resumed == [1], 2.0, what="served after the snapshot")
    assert line.queue.max == 5 and line.push(2, owner) and line.push(3, owner)


async def test_serving_is_not_reentered() -> None:
    p = pool()
    line = line_for(p, asyncio.get_running_loop())

    class Nested(Owner):
        def resume(self, conn_id: int, decision: Decision) -> bool:
            line.serve()  # as an engine resume that ends connections would
            return super().resume(conn_id, decision)

    owner = Nested()
    owner.free = 3
    for key in (1, 2, 3):
        line.push(key, owner)
    line.serve()
    assert owner.resumed == [1, 2, 3] and owner.asked == [1, 2, 3]
