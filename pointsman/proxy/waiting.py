"""A pool's waiting line in this process: the pure `ConnectionQueue` plus its one timer.

When every eligible backend of a pool is at its `max_connections`, the listener that accepted a
connection holds it in the engine (`Hold`: nothing read, nothing connected) and queues it here.
The line serves its head whenever a slot may have freed (a connection on a capped backend ended
or failed to connect, or the pool published a new snapshot: a cap raised on reload, a backend
back up), refuses entries whose deadline passed as `queue_timeout`, and lets go of entries whose
client left. Several listeners may send to one pool, so each entry names its owner, which
re-picks for it (`dequeued`) and resumes or refuses it in the engine (`resume`).

Ownership: the line owns the queue and the pool's `queue_stats` gauge and histogram; owners
own their connections. One line per pool per process (`line_for`).
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from pointsman.pool.pool import Pool
from pointsman.pool.queue import ConnectionQueue, Waiting
from pointsman.pool.snapshot import PoolSnapshot
from pointsman.proxy.engine.api import Decision


class Owner(Protocol):
    """The listener policy that holds a queued connection."""

    def dequeued(self, conn_id: int) -> Decision | None:
        """A decision for a queued connection now at the head (a backend picked, or a refusal),
        or None while every eligible backend is still full (it keeps its place)."""

    def resume(self, conn_id: int, decision: Decision) -> bool:
        """Hand the decision to the engine; False when the connection ended meanwhile."""

    def expired(self, conn_id: int) -> None:
        """Its deadline passed: refuse it as queue_timeout."""


class WaitingLine:
    """See the module docstring."""

    def __init__(self, pool: Pool, loop: asyncio.AbstractEventLoop) -> None:
        self.pool = pool
        self.loop = loop
        settings = pool.config.queue
        self.queue: ConnectionQueue[Owner] = ConnectionQueue(settings.max, settings.timeout)
        self.stats = pool.queue_stats
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._serving = False
        pool.watch(self._on_snapshot)

    def __len__(self) -> int:
        return len(self.queue)

    def push(self, conn_id: int, owner: Owner) -> bool:
        """Queue a connection at the tail; False when the queue is full (queue_full)."""
        if self.queue.push(conn_id, owner, self.loop.time()) is None:
            return False
        self.stats.queued_total += 1
        self.stats.queued = len(self.queue)
        self._arm()
        return True

    def leave(self, conn_id: int) -> None:
        """The connection ended while queued (its client left, or an operator cut it)."""
        entry = self.queue.remove(conn_id)
        if entry is not None:
            self._left(entry)

    def serve(self) -> None:
        """Slots may have freed: serve the head while its owner finds a backend for it.
        Re-entrant calls (a resume whose connect fails at once ends connections, which frees
        slots) leave the serving to the outer call."""
        if self._serving or not self.queue:
            return
        self._serving = True
        try:
            while (entry := self.queue.head()) is not None:
                decision = entry.owner.dequeued(entry.key)
                if decision is None:
                    break  # still full: the head keeps its place, and so does everyone
                self.queue.remove(entry.key)
                self._left(entry)
                entry.owner.resume(entry.key, decision)
        finally:
            self._serving = False
            self.stats.queued = len(self.queue)

    def _left(self, entry: Waiting[Owner]) -> None:
        self.stats.queue_wait.observe(max(self.loop.time() - entry.since, 0.0))
        self.stats.queued = len(self.queue)

    def _on_snapshot(self, snapshot: PoolSnapshot) -> None:
        """A new snapshot (reload, a backend up or down, weights): new limits, and the head may
        now fit (a raised cap) or have nowhere to go (refused by its owner's pick)."""
        settings = snapshot.config.queue
        self.queue.configure(settings.max, settings.timeout)
        if self.queue:
            self.loop.call_soon(self.serve)  # not inside the pool's publication

    # --- deadlines -----------------------------------------------------------------------------

    def _arm(self) -> None:
        """One timer for the whole line, at its earliest deadline."""
        deadline = self.queue.next_deadline()
        if deadline is None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            return
        if self._timer is not None and self._timer_at <= deadline:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = self.loop.call_at(deadline, self._expire)

    def _expire(self) -> None:
        self._timer = None
        for entry in self.queue.expire(self.loop.time()):
            self._left(entry)
            entry.owner.expired(entry.key)
        self._arm()


def line_for(pool: Pool, loop: asyncio.AbstractEventLoop) -> WaitingLine:
    """The pool's line in this process (made at its first queued connection, kept on the pool
    so it lives and goes with it)."""
    line = pool.waiting
    if line is None:
        line = pool.waiting = WaitingLine(pool, loop)
    assert isinstance(line, WaitingLine)
    return line


def existing_line(pool: Pool) -> WaitingLine | None:
    """The pool's line when one was ever made (a pool that never queued has none)."""
    line: WaitingLine | None = pool.waiting
    return line


__all__ = ["Owner", "WaitingLine", "existing_line", "line_for"]
