"""Tasks: a crashing task is logged with its traceback, counted by kind, and restarted with
backoff (or recorded as failed); cancel/stop/close end tasks and wait for them."""

from __future__ import annotations

import asyncio
import logging
import random
import traceback
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from pointsman.fleet.backoff import Backoff
from pointsman.node.tasks import Tasks

LOGGER = "pointsman.tasks"


def tiny() -> Backoff:
    """Milliseconds between restarts, with seeded jitter."""
    return Backoff(first=0.002, cap=0.004, rng=random.Random(1))


class Flaky:
    """A task body that crashes `crashes` times, then runs until `release` is set."""

    def __init__(self, crashes: int) -> None:
        self.crashes = crashes
        self.starts = 0
        self.release = asyncio.Event()

    async def __call__(self) -> None:
        self.starts += 1
        if self.starts <= self.crashes:
            self.probe_failed()
        await self.release.wait()

    def probe_failed(self) -> None:
        raise RuntimeError(f"bug number {self.starts}")


async def wait_until(predicate: object, timeout: float = 5.0) -> None:
    assert callable(predicate)
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.001)


async def test_a_crashing_task_is_logged_counted_and_restarted(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger=LOGGER)
    tasks = Tasks()
    body = Flaky(crashes=3)
    task = tasks.spawn("health:web", body, kind="health", backoff=tiny())
    await wait_until(lambda: body.starts == 4)
    assert not task.done() and tasks.names() == ["health:web"]
    assert tasks.crashes == {"health": 3}
    assert tasks.failed == {}

    records = [r for r in caplog.records if r.name == LOGGER]
    assert len(records) == 3
    for n, record in enumerate(records, start=1):
        assert record.levelno == logging.ERROR
        assert record.getMessage().startswith("task health:web crashed; restarting in ")
        assert record.exc_info is not None
        kind, exc, tb = record.exc_info
        assert kind is RuntimeError and str(exc) == f"bug number {n}"
        assert "probe_failed" in "".join(traceback.format_tb(tb))  # the traceback is the crash's
    body.release.set()
    async with asyncio.timeout(5):
        await task
    assert tasks.names() == []  # a task that ended is forgotten
    assert body.starts == 4  # ... and not restarted


async def test_the_restart_waits_for_the_backoff() -> None:
    tasks = Tasks()
    body = Flaky(crashes=1)
    backoff = Backoff(first=10.0, cap=10.0, rng=random.Random(1))  # at least 5 s
    tasks.spawn("slow", body, backoff=backoff)
    await wait_until(lambda: tasks.crashes["slow"] == 1)
    for _ in range(20):
        await asyncio.sleep(0)
    assert body.starts == 1  # still waiting for its restart
    assert backoff.failures == 1
    await tasks.close()
    assert body.starts == 1


async def test_crashes_are_counted_by_kind_and_default_to_the_name() -> None:
    tasks = Tasks()
    bodies = [Flaky(crashes=2), Flaky(crashes=1), Flaky(crashes=1)]
    tasks.spawn("health:a", bodies[0], kind="health", backoff=tiny())
    tasks.spawn("health:b", bodies[1], kind="health", backoff=tiny())
    tasks.spawn("flowlog", bodies[2], backoff=tiny())
    await wait_until(lambda: all(b.starts == b.crashes + 1 for b in bodies))
    assert tasks.crashes == {"health": 3, "flowlog": 1}
    await tasks.close()


async def test_restart_false_records_the_task_as_failed(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger=LOGGER)
    tasks = Tasks()
    body = Flaky(crashes=5)
    task = tasks.spawn("bgp", body, kind="services", restart=False, backoff=tiny())
    async with asyncio.timeout(5):
        await task  # it ends after the first crash
    assert body.starts == 1
    assert tasks.failed == {"bgp": "RuntimeError: bug number 1"}
    assert tasks.crashes == {"services": 1}
    assert tasks.names() == []
    (record,) = [r for r in caplog.records if r.name == LOGGER]
    assert record.getMessage() == "task bgp crashed; it is not restarted"
    assert record.exc_info is not None and record.exc_info[0] is RuntimeError
    # Spawning it again (a reload) clears the failure.
    again = Flaky(crashes=0)
    tasks.spawn("bgp", again, restart=False)
    assert tasks.failed == {}
    await wait_until(lambda: again.starts == 1)
    await tasks.close()


async def test_a_task_that_returns_is_not_restarted() -> None:
    tasks = Tasks()
    runs = 0

    async def once() -> None:
        nonlocal runs
        runs += 1

    task = tasks.spawn("once", once, backoff=tiny())
    async with asyncio.timeout(5):
        await task
    for _ in range(20):
        await asyncio.sleep(0)
    assert runs == 1
    assert tasks.names() == [] and tasks.crashes == {} and tasks.failed == {}


async def test_a_factory_that_raises_before_its_coroutine_is_a_crash_too() -> None:
    tasks = Tasks()
    calls = 0

    def factory() -> asyncio.Future[None]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ValueError("bad arguments")
        return asyncio.get_running_loop().create_future()

    tasks.spawn("odd", factory, backoff=tiny())  # type: ignore[arg-type]
    await wait_until(lambda: calls == 2)
    assert tasks.crashes == {"odd": 1}
    await tasks.close()


async def test_cancel_stop_and_close_cancel_and_await() -> None:
    tasks = Tasks()
    ended: list[str] = []

    def forever(name: str) -> Callable[[], Coroutine[Any, Any, None]]:
        async def run() -> None:
            try:
                await asyncio.Event().wait()
            finally:
                ended.append(name)

        return run

    names = ["a", "b", "c", "d"]
    spawned = {name: tasks.spawn(name, forever(name)) for name in names}
    await asyncio.sleep(0)
    assert tasks.names() == names

    # stop: cancelled and awaited before it returns.
    await tasks.stop("a", "missing")
    assert spawned["a"].cancelled() and ended == ["a"]
    assert tasks.names() == ["b", "c", "d"]

    # cancel: cancelled at once; close() waits for it.
    tasks.cancel("b")
    assert tasks.names() == ["c", "d"]
    assert not spawned["b"].done()

    # spawning under a taken name replaces (cancels) the running task.
    replacement = tasks.spawn("c", forever("c2"))
    assert spawned["c"].cancelling() or spawned["c"].cancelled()
    assert tasks.names() == ["c", "d"]
    await asyncio.sleep(0)  # the replacement starts running

    await tasks.close()
    assert all(task.done() for task in (*spawned.values(), replacement))
    assert sorted(ended) == ["a", "b", "c", "c2", "d"]
    assert tasks.names() == []


async def test_close_cancels_a_task_waiting_for_its_restart() -> None:
    tasks = Tasks()
    body = Flaky(crashes=1)
    task = tasks.spawn("waiting", body, backoff=Backoff(first=60.0, cap=60.0))
    await wait_until(lambda: tasks.crashes["waiting"] == 1)
    async with asyncio.timeout(5):
        await tasks.close()
    assert task.cancelled()
    assert body.starts == 1
