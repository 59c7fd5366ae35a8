"""A data-plane worker process: listeners (SO_REUSEPORT) and mirror pools, nothing else.

It receives the control process's pool events and configs over a pipe, in order, and sends back
its passive signals at once and its counters every `STATS_INTERVAL` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import math
import signal
import sys
from multiprocessing.connection import Connection
from typing import Any

from pointsman.config.model import Config
from pointsman.loop import run as run_loop
from pointsman.telemetry.aggregate import dump

log = logging.getLogger("pointsman.worker")

STATS_INTERVAL = 1.0


def share_of(config: Config, workers: int) -> Config:
    """Each worker holds its share of every bound that is meant for the whole process (the kernel
    spreads connections evenly): listener tables, the listener-wide new-connection rate and the
    load-shedding connection bound. Per-source limits stay whole: one source's connections do not
    spread evenly enough for a share of a small cap to be fair."""
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
    return config.model_copy(update={"listeners": listeners, "shedding": shedding})


def stats_payload(runtime: Any) -> dict[str, Any]:
    return {
        "listeners": {name: dump(lst.stats) for name, lst in runtime.listeners.items()},
        "backends": {
            f"{pool.name}\0{m.id}": dump(m.stats)
            for pool in runtime.pools.values() for m in pool.members()
        },
        "flow_log_dropped": runtime.flow_log.dropped if runtime.flow_log else 0,
    }


def main(index: int, config: Config, workers: int, conn: Connection, log_level: str) -> None:
    """Process entry point (spawned): serve until the control process says stop."""
    logging.basicConfig(level=getattr(logging, log_level.upper()), stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s %(name)s[w{index}]: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: control leads
    run_loop(_serve(index, config, workers, conn))


async def _serve(index: int, config: Config, workers: int, conn: Connection) -> None:
    from pointsman.runtime import Runtime

    loop = asyncio.get_running_loop()
    runtime = Runtime(share_of(config, workers), announce=lambda line: None, role="worker")
    runtime.relay = conn.send  # a mirror pool's sink: passive signals go up
    stop = asyncio.Event()
    grace: list[float] = [config.shutdown_grace]
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    try:
        await runtime.start()
    except OSError as exc:
        conn.send(("failed", index, str(exc)))
        return
    conn.send(("ready", index))
    pending: set[asyncio.Task[None]] = set()

    def on_message() -> None:
        try:
            while conn.poll():
                message = conn.recv()
                _handle(message)
        except (EOFError, OSError):
            stop.set()  # the control process is gone

    def _handle(message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "event":
            _, pool, backend, event, reason = message
            if (target := runtime.pools.get(pool)) is not None:
                target.apply_event(backend, event, reason)
        elif kind == "weight":
            _, pool, backend, weight = message
            if (target := runtime.pools.get(pool)) is not None:
                target.set_weight(backend, int(weight))
        elif kind == "config":
            task = loop.create_task(runtime.apply(share_of(message[1], workers)))
            pending.add(task)
            task.add_done_callback(pending.discard)
        elif kind == "stop":
            grace[0] = message[1]
            stop.set()

    timer: list[asyncio.TimerHandle] = []

    def send_stats() -> None:
        try:
            conn.send(("stats", index, stats_payload(runtime)))
        except OSError:
            stop.set()
            return
        timer[:] = [loop.call_later(STATS_INTERVAL, send_stats)]

    loop.add_reader(conn.fileno(), on_message)
    timer.append(loop.call_later(STATS_INTERVAL, send_stats))
    await stop.wait()
    for handle in timer:
        handle.cancel()
    loop.remove_reader(conn.fileno())
    runtime.config = runtime.config.model_copy(update={"shutdown_grace": grace[0]})
    await asyncio.gather(*pending, return_exceptions=True)
    await runtime.shutdown()
    try:
        conn.send(("stats", index, stats_payload(runtime)))
        conn.send(("stopped", index))
    except OSError:
        pass

