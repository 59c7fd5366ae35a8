"""The newest pool snapshot a kernel listener has yet to program (nftables or tc).

Pool publications post here; the listener's one writer task takes the newest, so a burst of
changes costs one transaction, and `since` (when the oldest untaken publication came) measures
publication-to-kernel latency. Only the listener's current pool counts (`wanted`): a reload may
move it to another pool while the old one still publishes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pointsman.pool.pool import Pool
    from pointsman.pool.snapshot import PoolSnapshot


class Mailbox:
    __slots__ = ("_wake", "_wanted", "_watched", "since", "snapshot")

    def __init__(self, wanted: Callable[[Pool], bool]) -> None:
        self.snapshot: PoolSnapshot | None = None
        self.since = 0.0
        self._wanted = wanted
        self._wake = asyncio.Event()
        self._watched: list[Pool] = []

    def watch(self, pool: Pool) -> None:
        """Hear `pool`'s publications (once per pool, however often a reload names it)."""
        if any(p is pool for p in self._watched):
            return
        self._watched.append(pool)
        pool.watch(lambda snapshot: self.post(pool, snapshot))

    def post(self, source: Pool, snapshot: PoolSnapshot) -> None:
        """A publication of `source` (on the loop): kept if wanted, and the writer woken."""
        if not self._wanted(source):
            return
        if self.snapshot is None:
            self.since = time.perf_counter()
        self.snapshot = snapshot
        self._wake.set()

    def again(self, snapshot: PoolSnapshot, since: float) -> None:
        """A failed snapshot, to be tried again unless a newer one came meanwhile."""
        if self.snapshot is None:
            self.snapshot, self.since = snapshot, since
        self._wake.set()

    async def take(self) -> tuple[PoolSnapshot | None, float]:
        """Wait for a post; the newest snapshot (None after a bare wake-up) and its `since`."""
        await self._wake.wait()
        self._wake.clear()
        snapshot, self.snapshot = self.snapshot, None
        return snapshot, self.since
