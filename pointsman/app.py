"""The composition root: the one place that knows every concrete class of a node.

`build_node` makes a single-process node (`workers: 1`) or a control process with its worker
processes, and attaches the services of a state-owning node: BGP announcement, the config source
(discovery, etcd), the fleet agent and the admin API. Worker processes are built by
`pointsman.node.worker`, which needs none of the services.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pointsman.config.model import AdminConfig, Config
from pointsman.config.workers import worker_count
from pointsman.discovery.composer import Composer
from pointsman.node.activation import Inherited
from pointsman.node.remote import WorkerReports
from pointsman.node.roles import ControlRole, SingleRole
from pointsman.node.runtime import Node
from pointsman.node.supervisor import WorkerProcesses
from pointsman.pool.events import PassiveSignal

if TYPE_CHECKING:
    from pointsman.admin.server import AdminServer
    from pointsman.bgp.announcer import Announcer
    from pointsman.fleet.agent import NodeAgent

log = logging.getLogger("pointsman")


def build_node(config: Config, *, config_path: str | Path | None = None,
               announce: Callable[[str], None] = print, workers: int | None = None,
               log_level: str = "info", agent: NodeAgent | None = None,
               inherited: Inherited | None = None) -> Node:
    """`inherited`: the listening sockets systemd passed (socket activation), if any."""
    count = workers if workers is not None else worker_count(config)
    if count > 1:
        reports = WorkerReports()
        node_ref: list[Node] = []

        def on_signal(signal: PassiveSignal) -> None:
            pool = node_ref[0].pools.get(signal.pool)
            if pool is None:
                return
            if signal.ok:
                pool.report_connect_success(signal.backend)
            else:
                pool.report_connect_failure(signal.backend)

        processes = WorkerProcesses(count, reports, on_signal, log_level)
        node = Node(config, ControlRole(processes, reports, inherited), config_path=config_path,
                    announce=announce)
        node_ref.append(node)
    else:
        node = Node(config, SingleRole(inherited), config_path=config_path, announce=announce)
    composer = agent.composer if agent is not None else Composer()
    node.config_source = composer
    node.services = [BgpService(), ComposerService(composer)]
    if agent is not None:
        node.services.append(FleetService(agent))
    if config.admin is not None:
        node.services.append(AdminService(config.admin))
    return node


class BgpService:
    """VIP announcement: started once the listeners are bound, reconfigured on every config,
    stopped first at shutdown (routers stop sending before we stop accepting)."""

    stops_before_drain = True

    def __init__(self) -> None:
        self.node: Node | None = None
        self.announcer: Announcer | None = None

    async def start(self, node: Node) -> None:
        self.node = node

    async def apply(self, config: Config) -> None:
        assert self.node is not None
        if config.bgp is None:
            await self.stop()
            return
        if self.announcer is None:
            from pointsman.bgp.announcer import Announcer

            starting = self.node.bgp is None and not self.node.started
            self.announcer = Announcer(config.bgp, self.node, tasks=self.node.tasks)
            self.node.bgp = self.announcer
            await self.announcer.start(retry=not starting)
        else:
            await self.announcer.reconfigure(config.bgp)

    async def stop(self) -> None:
        announcer, self.announcer = self.announcer, None
        if self.node is not None:
            self.node.bgp = None
        if announcer is not None:
            await announcer.stop()


class ComposerService:
    """Discovery sources (and, on a fleet node, the etcd config) feed every change through the
    composer into `Node.apply`."""

    stops_before_drain = True

    def __init__(self, composer: Composer) -> None:
        self.composer = composer

    async def start(self, node: Node) -> None:
        # The file's config: the node puts the runtime changes over every config it is given.
        await self.composer.start(node.file_config, node.apply, node.tasks)

    async def apply(self, config: Config) -> None:
        pass

    async def stop(self) -> None:
        await self.composer.stop()


class FleetService:
    stops_before_drain = True

    def __init__(self, agent: NodeAgent) -> None:
        self.agent = agent

    async def start(self, node: Node) -> None:
        node.fleet = self.agent
        await self.agent.start(node, node.tasks)

    async def apply(self, config: Config) -> None:
        pass

    async def stop(self) -> None:
        await self.agent.stop()  # leave the fleet: registration revoked, etcd watches closed


class AdminService:
    """The admin API and status page; it answers until the connections have drained."""

    stops_before_drain = False

    def __init__(self, config: AdminConfig) -> None:
        self.config = config
        self.server: AdminServer | None = None

    async def start(self, node: Node) -> None:
        from pointsman.admin.server import AdminServer

        self.server = AdminServer(node, self.config)
        await self.server.start()
        node.announce(f"admin api and status page on {self.server.url}")

    async def apply(self, config: Config) -> None:
        pass

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()
            self.server = None
