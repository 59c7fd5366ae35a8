"""Load shedding: refuse new connections early when the process is over its bounds, rather than
let every connection degrade. One instance per process, shared by all listeners."""

from __future__ import annotations


class Shedder:
    __slots__ = ("active", "lag", "max_connections", "max_loop_lag")

    def __init__(self, max_connections: int | None = None, max_loop_lag: float | None = None) -> None:
        self.max_connections = max_connections
        self.max_loop_lag = max_loop_lag
        self.active = 0  # connections open across every listener of the process
        self.lag = 0.0  # last measured event-loop lag, seconds

    def reason(self) -> str | None:
        """"shed_connections" or "shed_loop_lag" when a new connection should be refused."""
        if self.max_connections is not None and self.active >= self.max_connections:
            return "shed_connections"
        if self.max_loop_lag is not None and self.lag > self.max_loop_lag:
            return "shed_loop_lag"
        return None
