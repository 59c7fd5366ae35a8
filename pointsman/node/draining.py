"""Drain deadlines: a draining backend's remaining connections are closed `drain_timeout` after
its drain began (`pools[].drain_timeout`, or the seconds an operator gave that one drain).

The state owner (a single process, or the control process) keeps one timer per draining backend;
when it fires while the backend still drains, the node closes that backend's connections (with
workers: a `CloseConnections` message to each, since the connections live there). One owner, one
clock: every worker closes at the same moment, and a per-call timeout needs no new field in the
decisions the workers mirror. Timers are loop handles, never polling.

A drain that ends (enable, maintenance, the backend removed) cancels its timer. A reload that
changes the pool's `drain_timeout` moves the deadline of drains that run on the pool's value
(counted from when each drain began); a per-call timeout keeps its deadline.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

Key = tuple[str, str]  # (pool, backend id)


@dataclass(slots=True)
class _Timer:
    started: float  # loop time the drain began
    seconds: float
    override: bool  # an operator's per-call timeout (a reload leaves it alone)
    handle: asyncio.TimerHandle

    @property
    def deadline(self) -> float:
        return self.started + self.seconds


class DrainTimers:
    def __init__(self, loop: asyncio.AbstractEventLoop, expired: Callable[[str, str], None]) -> None:
        self._loop = loop
        self._expired = expired
        self._timers: dict[Key, _Timer] = {}

    def arm(self, pool: str, backend: str, seconds: float | None, *, override: bool = False,
            started: float | None = None) -> None:
        """Close `backend`'s connections `seconds` after `started` (default: now); None: no
        deadline (and any running one is cancelled)."""
        self.cancel(pool, backend)
        if seconds is None:
            return
        begun = self._loop.time() if started is None else started
        key = (pool, backend)
        handle = self._loop.call_at(begun + seconds, self._fire, key)
        self._timers[key] = _Timer(begun, seconds, override, handle)

    def _fire(self, key: Key) -> None:
        if self._timers.pop(key, None) is not None:
            self._expired(*key)

    def cancel(self, pool: str, backend: str) -> None:
        timer = self._timers.pop((pool, backend), None)
        if timer is not None:
            timer.handle.cancel()

    def remaining(self, pool: str, backend: str) -> float | None:
        """Seconds until the backend's connections are closed (None: no deadline runs)."""
        timer = self._timers.get((pool, backend))
        return None if timer is None else max(timer.deadline - self._loop.time(), 0.0)

    def pool_changed(self, pool: str, seconds: float | None) -> None:
        """The pool's drain_timeout is now `seconds`: drains on the pool's value follow it."""
        for (name, backend), timer in list(self._timers.items()):
            if name == pool and not timer.override and timer.seconds != seconds:
                self.arm(pool, backend, seconds, started=timer.started)

    def keep_only(self, alive: Callable[[str, str], bool]) -> None:
        """Cancel the timers of backends (or pools) that are gone."""
        for pool, backend in list(self._timers):
            if not alive(pool, backend):
                self.cancel(pool, backend)

    def close(self) -> None:
        for pool, backend in list(self._timers):
            self.cancel(pool, backend)
