"""Immutable views of a pool that the control plane publishes and the data plane reads.

The data plane swaps its reference to a new snapshot and never mutates one; only `stats` (live
counters, owned by the data plane) and the affinity table are mutable, and both are kept by backend
id across snapshots.
"""

from __future__ import annotations

from dataclasses import dataclass

from pointsman.balance.affinity import AffinityTable
from pointsman.balance.base import Picker
from pointsman.config.model import PoolConfig
from pointsman.pool.state import BackendState
from pointsman.telemetry.stats import BackendStats


@dataclass(frozen=True, slots=True)
class BackendView:
    id: str
    host: str
    port: int
    weight: int
    effective_weight: float  # 0: not picked now (down, an idle backup, weight 0, ...)
    state: BackendState
    backup: bool = False


@dataclass(frozen=True, slots=True)
class PoolSnapshot:
    name: str
    version: int
    config: PoolConfig
    backends: tuple[BackendView, ...]
    stats: tuple[BackendStats, ...]
    picker: Picker
    affinity: AffinityTable | None
    needs_key: bool  # hash policy or affinity: the data plane must compute the client key
    available: int  # backends taking new connections (read on every accept: computed once)
    # Who serves: "primary", "backup" (no primary available), "panic" (below panic_threshold:
    # health ignored), "none". See pointsman.pool.serving.
    mode: str = "primary"
    # Each backend's max_connections in this process (0: no cap); empty when none is capped.
    caps: tuple[int, ...] = ()

    @property
    def panic(self) -> bool:
        return self.mode == "panic"
