"""The control process's workers: spawned, watched, restarted within a budget, stopped in order.

Each worker is a `python -m pointsman.node.worker` child joined to the control process by a
socketpair (`ipc.Channel`). Its first message is `Start` with the running config and every pool's
decisions so far; after that it receives every decision in the order the owner pools made them,
so its mirror pools stay in step. Everything here is asyncio: spawning, reading, waiting for an
exit; nothing blocks the control process's loop.

A worker that dies is restarted with backoff; the budget is a rate (`RestartBudget`: at most 5
restarts in 60 s by default), after which the next restart waits until the oldest leaves the
window. While a listener has no live worker, readiness says so.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pointsman.config.model import Config
from pointsman.node import systemd
from pointsman.node.ipc import (
    IPC_VERSION,
    ApplyConfig,
    Channel,
    ConfigApplied,
    IpcError,
    Message,
    Ready,
    Signal,
    StartFailed,
    StatsReport,
    Stop,
    Stopped,
    check_version,
)
from pointsman.node.ipc import Start as StartMessage
from pointsman.node.remote import RemoteListener, WorkerReports
from pointsman.node.view import WorkerStatus
from pointsman.pool.events import PassiveSignal

if TYPE_CHECKING:
    from pointsman.node.runtime import Node

log = logging.getLogger("pointsman.supervisor")

READY_TIMEOUT = 30.0  # a worker imports pointsman and binds; seconds on a slow machine
APPLY_TIMEOUT = 10.0  # a worker applies a config (binds, reconfigures) in milliseconds
STOP_MARGIN = 5.0  # past the grace, before killing a worker that has not exited
MAX_BUFFERED = 32 * 1024 * 1024  # unread messages to one worker before it is taken as stuck


class WorkerStartError(Exception):
    """A worker could not start (e.g. an address it must bind is taken)."""


@dataclass
class RestartBudget:
    """How long to wait before restarting a worker (pure): doubling from `first` up to `cap`,
    and never more than `limit` restarts within `window` seconds."""

    limit: int = 5
    window: float = 60.0
    first: float = 0.5
    cap: float = 10.0
    history: deque[float] = field(default_factory=deque)

    def delay(self, now: float) -> float:
        while self.history and now - self.history[0] >= self.window:
            self.history.popleft()
        if len(self.history) >= self.limit:
            return self.history[0] + self.window - now
        return min(self.cap, self.first * 2.0 ** len(self.history))

    def record(self, now: float) -> None:
        self.history.append(now)


@dataclass
class Slot:
    """One worker index and the process currently running it."""

    index: int
    state: str = "starting"
    pid: int | None = None
    started_at: float | None = None
    restarts: int = 0
    last_exit_code: int | None = None
    channel: Channel | None = None
    process: asyncio.subprocess.Process | None = None
    ready: asyncio.Future[None] | None = None
    served: bool = False  # became ready at least once
    budget: RestartBudget = field(default_factory=RestartBudget)

    def status(self) -> WorkerStatus:
        return WorkerStatus(self.index, self.state, self.pid, self.started_at, self.restarts,
                            self.last_exit_code)


class WorkerProcesses:
    def __init__(self, count: int, reports: WorkerReports,
                 on_signal: Callable[[PassiveSignal], None], log_level: str = "info") -> None:
        self.count = count
        self.reports = reports
        self.on_signal = on_signal
        self.log_level = log_level
        self.slots = [Slot(i) for i in range(count)]
        self._node: Node | None = None
        self._config: Config | None = None
        self._stopping = False
        self._seq = 0
        self._pending: dict[int, tuple[asyncio.Future[list[str]], set[int]]] = {}

    # --- start ------------------------------------------------------------------------------------

    async def start(self, node: Node) -> None:
        """Spawn every worker and wait until each has bound its listeners; raise
        WorkerStartError naming the problem when one cannot."""
        self._node = node
        self._config = node.config
        loop = asyncio.get_running_loop()
        for slot in self.slots:
            slot.ready = loop.create_future()
            node.tasks.spawn(f"worker:{slot.index}", functools.partial(self._run, slot),
                             kind="supervisor")
        try:
            async with asyncio.timeout(READY_TIMEOUT):
                for slot in self.slots:
                    assert slot.ready is not None
                    await slot.ready
        except TimeoutError:
            raise WorkerStartError(f"workers not ready after {READY_TIMEOUT:.0f}s") from None
        finally:
            for slot in self.slots:  # several failed alike: the first one is the one raised
                if slot.ready is not None and slot.ready.done() and not slot.ready.cancelled():
                    slot.ready.exception()

    async def _run(self, slot: Slot) -> None:
        """Keep worker `slot` running until the node stops."""
        while not self._stopping:
            await self._serve_once(slot)
            if self._stopping:
                return
            if not slot.served:  # failed at start: the node's start fails, nothing to restart
                if slot.ready is not None and not slot.ready.done():
                    slot.ready.set_exception(WorkerStartError(
                        f"worker {slot.index} exited at start (code {slot.last_exit_code})"))
                return
            now = time.monotonic()
            delay = slot.budget.delay(now)
            slot.state = "restarting"
            level = logging.ERROR if delay < slot.budget.window / 2 else logging.CRITICAL
            log.log(level, "worker %d exited with code %s; restarting in %.1fs (%d restarts in the "
                    "last %.0fs)", slot.index, slot.last_exit_code, delay,
                    len(slot.budget.history), slot.budget.window)
            await asyncio.sleep(delay)
            slot.budget.record(time.monotonic())
            slot.restarts += 1
            slot.ready = None

    async def _serve_once(self, slot: Slot) -> None:
        """One worker process from spawn to exit."""
        channel = await self._spawn(slot)
        try:
            while True:
                self._handle(slot, await channel.receive())
        except EOFError:
            pass
        except IpcError as exc:
            log.error("worker %d: %s; stopping it", slot.index, exc)
            if slot.process is not None and slot.process.returncode is None:
                slot.process.kill()
        finally:
            slot.channel = None
            channel.close()
            self.reports.retire(slot.index)
            self._forget_pending(slot.index)
        assert slot.process is not None
        slot.last_exit_code = await slot.process.wait()
        slot.state = "stopped" if self._stopping else "exited"
        slot.pid = None

    async def _spawn(self, slot: Slot) -> Channel:
        assert self._node is not None
        inherited = self._node.role_object.inherited  # passed sockets: the same fds in the worker
        ours, theirs = socket.socketpair()
        try:
            slot.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "pointsman.node.worker", "--fd", str(theirs.fileno()),
                "--index", str(slot.index), "--log-level", self.log_level,
                pass_fds=(theirs.fileno(), *inherited.fds), stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL, env=systemd.child_environment())
        finally:
            theirs.close()
        slot.pid = slot.process.pid
        slot.started_at = time.time()
        slot.state = "starting"
        channel = await Channel.open(ours)
        assert self._node is not None and self._config is not None
        pools = tuple(pool.decisions() for pool in self._node.pools.values())
        acls = tuple(acl for listener in self._node.listeners.values()
                     if isinstance(listener, RemoteListener) for acl in listener.runtime_acls())
        # No await between reading the decisions and joining the broadcast: the worker gets
        # every later decision, and none twice.
        channel.send(StartMessage(IPC_VERSION, slot.index, self.count, self._config, pools, acls,
                                  inherited.sockets))
        slot.channel = channel
        return channel

    def _handle(self, slot: Slot, message: Message) -> None:
        if isinstance(message, StatsReport):
            self.reports.update(message)
            # Ready once its first report is in: from then on its listeners count as served.
            if slot.served and slot.ready is not None and not slot.ready.done():
                slot.ready.set_result(None)
        elif isinstance(message, Signal):
            self.on_signal(message.signal)
        elif isinstance(message, ConfigApplied):
            self._applied(message)
        elif isinstance(message, Ready):
            check_version(message.version)
            slot.state = "running"
            slot.served = True
            if slot.restarts:
                log.info("worker %d is back (pid %d)", slot.index, message.pid)
        elif isinstance(message, StartFailed):
            log.error("worker %d cannot start: %s", slot.index, message.error)
            if slot.ready is not None and not slot.ready.done():
                slot.ready.set_exception(WorkerStartError(message.error))
        elif isinstance(message, Stopped):
            slot.state = "stopping"
        else:
            raise IpcError(f"unexpected {type(message).__name__} from a worker")

    # --- messages to the workers ---------------------------------------------------------------

    def broadcast(self, message: Message) -> None:
        for slot in self.slots:
            self._send(slot, message)

    def _send(self, slot: Slot, message: Message) -> bool:
        channel = slot.channel
        if channel is None:
            return False  # starting or restarting: its Start will carry the state
        try:
            channel.send(message)
        except ConnectionError:
            return False
        if channel.buffered > MAX_BUFFERED and slot.process is not None:
            log.error("worker %d is not reading its messages (%d bytes queued); restarting it",
                      slot.index, channel.buffered)
            slot.process.kill()
        return True

    def apply(self, config: Config) -> Awaitable[list[str]]:
        """Send `config` to every live worker now (before any decision it causes is broadcast,
        and as the config a starting worker gets); await the result for their problems, each
        naming the worker."""
        self._config = config
        self._seq += 1
        seq = self._seq
        waiting = {slot.index for slot in self.slots if self._send(slot, ApplyConfig(seq, config))}
        done: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
        if waiting:
            self._pending[seq] = (done, waiting)
        else:
            done.set_result([])
        return self._answers(seq, done, waiting)

    async def _answers(self, seq: int, done: asyncio.Future[list[str]],
                       waiting: set[int]) -> list[str]:
        try:
            async with asyncio.timeout(APPLY_TIMEOUT):
                return await done
        except TimeoutError:
            return [f"worker {i}: no answer to the new config in {APPLY_TIMEOUT:.0f}s"
                    for i in sorted(waiting)]
        finally:
            self._pending.pop(seq, None)

    def _applied(self, message: ConfigApplied) -> None:
        pending = self._pending.get(message.seq)
        if pending is None:
            return
        done, waiting = pending
        waiting.discard(message.index)
        if message.errors and not done.done():
            done.set_result([f"worker {message.index}: {e}" for e in message.errors])
        elif not waiting and not done.done():
            done.set_result([])

    def _forget_pending(self, index: int) -> None:
        """A worker that exits answers no more: it will start with the latest config."""
        for done, waiting in self._pending.values():
            waiting.discard(index)
            if not waiting and not done.done():
                done.set_result([])

    # --- stop -------------------------------------------------------------------------------------------

    async def stop(self, grace: float) -> None:
        """Ask every worker to stop (each drains within `grace`), then wait; kill what is left
        `STOP_MARGIN` seconds past the grace."""
        self._stopping = True
        self.broadcast(Stop(grace))
        processes = [slot.process for slot in self.slots if slot.process is not None]
        waits = [process.wait() for process in processes if process.returncode is None]
        try:
            async with asyncio.timeout(grace + STOP_MARGIN):
                await asyncio.gather(*waits)
        except TimeoutError:
            log.warning("workers still running %.0fs after stop; killing them", grace + STOP_MARGIN)
            for process in processes:
                if process.returncode is None:
                    process.kill()
            await asyncio.gather(*(p.wait() for p in processes))

    def statuses(self) -> list[WorkerStatus]:
        return [slot.status() for slot in self.slots]

