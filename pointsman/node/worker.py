"""A worker process: `python -m pointsman.node.worker --fd N --index I`.

It serves the TCP and UDP listeners (SO_REUSEPORT, or the sockets systemd passed to the control
process, which it inherits under the same descriptor numbers) with mirror pools, applies the control
process's messages in the order they come (a config is applied whole before the next message is
read, so the decisions that follow it find its backends), reports its counters every
`STATS_INTERVAL` seconds, and stops on `Stop`, on SIGTERM, or as soon as the control process is
gone (its end of the socketpair closes when it dies, even by SIGKILL): then it stops accepting,
lets open connections finish within `shutdown_grace`, and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
import time

from pointsman.loop import run as run_loop
from pointsman.node.activation import Inherited
from pointsman.node.closing import close_connections
from pointsman.node.ipc import (
    IPC_VERSION,
    AgentScaleSet,
    ApplyConfig,
    Channel,
    CloseConnections,
    ConfigApplied,
    IpcError,
    ListenerAcl,
    Message,
    PoolEvent,
    Ready,
    Start,
    StartFailed,
    StatsReport,
    Stop,
    Stopped,
    WeightSet,
    check_version,
)
from pointsman.node.roles import WorkerRole, share_of
from pointsman.node.runtime import Node
from pointsman.proxy.listener import TcpListener
from pointsman.proxy.udp import UdpListener

log = logging.getLogger("pointsman.worker")

STATS_INTERVAL = 0.5
START_TIMEOUT = 30.0


def report(node: Node, role: WorkerRole) -> StatsReport:
    return StatsReport(
        index=role.index,
        listeners={name: lst.statistics() for name, lst in node.listeners.items()},  # type: ignore[misc]
        accepting=frozenset(name for name, lst in node.listeners.items() if lst.accepting),
        backends={(pool.name, m.id): m.stats for pool in node.pools.values() for m in pool.members()},
        process=role.processes(node)[0],
        flow_log_dropped=node.flow_log.dropped if node.flow_log is not None else 0,
        ages=role.connection_ages(node),
        at=time.monotonic(),
        pools={pool.name: pool.queue_stats for pool in node.pools.values()},
    )


def apply_acl(node: Node, acl: ListenerAcl) -> None:
    """A list the control process's admin API set, on this worker's listener of that name."""
    listener = node.listeners.get(acl.listener)
    if isinstance(listener, TcpListener | UdpListener):
        listener.set_acl(listener.acl_lists.replaced(acl.kind, acl.prefixes))


class WorkerLoop:
    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.loop = asyncio.get_running_loop()
        self.node: Node | None = None
        self.role: WorkerRole | None = None
        self.grace: float | None = None
        self._stop = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None

    async def run(self) -> int:
        async with asyncio.timeout(START_TIMEOUT):
            start = await self.channel.receive()
        if not isinstance(start, Start):
            raise IpcError(f"expected Start first, got {type(start).__name__}")
        check_version(start.version)
        role = self.role = WorkerRole(start.index, start.workers, self.channel, start.pools,
                                      Inherited(start.sockets))
        node = self.node = Node(share_of(start.config, start.workers, start.index), role)
        try:
            await node.start()
        except OSError as exc:
            self.channel.send(StartFailed(start.index, str(exc)))
            await self.channel.drain()
            await node.shutdown(0.0)
            return 1
        for acl in start.acls:
            apply_acl(node, acl)
        self.channel.send(Ready(IPC_VERSION, start.index, os.getpid()))
        self._send_stats()
        self.loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        reader = self.loop.create_task(self._read(), name="worker:channel")
        await self._stop.wait()
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        if self._timer is not None:
            self._timer.cancel()
        await node.shutdown(self.grace)
        try:
            self.channel.send(report(node, role))
            self.channel.send(Stopped(role.index))
            await self.channel.drain()
        except ConnectionError:
            pass
        return 0

    async def _read(self) -> None:
        assert self.node is not None
        try:
            while True:
                message = await self.channel.receive()
                try:
                    await self._handle(message)
                except Exception:  # a bug, or a decision about a backend we do not have
                    log.exception("cannot apply %s from the control process; skipped",
                                  type(message).__name__)
        except EOFError:
            log.warning("the control process is gone: stopping (open connections get %gs)",
                        self.node.config.shutdown_grace)
        except IpcError as exc:
            log.error("bad message from the control process: %s; stopping", exc)
        self._stop.set()

    async def _handle(self, message: Message) -> None:
        node, role = self.node, self.role
        assert node is not None and role is not None
        if isinstance(message, PoolEvent):
            event = message.event
            if (pool := node.pools.get(event.pool)) is not None:
                pool.apply_event(event.backend, event.event, event.reason)
        elif isinstance(message, WeightSet):
            change = message.change
            if (pool := node.pools.get(change.pool)) is not None:
                pool.set_weight(change.backend, change.weight)
        elif isinstance(message, AgentScaleSet):
            scale = message.change
            if (pool := node.pools.get(scale.pool)) is not None:
                pool.set_agent_scale(scale.backend, scale.scale)
        elif isinstance(message, ListenerAcl):
            apply_acl(node, message)
        elif isinstance(message, CloseConnections):
            close_connections(node.listeners.values(), message.pool, message.backend,
                              message.reason)
        elif isinstance(message, ApplyConfig):
            try:
                errors = await node.apply(share_of(message.config, role.count, role.index))
            except OSError as exc:
                errors = [f"cannot apply: {exc}"]
            self.channel.send(ConfigApplied(message.seq, role.index, tuple(errors)))
        elif isinstance(message, Stop):
            self.grace = message.grace
            self._stop.set()
        else:
            raise IpcError(f"unexpected {type(message).__name__} from the control process")

    def _send_stats(self) -> None:
        assert self.node is not None and self.role is not None
        try:
            self.channel.send(report(self.node, self.role))
        except ConnectionError:
            self._stop.set()
            return
        self._timer = self.loop.call_later(STATS_INTERVAL, self._send_stats)


async def _main(fd: int) -> int:
    sock = socket.socket(fileno=fd)
    channel = await Channel.open(sock)
    return await WorkerLoop(channel).run()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="pointsman.node.worker")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s %(name)s[w{args.index}]: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: control leads
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # reloads come from the control process
    sys.exit(run_loop(_main(args.fd)))


if __name__ == "__main__":
    main()
