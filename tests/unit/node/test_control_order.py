"""The order in which a control process tells its workers about a reload: the new config first,
then the decisions its owner pools make (so a worker's mirror knows every backend a decision
names). Real channels over a socketpair; no worker process is needed to read them."""

from __future__ import annotations

import asyncio
import inspect
import socket
import textwrap

from pointsman.config.loader import load_text
from pointsman.node.ipc import ApplyConfig, Channel, PoolEvent
from pointsman.node.remote import WorkerReports
from pointsman.node.roles import ControlRole
from pointsman.node.supervisor import WorkerProcesses

CONFIG = textwrap.dedent("""
    listeners:
      - name: web
        bind: "127.0.0.1:8080"
        pool: web
    pools:
      - name: web
        backends:
          - address: "127.0.0.1:9001"
            name: a
          - address: "127.0.0.1:9002"
            name: new
""")


async def test_a_config_reaches_the_workers_before_the_decisions_it_causes() -> None:
    reports = WorkerReports()
    processes = WorkerProcesses(1, reports, on_signal=lambda signal: None)
    ours, theirs = socket.socketpair()
    processes.slots[0].channel = await Channel.open(ours)
    worker = await Channel.open(theirs)
    role = ControlRole(processes, reports)
    config = load_text(CONFIG, "order.yaml")
    # What Node.apply does: hand the config over, then apply the pools (whose decisions are
    # broadcast at once), and only later wait for the workers' answers.
    pending = role.config_sent(config)
    assert pending is not None
    try:
        pool = role.new_pool(config.pool("web"))
        pool.drain("new")
        async with asyncio.timeout(5):
            first = await worker.receive()
            assert isinstance(first, ApplyConfig), f"the workers heard {first} before the config"
            assert first.config == config
            second = await worker.receive()
    finally:
        if inspect.iscoroutine(pending):
            pending.close()  # never started: nothing to wait for
        elif isinstance(pending, asyncio.Future):
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
        worker.close()
        channel = processes.slots[0].channel
        assert channel is not None
        channel.close()
    assert isinstance(second, PoolEvent) and second.event.backend == "new"
