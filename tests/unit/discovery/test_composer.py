"""The composer (discovery/composer.py): one path for every config change, refusals counted by
source, discovered backends merged and applied one change at a time. Sources here are scripted
(no network): each publishes what the test hands it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from pointsman.config.loader import load_text
from pointsman.config.model import BackendConfig, Config, DiscoveryConfig
from pointsman.discovery.composer import Composer
from pointsman.discovery.source import Publish, Source, backend

CLUSTER = """
listeners: [{name: lb, bind: "127.0.0.1:8080", pool: p}]
pools:
  - name: p
    backends: [{name: seed, address: "127.0.0.1:9000"}]
    discovery: {dns: {srv: _x._tcp.example}, etcd_members: true}
shutdown_grace: 5s
"""


class Scripted:
    """A discovery source whose answers the test sends."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.describe = f"scripted {kind}"
        self.answers: asyncio.Queue[tuple[BackendConfig, ...]] = asyncio.Queue()

    async def run(self, publish: Publish) -> None:
        while True:
            publish(await self.answers.get())


class Harness:
    def __init__(self) -> None:
        self.sources: dict[str, Scripted] = {}
        self.applied: list[Config] = []
        self.composer = Composer(local={"shutdown_grace": "1s"}, binds={"lb": "127.0.0.1:18080"},
                                 make_source=self.make)

    def make(self, pool: str, kind: str, discovery: DiscoveryConfig) -> Source:
        source = self.sources[kind] = Scripted(kind)
        return source

    async def apply(self, config: Config) -> list[str]:
        self.applied.append(config)
        return []

    def ids(self) -> list[str]:
        assert self.composer.current is not None
        return [b.id for b in self.composer.current.pool("p").backends]

    async def wait_applied(self, count: int) -> None:
        async with asyncio.timeout(2.0):
            while len(self.applied) < count:
                await asyncio.sleep(0.001)


@pytest_asyncio.fixture
async def harness() -> AsyncIterator[Harness]:
    h = Harness()
    base = h.composer.compose_text(CLUSTER, "etcd:/pm/config@1")
    await h.composer.start(base, h.apply, wait=0.01)  # no first answer in time is not an error
    try:
        yield h
    finally:
        await h.composer.stop()


def test_node_local_keys_and_binds_go_over_the_cluster_config() -> None:
    composer = Composer(local={"shutdown_grace": "1s", "workers": 2}, binds={"lb": "127.0.0.1:18080"})
    config = composer.compose_text(CLUSTER, "etcd:/pm/config@1")
    assert config.shutdown_grace == 1.0 and config.workers == 2
    assert str(config.listeners[0].bind) == "127.0.0.1:18080"
    assert load_text(CLUSTER).shutdown_grace == 5.0


@pytest.mark.timeout(10)
async def test_discovered_changes_apply_in_order(harness: Harness) -> None:
    harness.sources["dns"].answers.put_nowait((backend("127.0.0.2", 80), backend("127.0.0.3", 80)))
    await harness.wait_applied(1)
    assert harness.ids() == ["127.0.0.2:80", "127.0.0.3:80"]
    assert str(harness.applied[-1].listeners[0].bind) == "127.0.0.1:18080"  # binds survive merges

    harness.sources["etcd_members"].answers.put_nowait((backend("127.0.0.9", 90),))
    await harness.wait_applied(2)
    assert harness.ids() == ["127.0.0.2:80", "127.0.0.3:80", "127.0.0.9:90"]

    # DNS finds nothing: the pool keeps what DNS found before (it cannot be empty).
    harness.sources["dns"].answers.put_nowait(())
    harness.sources["etcd_members"].answers.put_nowait(())  # members may all leave
    await harness.wait_applied(3)
    assert harness.ids() == ["127.0.0.2:80", "127.0.0.3:80"]
    assert harness.composer.updates == {("p", "dns"): 1, ("p", "etcd_members"): 2}
    assert harness.composer.applied["discovery"] == 3


@pytest.mark.timeout(10)
async def test_a_new_base_keeps_discovered_backends_and_bad_ones_are_refused(harness: Harness) -> None:
    harness.sources["dns"].answers.put_nowait((backend("127.0.0.2", 80),))
    await harness.wait_applied(1)
    dns_source = harness.sources["dns"]

    errors = await harness.composer.apply_text(CLUSTER.replace("5s", "7s"), "etcd:/pm/config@2", "etcd")
    assert errors == [] and harness.ids() == ["127.0.0.2:80"]
    assert harness.sources["dns"] is dns_source  # same discovery config: the source runs on

    errors = await harness.composer.apply_text("listeners: [\n", "etcd:/pm/config@3", "etcd")
    assert errors == [
        "etcd:/pm/config@3:2: invalid YAML: expected the node content, but found '<stream end>'"]
    errors = await harness.composer.apply_text(CLUSTER.replace("pool: p", "pool: q"), "etcd:/pm/config@4",
                                               "etcd")
    assert errors == ["etcd:/pm/config@4:2: listeners[0].pool: no pool named 'q'"]
    assert harness.composer.rejected == {"etcd": 2}
    assert len(harness.applied) == 2

    # Discovery turned off for the pool: its source stops and the seed is back.
    no_dns = CLUSTER.replace("dns: {srv: _x._tcp.example}, ", "")
    assert await harness.composer.apply_text(no_dns, "etcd:/pm/config@5", "etcd") == []
    assert harness.ids() == ["seed"]
    assert "dns" not in {k for (_, k) in harness.composer._runners}
