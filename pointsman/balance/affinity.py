"""Sticky table: remembers which backend a client key went to, for a while.

The model is HAProxy's stick table with `expire` (and LVS persistence timeouts): an entry lives
until `timeout` seconds pass without a connection from its key, and the table is bounded, evicting
the least recently used key when full so a scan of many source addresses cannot grow it without
limit. Time is always an argument, so callers (and tests) decide what "now" is.
"""

from __future__ import annotations

from collections import OrderedDict


class AffinityTable:
    """Key (bytes) -> backend id, with idle expiry and LRU eviction."""

    __slots__ = ("_by_backend", "_entries", "max_entries", "timeout")

    def __init__(self, timeout: float, max_entries: int) -> None:
        if timeout <= 0:
            raise ValueError(f"affinity timeout must be positive, got {timeout}")
        if max_entries < 1:
            raise ValueError(f"affinity table needs at least one entry, got {max_entries}")
        self.timeout = timeout
        self.max_entries = max_entries
        # Ordered oldest use first, so eviction and expiry both work from the front.
        self._entries: OrderedDict[bytes, tuple[str, float]] = OrderedDict()
        # Reverse index so forgetting a backend costs its own keys, not a scan of the table.
        self._by_backend: dict[str, set[bytes]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, key: bytes, now: float) -> str | None:
        """Return the remembered backend id and refresh the entry, or None if absent or expired."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        backend_id, last_use = entry
        if now - last_use >= self.timeout:
            self._remove(key, backend_id)
            return None
        self._entries[key] = (backend_id, now)
        self._entries.move_to_end(key)
        return backend_id

    def remember(self, key: bytes, backend_id: str, now: float) -> None:
        """Record that `key` went to `backend_id` at `now`, evicting the least recent if full."""
        previous = self._entries.get(key)
        if previous is not None and previous[0] != backend_id:
            self._unindex(key, previous[0])
        self._entries[key] = (backend_id, now)
        self._entries.move_to_end(key)
        self._by_backend.setdefault(backend_id, set()).add(key)
        while len(self._entries) > self.max_entries:
            oldest, (oldest_backend, _) = self._entries.popitem(last=False)
            self._unindex(oldest, oldest_backend)

    def forget_backend(self, backend_id: str) -> int:
        """Drop every key bound to `backend_id` (it left the pool); return how many."""
        keys = self._by_backend.pop(backend_id, set())
        for key in keys:
            del self._entries[key]
        return len(keys)

    def expire(self, now: float) -> int:
        """Drop entries idle for `timeout` or longer; return how many. Cost: the expired ones.

        Relies on `now` never going backwards between calls (pass a monotonic clock).
        """
        removed = 0
        entries = self._entries
        while entries:
            key, (backend_id, last_use) = next(iter(entries.items()))
            if now - last_use < self.timeout:
                break
            self._remove(key, backend_id)
            removed += 1
        return removed

    def _remove(self, key: bytes, backend_id: str) -> None:
        del self._entries[key]
        self._unindex(key, backend_id)

    def _unindex(self, key: bytes, backend_id: str) -> None:
        keys = self._by_backend.get(backend_id)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._by_backend[backend_id]
