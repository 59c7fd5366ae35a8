"""The control process of a multi-worker pointsman: it owns config, health checks and admin, and
runs `workers` data-plane processes that each bind every listener with SO_REUSEPORT.

Pool state stays consistent without shared memory: every event the control pools apply (health
verdicts, ejections, operator calls, weights) and every reloaded config is sent to each worker
over its pipe, in order, and the worker's mirror pools apply the same events to the same
deterministic state machines. Workers send passive signals (connect failures) up at once and
their counters every second; the control process adds the counters into its own stats objects,
so /metrics and /api/v1/status show totals across workers.

least_connections: each worker balances by its own active counts. The kernel spreads new
connections evenly over the workers' sockets (SO_REUSEPORT hashes the 4-tuple), so each worker
sees about 1/N of every backend's load and the per-worker choice tracks the global one, as with
HAProxy's nbproc or nginx workers without a shared zone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnProcess
from typing import Any

from pointsman.runtime import Runtime
from pointsman.telemetry import aggregate

log = logging.getLogger("pointsman.supervisor")

READY_TIMEOUT = 30.0  # a spawned worker imports pointsman and binds; seconds on a slow machine
RESTART_LIMIT = 10  # restarts of crashed workers before the control process gives up


class Worker:
    __slots__ = ("conn", "index", "process", "ready", "stats", "stopped")

    def __init__(self, index: int, process: SpawnProcess, conn: Connection) -> None:
        self.index = index
        self.process = process
        self.conn = conn
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.stopped = asyncio.Event()
        self.stats: dict[str, Any] = {}


class Supervisor:
    def __init__(self, runtime: Runtime, workers: int, log_level: str = "info") -> None:
        self.runtime = runtime
        self.count = workers
        self.log_level = log_level
        self.workers: dict[int, Worker] = {}
        self.restarts = 0
        self._stopping = False
        self._ctx = multiprocessing.get_context("spawn")
        self._loop = asyncio.get_running_loop()
        runtime.relay = self.broadcast

    async def start(self) -> None:
        for index in range(self.count):
            self._spawn(index)
        await asyncio.gather(*(self._wait_ready(w) for w in self.workers.values()))

    def _spawn(self, index: int) -> Worker:
        from pointsman import worker as worker_module

        ours, theirs = self._ctx.Pipe()
        process = self._ctx.Process(
            target=worker_module.main,
            args=(index, self.runtime.config, self.count, theirs, self.log_level),
            name=f"pointsman-worker-{index}",
            daemon=False,
        )
        process.start()
        theirs.close()
        worker = Worker(index, process, ours)
        self.workers[index] = worker
        self._loop.add_reader(ours.fileno(), self._readable, worker)
        return worker

    async def _wait_ready(self, worker: Worker) -> None:
        try:
            async with asyncio.timeout(READY_TIMEOUT):
                await worker.ready
        except TimeoutError:
            raise RuntimeError(f"worker {worker.index} did not start in {READY_TIMEOUT}s") from None

    def broadcast(self, message: tuple[object, ...]) -> None:
        for worker in list(self.workers.values()):
            try:
                worker.conn.send(message)
            except OSError:
                log.warning("worker %d: cannot send, it will be restarted", worker.index)

    def _readable(self, worker: Worker) -> None:
        try:
            while worker.conn.poll():
                self._handle(worker, worker.conn.recv())
        except (EOFError, OSError):
            self._lost(worker)

    def _handle(self, worker: Worker, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "stats":
            worker.stats = message[2]
            self._aggregate()
        elif kind in ("failure", "success"):
            pool = self.runtime.pools.get(message[1])
            if pool is not None:
                if kind == "failure":
                    pool.report_connect_failure(message[2])
                else:
                    pool.report_connect_success(message[2])
        elif kind == "ready" and not worker.ready.done():
            worker.ready.set_result(None)
        elif kind == "failed" and not worker.ready.done():
            worker.ready.set_exception(OSError(f"worker {worker.index}: {message[2]}"))
        elif kind == "stopped":
            worker.stopped.set()

    def _lost(self, worker: Worker) -> None:
        self._loop.remove_reader(worker.conn.fileno())
        worker.conn.close()
        worker.stopped.set()
        if not worker.ready.done():
            worker.ready.set_exception(RuntimeError(f"worker {worker.index} exited at start"))
            return
        if self._stopping or self.workers.get(worker.index) is not worker:
            return
        worker.process.join(timeout=1.0)
        if self.restarts >= RESTART_LIMIT:
            log.error("worker %d exited (code %s); restart limit reached", worker.index,
                      worker.process.exitcode)
            del self.workers[worker.index]
            return
        self.restarts += 1
        log.error("worker %d exited (code %s); restarting", worker.index, worker.process.exitcode)
        self._spawn(worker.index)

    def _aggregate(self) -> None:
        """Totals across workers into the control process's own stats objects."""
        runtime = self.runtime
        for name, listener in runtime.listeners.items():
            aggregate.reset(listener.stats)
            for worker in self.workers.values():
                if (part := worker.stats.get("listeners", {}).get(name)) is not None:
                    aggregate.add(listener.stats, part)
        for pool in runtime.pools.values():
            for member in pool.members():
                key = f"{pool.name}\0{member.id}"
                aggregate.reset(member.stats)
                for worker in self.workers.values():
                    if (part := worker.stats.get("backends", {}).get(key)) is not None:
                        aggregate.add(member.stats, part)

    async def stop(self, grace: float) -> None:
        """Ask every worker to shut down gracefully, wait (grace + margin), then kill the rest."""
        self._stopping = True
        self.broadcast(("stop", grace))
        waits = [w.stopped.wait() for w in self.workers.values()]
        try:
            async with asyncio.timeout(grace + 5.0):
                await asyncio.gather(*waits)
        except TimeoutError:
            log.warning("workers still running %.0fs after stop; killing them", grace + 5.0)
        for worker in self.workers.values():
            await asyncio.to_thread(worker.process.join, 2.0)
            if worker.process.is_alive():
                worker.process.kill()
                await asyncio.to_thread(worker.process.join, 2.0)
            with contextlib.suppress(OSError, ValueError):
                self._loop.remove_reader(worker.conn.fileno())
