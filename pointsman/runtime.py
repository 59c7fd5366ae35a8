"""The running load balancer in one process: pools, listeners, health checks, reload, shutdown.

Shutdown has one written order: stop accepting (close listeners), stop health checks, let open
connections finish for `shutdown_grace`, then cut the rest and count them as `shutdown`.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pointsman.config.loader import ConfigError, load_file
from pointsman.config.model import Config, FlowLogConfig, ListenerConfig, PoolConfig
from pointsman.health.checker import HealthChecker
from pointsman.health.probes import ProbeResult
from pointsman.health.targets import targets_for
from pointsman.kernel.listener import KernelListener
from pointsman.pool.pool import Pool
from pointsman.pool.state import BackendState, Transition
from pointsman.protect.shedding import Shedder
from pointsman.proxy.listener import TcpListener
from pointsman.proxy.sockets import listen_socket
from pointsman.proxy.udp import UdpListener
from pointsman.telemetry.eventlog import record_reload, record_transition
from pointsman.telemetry.flow import EndReason
from pointsman.telemetry.flowlog import FlowLog
from pointsman.telemetry.stats import ListenerStats
from pointsman.telemetry.udp_stats import UdpListenerStats

if TYPE_CHECKING:
    from pointsman.admin.server import AdminServer
    from pointsman.bgp.announcer import Announcer
    from pointsman.discovery.composer import Composer
    from pointsman.fleet.agent import NodeAgent
    from pointsman.proxy.tcp import ClientConnection
    from pointsman.proxy.udp import UdpSession

Listener = TcpListener | UdpListener | KernelListener
Role = Literal["single", "control", "worker"]

log = logging.getLogger("pointsman")

TICK_SECONDS = 0.5
TRANSITIONS_KEPT = 200  # recent backend state changes shown on the status page


def describe(listener: ListenerConfig, pool: Pool) -> str:
    n = len(pool.config.backends)
    return (
        f"listening {listener.protocol} {listener.bind} -> pool {pool.name} "
        f"({n} backend{'s' if n != 1 else ''}, {pool.config.algorithm})"
    )


class Runtime:
    def __init__(
        self,
        config: Config,
        config_path: str | Path | None = None,
        announce: Callable[[str], None] = print,
        role: Role = "single",
    ) -> None:
        self.role = role
        # Where pool messages go between processes: control -> workers (events, weights,
        # configs), worker -> control (passive signals). None in a single process.
        self.relay: Callable[[tuple[object, ...]], None] | None = None
        self.stop_workers: Callable[[float], Awaitable[None]] | None = None  # control only
        self.config = config
        self.config_path = config_path
        self.announce = announce
        self.pools: dict[str, Pool] = {}
        self.listeners: dict[str, Listener] = {}
        self._stats: dict[str, ListenerStats | UdpListenerStats] = {}
        self._stopping = asyncio.Event()
        self._retired: set[asyncio.Task[object]] = set()
        self._tick_handle: asyncio.TimerHandle | None = None
        self.loop_lag = 0.0
        self.shedder = Shedder(config.shedding.max_connections, config.shedding.max_loop_lag)
        self.started_at = time.time()
        self.flow_log: FlowLog | None = None
        self.transitions: deque[tuple[float, str, Transition]] = deque(maxlen=TRANSITIONS_KEPT)
        self.admin: AdminServer | None = None
        self.bgp: Announcer | None = None  # VIP announcement (single or control process only)
        # Single or control: every config change (reload, etcd, discovery) goes through it.
        self.composer: Composer | None = None
        self.fleet: NodeAgent | None = None  # node-file runs: etcd config, registration, drain
        self.checkers: dict[str, HealthChecker] = {}
        self._checker_tasks: dict[str, asyncio.Task[None]] = {}
        self.loop = asyncio.get_running_loop()

    # --- start -----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Single: everything. Control: pools, health, admin (listeners are the workers').
        Worker: listeners and mirror pools only."""
        if self.role != "control":
            self._open_flow_log(self.config.flow_log)
        for pool_config in self.config.pools:
            self.pools[pool_config.name] = self._new_pool(pool_config)
        for listener_config in self.config.listeners:
            await self._start_listener(listener_config)
        self._sync_health_checks()
        await self._apply_bgp(self.config, starting=True)  # after the listeners are bound
        self._tick_at = self.loop.time() + TICK_SECONDS
        self._tick_handle = self.loop.call_at(self._tick_at, self._tick)
        if self.role != "worker":
            from pointsman.discovery.composer import Composer

            self.composer = self.composer or Composer()
            await self.composer.start(self.config, self.apply)
            if self.fleet is not None:
                await self.fleet.start(self)
        if self.config.admin is not None and self.role != "worker":
            from pointsman.admin.server import AdminServer

            self.admin = AdminServer(self, self.config.admin)
            await self.admin.start()
            self.announce(f"admin api and status page on {self.admin.url}")

    def _open_flow_log(self, config: FlowLogConfig | None) -> None:
        if config is None or not config.enabled:
            self.flow_log = None
            return
        stream = sys.stderr if config.path == "-" else open(config.path, "a")  # noqa: SIM115
        self.flow_log = FlowLog(self.loop, stream, config.sample, config.queue_size)

    def _flow_sinks(self) -> tuple[Callable[[ClientConnection], None] | None,
                                   Callable[[UdpSession], None] | None]:
        log_ = self.flow_log
        return (log_.tcp, log_.udp) if log_ is not None else (None, None)

    def _new_pool(self, pool_config: PoolConfig) -> Pool:
        pool = Pool(pool_config, mirror=self.role == "worker")
        pool.sink = self._pool_sink
        pool.subscribe(self._on_transition)
        if not pool.mirror:  # event log: the control process records each transition once
            pool.subscribe(record_transition)
        return pool

    def _pool_sink(self, message: tuple[str, ...]) -> None:
        """Control: broadcast pool events to workers. Worker: forward passive signals up."""
        if self.relay is not None:
            self.relay(message)

    async def _start_listener(
        self, config: ListenerConfig, sock: socket.socket | None = None
    ) -> None:
        pool = self.pools[config.fallback_pool]
        if config.dataplane == "kernel":
            if self.role == "worker":
                return  # nftables is programmed once, by the control process
            kernel = KernelListener(config, pool, self.loop)
            await kernel.start()
            self.listeners[config.name] = kernel
            self.announce(describe(config, pool) + " [kernel data plane]")
            return
        listener: Listener
        if config.protocol == "udp":
            udp_stats = self._stats.get(config.name)
            if not isinstance(udp_stats, UdpListenerStats):
                udp_stats = self._stats[config.name] = UdpListenerStats(config.udp.max_sessions)
            listener = UdpListener(config, pool, self.loop, stats=udp_stats,
                                   session_sink=self._flow_sinks()[1])
        else:
            tcp_stats = self._stats.get(config.name)
            if not isinstance(tcp_stats, ListenerStats):
                tcp_stats = self._stats[config.name] = ListenerStats(config.max_connections)
            listener = TcpListener(config, pool, self.loop, stats=tcp_stats,
                                   flow_sink=self._flow_sinks()[0], pools=self.pools,
                                   shedder=self.shedder)
        if self.role == "control":
            listener.accepting = True  # the workers accept; this object only carries totals
        else:
            await listener.start(sock, reuse_port=self.role == "worker")
        self.listeners[config.name] = listener
        if self.role != "worker":
            self.announce(describe(config, pool))

    def _sync_health_checks(self) -> None:
        """One checker per pool; on reload unchanged targets keep their counters."""
        if self.role == "worker":
            return
        for name, pool in self.pools.items():
            checker = self.checkers.get(name)
            if checker is None:
                checker = self.checkers[name] = HealthChecker(self._on_check(pool))
                task = self.loop.create_task(checker.run(), name=f"health:{name}")
                self._checker_tasks[name] = task
            checker.set_targets(targets_for(pool, pool.config))
        for name in set(self.checkers) - set(self.pools):
            del self.checkers[name]
            self._checker_tasks.pop(name).cancel()

    @staticmethod
    def _on_check(pool: Pool) -> Callable[[str, ProbeResult, bool | None], None]:
        def on_result(backend_id: str, result: ProbeResult, verdict: bool | None) -> None:
            pool.record_check(backend_id, result)
            if verdict is not None:
                pool.health_verdict(backend_id, verdict, result.detail)

        return on_result

    async def _stop_health_checks(self) -> None:
        tasks = list(self._checker_tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._checker_tasks.clear()
        self.checkers.clear()

    def _tick(self) -> None:
        now = self.loop.time()
        self.loop_lag = max(now - self._tick_at, 0.0)
        self.shedder.lag = self.loop_lag
        for pool in self.pools.values():
            pool.tick()
        self._tick_at = now + TICK_SECONDS
        self._tick_handle = self.loop.call_at(self._tick_at, self._tick)

    def _on_transition(self, pool_name: str, backend_id: str, transition: Transition) -> None:
        """Keep recent transitions; on_down: close_sessions cuts the backend's connections."""
        self.transitions.append((time.time(), pool_name, transition))
        pool = self.pools.get(pool_name)
        if pool is None or pool.config.on_down != "close_sessions":
            return
        if transition.new in (BackendState.DOWN, BackendState.EJECTED):
            for listener in self.listeners.values():
                if listener.pool is pool:
                    listener.close_backend(backend_id, EndReason.BACKEND_DOWN)

    # --- run, reload, stop ---------------------------------------------------------------------------

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
        task = self.loop.create_task(self.reload())
        self._retired.add(task)
        task.add_done_callback(self._retired.discard)

    async def reload(self) -> list[str]:
        """Re-read the config file; return its errors (the running config then stays)."""
        if self.config_path is None:
            return ["no config file to reload (config came from elsewhere)"]
        try:
            config = load_file(self.config_path)
        except ConfigError as exc:
            log.error("reload refused, the running config stays:\n%s", exc)
            record_reload("file", False, self.config, None, exc.issues)
            return [str(issue) for issue in exc.issues]
        try:
            if self.composer is not None:  # merges discovered backends; refuses what fails
                return await self.composer.apply_base(config, "file")
            await self.apply(config)
        except OSError as exc:
            log.error("reload failed to bind: %s", exc)
            record_reload("file", False, self.config, config, [f"cannot apply: {exc}"])
            return [f"cannot apply: {exc}"]
        return []

    async def apply(self, config: Config) -> None:
        """Apply a validated config without closing sockets or connections that still fit."""
        socks = self._prebind(config)  # may raise OSError: then nothing has changed
        if self.role == "control" and self.relay is not None:
            self.relay(("config", config))  # before the events this apply may broadcast
        for pool_config in config.pools:
            if (pool := self.pools.get(pool_config.name)) is not None:
                pool.reconfigure(pool_config)
            else:
                self.pools[pool_config.name] = self._new_pool(pool_config)
        wanted = {listener.name: listener for listener in config.listeners}
        for name, listener in list(self.listeners.items()):
            new = wanted.get(name)
            same = new is not None and (new.bind, new.protocol, new.dataplane) == (
                listener.config.bind, listener.config.protocol, listener.config.dataplane)
            if new is not None and same:
                listener.reconfigure(new, self.pools[new.fallback_pool])
                continue
            del self.listeners[name]
            self._retire(listener, config.shutdown_grace)
        for name, new in wanted.items():
            if name not in self.listeners:
                await self._start_listener(new, socks.pop(name, None))
        for name in set(self.pools) - {p.name for p in config.pools}:
            del self.pools[name]
        self.shedder.max_connections = config.shedding.max_connections
        self.shedder.max_loop_lag = config.shedding.max_loop_lag
        self._sync_health_checks()
        await self._apply_bgp(config, starting=False)
        self.config = config
        log.info("config applied: %d listeners, %d pools", len(self.listeners), len(self.pools))

    def _prebind(self, config: Config) -> dict[str, socket.socket]:
        """Bind the sockets of the listeners `config` adds or moves, before anything changes, so
        a reload that cannot bind is refused whole instead of half applied (old listeners already
        retired). An address one of our listeners holds now is bound after that one retires."""
        if self.role == "control":
            return {}
        held = {(lst.config.bind, lst.config.protocol) for lst in self.listeners.values()}
        socks: dict[str, socket.socket] = {}
        try:
            for new in config.listeners:
                if (new.bind, new.protocol) in held:
                    continue
                kind = socket.SOCK_DGRAM if new.protocol == "udp" else socket.SOCK_STREAM
                socks[new.name] = listen_socket(new.bind, kind, backlog=new.backlog,
                                                reuse_port=self.role == "worker")
        except OSError:
            for sock in socks.values():
                sock.close()
            raise
        return socks

    def _retire(self, listener: Listener, grace: float) -> None:
        listener.stop_accepting()

        async def drain() -> None:
            if not await listener.wait_drained(grace):
                listener.close_all(EndReason.SHUTDOWN)

        task = self.loop.create_task(drain())
        self._retired.add(task)
        task.add_done_callback(self._retired.discard)

    async def _apply_bgp(self, config: Config, starting: bool) -> None:
        """Start, reconfigure or stop the BGP announcer (never in a worker process). At start an
        ExaBGP that cannot run stops pointsman; on reload the announcer retries with backoff."""
        if self.role == "worker":
            return
        if config.bgp is None:
            if self.bgp is not None:
                announcer, self.bgp = self.bgp, None
                await announcer.stop()
        elif self.bgp is None:
            from pointsman.bgp.announcer import Announcer

            self.bgp = Announcer(config.bgp, self)
            await self.bgp.start(retry=not starting)
        else:
            await self.bgp.reconfigure(config.bgp)

    async def shutdown(self) -> None:
        # First withdraw the VIPs and stop ExaBGP, so routers stop sending before we stop accepting.
        if self.bgp is not None:
            announcer, self.bgp = self.bgp, None
            await announcer.stop()
        if self.composer is not None:
            await self.composer.stop()  # discovery sources first: they may use the etcd client
        if self.fleet is not None:
            await self.fleet.stop()  # leave the fleet: registration revoked, etcd watches closed
        if self._tick_handle is not None:
            self._tick_handle.cancel()
        if self.stop_workers is not None:
            await self.stop_workers(self.config.shutdown_grace)
        if self.admin is not None:
            await self.admin.stop()
        listeners = list(self.listeners.values())
        for listener in listeners:
            listener.stop_accepting()
        await self._stop_health_checks()
        # UDP has no close handshake to wait for: its sessions end now.
        udp = sum(lst.close_all(EndReason.SHUTDOWN) for lst in listeners
                  if isinstance(lst, UdpListener))
        if udp:
            log.info("shutdown: ended %d UDP sessions", udp)
        streams = [lst for lst in listeners if not isinstance(lst, UdpListener)]
        grace = self.config.shutdown_grace
        results = await asyncio.gather(*(lst.wait_drained(grace) for lst in streams))
        cut = sum(
            lst.close_all(EndReason.SHUTDOWN)
            for lst, drained in zip(streams, results, strict=True)
            if not drained
        )
        if cut:
            log.warning("shutdown: cut %d connections still open after %.0fs", cut, grace)
        for task in list(self._retired):
            task.cancel()
        await asyncio.gather(*self._retired, return_exceptions=True)
        # Let the cut connections' connection_lost callbacks run before the loop goes away.
        await asyncio.sleep(0)
        if self.flow_log is not None:
            self.flow_log.close()
            if self.flow_log.stream is not sys.stderr:
                self.flow_log.stream.close()
