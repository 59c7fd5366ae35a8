"""The monitoring kit against a real Prometheus: the rules pass promtool, and every dashboard panel
and rule expression evaluates against a Prometheus scraping a running pointsman under load; a
listener whose worker is stopped overflows its accept queue, and the overflow counter, the queue
gauges and the alert move in that Prometheus.

Also, without any peer: every alert has a runbook and a severity, every alert's panels link to its
runbook, and the dashboards and rules name only metrics pointsman exports (or the rules record).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client import generate_latest

from pointsman.admin.metrics import registry_for
from tests.support import (
    LOOPBACK,
    close_writer,
    connect,
    echo_backend,
    free_port,
    pointsman_process_async,
    refused_port,
    roundtrip,
    running,
)

pytestmark = pytest.mark.timeout(90)

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "deploy" / "prometheus" / "pointsman-rules.yml"
RULE_TESTS = REPO / "deploy" / "prometheus" / "pointsman-rules.test.yml"
DASHBOARDS = sorted((REPO / "deploy" / "grafana").glob("*.json"))

# Grafana's variables, as the test resolves them: every instance, listener, pool and backend.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "5m",
    "$instance": ".*",
    "$listener": ".*",
    "$pool": ".*",
    "$backend": ".*",
}
# Panels that must return data once a few connections went through (the core signals).
PANELS_WITH_DATA = {
    "pointsman: executive": [
        "Connection success (selected range)",
        "Connection success ratio by listener (5m)",
        "Error budget burn rate",
        "Healthy backends",
        "Throughput",
        "Throughput by listener",
    ],
    "pointsman: on-call": [
        "Active connections per listener",
        "Table utilisation",
        "Churn: new and ended connections per second",
        "Available backends per pool",
        "Accept queues",
        "Listen overflows and drops",
        "SYN cookies and SYN retransmits",
        "Oldest open connection",
        "BGP flaps, ExaBGP restarts, config reloads",
    ],
    "pointsman: debug": [
        "Backend connect time p99",
        "Time to first byte percentiles",
        "New connections per second by listener",
        "New connections per second by backend",
        "Time to first byte heatmap",
        "Backend connect time heatmap",
        "Backend connects over 1 s (SYN retransmits)",
        "Health probe duration percentiles",
        "New connections share vs weight share",
        "Time in current state",
    ],
}
# Process start, first scrapes, first rule evaluations: generous for a loaded 2-core VM.
PROMETHEUS_READY_TIMEOUT = 20.0
DATA_TIMEOUT = 20.0
LOAD_PAUSE = 0.02  # between two load connections: about 50 connections per second

_METRIC = re.compile(r"(?<![\w:])(pointsman_[a-z0-9_]+|process_[a-z0-9_]+)(?![\w:])")
_RECORDED = re.compile(r"\b([a-z_]+:[a-z0-9_]+:[a-z0-9_]+)\b")
_LABEL_VALUES = re.compile(r"^label_values\((.*),\s*([a-z_]+)\)$")


def need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} is not installed (apt-get install prometheus)")
    return path


# --- what the kit contains ------------------------------------------------------------------------


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield from panel.get("panels", [])
        if panel["type"] != "row":
            yield panel


def dashboard_queries() -> Iterator[tuple[str, str, str]]:
    """(dashboard title, panel title, PromQL with Grafana's variables resolved)."""
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        for panel in panels(dashboard):
            for target in panel["targets"]:
                yield dashboard["title"], panel["title"], resolve(target["expr"])


def variable_queries() -> Iterator[tuple[str, str, str]]:
    """The templating queries, `label_values(selector, label)` as PromQL `count by (label)`."""
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        for variable in dashboard["templating"]["list"]:
            if variable["type"] != "query":
                continue
            match = _LABEL_VALUES.match(variable["query"]["query"])
            assert match, f"{path.name}: variable {variable['name']} is not label_values(...)"
            selector, label = match.groups()
            yield dashboard["title"], variable["name"], resolve(f"count by ({label}) ({selector})")


def resolve(expr: str) -> str:
    for name, value in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(name, value)
    assert "$" not in expr, f"unknown Grafana variable left in {expr!r}"
    return expr


def test_every_alert_has_a_runbook_and_a_severity() -> None:
    alerts = [rule for rule in rules() if "alert" in rule]
    assert len(alerts) >= 8
    for alert in alerts:
        name = alert["alert"]
        assert alert["labels"]["severity"] in ("page", "ticket"), name
        url = alert["annotations"]["runbook_url"]
        assert url == f"docs/runbooks/{name}.md", name
        runbook = REPO / url
        assert runbook.is_file(), f"{name}: no runbook at {url}"
        text = runbook.read_text()
        for section in ("## What it means", "## Confirm", "## Mitigate"):
            assert section in text, f"{url} has no '{section}' section"


def _names(expr: str) -> set[str]:
    """The pointsman, process and recorded names an expression reads (and Prometheus's `up`)."""
    up = {"up"} if re.search(r"(?<![\w:])up\{", expr) else set()
    return set(_METRIC.findall(expr)) | set(_RECORDED.findall(expr)) | up


def _expanded(names: set[str], recorded: dict[str, str]) -> set[str]:
    """The names and, for recorded ones, every name behind them (transitively)."""
    out, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name not in out:
            out.add(name)
            todo.extend(_names(recorded.get(name, "")))
    return out


def test_every_alert_links_from_the_panels_it_rests_on() -> None:
    """Each alert's runbook is linked from at least one panel, and a panel links a runbook only
    if its queries read what the alert reads (directly or through recording rules)."""
    recorded = {rule["record"]: rule["expr"] for rule in rules() if "record" in rule}
    alerts = {rule["alert"]: _expanded(_names(rule["expr"]), recorded)
              for rule in rules() if "alert" in rule}
    linked: set[str] = set()
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        variables = {v["name"]: v for v in dashboard["templating"]["list"]}
        assert variables["runbooks"]["type"] == "constant", path.name
        for panel in panels(dashboard):
            reads = _expanded(set().union(*(_names(t["expr"]) for t in panel["targets"])), recorded)
            for link in panel.get("links", []):
                match = re.fullmatch(r"\$\{runbooks\}/(\w+)\.md", link["url"])
                assert match, f"{path.name}: {panel['title']}: link {link['url']}"
                alert = match.group(1)
                assert alert in alerts, f"{path.name}: {panel['title']} links unknown {alert}"
                assert (REPO / "docs" / "runbooks" / f"{alert}.md").is_file()
                assert link["title"] == f"Runbook: {alert}"
                assert reads & alerts[alert], f"{path.name}: {panel['title']} shows nothing {alert} reads"
                linked.add(alert)
    assert linked == set(alerts), sorted(set(alerts) - linked)


def test_every_dashboard_panel_has_a_query_and_a_unique_id() -> None:
    assert {path.name for path in DASHBOARDS} == {
        "pointsman-executive.json", "pointsman-oncall.json", "pointsman-debug.json"}
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        ids = [panel["id"] for panel in dashboard["panels"]]
        assert len(ids) == len(set(ids)), path.name
        titles = [panel["title"] for panel in panels(dashboard)]
        assert len(titles) == len(set(titles)), path.name
        for panel in panels(dashboard):
            assert panel["targets"], f"{path.name}: {panel['title']} has no query"
            assert panel.get("description"), f"{path.name}: {panel['title']} has no description"


async def test_dashboards_and_rules_name_only_exported_metrics() -> None:
    """Every `pointsman_*` / `process_*` name in the kit is in a real /metrics exposition (a TCP
    and a UDP listener, so both families have samples); every `a:b:c` name is recorded."""
    with refused_port() as port, refused_port() as other:
        config = yaml.safe_dump({
            "listeners": [
                {"name": "lb", "bind": f"{LOOPBACK}:{free_port()}", "pool": "p"},
                {"name": "dns", "bind": f"{LOOPBACK}:{free_port(kind=socket.SOCK_DGRAM)}",
                 "protocol": "udp", "pool": "u"},
            ],
            "pools": [
                {"name": "p", "backends": [{"address": f"{LOOPBACK}:{port}"}]},
                {"name": "u", "backends": [{"address": f"{LOOPBACK}:{other}"}]},
            ],
        })
        async with running(config) as runtime:
            exposition = generate_latest(registry_for(runtime)).decode()
    exported = {line.split("{")[0].split(" ")[0] for line in exposition.splitlines()
                if line and not line.startswith("#")}
    # A family without samples yet (no health checks, no ended UDP session) still has its TYPE.
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            exported.add(name)
            if kind == "histogram":
                exported |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    texts = [expr for _, _, expr in dashboard_queries()]
    texts += [expr for _, _, expr in variable_queries()]
    texts += [rule["expr"] for rule in rules()]
    missing: set[str] = set()
    for text in texts:
        missing |= {name for name in _METRIC.findall(text) if name not in exported}
        missing |= {name for name in _RECORDED.findall(text) if name not in recorded}
    assert not missing, f"names neither exported nor recorded: {sorted(missing)}"


# --- promtool -------------------------------------------------------------------------------------


def test_promtool_check_rules() -> None:
    promtool = need("promtool")
    done = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules())} rules found" in done.stdout


def test_promtool_rule_unit_tests_pass() -> None:
    promtool = need("promtool")
    done = subprocess.run([promtool, "test", "rules", str(RULE_TESTS)], capture_output=True,
                          text=True, timeout=60, cwd=RULE_TESTS.parent)
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_rule_unit_tests_can_fail(tmp_path: Path) -> None:
    """The unit tests are not vacuous: with the table threshold moved they fail."""
    promtool = need("promtool")
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    broken = RULES.read_text().replace("ratio > 0.7", "ratio > 0.9")
    assert broken != RULES.read_text()
    (tmp_path / RULES.name).write_text(broken)
    done = subprocess.run([promtool, "test", "rules", RULE_TESTS.name], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
    assert done.returncode != 0
    assert "PointsmanConnectionTableHigh" in done.stdout + done.stderr


# --- a real Prometheus scraping a real pointsman ----------------------------------------------------


class Prometheus:
    def __init__(self, url: str, session: aiohttp.ClientSession) -> None:
        self.url = url
        self.session = session

    async def query(self, expr: str) -> dict[str, Any]:
        """The API's answer; a parse error comes back as status "error" (HTTP 400)."""
        async with self.session.get(f"{self.url}/api/v1/query", params={"query": expr}) as r:
            return dict(await r.json())

    async def values(self, expr: str) -> list[float]:
        answer = await self.query(expr)
        assert answer["status"] == "success", (expr, answer)
        return [float(item["value"][1]) for item in answer["data"]["result"]]

    async def rules(self) -> list[dict[str, Any]]:
        async with self.session.get(f"{self.url}/api/v1/rules") as r:
            body = await r.json()
        return [rule for group in body["data"]["groups"] for rule in group["rules"]]

    async def wait_for(self, what: str, check: Any, timeout: float) -> None:
        """Poll `await check()` until true; fail with `what` after `timeout` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not await check():
            if loop.time() > deadline:
                raise AssertionError(f"Prometheus: not true after {timeout}s: {what}")
            await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def prometheus_server(binary: str, target: str, workdir: Path) -> AsyncIterator[Prometheus]:
    port = free_port()
    config = workdir / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": "pointsman", "static_configs": [{"targets": [target]}]}],
    }))
    log = workdir / "prometheus.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
            f"--web.listen-address={LOOPBACK}:{port}", "--log.level=warn",
            stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    url = f"http://{LOOPBACK}:{port}"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            server = Prometheus(url, session)

            async def ready() -> bool:
                if proc.returncode is not None:
                    raise AssertionError(f"prometheus exited:\n{log.read_text()}")
                try:
                    async with session.get(f"{url}/-/ready") as r:
                        return r.status == 200
                except aiohttp.ClientError:
                    return False

            await server.wait_for("ready", ready, PROMETHEUS_READY_TIMEOUT)
            yield server
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def load(listen: str, stop: asyncio.Event) -> int:
    """Open, use and close connections at a steady pace until `stop`; return how many."""
    done = 0
    while not stop.is_set():
        reader, writer = await connect(listen)
        await roundtrip(reader, writer, b"ping\n")
        await close_writer(writer)
        done += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), LOAD_PAUSE)
    return done


async def test_prometheus_evaluates_every_dashboard_and_rule_expression(tmp_path: Path) -> None:
    binary = need("prometheus")
    admin = f"{LOOPBACK}:{free_port()}"
    listen = f"{LOOPBACK}:{free_port()}"
    async with echo_backend() as peer:
        with refused_port() as udp_peer:
            config = yaml.safe_dump({
                "listeners": [
                    {"name": "lb", "bind": listen, "pool": "p"},
                    {"name": "dns", "bind": f"{LOOPBACK}:{free_port(kind=socket.SOCK_DGRAM)}",
                     "protocol": "udp", "pool": "u"},
                ],
                "pools": [
                    {"name": "p", "backends": [{"address": peer.address, "name": "echo"}],
                     "health_check": {"type": "tcp", "interval": "0.5s", "timeout": "0.5s"}},
                    {"name": "u", "backends": [{"address": f"{LOOPBACK}:{udp_peer}"}]},
                ],
                "admin": {"bind": admin},
                "shutdown_grace": "1s",
            })
            async with (
                pointsman_process_async(config, tmp_path),
                prometheus_server(binary, admin, tmp_path) as prom,
            ):
                stop = asyncio.Event()
                loader = asyncio.create_task(load(listen, stop))
                try:
                    await wait_for_data(prom)
                finally:
                    stop.set()
                    connections = await loader
                assert connections > 0
                await check_queries(prom)


async def wait_for_data(prom: Prometheus) -> None:
    async def rates() -> bool:
        got = await prom.values("sum(rate(pointsman_connections_accepted_total[1m])) > 0")
        ttfb = await prom.values(
            "count_over_time(pointsman_time_to_first_byte_seconds_count[1m]) >= 3")
        return bool(got and ttfb)

    await prom.wait_for("a rate of accepted connections", rates, DATA_TIMEOUT)

    async def evaluated() -> bool:
        return all(rule["health"] == "ok" and not rule.get("lastError")
                   and not rule["lastEvaluation"].startswith("0001")
                   for rule in await prom.rules())

    await prom.wait_for("every rule evaluated without error", evaluated, DATA_TIMEOUT)

    async def recorded() -> bool:
        return bool(await prom.values("listener_pool:pointsman_connection_success:ratio_rate5m"))

    await prom.wait_for("the success ratio recorded", recorded, DATA_TIMEOUT)


async def check_queries(prom: Prometheus) -> None:
    # The core signals hold the values the load implies.
    assert await prom.values("sum(rate(pointsman_connections_accepted_total[1m])) > 0")
    active = await prom.values('pointsman_active_connections{listener="lb"}')
    assert len(active) == 1 and active[0] >= 0
    assert await prom.values(
        'pointsman_backend_state{pool="p", backend="echo", state="up"}') == [1.0]
    p99 = await prom.values("histogram_quantile(0.99, sum by (le) "
                            "(rate(pointsman_time_to_first_byte_seconds_bucket[1m])))")
    assert len(p99) == 1 and math.isfinite(p99[0]) and 0 < p99[0] < 1.0
    assert await prom.values(
        'listener_pool:pointsman_connection_success:ratio_rate5m{listener="lb"}') == [1.0]
    assert await prom.values(
        'listener_pool:pointsman_error_budget_burn:rate5m{listener="lb"}') == [0.0]
    assert await prom.values('pool:pointsman_backends_healthy:ratio{pool="p"}') == [1.0]
    assert await prom.values(
        'listener_pool:pointsman_table_utilisation:ratio{listener="dns"}') == [0.0]
    assert await prom.values('pointsman_accept_queue_limit{listener="lb"}') == [1024.0]
    assert await prom.values('pointsman_build_info{uvloop!="none"}') == [1.0]
    assert await prom.values("pointsman_config_last_reload_success") == [1.0]
    assert await prom.values('pointsman_health_check_info{pool="p", type="tcp"}') == [1.0]
    assert await prom.values("sum(pointsman_health_check_duration_seconds_count) > 0")
    offered = await prom.values('listener_pool:pointsman_connections_offered:rate5m{listener="lb"}')
    assert len(offered) == 1 and offered[0] > 0
    assert await prom.values('listener_pool:pointsman_bytes:rate5m{listener="lb", direction="in"} > 0')
    share = await prom.values('pool_backend:pointsman_load_imbalance:ratio_rate15m{pool="p"}')
    assert share == [1.0]  # one backend: all of the connections, all of the weight

    # Every expression parses and evaluates; the core panels return data.
    errors: list[str] = []
    with_data: set[tuple[str, str]] = set()  # (dashboard, panel) with a query that returned data
    queries = [*dashboard_queries(), *variable_queries(),
               *(("rules", rule.get("alert") or rule["record"], rule["expr"]) for rule in rules())]
    for source, title, expr in queries:
        answer = await prom.query(expr)
        if answer["status"] != "success":
            errors.append(f"{source} / {title}: {answer.get('error')}\n  {expr}")
        elif answer["data"]["result"]:
            with_data.add((source, title))
    assert not errors, "\n".join(errors)
    for dashboard, titles in PANELS_WITH_DATA.items():
        no_data = [title for title in titles if (dashboard, title) not in with_data]
        assert not no_data, f"{dashboard}: no data for {no_data}"
    variables = [(source, name) for source, name, _ in variable_queries()]
    assert variables and all(variable in with_data for variable in variables), variables


# --- an accept queue that overflows, seen by Prometheus -----------------------------------------------

BACKLOG = 4
WORKERS = 2  # a control process and two workers, each with its own socket (SO_REUSEPORT)
SYN_CLIENTS = 24  # 5 fit in each queue (backlog + 1); the others' SYNs are dropped and retried


def _worker_pids(control: int) -> list[int]:
    """The control process's children that run a worker (`python -m pointsman.node.worker`)."""
    children = Path(f"/proc/{control}/task/{control}/children").read_text().split()
    pids = []
    for pid in map(int, children):
        with contextlib.suppress(OSError):
            if b"pointsman.node.worker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(pid)
    return pids


def _open_syns(listen: str, count: int) -> list[socket.socket]:
    host, port = listen.rsplit(":", 1)
    clients = []
    for _ in range(count):
        client = socket.socket()
        client.setblocking(False)
        clients.append(client)
        client.connect_ex((host, int(port)))
    return clients


async def test_a_stalled_listener_overflows_and_prometheus_sees_it(tmp_path: Path) -> None:
    """`backlog: 4` and the workers that accept stopped (SIGSTOP): connections pile up in the
    kernel's queues. The control process reads the workers' sockets over sock_diag; the kernel's
    ListenOverflows grows by at least one per dropped SYN; the alert goes pending."""
    binary = need("prometheus")
    admin = f"{LOOPBACK}:{free_port()}"
    listen = f"{LOOPBACK}:{free_port()}"
    async with echo_backend() as peer:
        config = yaml.safe_dump({
            "listeners": [{"name": "lb", "bind": listen, "pool": "p", "backlog": BACKLOG}],
            "pools": [{"name": "p", "backends": [{"address": peer.address}]}],
            "admin": {"bind": admin},
            "workers": WORKERS,
            "shutdown_grace": "1s",
        })
        async with (
            pointsman_process_async(config, tmp_path) as proc,
            prometheus_server(binary, admin, tmp_path) as prom,
        ):
            async def bound() -> bool:
                return await prom.values(
                    f'pointsman_accept_queue_limit{{listener="lb"}} == {BACKLOG}'
                    f' and pointsman_accept_queue_sockets == {WORKERS}') == [BACKLOG]

            await prom.wait_for("the workers' listening sockets", bound, DATA_TIMEOUT)
            [before] = await prom.values("pointsman_tcp_listen_overflows_total")
            workers = _worker_pids(proc.pid)
            assert len(workers) == WORKERS
            for worker in workers:
                os.kill(worker, signal.SIGSTOP)
            clients: list[socket.socket] = []
            try:
                clients = _open_syns(listen, SYN_CLIENTS)

                async def full() -> bool:
                    return await prom.values('pointsman_accept_queue_depth{listener="lb"}') == [
                        BACKLOG + 1.0]

                await prom.wait_for("the accept queue full (backlog + 1)", full, DATA_TIMEOUT)
                dropped = SYN_CLIENTS - WORKERS * (BACKLOG + 1)

                async def overflowed() -> bool:
                    [now] = await prom.values("pointsman_tcp_listen_overflows_total")
                    return now - before >= dropped

                await prom.wait_for(f"{dropped} more overflows", overflowed, DATA_TIMEOUT)
                rule = next(r for r in rules() if r.get("alert") == "PointsmanAcceptQueueOverflow")
                assert await prom.values(rule["expr"])  # the alert's expression holds...

                async def pending() -> bool:  # ...and the rule, evaluated by Prometheus, is on
                    return bool(await prom.values(
                        'ALERTS{alertname="PointsmanAcceptQueueOverflow", listener="lb"}'))

                await prom.wait_for("the alert pending", pending, DATA_TIMEOUT)
            finally:
                for worker in workers:
                    os.kill(worker, signal.SIGCONT)
                for client in clients:
                    client.close()

            async def drained() -> bool:  # the worker accepts again: the queue empties
                return await prom.values('pointsman_accept_queue_depth{listener="lb"}') == [0.0]

            await prom.wait_for("the queue drained after SIGCONT", drained, DATA_TIMEOUT)
