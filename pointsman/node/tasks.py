"""Every long-lived task of a node has one owner: `Tasks`.

A task that ends with an exception is a bug in our code (network trouble is handled inside the
tasks themselves): it is logged with its traceback and counted by name, then either restarted
with backoff (health checks, discovery, fleet watchers, the flow-log writer: the node keeps its
promise as soon as the task runs again) or, for tasks without which the node must not claim to
serve, marked failed so that readiness says so. `close()` cancels and awaits them all.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any

from pointsman.fleet.backoff import Backoff

log = logging.getLogger("pointsman.tasks")

TaskFactory = Callable[[], Coroutine[Any, Any, None]]


class Tasks:
    def __init__(self) -> None:
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._ending: set[asyncio.Task[None]] = set()  # cancelled, awaited by close()
        self.crashes: Counter[str] = Counter()  # by task kind
        self.failed: dict[str, str] = {}  # task name -> why (tasks not restarted)

    def spawn(self, name: str, factory: TaskFactory, *, kind: str | None = None,
              restart: bool = True, backoff: Backoff | None = None) -> asyncio.Task[None]:
        """Run `factory()` as task `name` (replacing a task of that name). On a crash: log it with
        its traceback, count it under `kind` (default: the name), then restart it after a backoff,
        or with `restart=False` record it in `failed`."""
        self.cancel(name)
        kind = kind or name
        delays = backoff or Backoff(first=0.5, cap=30.0)

        async def watched() -> None:
            while True:
                try:
                    await factory()
                    return
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self.crashes[kind] += 1
                    if not restart:
                        log.error("task %s crashed; it is not restarted", name, exc_info=exc)
                        self.failed[name] = f"{type(exc).__name__}: {exc}"
                        return
                    delay = delays.next()
                    log.error("task %s crashed; restarting in %.1fs", name, delay, exc_info=exc)
                await asyncio.sleep(delay)

        task = asyncio.get_running_loop().create_task(watched(), name=name)
        self._tasks[name] = task
        task.add_done_callback(lambda done: self._forget(name, done))
        return task

    def _forget(self, name: str, task: asyncio.Task[None]) -> None:
        if self._tasks.get(name) is task:
            del self._tasks[name]

    def cancel(self, name: str) -> None:
        task = self._tasks.pop(name, None)
        if task is not None:
            task.cancel()
            self._ending.add(task)
            task.add_done_callback(self._ending.discard)
        self.failed.pop(name, None)

    async def stop(self, *names: str) -> None:
        """Cancel the named tasks and wait until they have ended."""
        ending = [task for name in names if (task := self._tasks.get(name)) is not None]
        for name in names:
            self.cancel(name)
        await asyncio.gather(*ending, return_exceptions=True)

    def names(self) -> list[str]:
        return sorted(self._tasks)

    async def close(self) -> None:
        tasks = [*self._tasks.values(), *self._ending]
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
