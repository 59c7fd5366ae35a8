"""The shipped Alertmanager config, checked by Alertmanager's own tools: amtool accepts it, every
pointsman alert routes to the receiver its severity names, alerts group per pool, and a real
Alertmanager inhibits the pages a `PointsmanPoolNoBackends` of the same pool makes redundant."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.support import LOOPBACK, free_port

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "deploy" / "alertmanager" / "alertmanager.yml"
RULES = REPO / "deploy" / "prometheus" / "pointsman-rules.yml"
READY_TIMEOUT = 15.0


def need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} is not installed (Debian: apt-get install prometheus-alertmanager)")
    return path


def amtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([need("amtool"), *args], capture_output=True, text=True, timeout=30)


def alerts() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"] if "alert" in rule]


def test_amtool_check_config() -> None:
    done = amtool("check-config", str(CONFIG))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout
    assert "2 inhibit rules" in done.stdout and "2 receivers" in done.stdout


def route(*labels: str) -> str:
    done = amtool("config", "routes", "test", f"--config.file={CONFIG}", *labels)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.strip()


def test_every_alert_routes_to_its_severity() -> None:
    names = [(rule["alert"], rule["labels"]["severity"]) for rule in alerts()]
    assert len(names) >= 19
    for name, severity in names:
        for extra in (["pool=web"], ["instance=a:9900"]):  # pool alerts and node alerts
            assert route(f"alertname={name}", f"severity={severity}", *extra) == severity, name


def test_unknown_severity_falls_back_to_a_ticket_and_verify_fails_on_a_wrong_receiver() -> None:
    assert route("alertname=Other", "severity=info") == "ticket"
    done = amtool("config", "routes", "test", f"--config.file={CONFIG}",
                  "--verify.receivers=ticket", "severity=page", "alertname=PointsmanPoolNoBackends")
    assert done.returncode != 0  # amtool's own check can fail: the test above is not vacuous


# --- a real Alertmanager ------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def alertmanager(workdir: Path) -> AsyncIterator[str]:
    binary = need("prometheus-alertmanager")
    url = f"http://{LOOPBACK}:{free_port()}"
    log = workdir / "alertmanager.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            binary, f"--config.file={CONFIG}", f"--storage.path={workdir / 'data'}",
            f"--web.listen-address={url.removeprefix('http://')}", "--cluster.listen-address=",
            "--log.level=warn", stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + READY_TIMEOUT
            while True:
                if proc.returncode is not None:
                    raise AssertionError(f"alertmanager exited:\n{log.read_text()}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"{url}/-/ready") as r:
                        if r.status == 200:
                            break
                if loop.time() > deadline:
                    raise AssertionError(f"alertmanager not ready:\n{log.read_text()}")
                await asyncio.sleep(0.1)
        yield url
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


def alert(name: str, severity: str, **labels: str) -> dict[str, Any]:
    return {"labels": {"alertname": name, "severity": severity, "job": "pointsman", **labels},
            "annotations": {"summary": name}}


async def test_pool_no_backends_inhibits_the_same_pools_symptoms_and_groups_by_pool(
        tmp_path: Path) -> None:
    sent = [
        alert("PointsmanPoolNoBackends", "page", pool="web", instance="a:9900"),
        alert("PointsmanHealthyBackendsLow", "ticket", pool="web"),
        alert("PointsmanErrorBudgetBurnFast", "page", pool="web", listener="lb"),
        alert("PointsmanErrorBudgetBurnSlow", "ticket", pool="web", listener="lb"),
        alert("PointsmanErrorBudgetBurnFast", "page", pool="db", listener="pg"),  # another pool
        alert("PointsmanBackendFlapping", "ticket", pool="web", backend="w1"),  # not a symptom
        alert("PointsmanConntrackHigh", "page", instance="a:9900"),
        alert("PointsmanEventLoopLagHigh", "ticket", instance="a:9900"),
    ]
    async with (
        alertmanager(tmp_path) as url,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
    ):
        async with session.post(f"{url}/api/v2/alerts", json=sent) as r:
            assert r.status == 200, await r.text()

        async def state() -> dict[tuple[str, str], str]:
            async with session.get(f"{url}/api/v2/alerts") as r:
                body = await r.json()
            return {(a["labels"]["alertname"], a["labels"].get("pool", "")): a["status"]["state"]
                    for a in body}

        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10.0
        while len(got := await state()) < len(sent) and loop.time() < deadline:
            await asyncio.sleep(0.1)
        assert got == {
            ("PointsmanPoolNoBackends", "web"): "active",
            ("PointsmanHealthyBackendsLow", "web"): "suppressed",
            ("PointsmanErrorBudgetBurnFast", "web"): "suppressed",
            ("PointsmanErrorBudgetBurnSlow", "web"): "suppressed",
            ("PointsmanErrorBudgetBurnFast", "db"): "active",
            ("PointsmanBackendFlapping", "web"): "active",
            ("PointsmanConntrackHigh", ""): "active",
            ("PointsmanEventLoopLagHigh", ""): "active",
        }

        async with session.get(f"{url}/api/v2/alerts/groups") as r:
            groups = await r.json()
        by_receiver: dict[str, list[dict[str, str]]] = {}
        for group in groups:
            by_receiver.setdefault(group["receiver"]["name"], []).append(group["labels"])
        # pool alerts: one group per pool and receiver; node alerts: per alert and instance
        assert sorted(map(str, by_receiver["page"])) == sorted(map(str, [
            {"pool": "web"}, {"pool": "db"},
            {"alertname": "PointsmanConntrackHigh", "instance": "a:9900"}]))
        assert sorted(map(str, by_receiver["ticket"])) == sorted(map(str, [
            {"pool": "web"}, {"alertname": "PointsmanEventLoopLagHigh", "instance": "a:9900"}]))
