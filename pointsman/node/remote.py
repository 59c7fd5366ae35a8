"""The control process's picture of what its workers serve.

`WorkerReports` keeps the latest `StatsReport` of each worker and the counters of workers that
have exited; totals are summed when read. `RemoteListener` is the data plane of a listener that
the workers serve, as the control process sees it: its statistics are the workers' totals and it
accepts while at least one live worker does.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from typing import Literal, TypeVar

from pointsman.config.model import ListenerConfig
from pointsman.node.ipc import ListenerAcl, ListenerStatistics, Message, StatsReport
from pointsman.pool.pool import Pool
from pointsman.protect.acl import AclLists
from pointsman.telemetry.aggregate import add, counters_of, total
from pointsman.telemetry.flow import EndReason
from pointsman.telemetry.process import ProcessFigures
from pointsman.telemetry.stats import BackendStats, ListenerStats, PoolStats
from pointsman.telemetry.udp_stats import UdpListenerStats

T = TypeVar("T")
KINDS: tuple[Literal["allow", "deny"], ...] = ("allow", "deny")


class WorkerReports:
    def __init__(self) -> None:
        self.latest: dict[int, StatsReport] = {}
        # By name and type: a reload may turn a listener from TCP into UDP under the same name.
        self._retired_listeners: dict[tuple[str, type], ListenerStatistics] = {}
        self._retired_backends: dict[tuple[str, str], BackendStats] = {}
        self._retired_pools: dict[str, PoolStats] = {}
        self._retired_dropped = 0

    def update(self, report: StatsReport) -> None:
        self.latest[report.index] = report

    def retire(self, index: int) -> None:
        """Worker `index` exited: keep its counters in the totals, drop its gauges."""
        report = self.latest.pop(index, None)
        if report is None:
            return
        for name, stats in report.listeners.items():
            kind = (name, type(stats))
            self._retired_listeners[kind] = _fold(self._retired_listeners.get(kind), stats)
        for key, backend in report.backends.items():
            self._retired_backends[key] = _fold(self._retired_backends.get(key), backend)
        for name, pool in report.pools.items():
            self._retired_pools[name] = _fold(self._retired_pools.get(name), pool)
        self._retired_dropped += report.flow_log_dropped

    def listener(self, name: str, kind: type | None = None) -> ListenerStatistics | None:
        """The totals of listener `name`, of type `kind` (default: what the workers report)."""
        live = [r.listeners[name] for r in list(self.latest.values()) if name in r.listeners]
        if kind is None:
            kinds = [type(stats) for stats in live] or [k for n, k in self._retired_listeners if n == name]
            if not kinds:
                return None
            kind = kinds[0]
        return total([s for s in live if type(s) is kind], self._retired_listeners.get((name, kind)))

    def backend(self, pool: str, backend: str) -> BackendStats:
        key = (pool, backend)
        live = [r.backends[key] for r in list(self.latest.values()) if key in r.backends]
        return total(live, self._retired_backends.get(key)) or BackendStats()

    def pool(self, name: str) -> PoolStats:
        """A pool's queue figures: the workers' gauges and counters, and exited workers' counters."""
        live = [r.pools[name] for r in list(self.latest.values()) if name in r.pools]
        return total(live, self._retired_pools.get(name)) or PoolStats()

    def accepting(self, name: str) -> bool:
        return any(name in r.accepting for r in list(self.latest.values()))

    def processes(self) -> list[ProcessFigures]:
        return [report.process for _, report in sorted(list(self.latest.items()))]

    def connection_ages(self, now: float) -> dict[tuple[str, str], float]:
        """The oldest connection any worker holds, aged to `now` (time.monotonic())."""
        ages: dict[tuple[str, str], float] = {}
        for report in list(self.latest.values()):
            for key, age in report.ages.items():
                ages[key] = max(ages.get(key, 0.0), age + max(now - report.at, 0.0) if age else 0.0)
        return ages

    def flow_log_dropped(self) -> int:
        return self._retired_dropped + sum(r.flow_log_dropped for r in list(self.latest.values()))


def _fold(retired: T | None, stats: T) -> T:
    if retired is None:
        return counters_of(stats)
    add(retired, stats, gauges=False)
    return retired


class RemoteListener:
    """A TCP or UDP listener served by the workers (see the module docstring). Its allow/deny
    lists are kept here too: a list set through the admin API is sent to every worker, and to
    every worker that starts later (`runtime_acls`)."""

    def __init__(self, config: ListenerConfig, pool: Pool, reports: WorkerReports,
                 send: Callable[[Message], None]) -> None:
        self.config = config
        self.pool = pool
        self._reports = reports
        self._send = send
        self._stopped = False
        self.acl_lists = AclLists.from_file(config.allow, config.deny, config.acl_on)

    def set_acl(self, lists: AclLists) -> None:
        old, self.acl_lists = self.acl_lists, lists
        for kind in KINDS:
            if lists.get(kind) != old.get(kind):
                self._send(ListenerAcl(self.name, kind, lists.get(kind)))

    def runtime_acls(self) -> list[ListenerAcl]:
        """The lists set at run time, unlike the file's: what a starting worker must be told."""
        lists = self.acl_lists
        file = {"allow": lists.file_allow, "deny": lists.file_deny}
        return [ListenerAcl(self.name, kind, lists.get(kind)) for kind in KINDS
                if lists.get(kind) != file[kind]]

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def accepting(self) -> bool:
        return not self._stopped and self._reports.accepting(self.name)

    async def start(self, sock: socket.socket | Sequence[socket.socket] | None = None) -> None:
        """The workers bind; nothing to do here."""

    def reconfigure(self, config: ListenerConfig, pool: Pool) -> None:
        """As a local listener does: a list the file changed takes the file's value, which the
        workers take from the config they apply."""
        self.config = config
        self.pool = pool
        self.acl_lists = AclLists.from_file(config.allow, config.deny, config.acl_on, self.acl_lists)

    def stop_accepting(self) -> None:
        self._stopped = True

    async def wait_drained(self, timeout: float) -> bool:
        return True  # each worker drains its own connections

    def close_all(self, reason: EndReason) -> int:
        return 0

    def close_backend(self, backend_id: str, reason: EndReason) -> int:
        return 0  # workers follow the same transitions and close their own connections

    def statistics(self) -> ListenerStatistics:
        udp = self.config.protocol == "udp"
        found = self._reports.listener(self.name, UdpListenerStats if udp else ListenerStats)
        if found is not None:
            return found
        if udp:  # no worker has reported yet
            return UdpListenerStats(self.config.udp.max_sessions)
        return ListenerStats(self.config.max_connections)
