"""A pool's queue of connections waiting for a backend slot (pure: no I/OwnerT, time is an argument).

When every eligible backend of a pool is at its `max_connections`, a new connection waits here,
unread, and is served in arrival order as slots free up (HAProxy's backend queue behind a
server's `maxconn`). An entry leaves the queue one of four ways: served (`pop` / `remove` once
the owner resumed it), timed out (`expire`: its deadline passed), refused because the queue was
full (`push` returns None: it never entered), or gone (its client left: `remove`).

One queue per pool per process; several listeners can send to one pool, so every entry names
its `owner` (the listener policy that holds the connection and can resume or refuse it). Keys
(connection ids) are unique within the process.

Deadlines are fixed at `push` (the timeout in force then), so a reload that shortens the
timeout does not reorder entries already waiting: expiry goes through a heap of deadlines, not
the arrival order.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass
from typing import Generic, TypeVar

OwnerT = TypeVar("OwnerT")

# HAProxy's default queue is unbounded (bounded by maxconn elsewhere); ours is bounded so that a
# pool whose backends stall cannot hold every descriptor of the process: 1000 waiting connections
# cost about 1000 descriptors and a few hundred KiB.
DEFAULT_MAX = 1000
DEFAULT_TIMEOUT = 5.0  # seconds: about what a client's connect retry or a user waits


@dataclass(slots=True)
class Waiting(Generic[OwnerT]):
    """One queued connection."""

    key: int  # the connection id (unique in the process)
    owner: OwnerT  # who holds it: the listener policy that resumes or refuses it
    since: float  # when it entered (the wait-time histogram measures from here)
    deadline: float  # when it is refused as queue_timeout
    seq: int  # arrival number: tells a heap entry from a later entry with the same key


class ConnectionQueue(Generic[OwnerT]):
    """Arrival-ordered waiting connections with a bound (`max`) and a timeout."""

    __slots__ = ("_deadlines", "_entries", "_seq", "max", "timeout")

    def __init__(self, max: int = DEFAULT_MAX, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.max = max
        self.timeout = timeout
        self._entries: OrderedDict[int, Waiting[OwnerT]] = OrderedDict()
        self._deadlines: list[tuple[float, int, int]] = []  # (deadline, seq, key), lazily pruned
        self._seq = 0

    def configure(self, max: int, timeout: float) -> None:
        """New limits (a reload): entries already waiting keep their deadlines; a smaller `max`
        refuses only newcomers until the queue is below it."""
        self.max = max
        self.timeout = timeout

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: int) -> bool:
        return key in self._entries

    def push(self, key: int, owner: OwnerT, now: float) -> Waiting[OwnerT] | None:
        """Queue `key` at the tail; None when the queue is full (refuse it: queue_full)."""
        if len(self._entries) >= self.max:
            return None
        if key in self._entries:
            raise ValueError(f"connection {key} is already queued")
        self._seq += 1
        entry = Waiting(key, owner, now, now + self.timeout, self._seq)
        self._entries[key] = entry
        heapq.heappush(self._deadlines, (entry.deadline, entry.seq, key))
        return entry

    def head(self) -> Waiting[OwnerT] | None:
        """The longest-waiting entry (served first), left in the queue."""
        if not self._entries:
            return None
        return next(iter(self._entries.values()))

    def pop(self) -> Waiting[OwnerT] | None:
        """Take the head out of the queue."""
        if not self._entries:
            return None
        _, entry = self._entries.popitem(last=False)
        self._prune()
        return entry

    def remove(self, key: int) -> Waiting[OwnerT] | None:
        """Take `key` out wherever it is (served, or its client left); None if not queued."""
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._prune()
        return entry

    def expire(self, now: float) -> list[Waiting[OwnerT]]:
        """Take out every entry whose deadline is at or before `now`, earliest deadline first."""
        expired: list[Waiting[OwnerT]] = []
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            _, seq, key = heapq.heappop(deadlines)
            entry = self._entries.get(key)
            if entry is not None and entry.seq == seq:
                del self._entries[key]
                expired.append(entry)
        self._prune()
        return expired

    def next_deadline(self) -> float | None:
        """The earliest deadline of an entry still queued (when to call `expire` next)."""
        self._prune()
        return self._deadlines[0][0] if self._deadlines else None

    def _prune(self) -> None:
        """Drop heap tops whose entry left the queue, so the heap stays about as long as the
        queue (every removal prunes; an entry deep in the heap goes when it reaches the top)."""
        deadlines, entries = self._deadlines, self._entries
        while deadlines:
            _, seq, key = deadlines[0]
            entry = entries.get(key)
            if entry is not None and entry.seq == seq:
                return
            heapq.heappop(deadlines)
        if not entries:
            deadlines.clear()


__all__ = ["DEFAULT_MAX", "DEFAULT_TIMEOUT", "ConnectionQueue", "Waiting"]
