"""The three kinds of node process, one object each.

- `SingleRole`: everything in one process (`workers: 1`): owner pools, health checks, services,
  listeners bound here, the kernel data plane.
- `ControlRole`: owner pools, health checks, services and the kernel data plane; its TCP and UDP
  listeners are served by worker processes it supervises, and it sees them through their reports.
- `WorkerRole`: mirror pools that apply the control's decisions in order, and the TCP and UDP
  listeners (SO_REUSEPORT, steered by client address where per-client state needs it).

A listener binds one socket per address of its `bind` (each port of a range is one). A socket
passed by systemd (`node.activation`) is used instead of binding its address; with workers each
worker accepts on the same passed socket (no SO_REUSEPORT group, so no steering there).
"""

from __future__ import annotations

import contextlib
import math
import socket
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING

from pointsman.config.addresses import HostPort
from pointsman.config.model import Config, ListenerConfig, PoolConfig
from pointsman.dataplane import DataPlane
from pointsman.kernel.listener import kernel_listener
from pointsman.node import steering
from pointsman.node.activation import Inherited
from pointsman.node.closing import close_connections
from pointsman.node.ipc import (
    AgentScaleSet,
    Channel,
    CloseConnections,
    PoolEvent,
    Signal,
    WeightSet,
)
from pointsman.node.remote import RemoteListener, WorkerReports
from pointsman.node.runtime import BindError
from pointsman.node.view import RoleName, WorkerStatus
from pointsman.pool.events import (
    AgentScale,
    BackendEvent,
    PassiveSignal,
    PoolMessage,
    PoolState,
    WeightChange,
)
from pointsman.pool.pool import Pool
from pointsman.proxy.listener import TcpListener
from pointsman.proxy.sockets import listen_socket
from pointsman.proxy.udp import UdpListener
from pointsman.telemetry.flow import EndReason
from pointsman.telemetry.process import ProcessFigures, measure
from pointsman.telemetry.stats import BackendStats, ListenerStats, PoolStats
from pointsman.telemetry.udp_stats import UdpListenerStats

if TYPE_CHECKING:
    from pointsman.node.runtime import Node
    from pointsman.node.supervisor import WorkerProcesses


def _socket_kind(config: ListenerConfig) -> socket.SocketKind:
    return socket.SOCK_DGRAM if config.protocol == "udp" else socket.SOCK_STREAM


def _bind_error(config: ListenerConfig, address: HostPort, exc: OSError) -> BindError:
    written = "" if str(config.bind) == str(address) else f" (of {config.bind})"
    return BindError(exc.errno, f"listener {config.name}: cannot bind {config.protocol} "
                                f"{address}{written}: {exc.strerror or exc}")


def bind_all(config: ListenerConfig, inherited: Inherited, *, reuse_port: bool = False,
             backlog: int | None = None) -> list[socket.socket]:
    """One listening socket per address of `config` (a passed one where systemd gave it);
    BindError naming the address when one cannot be bound (the others are closed)."""
    socks: list[socket.socket] = []
    try:
        for address in config.addresses:
            sock = inherited.take(config.name, address)
            if sock is None:
                try:
                    sock = listen_socket(address, _socket_kind(config),
                                         backlog=config.backlog if backlog is None else backlog,
                                         reuse_port=reuse_port)
                except OSError as exc:
                    raise _bind_error(config, address, exc) from exc
            socks.append(sock)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def local_listener(node: Node, config: ListenerConfig, pool: Pool) -> DataPlane:
    """A TCP or UDP listener served by this process; its counters survive a restart of the
    listener under the same name (a reload that moves it)."""
    flow_log = node.flow_log
    if config.protocol == "udp":
        udp_stats = node.listener_stats.get(config.name)
        if not isinstance(udp_stats, UdpListenerStats):
            udp_stats = node.listener_stats[config.name] = UdpListenerStats(config.udp.max_sessions)
        return UdpListener(config, pool, node.loop, stats=udp_stats,
                           session_sink=flow_log.udp if flow_log is not None else None,
                           pools=node.pools)
    tcp_stats = node.listener_stats.get(config.name)
    if not isinstance(tcp_stats, ListenerStats):
        tcp_stats = node.listener_stats[config.name] = ListenerStats(config.max_connections)
    return TcpListener(config, pool, node.loop, stats=tcp_stats,
                       flow_sink=flow_log,
                       pools=node.pools, shedder=node.shedder)


class SingleRole:
    name: RoleName = "single"
    owns_state = True
    serves = True
    stats_lag = 0.0  # the counters are this process's own

    def __init__(self, inherited: Inherited | None = None) -> None:
        self.started_at = time.time()
        self.inherited = inherited if inherited is not None else Inherited()

    def new_pool(self, config: PoolConfig) -> Pool:
        return Pool(config)

    def bind(self, config: ListenerConfig, node_config: Config) -> list[socket.socket] | None:
        if config.dataplane == "kernel":
            return None
        return bind_all(config, self.inherited)

    def new_listener(self, node: Node, config: ListenerConfig, pool: Pool) -> DataPlane | None:
        if config.dataplane == "kernel":
            return kernel_listener(config, pool, node.loop)
        return local_listener(node, config, pool)

    def listener_reconfigured(self, listener: DataPlane, node_config: Config) -> None:
        pass

    def close_connections(self, node: Node, pool: str, backend: str, reason: EndReason) -> int:
        return close_connections(node.listeners.values(), pool, backend, reason)

    async def start(self, node: Node) -> None:
        pass

    def config_sent(self, config: Config) -> Awaitable[list[str]] | None:
        return None

    async def stop_serving(self, grace: float) -> None:
        pass

    def backend_stats(self, pool: Pool) -> list[BackendStats]:
        return [member.stats for member in pool.members()]

    def pool_stats(self, pool: Pool) -> PoolStats:
        return pool.queue_stats

    def processes(self, node: Node) -> list[ProcessFigures]:
        return [measure(self.name, self.started_at, node.loop_lag)]

    def workers(self) -> list[WorkerStatus]:
        return []

    def flow_log_dropped(self, node: Node) -> int:
        return node.flow_log.dropped if node.flow_log is not None else 0

    def connection_ages(self, node: Node) -> dict[tuple[str, str], float]:
        """From the accept times of this process's TCP connections (perf_counter stamps)."""
        now = time.perf_counter()
        ages: dict[tuple[str, str], float] = {}
        for listener in list(node.listeners.values()):
            if isinstance(listener, TcpListener):
                for pool, started in listener.oldest().items():
                    ages[listener.name, pool] = max(now - started, 0.0)
        return ages


class ControlRole(SingleRole):
    name: RoleName = "control"
    serves = False
    # Workers report every STATS_INTERVAL (0.5 s): a count read this long after a change has
    # seen it (a backend's removal waits for that before it trusts "no connection left").
    stats_lag = 1.0

    def __init__(self, processes: WorkerProcesses, reports: WorkerReports,
                 inherited: Inherited | None = None) -> None:
        super().__init__(inherited)
        self.worker_processes = processes
        self.reports = reports

    def new_pool(self, config: PoolConfig) -> Pool:
        return Pool(config, sink=self._broadcast)

    def _broadcast(self, message: PoolMessage) -> None:
        if isinstance(message, BackendEvent):
            self.worker_processes.broadcast(PoolEvent(message))
        elif isinstance(message, WeightChange):
            self.worker_processes.broadcast(WeightSet(message))
        elif isinstance(message, AgentScale):
            self.worker_processes.broadcast(AgentScaleSet(message))

    def bind(self, config: ListenerConfig, node_config: Config) -> list[socket.socket] | None:
        """The workers bind; here only check that they can (a reload that cannot bind is refused
        before any worker changes anything). Passed sockets go to the workers as they are."""
        if config.dataplane == "kernel":
            return None
        checked: list[socket.socket] = []
        try:
            for address in config.addresses:
                if self.inherited.covers(config.name, address):
                    continue
                try:
                    checked.append(listen_socket(address, _socket_kind(config), backlog=1,
                                                 reuse_port=True))
                except OSError as exc:
                    raise _bind_error(config, address, exc) from exc
        finally:
            for sock in checked:
                sock.close()
        return None

    def new_listener(self, node: Node, config: ListenerConfig, pool: Pool) -> DataPlane | None:
        if config.dataplane == "kernel":  # nftables (or the tc program) is programmed once, here
            return kernel_listener(config, pool, node.loop)
        return RemoteListener(config, pool, self.reports, self.worker_processes.broadcast)

    def close_connections(self, node: Node, pool: str, backend: str, reason: EndReason) -> int:
        """The workers close theirs (a message to each); the kernel's flows are cut here."""
        self.worker_processes.broadcast(CloseConnections(pool, backend, reason))
        return close_connections(node.listeners.values(), pool, backend, reason)

    async def start(self, node: Node) -> None:
        await self.worker_processes.start(node)

    def config_sent(self, config: Config) -> Awaitable[list[str]] | None:
        return self.worker_processes.apply(config)

    async def stop_serving(self, grace: float) -> None:
        await self.worker_processes.stop(grace)

    def backend_stats(self, pool: Pool) -> list[BackendStats]:
        return [self.reports.backend(pool.name, member.id) for member in pool.members()]

    def pool_stats(self, pool: Pool) -> PoolStats:
        return self.reports.pool(pool.name)

    def processes(self, node: Node) -> list[ProcessFigures]:
        return [*super().processes(node), *self.reports.processes()]

    def workers(self) -> list[WorkerStatus]:
        return self.worker_processes.statuses()

    def flow_log_dropped(self, node: Node) -> int:
        return self.reports.flow_log_dropped()

    def connection_ages(self, node: Node) -> dict[tuple[str, str], float]:
        return self.reports.connection_ages(time.monotonic())


class WorkerRole(SingleRole):
    name: RoleName = "worker"
    owns_state = False

    def __init__(self, index: int, workers: int, channel: Channel,
                 pools: tuple[PoolState, ...] = (), inherited: Inherited | None = None) -> None:
        super().__init__(inherited)
        self.index = index
        self.count = workers
        self.channel = channel
        self._initial = pools
        self._sockets: dict[str, list[socket.socket]] = {}  # its own (reuseport) sockets

    def new_pool(self, config: PoolConfig) -> Pool:
        return Pool(config, mirror=True, sink=self._signal)

    def _signal(self, message: PoolMessage) -> None:
        if isinstance(message, PassiveSignal):
            with contextlib.suppress(ConnectionError):  # the control is gone: we are stopping
                self.channel.send(Signal(message))

    def bind(self, config: ListenerConfig, node_config: Config) -> list[socket.socket] | None:
        if config.dataplane == "kernel":
            return None
        socks = bind_all(config, self.inherited, reuse_port=True)
        own = [sock for sock, address in zip(socks, config.addresses, strict=True)
               if not self.inherited.covers(config.name, address)]
        try:
            self._steer(own, config, node_config)
        except OSError:
            for sock in socks:
                sock.close()
            raise
        return socks

    def _steer(self, socks: list[socket.socket], config: ListenerConfig,
               node_config: Config) -> None:
        """Steering is a program on a reuseport group: only this worker's own sockets have one
        (a passed socket is shared by every worker as it is)."""
        self._sockets[config.name] = socks
        steer = steering.needs_steering(config, node_config)
        for sock in socks:
            if steer:
                steering.attach(sock, config, self.count)
            else:
                steering.detach(sock)

    def new_listener(self, node: Node, config: ListenerConfig, pool: Pool) -> DataPlane | None:
        if config.dataplane == "kernel":
            return None
        return local_listener(node, config, pool)

    def listener_reconfigured(self, listener: DataPlane, node_config: Config) -> None:
        socks = [sock for sock in self._sockets.get(listener.name, []) if sock.fileno() >= 0]
        if socks:
            self._steer(socks, listener.config, node_config)

    async def start(self, node: Node) -> None:
        for state in self._initial:
            if (pool := node.pools.get(state.pool)) is not None:
                pool.restore(state)

    def processes(self, node: Node) -> list[ProcessFigures]:
        return [measure(f"worker-{self.index}", self.started_at, node.loop_lag)]


def share_of(config: Config, workers: int, index: int = 0) -> Config:
    """What worker `index` of `workers` enforces: its share of every bound meant for the whole
    node (the kernel spreads connections evenly, or by client address where steered): listener
    tables, the listener-wide new-connection rate and the load-shedding connection bound, and
    the pools' backend caps and queue bounds (`cap_share`: exact sums, at least 1 each).
    Per-source limits stay whole: with steering, every source is counted by one worker."""
    listeners = []
    for listener in config.listeners:
        rate = listener.limits.new_connections_per_second
        listeners.append(listener.model_copy(update={
            "max_connections": math.ceil(listener.max_connections / workers),
            "udp": listener.udp.model_copy(update={
                "max_sessions": math.ceil(listener.udp.max_sessions / workers)}),
            "limits": listener.limits.model_copy(update={
                "new_connections_per_second": None if rate is None else rate / workers}),
        }))
    shed = config.shedding.max_connections
    shedding = config.shedding.model_copy(update={
        "max_connections": None if shed is None else math.ceil(shed / workers)})
    pools = [_pool_share(pool, workers, index) for pool in config.pools] if workers > 1 \
        else config.pools
    return config.model_copy(update={"listeners": listeners, "shedding": shedding,
                                     "pools": pools})


def cap_share(total: int, workers: int, index: int) -> int:
    """Worker `index`'s part of a per-backend cap or a queue bound: the parts add up to `total`
    exactly (the first `total % workers` workers take one more), and none is below 1 (a cap
    smaller than the worker count lets each worker one connection: the node may then hold
    `workers` connections on that backend; docs/config.md says so)."""
    return max(1, total // workers + (1 if index % workers < total % workers else 0))


def _pool_share(pool: PoolConfig, workers: int, index: int) -> PoolConfig:
    if pool.backend_max_connections is None and all(
            b.max_connections is None for b in pool.backends):
        return pool
    default = pool.backend_max_connections
    backends = [b if b.max_connections is None else b.model_copy(update={
        "max_connections": cap_share(b.max_connections, workers, index)}) for b in pool.backends]
    queue = pool.queue
    if queue.max:
        queue = queue.model_copy(update={"max": cap_share(queue.max, workers, index)})
    return pool.model_copy(update={
        "backends": backends, "queue": queue,
        "backend_max_connections": None if default is None else cap_share(default, workers, index)})


