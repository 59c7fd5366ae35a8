"""The event log end to end: backend transitions (operator and health checks), admin actions and
reloads (accepted with their diff, refused with their errors) land in GET /api/v1/events, with its
filters, and each is one JSON object per line on the `pointsman.events` / `pointsman.audit`
loggers; the same from a `pointsman run` subprocess's stderr."""

from __future__ import annotations

import json
import logging
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from pointsman.app import build_node
from pointsman.config.loader import load_file
from pointsman.telemetry.eventlog import EVENTS
from pointsman.telemetry.events import AdminEvent, iso_utc
from tests.support import LOOPBACK, echo_backend, free_port, pointsman_process, refused_port, wait_for

TOKEN = "events-t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def config_text(listen: str, admin: str, token_file: Path, backends: dict[str, str],
                **pool: Any) -> str:
    return yaml.safe_dump({
        "listeners": [{"name": "lb", "bind": listen, "pool": "p"}],
        "pools": [{"name": "p", "backends": [{"address": a, "name": n} for n, a in backends.items()],
                   **pool}],
        "admin": {"bind": admin, "token_file": str(token_file)},
        "shutdown_grace": "0.2s",
        "workers": 1,
    }, sort_keys=False)


def event_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    lines = [r.getMessage() for r in caplog.records if r.name in ("pointsman.events", "pointsman.audit")]
    assert all("\n" not in line for line in lines)
    return [json.loads(line) for line in lines]


async def test_transitions_admin_actions_and_reloads_are_events(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    listen, admin = f"{LOOPBACK}:{free_port()}", f"{LOOPBACK}:{free_port()}"
    path = tmp_path / "pointsman.yaml"
    seen = EVENTS.ring.recorded
    started = time.time()
    async with echo_backend() as a, echo_backend() as b, echo_backend() as c:
        backends = {"a": a.address, "b": b.address}
        path.write_text(config_text(listen, admin, token_file, backends))
        runtime = build_node(load_file(path), config_path=path, announce=lambda line: None, workers=1)
        await runtime.start()
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
                url = f"http://{admin}"

                async def call(method: str, route: str, **kw: Any) -> tuple[int, Any]:
                    async with http.request(method, url + route, **kw) as r:
                        return r.status, await r.json()

                assert (await call("POST", "/api/v1/pools/p/backends/a/drain", headers=AUTH))[0] == 200
                assert (await call("PUT", "/api/v1/pools/p/backends/b/weight", headers=AUTH,
                                   json={"weight": 4}))[0] == 200
                path.write_text(config_text(listen, admin, token_file, {**backends, "c": c.address}))
                assert await call("POST", "/api/v1/reload", headers=AUTH) == (200, {"reloaded": True})
                path.write_text(config_text(listen, admin, token_file, backends).replace(
                    "pool: p", "pool: nope", 1))
                code, body = await call("POST", "/api/v1/reload", headers=AUTH)
                assert code == 422 and body["error"].startswith("reload refused: ")

                code, doc = await call("GET", f"/api/v1/events?after={seen}")
                assert code == 200
                assert doc["capacity"] == 1000 and doc["recorded"] == seen + 7
                events = doc["events"]
                assert [(e["kind"], e.get("backend"), e.get("status")) for e in events] == [
                    ("backend", "a", None), ("admin", "a", 200), ("admin", "b", 200),
                    ("reload", None, None), ("admin", None, 200), ("reload", None, None),
                    ("admin", None, 422)]
                drained, drain_call, weight_call, applied, _, refused, refused_call = events
                assert (drained["old"], drained["new"], drained["reason"]) == (
                    "up", "draining", "operator drain via admin api")
                assert drain_call["path"] == "/api/v1/pools/p/backends/a/drain"
                assert drain_call["token"] == "default" and drain_call["result"] == "ok"
                assert weight_call["detail"] == {"pool": "p", "backend": "b", "weight": 4}
                assert (applied["source"], applied["accepted"]) == ("file", True)
                assert applied["diff"]["backends"] == {"added": ["p/c"], "removed": [], "changed": []}
                assert applied["summary"] == "config from file applied: backends added: p/c"
                assert (refused["source"], refused["accepted"], refused["diff"]) == ("file", False, None)
                assert any("nope" in error for error in refused["errors"])
                assert refused_call["result"].startswith("reload refused: ")
                assert all(started <= e["ts"] <= time.time() for e in events)

                # The filters.
                async def seqs(query: str) -> list[int]:
                    code, doc = await call("GET", f"/api/v1/events?after={seen}&{query}")
                    assert code == 200, doc
                    return [e["seq"] for e in doc["events"]]

                by_seq = [e["seq"] for e in events]
                assert await seqs("kind=reload") == [by_seq[3], by_seq[5]]
                assert await seqs("kind=backend,reload") == [by_seq[0], by_seq[3], by_seq[5]]
                assert await seqs("backend=a") == by_seq[:2]
                assert await seqs("pool=p&backend=c") == [by_seq[3]]  # the reload that added it
                assert await seqs("pool=nope") == []
                assert await seqs(f"since={iso_utc(events[3]['ts'])}") == by_seq[3:]
                assert await seqs(f"since={events[5]['ts']}") == by_seq[5:]
                assert await seqs("limit=2") == by_seq[-2:]
                for bad in ("kind=nope", "since=yesterday", "limit=-1", "pol=p"):
                    code, doc = await call("GET", f"/api/v1/events?{bad}")
                    assert code == 400 and doc["error"], bad
        finally:
            await runtime.shutdown()

    logged = [line for line in event_lines(caplog) if line["seq"] > seen]
    assert logged == events  # the log and the API say the same, line for line


async def test_a_backend_found_down_by_its_health_check_is_a_warning_event(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    check = {"type": "tcp", "interval": "100ms", "timeout": "100ms", "rise": 1, "fall": 1}
    seen = EVENTS.ring.recorded
    with refused_port() as dead:
        path = tmp_path / "pointsman.yaml"
        path.write_text(config_text(f"{LOOPBACK}:{free_port()}", f"{LOOPBACK}:{free_port()}",
                                    token_file, {"dead": f"{LOOPBACK}:{dead}"}, health_check=check))
        runtime = build_node(load_file(path), config_path=path, announce=lambda line: None, workers=1)
        await runtime.start()
        try:
            await wait_for(lambda: any(e.event.kind == "backend" and e.seq > seen
                                       for e in EVENTS.ring.query()), 5.0, what="a transition event")
        finally:
            await runtime.shutdown()
    first = next(line for line in event_lines(caplog) if line["seq"] > seen)
    assert (first["kind"], first["backend"], first["old"], first["new"]) == ("backend", "dead", "up", "down")
    assert first["reason"].startswith("health check failed")
    record = next(r for r in caplog.records if r.name == "pointsman.events")
    assert record.levelname == "WARNING"


def test_a_pointsman_process_writes_event_lines_to_its_log(tmp_path: Path) -> None:
    """In a real run (control process with a worker) each event is logged once, as JSON."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    admin = f"{LOOPBACK}:{free_port()}"
    text = config_text(f"{LOOPBACK}:{free_port()}", admin, token_file,
                       {"a": f"{LOOPBACK}:{free_port()}"}).replace("workers: 1", "workers: 2")
    with pointsman_process(text, tmp_path) as proc:
        proc.wait_lines(lambda lines: any(line.startswith("admin api") for line in lines))
        request = urllib.request.Request(f"http://{admin}/api/v1/pools/p/backends/a/drain",
                                         method="POST", headers=AUTH)
        with urllib.request.urlopen(request, timeout=5) as r:
            assert r.status == 200

        def lines() -> list[dict[str, Any]]:
            return [json.loads(line.split(": ", 1)[1]) for line in proc.stderr().splitlines()
                    if " pointsman.events: " in line or " pointsman.audit: " in line]

        deadline = time.monotonic() + 5
        while len(lines()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)  # polling the log file with a deadline
        assert [(e["kind"], e["backend"]) for e in lines()] == [("backend", "a"), ("admin", "a")]


async def test_a_bug_behind_a_call_is_a_logged_500_and_still_audited(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The one 5xx the API has: a failure of ours (simulated by a reload that raises). Its
    traceback is logged (a bug must be visible) and the call is in the audit log with 500."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    admin = f"{LOOPBACK}:{free_port()}"
    path = tmp_path / "pointsman.yaml"
    path.write_text(config_text(f"{LOOPBACK}:{free_port()}", admin, token_file,
                                {"a": f"{LOOPBACK}:{free_port()}"}))
    runtime = build_node(load_file(path), config_path=path, announce=lambda line: None, workers=1)
    await runtime.start()
    seen = EVENTS.ring.recorded

    async def broken_reload() -> list[str]:
        raise RuntimeError("simulated bug")

    runtime.reload = broken_reload  # type: ignore[method-assign]
    try:
        async with aiohttp.ClientSession() as http, \
                http.post(f"http://{admin}/api/v1/reload", headers=AUTH) as r:
            assert r.status == 500 and await r.json() == {"error": "internal error (logged)"}
    finally:
        await runtime.shutdown()
    [record] = [r for r in caplog.records if r.name == "pointsman.admin"]
    assert record.exc_info is not None and "simulated bug" in str(record.exc_info[1])
    [audit] = [e.event for e in EVENTS.ring.query() if e.seq > seen]
    assert isinstance(audit, AdminEvent) and (audit.status, audit.token) == (500, "default")
