"""Every long-lived task is owned and watched: a crash (a bug of ours, injected here) is logged with
its traceback and counted by task kind, the task runs again, and a bug in probe code never turns
into a verdict on a backend. The fleet watchers' case needs etcd: tests/interop/test_etcd_config.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from pointsman.admin.metrics import registry_for
from pointsman.bgp import announcer as announcer_module
from pointsman.bgp.announcer import Announcer
from pointsman.config.loader import load_text
from pointsman.config.model import BackendConfig, Config
from pointsman.discovery.composer import Composer
from pointsman.fleet.backoff import Backoff
from pointsman.health import probes
from pointsman.node.tasks import Tasks
from pointsman.pool.state import BackendState
from pointsman.telemetry.flowlog import FlowLog
from tests.support import (
    LOOPBACK,
    close_writer,
    connect,
    echo_backend,
    free_port,
    roundtrip,
    running,
    wait_for,
)
from tests.unit.bgp.test_announcer import ANNOUNCE, WITHDRAW, FakeNode, RecordingSpeaker, bgp, pool

pytestmark = [pytest.mark.timeout(30), pytest.mark.asyncio(loop_factories=["uvloop"])]


class Once:
    """Raise an injected bug on the first call, then behave like `original`."""

    def __init__(self, original: Callable[..., Any]) -> None:
        self.original = original
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("injected bug")
        return self.original(*args, **kwargs)


def crash_logged(caplog: pytest.LogCaptureFixture, task: str) -> bool:
    """The crash line names the task and carries the traceback down to the injected bug."""
    return any(r.getMessage().startswith(f"task {task} crashed") and r.exc_info is not None
               and "RuntimeError: injected bug" in logging.Formatter().formatException(r.exc_info)
               for r in caplog.records)


def crash_metric(node: Any, kind: str) -> float:
    value = registry_for(node).get_sample_value("pointsman_task_crashes_total", {"task": kind})
    return value or 0.0


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Restart crashed tasks at once (the default backoff starts at half a second)."""
    original = Tasks.spawn

    def spawn(self: Tasks, name: str, factory: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("backoff", Backoff(first=0.01, cap=0.02))
        return original(self, name, factory, **kwargs)

    monkeypatch.setattr(Tasks, "spawn", spawn)


async def test_a_bug_in_a_probe_is_logged_counted_and_checking_resumes(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    runner = probes._RUNNERS["tcp"]
    broken = Once(runner)

    async def tcp(*args: Any) -> Any:
        return await broken(*args)

    monkeypatch.setitem(probes._RUNNERS, "tcp", tcp)
    caplog.set_level(logging.ERROR, "pointsman.tasks")
    async with echo_backend() as peer:
        listen = f"{LOOPBACK}:{free_port()}"
        config = yaml.safe_dump({
            "listeners": [{"name": "lb", "bind": listen, "pool": "p"}],
            "pools": [{"name": "p", "backends": [{"address": peer.address}],
                       "health_check": {"type": "tcp", "interval": "0.1s", "timeout": "0.05s",
                                        "fall": 1, "jitter": 0}}],
        })
        async with running(config) as node:
            member = node.pools["p"].members()[0]
            await wait_for(lambda: member.checks >= 5, 5.0, what="checks after the crash")
            states = {t.new for _, _, t in node.transitions}
            metric = crash_metric(node, "health")
            crashes = node.task_crashes()

    assert crash_logged(caplog, "health:p")
    assert crashes == {"health": 1} and metric == 1
    assert member.machine.state is BackendState.UP and BackendState.DOWN not in states
    assert member.check_failures == 0  # the bug was no failed check either


async def test_a_flow_log_writer_crash_is_logged_counted_and_writing_resumes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    broken = Once(FlowLog._write)

    def write(self: FlowLog, batch: list[tuple[object, ...]]) -> None:
        broken(self, batch)

    monkeypatch.setattr(FlowLog, "_write", write)
    caplog.set_level(logging.ERROR, "pointsman.tasks")
    flows = tmp_path / "flows.jsonl"
    async with echo_backend() as peer:
        listen = f"{LOOPBACK}:{free_port()}"
        config = yaml.safe_dump({
            "listeners": [{"name": "lb", "bind": listen, "pool": "p"}],
            "pools": [{"name": "p", "backends": [{"address": peer.address}]}],
            "flow_log": {"path": str(flows)},
        })
        async with running(config) as node:
            for message in (b"first", b"second"):
                reader, writer = await connect(listen)
                await roundtrip(reader, writer, message)
                await close_writer(writer)
                await wait_for(lambda: node.task_crashes().get("flow_log") == 1, 5.0)
            await wait_for(lambda: flows.exists() and flows.read_text().count("\n") >= 1, 5.0,
                           what="a record written after the crash")
            crashes = node.task_crashes()

    records = [json.loads(line) for line in flows.read_text().splitlines()]
    assert crash_logged(caplog, "flow-log")
    assert crashes == {"flow_log": 1}
    assert records and all(r["listener"] == "lb" for r in records)


class CrashingSource:
    """A discovery source whose first run is a bug; the second finds one backend."""

    describe = "injected source"

    def __init__(self) -> None:
        self.runs = 0

    async def run(self, publish: Callable[[list[BackendConfig]], None]) -> None:
        self.runs += 1
        if self.runs == 1:
            raise RuntimeError("injected bug")
        publish([BackendConfig.model_validate({"address": "127.0.0.9:80"})])
        await asyncio.Event().wait()


BASE = """
listeners: [{name: lb, bind: "127.0.0.1:18080", pool: p}]
pools:
  - name: p
    backends: [{address: "127.0.0.2:80"}]
    discovery: {dns: {name: example.invalid, port: 80}}
"""


async def test_a_discovery_crash_is_logged_counted_and_the_source_runs_again(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, "pointsman.tasks")
    source = CrashingSource()
    applied: list[Config] = []

    async def apply(config: Config) -> list[str]:
        applied.append(config)
        return []

    tasks = Tasks()
    composer = Composer(make_source=lambda pool, kind, d: source)  # type: ignore[arg-type,return-value]
    await composer.start(load_text(BASE), apply, tasks, wait=0.0)
    try:
        await wait_for(lambda: bool(applied), 5.0, what="the source's second run applied")
    finally:
        await composer.stop()
        await tasks.close()
    assert crash_logged(caplog, "discovery:p:dns")
    assert tasks.crashes == {"discovery": 1} and source.runs == 2
    assert [str(b.address) for b in applied[-1].pools[0].backends] == ["127.0.0.9:80"]


async def test_a_bgp_decision_crash_is_logged_counted_and_deciding_resumes(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(announcer_module, "RESTART_DELAYS", (0.01, 0.02))
    RecordingSpeaker.instances = []
    caplog.set_level(logging.ERROR, "pointsman.tasks")
    web = pool("web")
    node = FakeNode({"web": web})
    tasks = Tasks()
    announcer = Announcer(bgp(), node, RecordingSpeaker, tasks=tasks)  # type: ignore[arg-type]
    await announcer.start()
    speaker = RecordingSpeaker.instances[-1]
    speaker.connect()
    assert speaker.sent == [ANNOUNCE]
    monkeypatch.setattr(announcer_module, "decide", Once(announcer_module.decide))
    try:
        web.health_verdict(web.members()[0].id, False, "down")  # the decider crashes on this one
        await wait_for(lambda: tasks.crashes.get("bgp") == 1, 5.0, what="the crash counted")
        web.health_verdict(web.members()[0].id, True, "up")
        web.health_verdict(web.members()[0].id, False, "down again")
        await wait_for(lambda: speaker.sent[-1:] == [WITHDRAW], 5.0, what="deciding again")
    finally:
        await announcer.stop()
        await tasks.close()
    assert crash_logged(caplog, "bgp:decide")
