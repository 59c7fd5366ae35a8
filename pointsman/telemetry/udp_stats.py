"""Counters of one UDP listener (integer adds on the hot path)."""

from __future__ import annotations

from collections import Counter

from pointsman.telemetry.flow import DropReason


class UdpListenerStats:
    GAUGES = frozenset({"sessions", "capacity"})  # the rest are counters (see telemetry.aggregate)
    __slots__ = (
        "bytes_in",
        "bytes_out",
        "capacity",
        "datagrams_in",
        "datagrams_out",
        "drops",
        "local_resource",
        "sessions",
        "sessions_created",
        "sessions_ended",
    )

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.sessions = 0  # live sessions (table use)
        self.sessions_created = 0
        self.sessions_ended: Counter[str] = Counter()  # by end reason
        self.datagrams_in = 0  # client -> backend
        self.datagrams_out = 0  # backend -> client
        self.bytes_in = 0
        self.bytes_out = 0
        self.drops: Counter[DropReason] = Counter()
        self.local_resource: Counter[str] = Counter()  # "op:ERRNO"
