"""A running node: its lifecycle, and nothing else.

What differs between a single process, a control process and a worker (who owns pool state,
who binds sockets, where counters come from) is the `Role`'s business; the admin API, BGP,
discovery and the fleet agent are `Service`s that `pointsman.app` attaches. The node keeps the
order of things:

start:    the state file's runtime changes over the config -> pools (and their restored drains)
          -> role.start (control: workers bind; worker: take the owner's decisions)
          -> listeners (and their restored allow/deny lists) -> health checks -> services
          -> the periodic tick.
apply:    runtime changes over the config -> plan (pure) -> bind new addresses (or refuse the
          whole reload) -> tell the workers -> pools -> listeners (retire, reconfigure, start)
          -> health checks -> services. One apply at a time.
shutdown: services that announce or change config (BGP first: routers stop sending before we
          stop accepting) -> the workers drain (control) -> stop accepting -> health checks stop
          -> open connections finish within `shutdown_grace`, the rest are cut -> the state file
          is written -> late services (the admin API: it answers until the end) -> tasks
          -> flow log.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

from pointsman.config.loader import ConfigError, load_file
from pointsman.config.model import Config, ListenerConfig, PoolConfig
from pointsman.dataplane import DataPlane
from pointsman.health.checker import HealthChecker
from pointsman.health.probes import ProbeResult
from pointsman.health.targets import targets_for
from pointsman.node import systemd
from pointsman.node.activation import Inherited
from pointsman.node.changes import Change, RuntimeChanges
from pointsman.node.reload import ReloadPlan, reload_plan
from pointsman.node.tasks import Tasks
from pointsman.node.view import (
    BgpView,
    ConfigSourcesView,
    FleetView,
    Readiness,
    RoleName,
    TransitionRecord,
    WorkerStatus,
)
from pointsman.pool.pool import Pool
from pointsman.pool.state import BackendState, Transition
from pointsman.protect.shedding import Shedder
from pointsman.telemetry.eventlog import record_reload, record_transition
from pointsman.telemetry.flow import EndReason
from pointsman.telemetry.flowlog import FlowLog
from pointsman.telemetry.process import ProcessFigures
from pointsman.telemetry.reloads import ReloadHistory
from pointsman.telemetry.stats import BackendStats, PoolStats

log = logging.getLogger("pointsman")

TICK_SECONDS = 0.5
SWITCH_INTERVAL = 0.001
TRANSITIONS_KEPT = 200  # recent backend state changes shown on the status page


class Role(Protocol):
    """What makes a node a single process, a control process or a worker (see `node.roles`)."""

    name: RoleName
    owns_state: bool  # owner pools, health checks and services live here
    serves: bool  # binds TCP/UDP listeners and writes the flow log
    inherited: Inherited  # sockets systemd passed (socket activation)
    stats_lag: float  # seconds the backends' counters may lag (workers report periodically)

    def new_pool(self, config: PoolConfig) -> Pool: ...

    def bind(self, config: ListenerConfig, node_config: Config) -> list[socket.socket] | None:
        """The listening sockets for `config`, one per address (None: the data plane needs none
        from us). Raises OSError when an address cannot be bound; a control process only checks
        that it can."""

    def new_listener(self, node: Node, config: ListenerConfig, pool: Pool) -> DataPlane | None:
        """The data plane serving `config` in this process (None: not served here)."""

    def listener_reconfigured(self, listener: DataPlane, node_config: Config) -> None: ...

    def close_connections(self, node: Node, pool: str, backend: str, reason: EndReason) -> int:
        """Close every connection to `backend` of `pool` now, wherever it is served (workers:
        told to); how many were closed here."""

    async def start(self, node: Node) -> None:
        """After the pools exist, before any listener starts."""

    def config_sent(self, config: Config) -> Awaitable[list[str]] | None:
        """Control: hand `config` to the workers now (before the pools broadcast the events the
        new config causes); the result resolves to their problems once they applied it."""

    async def stop_serving(self, grace: float) -> None:
        """Control: stop the workers (each drains within `grace`)."""

    def backend_stats(self, pool: Pool) -> list[BackendStats]: ...

    def pool_stats(self, pool: Pool) -> PoolStats: ...

    def processes(self, node: Node) -> list[ProcessFigures]: ...

    def workers(self) -> list[WorkerStatus]: ...

    def flow_log_dropped(self, node: Node) -> int: ...

    def connection_ages(self, node: Node) -> dict[tuple[str, str], float]:
        """Seconds the oldest open connection has been open, by (listener, pool it went to)."""


class Service(Protocol):
    """A part with a life of its own on a state-owning node (admin API, BGP, discovery, fleet)."""

    stops_before_drain: bool  # True: stopped before connections drain; False: after

    async def start(self, node: Node) -> None: ...

    async def apply(self, config: Config) -> None:
        """Called after every applied config."""

    async def stop(self) -> None: ...


class ConfigSource(ConfigSourcesView, Protocol):
    """The path every config change takes when discovery or etcd feed the node (the composer)."""

    async def apply_base(self, config: Config, label: str) -> list[str]: ...


class BindError(OSError):
    """A listener's address cannot be bound; the message names the listener and the address."""


def bind(role: Role, listener: ListenerConfig, config: Config) -> list[socket.socket] | None:
    try:
        return role.bind(listener, config)
    except BindError:
        raise
    except OSError as exc:
        raise BindError(exc.errno, f"listener {listener.name}: cannot bind {listener.protocol} "
                                   f"{listener.bind}: {exc.strerror or exc}") from exc


class Node:
    def __init__(self, config: Config, role: Role, *, config_path: str | Path | None = None,
                 announce: Callable[[str], None] = print) -> None:
        self.config = config  # as applied: the file's config with the runtime changes
        self.file_config = config  # as given (file, discovery), before the runtime changes
        self.role_object = role
        self.config_path = config_path
        self.announce = announce if role.name != "worker" else (lambda line: None)
        self.loop = asyncio.get_running_loop()
        self.started_at = time.time()
        self.pools: dict[str, Pool] = {}
        self.listeners: dict[str, DataPlane] = {}
        self.tasks = Tasks()
        self.transitions: deque[TransitionRecord] = deque(maxlen=TRANSITIONS_KEPT)
        self.loop_lag = 0.0
        self.shedder = Shedder(config.shedding.max_connections, config.shedding.max_loop_lag)
        self.flow_log: FlowLog | None = None
        self.services: list[Service] = []
        self.config_source: ConfigSource | None = None
        self.bgp: BgpView | None = None
        self.fleet: FleetView | None = None
        self.checkers: dict[str, HealthChecker] = {}
        self.listener_stats: dict[str, object] = {}  # kept by listener name across restarts
        self.started = False  # start() has completed
        self.reload_history = ReloadHistory()
        self._reloads = 0
        self._reload_lock = asyncio.Lock()
        self._apply_lock = asyncio.Lock()
        self.changes = RuntimeChanges(self, owner=role.owns_state, stats_lag=role.stats_lag)
        self._stopping = asyncio.Event()
        self._retiring: set[asyncio.Task[None]] = set()
        self._tick_handle: asyncio.TimerHandle | None = None
        self._tick_at = 0.0

    # --- NodeView ------------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        fleet, node = self.fleet, self.config.node
        if fleet is not None:
            return fleet.name
        return node.name if node is not None else socket.gethostname()

    @property
    def role(self) -> RoleName:
        return self.role_object.name

    @property
    def composer(self) -> ConfigSourcesView | None:
        return self.config_source

    def backend_stats(self, pool: Pool) -> Sequence[BackendStats]:
        return self.role_object.backend_stats(pool)

    def pool_stats(self, pool: Pool) -> PoolStats:
        return self.role_object.pool_stats(pool)

    def processes(self) -> Sequence[ProcessFigures]:
        return self.role_object.processes(self)

    def workers(self) -> Sequence[WorkerStatus]:
        return self.role_object.workers()

    def flow_log_dropped(self) -> int:
        return self.role_object.flow_log_dropped(self)

    def connection_ages(self) -> dict[tuple[str, str], float]:
        return self.role_object.connection_ages(self)

    def close_connections(self, pool: str, backend: str, reason: EndReason) -> int:
        """Close the connections to `backend` of `pool` now (with workers: they are told to)."""
        return self.role_object.close_connections(self, pool, backend, reason)

    def passed_sockets(self) -> list[dict[str, object]]:
        inherited = self.role_object.inherited
        served = {fd: f"{name}" for (name, _), fd in inherited.assignment.fds.items()}
        return [{"fd": s.fd, "name": s.name, "protocol": s.protocol,
                 "address": None if s.address is None else str(s.address),
                 "listener": served.get(s.fd)} for s in inherited.sockets]

    def task_crashes(self) -> Mapping[str, int]:
        return dict(self.tasks.crashes)

    def readiness(self) -> Readiness:
        fleet, bgp = self.fleet, self.bgp
        return Readiness(
            not_accepting=tuple(n for n, lst in list(self.listeners.items()) if not lst.accepting),
            pools_without_backends=tuple(n for n, p in list(self.pools.items())
                                         if p.snapshot.available == 0),
            failed_tasks=tuple(sorted(self.tasks.failed)),
            drained=(fleet is not None and fleet.draining is not None)
            or (bgp is not None and bgp.drained),
        )

    # --- start ----------------------------------------------------------------------------------------

    async def start(self) -> None:
        # Slow work (config parsing, scrapes, the flow log) runs in threads; a thread holding the
        # GIL delays the loop by up to the switch interval at every handover: 1 ms, not 5.
        sys.setswitchinterval(SWITCH_INTERVAL)
        role = self.role_object
        if role.serves:
            self.flow_log = FlowLog.open(self.config.flow_log, self.tasks)
        self.config = await self.changes.load(self.file_config)
        role.inherited.prepare(self.config)
        for pool_config in self.config.pools:
            self.pools[pool_config.name] = self._new_pool(pool_config)
        self.changes.restore_pools()
        await role.start(self)
        for listener_config in self.config.listeners:
            await self._start_listener(listener_config, bind(role, listener_config, self.config))
        self.changes.restore_acls()
        self._sync_health_checks()
        for service in self.services:
            await service.start(self)
            await service.apply(self.config)
        self._tick_at = self.loop.time() + TICK_SECONDS
        self._tick_handle = self.loop.call_at(self._tick_at, self._tick)
        self.started = True
        if self.role_object.name != "worker":
            systemd.ready(self._summary())
            if (interval := systemd.watchdog_interval()) is not None:
                self.tasks.spawn("systemd:watchdog", lambda: systemd.keep_watchdog_fed(interval),
                                 kind="systemd")

    def _summary(self) -> str:
        workers = len(self.workers())
        return (f"{len(self.listeners)} listeners, {len(self.pools)} pools"
                + (f", {workers} workers" if workers else ""))

    def _new_pool(self, config: PoolConfig) -> Pool:
        pool = self.role_object.new_pool(config)
        pool.subscribe(self._on_transition)
        if self.role_object.owns_state:  # mirrors repeat the owner's transitions: not events
            pool.subscribe(record_transition)
        return pool

    async def _start_listener(self, config: ListenerConfig,
                              socks: list[socket.socket] | None) -> None:
        pool = self.pools[config.fallback_pool]
        listener = self.role_object.new_listener(self, config, pool)
        if listener is None:
            for sock in socks or ():
                sock.close()
            return
        try:
            await listener.start(socks)
        except BaseException:
            for sock in socks or ():
                sock.close()
            raise
        self.listeners[config.name] = listener
        self.announce(describe(config, pool))

    def _sync_health_checks(self) -> None:
        """One checker per pool, owned by the task supervisor; on reload unchanged targets keep
        their counters."""
        if not self.role_object.owns_state:
            return
        for name, pool in self.pools.items():
            checker = self.checkers.get(name)
            if checker is None:
                checker = self.checkers[name] = HealthChecker(_on_check(pool))
                self.tasks.spawn(f"health:{name}", checker.run, kind="health")
            checker.set_targets(targets_for(pool, pool.config))
        for name in set(self.checkers) - set(self.pools):
            del self.checkers[name]
            self.tasks.cancel(f"health:{name}")

    def _tick(self) -> None:
        now = self.loop.time()
        self.loop_lag = max(now - self._tick_at, 0.0)
        self.shedder.measured(self.loop_lag)
        for pool in self.pools.values():
            pool.tick()
        self.changes.tick()
        self._tick_at = now + TICK_SECONDS
        self._tick_handle = self.loop.call_at(self._tick_at, self._tick)

    def _on_transition(self, pool_name: str, backend_id: str, transition: Transition) -> None:
        """Keep recent transitions; on_down: close_sessions cuts the backend's connections."""
        self.transitions.append((time.time(), pool_name, transition))
        self.changes.on_transition(pool_name, backend_id, transition)
        pool = self.pools.get(pool_name)
        if pool is None or pool.config.on_down != "close_sessions":
            return
        if transition.new in (BackendState.DOWN, BackendState.EJECTED):
            for listener in self.listeners.values():
                if listener.pool is pool:
                    listener.close_backend(backend_id, EndReason.BACKEND_DOWN)

    # --- run, reload ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until SIGTERM or SIGINT; SIGHUP reloads the config file."""
        self.install_signal_handlers()
        try:
            await self._stopping.wait()
        finally:
            await self.shutdown()

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self.request_stop)
        if self.config_path is not None:
            self.loop.add_signal_handler(signal.SIGHUP, self._reload_from_file)

    def request_stop(self) -> None:
        self._stopping.set()

    def _reload_from_file(self) -> None:
        self._reloads += 1
        self.tasks.spawn(f"reload:{self._reloads}", self._reload_quietly, kind="reload",
                         restart=False)

    async def _reload_quietly(self) -> None:
        await self.reload()

    async def reload(self) -> list[str]:
        """Re-read the config file (off the loop: parsing and name resolution take time); return
        its problems, in which case the running config stays. Reloads run one at a time; every
        outcome is recorded in `reload_history` (an exception counts as refused)."""
        async with self._reload_lock:
            systemd.reloading()
            try:
                errors = await self._reload()
            except Exception:
                self.reload_history.record(False, time.time())
                raise
            finally:
                systemd.ready(self._summary())
            self.reload_history.record(not errors, time.time())
            return errors

    async def _reload(self) -> list[str]:
        if self.config_path is None:
            return ["no config file to reload (config came from elsewhere)"]
        try:
            config = await asyncio.to_thread(load_file, self.config_path)
        except ConfigError as exc:
            log.error("reload refused, the running config stays:\n%s", exc)
            record_reload("file", False, self.config, None, exc.issues)
            return [str(issue) for issue in exc.issues]
        try:
            if self.config_source is not None:  # merges discovered backends; refuses what fails
                return await self.config_source.apply_base(config, "file")
            errors = await self.apply(config)
        except OSError as exc:
            log.error("reload failed to bind: %s", exc)
            record_reload("file", False, self.config, config, [f"cannot apply: {exc}"])
            return [f"cannot apply: {exc}"]
        record_reload("file", not errors, self.config, config, errors)
        return errors

    async def apply(self, config: Config) -> list[str]:
        """Apply a validated config (with the runtime changes that still hold over it) without
        closing sockets or connections that still fit. Raises OSError (then nothing has
        changed) when a new address cannot be bound; returns the workers' problems, if any,
        once they have applied it too."""
        async with self._apply_lock:
            effective = self.changes.effective(config)
            errors = await self._apply(effective)
            self.file_config = config
            self.changes.commit(config, effective)
            return errors

    async def apply_overlay(self, change: Change,
                            check: Callable[[Config], None] | None = None) -> list[str]:
        """Apply a runtime change: the current config (file, discovery) with the runtime changes
        and `change` over it, which `check` may refuse (ValueError) before anything changes."""
        async with self._apply_lock:
            effective = self.changes.effective(self.file_config, change)
            if check is not None:
                check(effective)
            errors = await self._apply(effective)
            self.changes.commit(self.file_config, effective, change)
            return errors

    async def _apply(self, config: Config) -> list[str]:
        self.role_object.inherited.prepare(config)
        plan = reload_plan(self.config, config)
        socks = self._bind_first(config, plan)
        workers_done = self.role_object.config_sent(config)
        self._apply_pools(plan)
        for name in plan.retire_listeners:
            self._retire(self.listeners.pop(name), config.shutdown_grace)
        for listener_config in plan.keep_listeners:
            listener = self.listeners[listener_config.name]
            listener.reconfigure(listener_config, self.pools[listener_config.fallback_pool])
            self.role_object.listener_reconfigured(listener, config)
        for listener_config in plan.start_listeners:
            bound = socks.pop(listener_config.name, None)
            if bound is None:
                bound = bind(self.role_object, listener_config, config)
            await self._start_listener(listener_config, bound)
        for name in plan.remove_pools:
            del self.pools[name]
        self.shedder.configure(config.shedding.max_connections, config.shedding.max_loop_lag)
        self.config = config
        self._sync_health_checks()
        for service in self.services:
            await service.apply(config)
        errors = await workers_done if workers_done is not None else []
        if self.role_object.name != "worker":
            log.info("config applied: %s", plan.describe())
        return errors

    def _bind_first(self, config: Config, plan: ReloadPlan) -> dict[str, list[socket.socket]]:
        """Bind the addresses the plan adds before anything changes, so a reload that cannot
        bind is refused whole instead of half applied."""
        socks: dict[str, list[socket.socket]] = {}
        wanted = {listener.name: listener for listener in config.listeners}
        try:
            for name in plan.bind_first:
                bound = bind(self.role_object, wanted[name], config)
                if bound is not None:
                    socks[name] = bound
        except OSError:
            for bound in socks.values():
                for sock in bound:
                    sock.close()
            raise
        return socks

    def _apply_pools(self, plan: ReloadPlan) -> None:
        for pool_config in plan.add_pools:
            self.pools[pool_config.name] = self._new_pool(pool_config)
        for pool_config in plan.change_pools:
            self.pools[pool_config.name].reconfigure(pool_config)

    def _retire(self, listener: DataPlane, grace: float) -> None:
        listener.stop_accepting()

        async def drain() -> None:
            if not await listener.wait_drained(grace):
                listener.close_all(EndReason.SHUTDOWN)

        task = self.loop.create_task(drain(), name=f"retire:{listener.name}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    # --- shutdown ---------------------------------------------------------------------------------------

    def open_connections(self) -> int:
        return sum(_active(listener) for listener in self.listeners.values())

    async def shutdown(self, grace: float | None = None) -> None:
        grace = self.config.shutdown_grace if grace is None else grace
        if self.role_object.name != "worker":
            said = f"stopping: {self.open_connections()} connections open, grace {grace:g}s"
            log.info("%s", said)
            systemd.stopping(said)
        for service in self.services:
            if service.stops_before_drain:
                await service.stop()
        if self._tick_handle is not None:
            self._tick_handle.cancel()
        listeners = list(self.listeners.values())
        for listener in listeners:  # first: a control process is not accepting while it waits
            listener.stop_accepting()
        await self.role_object.stop_serving(grace)
        for name in list(self.checkers):
            self.tasks.cancel(f"health:{name}")
        self.checkers.clear()
        results = await asyncio.gather(*(lst.wait_drained(grace) for lst in listeners))
        cut = sum(lst.close_all(EndReason.SHUTDOWN)
                  for lst, drained in zip(listeners, results, strict=True) if not drained)
        if cut:
            log.warning("shutdown: cut %d connections still open after %gs", cut, grace)
        await self.changes.close()
        for task in list(self._retiring):
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)
        # Let the cut connections' connection_lost callbacks run before the loop goes away.
        await asyncio.sleep(0)
        for service in reversed(self.services):
            if not service.stops_before_drain:
                await service.stop()
        await self.tasks.close()
        if self.flow_log is not None:
            await self.flow_log.close()


def describe(config: ListenerConfig, pool: Pool) -> str:
    n = len(pool.config.backends)
    kernel = " [kernel data plane]" if config.dataplane == "kernel" else ""
    return (f"listening {config.protocol} {config.bind} -> pool {pool.name} "
            f"({n} backend{'s' if n != 1 else ''}, {pool.config.algorithm}){kernel}")


def _on_check(pool: Pool) -> Callable[[str, ProbeResult, bool | None], None]:
    def on_result(backend_id: str, result: ProbeResult, verdict: bool | None) -> None:
        pool.record_check(backend_id, result)
        if verdict is not None:
            pool.health_verdict(backend_id, verdict, result.detail)

    return on_result


def _active(listener: DataPlane) -> int:
    """Open connections (TCP) or sessions (UDP); the kernel's flows are not counted here."""
    stats = listener.statistics()
    return int(getattr(stats, "active", getattr(stats, "sessions", 0)))
