"""A worker's message loop, run in the test's event loop over a real socketpair (the worker binds
its listener on loopback): the handshake, decisions applied to its mirror pools, a stop; and
a message it cannot apply must not leave it deaf to the control process."""

from __future__ import annotations

import asyncio
import socket
import textwrap
from collections.abc import AsyncIterator

import pytest

from pointsman.config.loader import load_text
from pointsman.config.model import Config
from pointsman.node.ipc import (
    IPC_VERSION,
    Channel,
    Message,
    PoolEvent,
    Ready,
    Start,
    StatsReport,
    Stop,
    Stopped,
    WeightSet,
)
from pointsman.node.worker import WorkerLoop
from pointsman.pool.events import BackendEvent, WeightChange
from pointsman.pool.state import BackendState, Event
from tests.support import free_port


def config() -> Config:
    return load_text(textwrap.dedent(f"""
        shutdown_grace: 1s
        listeners:
          - name: web
            bind: "127.0.0.1:{free_port()}"
            pool: web
        pools:
          - name: web
            backends:
              - address: "127.0.0.1:9001"
                name: a
              - address: "127.0.0.1:9002"
                name: b
    """), "worker.yaml")


class Control:
    """The control process's end of one worker's channel."""

    def __init__(self, channel: Channel, worker: WorkerLoop, task: asyncio.Task[int]) -> None:
        self.channel = channel
        self.worker = worker
        self.task = task

    async def next(self, kind: type, timeout: float = 10.0) -> Message:
        """The next message of `kind` (stats reports in between are skipped)."""
        async with asyncio.timeout(timeout):
            while True:
                message = await self.channel.receive()
                if isinstance(message, kind):
                    return message
                assert isinstance(message, StatsReport), message


@pytest.fixture
async def control() -> AsyncIterator[Control]:
    ours, theirs = socket.socketpair()
    channel = await Channel.open(ours)
    worker = WorkerLoop(await Channel.open(theirs))
    task = asyncio.get_running_loop().create_task(worker.run())
    channel.send(Start(IPC_VERSION, 0, 1, config(), ()))
    end = Control(channel, worker, task)
    ready = await end.next(Ready)
    assert isinstance(ready, Ready) and ready.version == IPC_VERSION and ready.index == 0
    try:
        yield end
    finally:
        if not task.done():
            worker._stop.set()  # the test failed half way: let the worker shut down
            async with asyncio.timeout(10):
                await asyncio.gather(task, return_exceptions=True)
        channel.close()


def mirror_states(control: Control) -> dict[str, BackendState]:
    node = control.worker.node
    assert node is not None
    return {m.id: m.machine.state for m in node.pools["web"].members()}


async def test_a_worker_applies_decisions_and_stops(control: Control) -> None:
    control.channel.send(PoolEvent(BackendEvent("web", "a", Event.DRAIN, "operator drain")))
    control.channel.send(WeightSet(WeightChange("web", "b", 7)))
    report = await control.next(StatsReport)
    assert isinstance(report, StatsReport) and "web" in report.accepting
    async with asyncio.timeout(10):
        while mirror_states(control)["a"] is not BackendState.DRAINING:
            await asyncio.sleep(0.01)
    node = control.worker.node
    assert node is not None and node.pools["web"].member("b").weight == 7
    control.channel.send(Stop(0.0))
    assert isinstance(await control.next(Stopped), Stopped)
    async with asyncio.timeout(10):
        assert await control.task == 0


async def test_a_message_the_worker_cannot_apply_does_not_make_it_deaf(control: Control) -> None:
    control.channel.send(WeightSet(WeightChange("web", "not-yet-known", 3)))
    control.channel.send(PoolEvent(BackendEvent("web", "a", Event.DRAIN, "operator drain")))
    control.channel.send(Stop(0.0))
    stopped = await control.next(Stopped, timeout=2.0)  # a live worker answers in milliseconds
    assert isinstance(stopped, Stopped)
    assert mirror_states(control)["a"] is BackendState.DRAINING
