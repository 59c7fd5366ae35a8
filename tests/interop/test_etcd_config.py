"""The cluster config from a real etcd (issue #10): `pointsman run node.yaml` waits for etcd and
for a config, applies every revision through the file's validation and reload path, refuses and
counts bad ones, keeps serving through an etcd outage and catches up when it returns; `config
push` validates as `check` does; nodes register themselves and can be drained through etcd.

Every wait polls a condition (stderr lines, the node's admin API, connections) with a deadline.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pointsman.fleet import keys
from pointsman.fleet.etcd import EtcdClient, EtcdSettings
from tests.integration.peers import NamedBackend, ask_name, named_backends
from tests.interop.etcd_support import (
    EtcdCluster,
    admin_get,
    cli,
    etcd_cluster,
    metric,
    new_prefix,
    pool_backend_ids,
    post,
    requires_etcd,
    write_node_file,
)
from tests.support import LOOPBACK, PointsmanProcess, free_port, wait_for

pytestmark = [requires_etcd, pytest.mark.peer("etcd"), pytest.mark.timeout(90)]

APPLY_TIMEOUT = 5.0  # etcd put -> node runs it; measured ~10-30 ms here
START_TIMEOUT = 15.0
REJECTED = 'pointsman_config_rejected_total{source="etcd"}'


def cluster_config(listen: str, peers: list[NamedBackend], **pool: Any) -> str:
    return yaml.safe_dump({
        "listeners": [{"name": "lb", "bind": listen, "pool": "p"}],
        "pools": [{"name": "p", "connect_timeout": "1s", "backends": [p.config() for p in peers],
                   **pool}],
        "shutdown_grace": "1s",
    }, sort_keys=False)


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    with etcd_cluster(tmp_path_factory.mktemp("etcd")) as cluster:
        yield cluster


def start_node(workdir: Path, node_file: Path) -> PointsmanProcess:
    workdir.mkdir(exist_ok=True)
    return PointsmanProcess(["run", str(node_file)], workdir)


async def wait_listening(proc: PointsmanProcess) -> None:
    """Until the node serves: its listeners, then its admin API (the last thing it starts)."""
    await asyncio.to_thread(proc.wait_lines, lambda lines: any(
        line.startswith("admin api ") for line in lines), START_TIMEOUT)


async def wait_stderr(proc: PointsmanProcess, text: str, count: int = 1,
                      timeout: float = APPLY_TIMEOUT) -> None:
    await wait_for(lambda: proc.stderr().count(text) >= count or proc.popen.poll() is not None,
                   timeout, interval=0.02, what=f"{count}x {text!r} in stderr")
    assert proc.popen.poll() is None, f"node exited:\n{proc.stderr()}"


async def wait_backends(admin_port: int, expected: list[str], timeout: float = APPLY_TIMEOUT) -> None:
    await wait_for(lambda: pool_backend_ids(admin_port) == sorted(expected), timeout,
                   interval=0.005, what=f"pool p runs {expected}")


def stop(proc: PointsmanProcess) -> None:
    try:
        if proc.popen.poll() is None:
            assert proc.stop() == 0, proc.stderr()
    finally:
        proc.close()


async def test_node_waits_for_etcd_and_for_a_valid_config(tmp_path: Path) -> None:
    listen = f"{LOOPBACK}:{free_port()}"
    with etcd_cluster(tmp_path, start=False) as etcd:
        prefix, admin = new_prefix(), free_port()
        node = write_node_file(tmp_path / "node.yaml", "lb-a", etcd.endpoints, prefix, admin)
        proc = start_node(tmp_path / "lb-a", node)
        try:
            # etcd is not there: the node says so, again every few seconds, and waits.
            await wait_stderr(proc, "waiting for its cluster config: etcd unreachable", count=2,
                              timeout=10.0)
            etcd.start(etcd.members[0])
            await asyncio.to_thread(etcd.wait_healthy)
            await wait_stderr(proc, "no valid config at", timeout=10.0)
            async with named_backends("a") as (a,), EtcdClient(EtcdSettings(tuple(etcd.urls))) as client:
                # A bad first revision is refused with its line; the node keeps waiting.
                await client.put(keys.config_key(prefix), "listeners: []\npools: nope\n")
                await wait_stderr(proc, "config@")
                assert ":1: listeners: list should have at least 1 item" in proc.stderr()
                good = tmp_path / "cluster.yaml"
                good.write_text(cluster_config(listen, [a]))
                pushed = await asyncio.to_thread(cli, "config", "push", str(good), "--endpoints",
                                                 etcd.endpoints, "--prefix", prefix)
                assert pushed.returncode == 0, pushed.stderr
                await wait_listening(proc)
                assert await ask_name(listen) == "a"
                assert metric(admin, REJECTED) == 1.0
        finally:
            await asyncio.to_thread(stop, proc)


async def test_revisions_apply_bad_ones_are_refused_and_counted(etcd: EtcdCluster, tmp_path: Path) -> None:
    listen, prefix, admin = f"{LOOPBACK}:{free_port()}", new_prefix(), free_port()
    async with named_backends("a", "b") as (a, b), EtcdClient(EtcdSettings(tuple(etcd.urls))) as client:
        key = keys.config_key(prefix)
        await client.put(key, cluster_config(listen, [a]))
        proc = start_node(tmp_path / "lb-a", write_node_file(tmp_path / "node.yaml", "lb-a",
                                                             etcd.endpoints, prefix, admin))
        try:
            await wait_listening(proc)
            assert await ask_name(listen) == "a"
            assert json.loads(admin_get(admin, "/api/v1/status"))["node"] == "lb-a"  # fleet name

            # Time from the put returning to the node running the new backend set.
            delays = []
            for i in range(10):
                peer = (b, a)[i % 2]
                start = time.perf_counter()
                await client.put(key, cluster_config(listen, [peer]))
                await wait_backends(admin, [peer.name])
                delays.append(time.perf_counter() - start)
            print(f"etcd put -> applied: median {statistics.median(delays) * 1000:.1f} ms, "
                  f"max {max(delays) * 1000:.1f} ms over {len(delays)} revisions")
            assert statistics.median(delays) < 1.0
            assert await ask_name(listen) == "a"

            # Invalid YAML, then a schema error: each refused with its line, counted, not run.
            await client.put(key, "listeners: [\n")
            await wait_stderr(proc, "invalid YAML")
            await client.put(key, cluster_config(listen, [b]).replace("connect_timeout: 1s",
                                                                        "connect_timeout: soon"))
            await wait_stderr(proc, "pools[0].connect_timeout: expected a duration")
            assert metric(admin, REJECTED) == 2.0
            assert pool_backend_ids(admin) == ["a"]
            assert await ask_name(listen) == "a"

            # The next good revision is applied as usual.
            await client.put(key, cluster_config(listen, [b]))
            await wait_backends(admin, ["b"])
            assert await ask_name(listen) == "b"
            assert metric(admin, 'pointsman_config_applied_total{source="etcd"}') == 11.0
        finally:
            await asyncio.to_thread(stop, proc)


async def test_config_push_validates_like_check_and_get_prints_it(etcd: EtcdCluster,
                                                                  tmp_path: Path) -> None:
    prefix = new_prefix()
    target = ["--endpoints", etcd.endpoints, "--prefix", prefix]
    bad = tmp_path / "bad.yaml"
    bad.write_text("listeners:\n  - {name: lb, bind: '127.0.0.1:1', pool: nowhere}\n"
                   "pools:\n  - {name: p, backends: [{address: '127.0.0.1'}]}\n")
    checked = await asyncio.to_thread(cli, "check", str(bad))
    pushed = await asyncio.to_thread(cli, "config", "push", str(bad), *target)
    assert checked.returncode == pushed.returncode == 1
    assert pushed.stderr == checked.stderr
    assert "bad.yaml:2: listeners[0].pool: no pool named 'nowhere'" in pushed.stderr
    got = await asyncio.to_thread(cli, "config", "get", *target)
    assert got.returncode == 1 and "no cluster config at" in got.stderr

    good = tmp_path / "good.yaml"
    text = ("# comments are kept\nlisteners:\n  - {name: lb, bind: '127.0.0.1:1', pool: p}\n"
            "pools:\n  - {name: p, backends: [{address: '127.0.0.1:2'}]}\n")
    good.write_text(text)
    pushed = await asyncio.to_thread(cli, "config", "push", str(good), *target)
    assert pushed.returncode == 0, pushed.stderr
    got = await asyncio.to_thread(cli, "config", "get", *target)
    assert got.returncode == 0, got.stderr
    assert got.stdout == text
    assert "revision" in got.stderr


async def test_etcd_outage_changes_nothing_and_the_node_catches_up(tmp_path: Path) -> None:
    listen, prefix, admin = f"{LOOPBACK}:{free_port()}", new_prefix(), free_port()
    with etcd_cluster(tmp_path) as etcd:
        async with named_backends("a", "b") as (a, b):
            async with EtcdClient(EtcdSettings(tuple(etcd.urls))) as client:
                await client.put(keys.config_key(prefix), cluster_config(listen, [a]))
            proc = start_node(tmp_path / "lb-a", write_node_file(tmp_path / "node.yaml", "lb-a",
                                                                 etcd.endpoints, prefix, admin))
            try:
                await wait_listening(proc)
                etcd.kill(etcd.members[0])
                await wait_stderr(proc, "etcd lost")
                assert metric(admin, "pointsman_etcd_connected") == 0.0
                for _ in range(20):  # still serving, on the last config
                    assert await ask_name(listen) == "a"

                # etcd returns; a revision written before the node reconnects is read on return.
                etcd.start(etcd.members[0])
                await asyncio.to_thread(etcd.wait_healthy)
                back = time.perf_counter()
                async with EtcdClient(EtcdSettings(tuple(etcd.urls))) as client:
                    await client.put(keys.config_key(prefix), cluster_config(listen, [b]))
                await wait_backends(admin, ["b"], timeout=10.0)
                print(f"etcd back -> new revision applied in {time.perf_counter() - back:.2f} s")
                assert await ask_name(listen) == "b"
                await wait_for(lambda: metric(admin, "pointsman_etcd_connected") == 1.0, 5.0)
            finally:
                await asyncio.to_thread(stop, proc)


async def test_fleet_status_drain_and_registration_lease(etcd: EtcdCluster, tmp_path: Path) -> None:
    listen, prefix, admin = f"{LOOPBACK}:{free_port()}", new_prefix(), free_port()
    target = ["--endpoints", etcd.endpoints, "--prefix", prefix]
    async with named_backends("a") as (a,):
        async with EtcdClient(EtcdSettings(tuple(etcd.urls))) as client:
            await client.put(keys.config_key(prefix), cluster_config(listen, [a]))
        node = write_node_file(tmp_path / "node.yaml", "lb-a", etcd.endpoints, prefix, admin,
                               lease_ttl="2s")
        proc = start_node(tmp_path / "lb-a", node)
        try:
            await wait_listening(proc)
            status = await asyncio.to_thread(cli, "fleet", "status", *target)
            assert status.returncode == 0, status.stderr
            row = next(line for line in status.stdout.splitlines() if "lb-a" in line)
            assert "serving" in row and "p 1/1" in row and f"{LOOPBACK}:{admin}" in row

            drained = await asyncio.to_thread(cli, "fleet", "drain", "lb-a", "--reason", "kernel upgrade",
                                              *target)
            assert drained.returncode == 0, drained.stderr
            assert drained.stdout.strip() == "lb-a: draining"
            assert metric(admin, "pointsman_node_draining") == 1.0
            assert "drained by an operator: kernel upgrade" in proc.stderr()
            assert await ask_name(listen) == "a"  # without BGP, draining only changes the report
            resumed = await asyncio.to_thread(cli, "fleet", "resume", "lb-a", *target)
            assert resumed.stdout.strip() == "lb-a: serving", resumed.stderr

            # A crashed node leaves the fleet when its lease runs out (2 s here).
            proc.popen.kill()
            proc.popen.wait()
            gone = time.perf_counter()
            async with EtcdClient(EtcdSettings(tuple(etcd.urls))) as client:
                for _ in range(100):
                    if not (await client.get_prefix(keys.nodes_prefix(prefix)))[0]:
                        break
                    await asyncio.sleep(0.1)
            print(f"crashed node left the fleet after {time.perf_counter() - gone:.1f} s (ttl 2 s)")
            status = await asyncio.to_thread(cli, "fleet", "status", *target)
            assert "no node is registered" in status.stdout
        finally:
            await asyncio.to_thread(stop, proc)

    # The node file can stand in for --endpoints/--prefix, and check accepts it.
    checked = await asyncio.to_thread(cli, "check", str(node))
    assert checked.returncode == 0 and checked.stdout.startswith("ok node lb-a"), checked.stderr
    assert "node-local keys: admin" in checked.stdout


async def test_etcd_with_authentication(tmp_path: Path) -> None:
    listen, prefix, admin = f"{LOOPBACK}:{free_port()}", new_prefix(), free_port()
    with etcd_cluster(tmp_path) as etcd:
        url = etcd.urls[0]
        for path, body in (("/v3/auth/user/add", {"name": "root", "password": "s3cret"}),
                           ("/v3/auth/user/grant", {"user": "root", "role": "root"}),
                           ("/v3/auth/enable", {})):
            assert post(url, path, body) is not None, path
        credentials = tmp_path / "etcd.token"
        credentials.write_text("root:s3cret\n")
        async with named_backends("a", "b") as (a, b):
            config = tmp_path / "cluster.yaml"
            config.write_text(cluster_config(listen, [a]))
            target = ["--endpoints", etcd.endpoints, "--prefix", prefix]
            refused = await asyncio.to_thread(cli, "config", "push", str(config), *target)
            assert refused.returncode == 1 and "user name is empty" in refused.stderr
            pushed = await asyncio.to_thread(cli, "config", "push", str(config), *target,
                                             "--token-file", str(credentials))
            assert pushed.returncode == 0, pushed.stderr

            node = write_node_file(tmp_path / "node.yaml", "lb-a", etcd.endpoints, prefix, admin)
            data = yaml.safe_load(node.read_text())
            data["config_source"]["etcd"]["token_file"] = str(credentials)
            node.write_text(yaml.safe_dump(data))
            proc = start_node(tmp_path / "lb-a", node)
            try:
                await wait_listening(proc)
                assert await ask_name(listen) == "a"
                config.write_text(cluster_config(listen, [b]))
                pushed = await asyncio.to_thread(cli, "config", "push", str(config), *target,
                                                 "--token-file", str(credentials))
                assert pushed.returncode == 0, pushed.stderr
                await wait_backends(admin, ["b"])  # the watch is authenticated too
            finally:
                await asyncio.to_thread(stop, proc)


async def test_a_fleet_watcher_crash_is_logged_counted_and_watching_resumes(
        etcd: EtcdCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A bug in handling the drain key (injected once) is logged with its traceback, counted as
    a fleet task crash, and the watcher runs again and follows the key."""
    from pointsman.config.node import load_node_file
    from pointsman.fleet.agent import NodeAgent
    from pointsman.node.tasks import Tasks

    calls = {"n": 0}
    original = NodeAgent._set_drain

    async def set_drain(self: NodeAgent, kv: Any) -> None:
        calls["n"] += 1
        if kv is not None and calls["n"] == 2:  # the first change after the first read
            raise RuntimeError("injected bug")
        await original(self, kv)

    monkeypatch.setattr(NodeAgent, "_set_drain", set_drain)
    monkeypatch.setattr("pointsman.node.tasks.Backoff", lambda **_: FastBackoff())
    caplog.set_level("ERROR", "pointsman.tasks")
    prefix = new_prefix()
    node_file = write_node_file(tmp_path / "node.yaml", "lb-c", etcd.endpoints, prefix, free_port())
    agent = NodeAgent(load_node_file(node_file))
    tasks = Tasks()
    view = FakeView()
    await agent.start(view, tasks)  # type: ignore[arg-type]
    try:
        await wait_for(lambda: calls["n"] >= 1, START_TIMEOUT, what="the first read of the drain key")
        async with EtcdClient(EtcdSettings(tuple(etcd.urls))) as client:
            await client.put(keys.drain_key(prefix, "lb-c"), '{"reason": "crash test"}')
        await wait_for(lambda: agent.draining == "crash test", APPLY_TIMEOUT,
                       what="the drain followed after the crash")
    finally:
        await agent.stop()
        await tasks.close()
        await agent.client.close()
    assert tasks.crashes == {"fleet": 1}
    assert any(r.getMessage().startswith("task fleet:drain crashed") and r.exc_info is not None
               for r in caplog.records)


class FastBackoff:
    def next(self) -> float:
        return 0.01

    def reset(self) -> None:
        pass


class FakeView:
    """What the agent reads of a node, for an agent run on its own."""

    pools: dict[str, Any] = {}
    listeners: dict[str, Any] = {}
    bgp = None
    started_at = 0.0

    @property
    def config(self) -> Any:
        class Empty:
            admin = None
        return Empty()
