"""Drain deadlines on a real event loop: a timer fires once at its deadline, a cancelled or
replaced one never does, and a pool's new drain_timeout moves drains on the pool's value only."""

from __future__ import annotations

import asyncio

from pointsman.node.draining import DrainTimers
from tests.support import wait_for


async def test_fires_once_and_is_forgotten() -> None:
    fired: list[tuple[str, str]] = []
    timers = DrainTimers(asyncio.get_running_loop(), lambda p, b: fired.append((p, b)))
    timers.arm("p", "a", 0.05)
    remaining = timers.remaining("p", "a")
    assert remaining is not None and 0 < remaining <= 0.05
    await wait_for(lambda: fired == [("p", "a")], 5.0, what="the deadline")
    assert timers.remaining("p", "a") is None


async def test_cancelled_replaced_and_none() -> None:
    fired: list[tuple[str, str]] = []
    loop = asyncio.get_running_loop()
    timers = DrainTimers(loop, lambda p, b: fired.append((p, b)))
    timers.arm("p", "a", 0.02)
    timers.cancel("p", "a")
    timers.arm("p", "b", 0.02)
    timers.arm("p", "b", 3600.0)  # a second drain call replaces the deadline
    timers.arm("p", "c", 0.02)
    timers.arm("p", "c", None)  # no timeout: none runs
    timers.arm("p", "d", 0.03)
    await wait_for(lambda: fired == [("p", "d")], 5.0, what="d's deadline")
    assert timers.remaining("p", "b") is not None and timers.remaining("p", "c") is None
    timers.close()
    assert timers.remaining("p", "b") is None


async def test_a_new_pool_timeout_moves_drains_on_the_pools_value_only() -> None:
    loop = asyncio.get_running_loop()
    timers = DrainTimers(loop, lambda p, b: None)
    began = loop.time() - 10.0
    timers.arm("p", "a", 3600.0, started=began)
    timers.arm("p", "b", 3600.0, override=True)  # the operator's own timeout
    timers.arm("q", "a", 3600.0, started=began)
    timers.pool_changed("p", 60.0)
    a = timers.remaining("p", "a")
    assert a is not None and 49.0 < a <= 50.0  # counted from when the drain began
    b = timers.remaining("p", "b")
    assert b is not None and b > 3500.0
    qa = timers.remaining("q", "a")
    assert qa is not None and qa > 3500.0
    timers.pool_changed("p", None)
    assert timers.remaining("p", "a") is None and timers.remaining("p", "b") is not None
    timers.keep_only(lambda pool, backend: pool == "q")
    assert timers.remaining("p", "b") is None and timers.remaining("q", "a") is not None
    timers.close()
