"""The one shape every data plane has: a listener served by this process (TCP or UDP proxy, the
kernel fast path) or, in a control process, the view of a listener its workers serve.

The node starts, reconfigures, drains and stops data planes through this protocol only, and
reads their counters through `statistics()`: a snapshot object whose type says which counters a
kind of data plane has (the exporters and the status document dispatch on it).
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Protocol

from pointsman.config.model import ListenerConfig
from pointsman.kernel.stats import KernelListenerStats
from pointsman.pool.pool import Pool
from pointsman.telemetry.flow import EndReason
from pointsman.telemetry.stats import ListenerStats
from pointsman.telemetry.udp_stats import UdpListenerStats

Statistics = ListenerStats | UdpListenerStats | KernelListenerStats


class DataPlane(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def config(self) -> ListenerConfig: ...

    @property
    def pool(self) -> Pool: ...

    @property
    def accepting(self) -> bool: ...

    async def start(self, sock: socket.socket | Sequence[socket.socket] | None = None) -> None:
        """Start serving on `sock` (bound by the node: one socket per address of the listener's
        `bind`), or bind/program what it needs itself."""

    def reconfigure(self, config: ListenerConfig, pool: Pool) -> None:
        """Reload: new settings for new connections; established ones are untouched."""

    def stop_accepting(self) -> None: ...

    async def wait_drained(self, timeout: float) -> bool:
        """Wait until no connection is left (at most `timeout` s); True if none is."""

    def close_all(self, reason: EndReason) -> int:
        """Cut every connection now; how many were cut."""

    def close_backend(self, backend_id: str, reason: EndReason) -> int:
        """Cut the connections to one backend; how many were cut."""

    def statistics(self) -> Statistics:
        """The counters now: cheap, consistent (taken in one loop callback), not to be mutated."""
