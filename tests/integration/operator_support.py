"""A node loaded from a config file (so `reload` re-reads it) with its admin API and a token, in
the test's loop; with `workers` > 1 a control process here and real worker processes. Shared by
the tests of runtime changes, drain deadlines and binds."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from pointsman.app import build_node
from pointsman.config.loader import load_file
from pointsman.node.runtime import Node
from pointsman.telemetry.stats import ListenerStats
from tests.integration.peers import NamedBackend, open_named
from tests.support import LOOPBACK, START_TIMEOUT, free_port, wait_for

TOKEN = "operator-t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def config_data(listen: str, backends: list[NamedBackend], admin: str, token_file: Path,
                **pool: Any) -> dict[str, Any]:
    return {
        "listeners": [{"name": "lb", "bind": listen, "pool": "p"}],
        "pools": [{"name": "p", "backends": [b.config() for b in backends], **pool}],
        "admin": {"bind": admin, "token_file": str(token_file)},
        "shutdown_grace": "0.3s",
    }


@dataclass
class Admin:
    node: Node
    path: Path
    listen: str
    url: str
    http: aiohttp.ClientSession
    data: dict[str, Any]

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        async with self.http.request(method, self.url + path, json=body, headers=AUTH) as r:
            return r.status, await r.json()

    async def reload(self, **pool: Any) -> None:
        """Rewrite the file with these pool keys changed (None: removed), and reload it."""
        current = self.data["pools"][0]
        for key, value in pool.items():
            if value is None:
                current.pop(key, None)
            else:
                current[key] = value
        self.path.write_text(yaml.safe_dump(self.data, sort_keys=False))
        assert await self.node.reload() == []

    def stats(self) -> ListenerStats:
        stats = self.node.listeners["lb"].statistics()
        assert isinstance(stats, ListenerStats)
        return stats

    def backend(self, name: str) -> dict[str, Any]:
        from pointsman.admin.status import status

        [pool] = status(self.node)["pools"]
        found: dict[str, Any] = next(b for b in pool["backends"] if b["id"] == name)
        return found


@contextlib.asynccontextmanager
async def admin_node(tmp_path: Path, backends: list[NamedBackend], workers: int = 1,
                     listen: str | None = None, state_file: str | None = None,
                     **pool: Any) -> AsyncIterator[Admin]:
    token = tmp_path / "token"
    token.write_text(TOKEN)
    listen = listen or f"{LOOPBACK}:{free_port()}"
    admin = f"{LOOPBACK}:{free_port()}"
    data = config_data(listen, backends, admin, token, **pool)
    if state_file is not None:
        data["state_file"] = state_file
    path = tmp_path / "pointsman.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    async with run_node(path, workers) as node, \
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        yield Admin(node, path, listen, f"http://{admin}", http, data)


@contextlib.asynccontextmanager
async def run_node(path: Path, workers: int = 1) -> AsyncIterator[Node]:
    node = build_node(load_file(path), config_path=path, announce=lambda line: None,
                      workers=workers)
    await node.start()
    try:
        await wait_for(lambda: all(lst.accepting for lst in node.listeners.values()),
                       START_TIMEOUT, what="every listener served")
        yield node
    finally:
        await node.shutdown()


async def names_reached(address: str, count: int) -> list[str]:
    """Which backend each of `count` short connections reached."""
    names = []
    for _ in range(count):
        name, _, writer = await open_named(address)
        writer.close()
        names.append(name)
    return names


async def open_connections(address: str, count: int) -> list[tuple[str, asyncio.StreamReader,
                                                                   asyncio.StreamWriter]]:
    return [await open_named(address) for _ in range(count)]
