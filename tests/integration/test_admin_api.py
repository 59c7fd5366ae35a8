"""The admin API on a real loopback port: health and readiness, metrics, the status document, the
operator calls and their bearer token, reload, the CLI that drives them, and a schemathesis fuzz
of the whole API from its own /openapi.json.

Most tests run a `Node` in the test's event loop (so they can look at the pool directly and
compare it with what the API says); the CLI and fuzz tests run `pointsman run` as a subprocess.
Tests that take the `workers` fixture run that node as one process and as a control process with
two workers, where the API answers from the owner pools and the workers' reports.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from pointsman.app import build_node
from pointsman.config.loader import load_file
from pointsman.node.runtime import Node
from tests.support import (
    LOOPBACK,
    close_writer,
    connect,
    echo_backend,
    free_port,
    pointsman_process,
    roundtrip,
    statistics_when,
    wait_for,
    workers_caught_up,
)

TOKEN = "s3cret-t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BACKEND = "/api/v1/pools/p/backends/a"
CLI_TIMEOUT = 20.0  # one `pointsman status` takes a second (two samples); the rest is start-up
FUZZ_TIMEOUT = 90.0
FUZZ_EXAMPLES = 30  # per operation; the whole run stays well under a minute

# The metric names an operator's dashboards and alerts rely on (deploy/).
CORE_METRICS = (
    "pointsman_connections_accepted_total",
    "pointsman_connections_rejected_total",
    "pointsman_connections_ended_total",
    "pointsman_connections_connect_failed_total",
    "pointsman_connect_retries_total",
    "pointsman_active_connections",
    "pointsman_connection_table_used",
    "pointsman_connection_table_capacity",
    "pointsman_bytes_total",
    "pointsman_time_to_first_byte_seconds",
    "pointsman_connection_duration_seconds",
    "pointsman_backend_state",
    "pointsman_backend_weight",
    "pointsman_backend_active_connections",
    "pointsman_backend_connections_total",
    "pointsman_backend_connect_failures_total",
    "pointsman_backend_connect_seconds",
    "pointsman_health_checks_total",
    "pointsman_pool_available_backends",
    "pointsman_pool_backends",
    "pointsman_event_loop_lag_seconds",
    "pointsman_flow_log_dropped_total",
    "pointsman_process_cpu_seconds_total",
)


# --- an in-process pointsman with its admin listener ------------------------------------------------


@dataclass
class Admin:
    runtime: Node
    url: str
    http: aiohttp.ClientSession
    config_path: Path
    listen: str

    async def get(self, path: str) -> tuple[int, Any]:
        async with self.http.get(self.url + path) as r:
            body = await r.json() if r.content_type == "application/json" else await r.text()
            return r.status, body

    async def call(self, method: str, path: str, *, headers: dict[str, str] | None = AUTH,
                   data: bytes | None = None, json_body: Any = None) -> tuple[int, Any]:
        async with self.http.request(method, self.url + path, headers=headers, data=data,
                                     json=json_body) as r:
            body = await r.json() if r.content_type == "application/json" else await r.text()
            return r.status, body

    async def status(self) -> dict[str, Any]:
        code, body = await self.get("/api/v1/status")
        assert code == 200
        return dict(body)

    async def backend_status(self, backend: str = "a") -> dict[str, Any]:
        doc = await self.status()
        pool = next(p for p in doc["pools"] if p["name"] == "p")
        return dict(next(b for b in pool["backends"] if b["id"] == backend))


def config_text(listen: str, backends: list[str], admin: str, token_file: Path | None,
                read_token_file: Path | None = None, **pool: Any) -> str:
    names = ["a", "b", "c"]
    admin_section: dict[str, Any] = {"bind": admin}
    if token_file is not None:
        admin_section["token_file"] = str(token_file)
    if read_token_file is not None:
        admin_section["read_token_file"] = str(read_token_file)
    return yaml.safe_dump({
        "listeners": [{"name": "lb", "bind": listen, "pool": "p"}],
        "pools": [{"name": "p", "connect_timeout": "1s",
                   "backends": [{"address": address, "name": names[i]}
                                for i, address in enumerate(backends)], **pool}],
        "admin": admin_section,
        "shutdown_grace": "0.2s",
    }, sort_keys=False)


@contextlib.asynccontextmanager
async def admin_runtime(tmp_path: Path, backends: list[str], *, token: bool = True,
                        workers: int = 1, **pool: Any) -> AsyncIterator[Admin]:
    """A Node loaded from a config file (so reload has a file to re-read), admin on a free
    port, with a bearer token unless `token=False`; with `workers` > 1 a control process whose
    workers serve the listener (yielded once they all do)."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    listen = f"{LOOPBACK}:{free_port()}"
    admin = f"{LOOPBACK}:{free_port()}"
    path = tmp_path / "pointsman.yaml"
    path.write_text(config_text(listen, backends, admin, token_file if token else None, **pool))
    runtime = build_node(load_file(path), config_path=path, announce=lambda line: None,
                         workers=workers)
    await runtime.start()
    try:
        await wait_for(lambda: all(lst.accepting for lst in runtime.listeners.values()), 10.0,
                       what="every listener served")
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            yield Admin(runtime, f"http://{admin}", http, path, listen)
    finally:
        await runtime.shutdown()


async def proxy_some(admin: Admin, count: int, message: bytes = b"hello\n") -> None:
    """`count` connections through the listener, each closed by the client after one echo."""
    for _ in range(count):
        reader, writer = await connect(admin.listen)
        await roundtrip(reader, writer, message)
        await close_writer(writer)
    # With workers the figures arrive by report: wait for the count, then check the gauge.
    stats = await statistics_when(admin.runtime, lambda s: sum(s.ended.values()) == count,
                                  what="every connection torn down")
    assert stats.active == 0


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def sample(parsed: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
           **labels: str) -> float:
    return parsed[(name, frozenset(labels.items()))]


# --- reads ---------------------------------------------------------------------------------------

READY = {"ready": True, "not_accepting": [], "pools_without_backends": [], "failed_tasks": [],
         "drained": False}


async def test_healthz_and_readyz_follow_the_pool(tmp_path: Path, workers: int) -> None:
    async with (
        echo_backend() as peer,
        admin_runtime(tmp_path, [peer.address], workers=workers) as admin,
    ):
        assert await admin.get("/healthz") == (200, "ok\n")
        assert await admin.get("/readyz") == (200, READY)

        code, _ = await admin.call("POST", f"{BACKEND}/drain")
        assert code == 200
        code, body = await admin.get("/readyz")
        assert code == 503
        assert body == {**READY, "ready": False, "pools_without_backends": ["p"]}
        assert await admin.get("/healthz") == (200, "ok\n")  # alive, just not ready

        code, _ = await admin.call("POST", f"{BACKEND}/enable")
        assert code == 200
        assert await admin.get("/readyz") == (200, READY)


async def test_metrics_count_the_proxied_connections(tmp_path: Path, workers: int) -> None:
    message = b"twelve bytes"
    async with (
        echo_backend() as peer,
        admin_runtime(tmp_path, [peer.address], workers=workers) as admin,
    ):
        await proxy_some(admin, 3, message)
        async with admin.http.get(admin.url + "/metrics") as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/plain")
            text = await r.text()

    families = {f.name for f in text_string_to_metric_families(text)}
    exposed = {line.split(" ")[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    for name in CORE_METRICS:
        assert name in exposed or name.removesuffix("_total") in families, name
    parsed = samples(text)
    lb = {"listener": "lb", "pool": "p"}
    assert sample(parsed, "pointsman_connections_accepted_total", **lb) == 3
    assert sample(parsed, "pointsman_connections_ended_total", **lb, reason="client_fin") == 3
    assert sample(parsed, "pointsman_connections_connect_failed_total", **lb) == 0
    assert sample(parsed, "pointsman_active_connections", **lb) == 0
    assert sample(parsed, "pointsman_bytes_total", **lb, direction="in") == 3 * len(message)
    assert sample(parsed, "pointsman_bytes_total", **lb, direction="out") == 3 * len(message)
    assert sample(parsed, "pointsman_time_to_first_byte_seconds_count", **lb) == 3
    assert sample(parsed, "pointsman_backend_connections_total", pool="p", backend="a") == 3
    assert sample(parsed, "pointsman_backend_state", pool="p", backend="a", state="up") == 1
    assert sample(parsed, "pointsman_pool_available_backends", pool="p") == 1


async def test_status_document_describes_listeners_pools_and_backends(
    tmp_path: Path, workers: int
) -> None:
    async with (
        echo_backend() as a,
        echo_backend() as b,
        admin_runtime(tmp_path, [a.address, b.address], workers=workers) as admin,
    ):
        await proxy_some(admin, 2)
        doc = await admin.status()
        pids = [w.pid for w in admin.runtime.workers()]

    assert set(doc) == {"version", "node", "role", "started_at", "generated_at",
                        "loop_lag_seconds", "readiness", "processes", "workers", "listeners",
                        "pools", "transitions", "runtime", "passed_sockets"}
    assert doc["readiness"]["ready"]
    assert doc["node"] == socket.gethostname()  # no `node.name` in the config, no fleet
    assert doc["started_at"] <= doc["generated_at"] <= time.time()
    if workers == 1:
        assert doc["role"] == "single" and doc["workers"] == []
        [process] = doc["processes"]
        assert process["process"] == "single" and process["pid"] == os.getpid()
    else:
        assert doc["role"] == "control"
        assert [(w["index"], w["state"], w["restarts"]) for w in doc["workers"]] == [
            (i, "running", 0) for i in range(workers)]
        assert [w["pid"] for w in doc["workers"]] == pids and os.getpid() not in pids
        assert [(p["process"], p["pid"]) for p in doc["processes"]] == [
            ("control", os.getpid()), *((f"worker-{i}", pids[i]) for i in range(workers))]
    [listener] = doc["listeners"]
    assert listener["name"] == "lb" and listener["protocol"] == "tcp"
    assert listener["bind"] == admin.listen and listener["pool"] == "p"
    assert listener["accepting"] is True
    assert listener["accepted"] == 2 and listener["active"] == 0
    assert listener["capacity"] == 10_000
    assert listener["ended"] == {"client_fin": 2}
    [pool] = doc["pools"]
    assert pool["name"] == "p" and pool["algorithm"] == "round_robin"
    assert pool["available"] == 2 and pool["total"] == 2
    assert [backend["id"] for backend in pool["backends"]] == ["a", "b"]
    # Round robin: one each with one process; each worker rotates on its own, so with workers
    # only the sum is known.
    assert sum(backend["total"] for backend in pool["backends"]) == 2
    for backend, peer in zip(pool["backends"], (a, b), strict=True):
        assert backend["address"] == peer.address
        assert backend["state"] == "up" and backend["weight"] == 1 and backend["available"]
        assert backend["active"] == 0
        if workers == 1:
            assert backend["total"] == 1
        assert backend["last_check"] is None  # no health check configured
        assert backend["since_seconds"] >= 0
    assert doc["transitions"] == []


# --- operator calls ---------------------------------------------------------------------------------


async def test_drain_maintenance_enable_and_weight_change_the_pool(
    tmp_path: Path, workers: int
) -> None:
    async with (
        echo_backend() as peer,
        admin_runtime(tmp_path, [peer.address], workers=workers) as admin,
    ):
        pool = admin.runtime.pools["p"]
        for action, state in (("drain", "draining"), ("maintenance", "maintenance"),
                              ("enable", "up")):
            code, body = await admin.call("POST", f"{BACKEND}/{action}")
            assert code == 200, body
            assert body == {"pool": "p", "backend": "a", "state": state, "active": 0}
            assert pool.member("a").machine.state.value == state
            assert (await admin.backend_status())["state"] == state

        code, body = await admin.call("PUT", f"{BACKEND}/weight", json_body={"weight": 7})
        assert (code, body) == (200, {"pool": "p", "backend": "a", "weight": 7})
        assert pool.member("a").weight == 7
        assert (await admin.backend_status())["weight"] == 7
        _, metrics = await admin.get("/metrics")
        assert sample(samples(metrics), "pointsman_backend_weight", pool="p", backend="a") == 7

        transitions = (await admin.status())["transitions"]
    # Newest first, each with the operator reason.
    assert [(t["old"], t["new"]) for t in transitions] == [
        ("maintenance", "up"), ("draining", "maintenance"), ("up", "draining")]
    assert all(t["reason"].startswith("operator ") for t in transitions)


async def test_a_drained_backend_gets_no_new_connections(tmp_path: Path, workers: int) -> None:
    async with (
        echo_backend() as a,
        echo_backend() as b,
        admin_runtime(tmp_path, [a.address, b.address], workers=workers) as admin,
    ):
        code, _ = await admin.call("POST", f"{BACKEND}/drain")
        assert code == 200
        await workers_caught_up(admin.runtime)  # the call returns once the owner pool changed
        await proxy_some(admin, 4)
    assert (a.accepted, b.accepted) == (0, 4)


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/api/v1/pools/nope/backends/a/drain", None),
        ("POST", "/api/v1/pools/p/backends/nope/drain", None),
        ("POST", "/api/v1/pools/p/backends/nope/enable", None),
        ("POST", "/api/v1/pools/p/backends/nope/maintenance", None),
        ("POST", "/api/v1/pools/p/backends/a/explode", None),
        ("PUT", "/api/v1/pools/nope/backends/a/weight", {"weight": 2}),
        ("PUT", "/api/v1/pools/p/backends/nope/weight", {"weight": 2}),
    ],
)
async def test_unknown_pool_backend_or_action_is_404(
    tmp_path: Path, method: str, path: str, body: Any
) -> None:
    async with echo_backend() as peer, admin_runtime(tmp_path, [peer.address]) as admin:
        code, _ = await admin.call(method, path, json_body=body)
        assert code == 404
        assert (await admin.backend_status())["state"] == "up"
        assert (await admin.backend_status())["weight"] == 1


async def test_wrong_method_is_405_naming_the_right_one(tmp_path: Path) -> None:
    async with echo_backend() as peer, admin_runtime(tmp_path, [peer.address]) as admin:
        async with admin.http.post(admin.url + f"{BACKEND}/weight", headers=AUTH) as r:
            assert r.status == 405
            assert r.headers["Allow"] == "PUT"
        async with admin.http.get(admin.url + f"{BACKEND}/drain") as r:
            assert r.status == 405
            assert r.headers["Allow"] == "POST"


@pytest.mark.parametrize(
    "body",
    [b"", b"not json", b"[]", b'"3"', b"{}", b'{"weight": "3"}', b'{"weight": true}',
     b'{"weight": 1.5}', b'{"weight": null}', b'{"weight": -1}', b'{"weight": 1001}',
     b"\xff\xfe"],
)
async def test_bad_weight_body_is_400_and_changes_nothing(tmp_path: Path, body: bytes) -> None:
    async with echo_backend() as peer, admin_runtime(tmp_path, [peer.address]) as admin:
        code, answer = await admin.call(
            "PUT", f"{BACKEND}/weight", data=body, headers={**AUTH, "Content-Type": "application/json"})
        assert code == 400, answer
        assert "error" in answer
        assert admin.runtime.pools["p"].member("a").weight == 1


# --- the bearer token ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
     {"Authorization": f"Basic {TOKEN}"}, {"Authorization": "Bearer "}],
    ids=["none", "wrong", "no-scheme", "basic", "empty"],
)
async def test_mutating_calls_need_the_token(tmp_path: Path, headers: dict[str, str]) -> None:
    async with echo_backend() as peer, admin_runtime(tmp_path, [peer.address]) as admin:
        before = await admin.backend_status()
        for method, path, body in (("POST", f"{BACKEND}/drain", None),
                                   ("POST", f"{BACKEND}/maintenance", None),
                                   ("PUT", f"{BACKEND}/weight", {"weight": 9}),
                                   ("POST", "/api/v1/reload", None)):
            code, answer = await admin.call(method, path, headers=headers, json_body=body)
            assert code == 401, (method, path, answer)
            assert answer == {"error": "a bearer token is required"}
        after = await admin.backend_status()
        assert (after["state"], after["weight"]) == (before["state"], before["weight"]) == ("up", 1)
        assert (await admin.status())["transitions"] == []
        # Reads stay open.
        assert (await admin.get("/api/v1/status"))[0] == 200
        assert (await admin.get("/metrics"))[0] == 200

        code, _ = await admin.call("POST", f"{BACKEND}/drain", headers=AUTH)
        assert code == 200
        assert (await admin.backend_status())["state"] == "draining"


async def test_without_a_token_file_loopback_calls_need_no_token(tmp_path: Path) -> None:
    async with (
        echo_backend() as peer,
        admin_runtime(tmp_path, [peer.address], token=False) as admin,
    ):
        code, _ = await admin.call("POST", f"{BACKEND}/drain", headers={})
        assert code == 200
        assert admin.runtime.pools["p"].member("a").machine.state.value == "draining"


# --- reload ----------------------------------------------------------------------------------------


async def test_reload_with_a_bad_file_is_422_and_keeps_the_running_config(
    tmp_path: Path, workers: int
) -> None:
    async with (
        echo_backend() as peer,
        admin_runtime(tmp_path, [peer.address], workers=workers) as admin,
    ):
        running_config = admin.runtime.config
        good = admin.config_path.read_text()
        admin.config_path.write_text(good.replace("pool: p", "pool: missing", 1))
        code, body = await admin.call("POST", "/api/v1/reload")
        assert code == 422
        assert body["reloaded"] is False and body["errors"]
        assert any("missing" in error for error in body["errors"]), body

        admin.config_path.write_text("listeners: [")  # not even YAML
        code, body = await admin.call("POST", "/api/v1/reload")
        assert code == 422 and body["errors"]

        assert admin.runtime.config is running_config
        await proxy_some(admin, 1)  # still serving

        # A good file is applied: the new weight shows in the status.
        admin.config_path.write_text(good.replace("name: a", "name: a\n    weight: 4", 1))
        code, body = await admin.call("POST", "/api/v1/reload")
        assert (code, body) == (200, {"reloaded": True})
        assert (await admin.backend_status())["weight"] == 4


# --- the CLI against a pointsman subprocess ---------------------------------------------------------


@contextlib.contextmanager
def pointsman_with_admin(tmp_path: Path, read_token: str | None = None) -> Iterator[tuple[str, Path]]:
    """`pointsman run` with backends a and b (nobody listens there: no traffic in these tests)
    and the admin API on a free port; yields (admin URL, token file)."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    admin = f"{LOOPBACK}:{free_port()}"
    backends = [f"{LOOPBACK}:{free_port()}", f"{LOOPBACK}:{free_port()}"]
    read_token_file = None
    if read_token is not None:
        read_token_file = tmp_path / "read.token"
        read_token_file.write_text(read_token)
    text = config_text(f"{LOOPBACK}:{free_port()}", backends, admin, token_file, read_token_file)
    with pointsman_process(text, tmp_path) as proc:
        proc.wait_lines(lambda lines: any(line.startswith("admin api") for line in lines))
        yield f"http://{admin}", token_file


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("POINTSMAN_TOKEN", "POINTSMAN_TOKEN_FILE", "POINTSMAN_ADMIN")}
    return subprocess.run([sys.executable, "-m", "pointsman", *args], capture_output=True,
                          text=True, timeout=CLI_TIMEOUT, env=env)


def fetch_status(url: str, token: str | None = None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(url + "/api/v1/status", headers=headers),
                                timeout=5) as r:
        return dict(json.loads(r.read()))


def states(doc: dict[str, Any]) -> dict[str, tuple[str, int]]:
    return {b["id"]: (b["state"], b["weight"]) for p in doc["pools"] for b in p["backends"]}


def test_cli_status_drain_weight_against_a_running_pointsman(tmp_path: Path) -> None:
    with pointsman_with_admin(tmp_path) as (url, token_file):
        common = ["--admin", url, "--token-file", str(token_file)]

        done = cli("status", *common)
        assert done.returncode == 0, done.stderr
        assert "a" in done.stdout and "b" in done.stdout
        assert done.stdout.count("up") >= 2

        done = cli("drain", "p", "a", *common)
        assert (done.returncode, done.stdout) == (0, "p/a: draining (0 active)\n"), done.stderr
        assert states(fetch_status(url))["a"] == ("draining", 1)

        done = cli("weight", "p", "b", "5", *common)
        assert (done.returncode, done.stdout) == (0, "p/b: weight 5\n"), done.stderr
        assert states(fetch_status(url))["b"] == ("up", 5)

        done = cli("status", *common)
        assert done.returncode == 0 and "draining" in done.stdout

        done = cli("enable", "p", "a", *common)
        assert (done.returncode, done.stdout) == (0, "p/a: up (0 active)\n"), done.stderr

        # Mistakes exit 1 with the API's reason, and change nothing.
        done = cli("drain", "p", "a", "--admin", url)
        assert done.returncode == 1 and "401" in done.stderr
        done = cli("drain", "p", "nope", *common)
        assert done.returncode == 1 and "404" in done.stderr
        assert states(fetch_status(url)) == {"a": ("up", 1), "b": ("up", 5)}

    done = cli("status", "--admin", url)  # nobody there any more
    assert done.returncode == 1 and "cannot reach" in done.stderr


# --- schemathesis ------------------------------------------------------------------------------------


def schemathesis_run(schema: str, url: str, checks: str, headers: dict[str, str],
                     workdir: Path) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("schemathesis") or shutil.which("st")
    if binary is None:
        pytest.skip("schemathesis is not installed (pip install -e '.[test]')")
    args = [binary, "run", schema, "--url", url, "--checks", checks,
            "--max-examples", str(FUZZ_EXAMPLES), "--seed", "1", "--workers", "1",
            "--generation-database", "none", "--no-color", "--request-timeout", "5"]
    for name, value in headers.items():
        args += ["--header", f"{name}: {value}"]
    return subprocess.run(args, capture_output=True, text=True, timeout=FUZZ_TIMEOUT, cwd=workdir)


def test_fuzzed_api_never_errors_and_never_changes_state_without_the_token(
    tmp_path: Path,
) -> None:
    """Two runs from the served /openapi.json, with a read token configured so that reads are
    guarded too. First with the write token: no 5xx anywhere, and every operation (reads as well
    as writes) answers 401 when schemathesis drops or spoils the token (`ignored_auth`). Then,
    with the path parameters pinned to the real pool and backend so every request reaches a real
    backend, without any token: the status must come out as it went in."""
    read_token = "fuzz-read-t0ken"
    with pointsman_with_admin(tmp_path, read_token=read_token) as (url, _):
        with urllib.request.urlopen(urllib.request.Request(url + "/openapi.json", headers=AUTH),
                                    timeout=5) as r:
            spec = json.loads(r.read())
        assert spec["paths"]["/api/v1/status"]["get"]["security"] == [{"bearer": []}]
        assert "/api/v1/events" in spec["paths"]
        served = tmp_path / "served.json"
        served.write_text(json.dumps(spec))
        pinned = tmp_path / "pinned.json"
        for item in spec["paths"].values():
            for parameter in item.get("parameters", []):
                value = "p" if parameter["name"] == "pool" else "a"
                parameter["schema"] = {"type": "string", "enum": [value]}
        pinned.write_text(json.dumps(spec))

        done = schemathesis_run(str(served), url, "not_a_server_error,ignored_auth", AUTH, tmp_path)
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
        assert "passed" in done.stdout

        before = fetch_status(url, read_token)
        done = schemathesis_run(str(pinned), url, "not_a_server_error", {}, tmp_path)
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
        after = fetch_status(url, read_token)
        assert states(after) == states(before)
        assert after["transitions"] == before["transitions"]
