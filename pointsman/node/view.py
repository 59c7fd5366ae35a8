"""What the admin API, the fleet agent and the BGP announcer may read of a node: `NodeView`.

They depend on this protocol, not on the node's classes, so the node layer can change (and be
built from these parts in `pointsman.app`) without import cycles. Everything here is a read, except
the handful of operator commands on the parts that own them (a pool's drain, BGP's drain).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from pointsman.config.model import BackendConfig, Config
from pointsman.dataplane import DataPlane
from pointsman.pool.pool import Member, Pool
from pointsman.pool.state import Transition
from pointsman.telemetry.process import ProcessFigures
from pointsman.telemetry.reloads import ReloadHistory
from pointsman.telemetry.stats import BackendStats, PoolStats

RoleName = Literal["single", "control", "worker"]


class BgpView(Protocol):
    @property
    def drained(self) -> bool: ...

    def statistics(self) -> dict[str, Any]: ...

    async def drain(self) -> bool: ...

    async def resume(self) -> bool: ...


class FleetView(Protocol):
    @property
    def name(self) -> str:
        """The node's name in the fleet (from its node file)."""

    @property
    def draining(self) -> str | None: ...

    @property
    def connected(self) -> bool: ...

    @property
    def revision(self) -> int: ...

    def statistics(self) -> dict[str, object]: ...


class ConfigSourcesView(Protocol):
    @property
    def applied(self) -> Counter[str]: ...

    @property
    def rejected(self) -> Counter[str]: ...

    @property
    def updates(self) -> Counter[tuple[str, str]]: ...

    def statistics(self) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    index: int
    state: str  # starting, running, stopping, restarting, failed
    pid: int | None
    started_at: float | None  # wall clock
    restarts: int
    last_exit_code: int | None


@dataclass(frozen=True, slots=True)
class Readiness:
    """Ready when every listener is served, every pool has a backend to send to, no supervised
    task has failed, and the node is not drained (fleet or BGP)."""

    not_accepting: tuple[str, ...]  # listeners not served by any live process
    pools_without_backends: tuple[str, ...]
    failed_tasks: tuple[str, ...]
    drained: bool

    @property
    def ready(self) -> bool:
        return not (self.not_accepting or self.pools_without_backends or self.failed_tasks
                    or self.drained)

    def as_dict(self) -> dict[str, object]:
        return {"ready": self.ready, "not_accepting": list(self.not_accepting),
                "pools_without_backends": list(self.pools_without_backends),
                "failed_tasks": list(self.failed_tasks), "drained": self.drained}


TransitionRecord = tuple[float, str, Transition]  # (wall time, pool, transition)


class OperatorView(Protocol):
    """The operator's commands on backends (the admin API's), kept across reloads and, with a
    state file, restarts (see `node.changes`). Pools and backends are named as operators write
    them (a backend by its name or host:port); unknown ones raise UnknownPool/UnknownBackend."""

    def drain(self, pool: str, backend: str, timeout: float | None = None) -> Member: ...

    def maintenance(self, pool: str, backend: str, close: bool = False) -> tuple[Member, int | None]:
        ...

    def enable(self, pool: str, backend: str) -> Member: ...

    def set_weight(self, pool: str, backend: str, weight: int) -> Member: ...

    async def add(self, pool: str, entry: BackendConfig) -> tuple[Member, list[str]]: ...

    async def remove(self, pool: str, backend: str) -> tuple[Member, bool]: ...

    def changed(self) -> None:
        """Something the state file holds changed elsewhere (an allow/deny list)."""

    def backend_status(self, pool: str, backend: str) -> dict[str, Any]: ...

    def statistics(self) -> dict[str, Any]: ...


class NodeView(Protocol):
    @property
    def name(self) -> str:
        """What operators call this node: the fleet node name, else the config's `node.name`,
        else the host name."""

    @property
    def role(self) -> RoleName: ...

    @property
    def config(self) -> Config: ...

    @property
    def started_at(self) -> float: ...

    @property
    def loop_lag(self) -> float: ...

    @property
    def pools(self) -> Mapping[str, Pool]: ...

    @property
    def listeners(self) -> Mapping[str, DataPlane]: ...

    @property
    def transitions(self) -> Sequence[TransitionRecord]: ...

    @property
    def bgp(self) -> BgpView | None: ...

    @property
    def fleet(self) -> FleetView | None: ...

    @property
    def composer(self) -> ConfigSourcesView | None: ...

    def backend_stats(self, pool: Pool) -> Sequence[BackendStats]:
        """Counters of the pool's backends (in `pool.members()` order), summed over workers."""

    def pool_stats(self, pool: Pool) -> PoolStats:
        """The pool's queue figures (length, wait times), summed over workers."""

    def processes(self) -> Sequence[ProcessFigures]:
        """CPU, memory, descriptors and loop lag of every process of the node."""

    def workers(self) -> Sequence[WorkerStatus]:
        """Worker processes (none in a single-process node)."""

    def flow_log_dropped(self) -> int: ...

    def connection_ages(self) -> dict[tuple[str, str], float]:
        """Seconds the oldest open TCP connection has been open, by (listener, pool)."""

    @property
    def reload_history(self) -> ReloadHistory: ...

    @property
    def changes(self) -> OperatorView: ...

    def passed_sockets(self) -> list[dict[str, Any]]:
        """The sockets systemd passed (socket activation), and the listener each serves."""

    def task_crashes(self) -> Mapping[str, int]: ...

    def readiness(self) -> Readiness: ...

    async def reload(self) -> list[str]:
        """Re-read the config file; its problems, or an empty list when applied."""
