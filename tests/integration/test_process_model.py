"""The default process model, from outside: a control process and worker processes.

- the same traffic gives the same figures with 1 and 2 workers, in /api/v1/status, /metrics and
  `pointsman status`;
- per-client state (affinity, per-source caps) holds across workers, because the kernel steers
  each source address to one worker;
- a worker that dies is restarted, and readiness names the listener while nobody serves it;
- when the control process dies (SIGKILL), the workers stop accepting, finish their open
  connections and exit.

Sources are distinct loopback addresses (127.0.0.0/8 is local on Linux).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from pointsman.node.runtime import Node
from tests.integration.peers import named_backends, open_named
from tests.support import (
    LOOPBACK,
    close_writer,
    echo_backend,
    free_port,
    pointsman_process_async,
    read_all,
    refused_port,
    roundtrip,
    running,
    wait_for,
)

pytestmark = [pytest.mark.timeout(90), pytest.mark.asyncio(loop_factories=["uvloop"])]

IO_TIMEOUT = 3.0
REPORT_DEADLINE = 5.0  # workers report every 0.5 s; a loaded CI machine may be slow


@dataclass
class Admin:
    url: str
    http: aiohttp.ClientSession

    async def get(self, path: str) -> tuple[int, Any]:
        async with self.http.get(self.url + path) as response:
            body = await response.text()
            if response.content_type == "application/json":
                return response.status, json.loads(body)
            return response.status, body


@contextlib.asynccontextmanager
async def admin_client(url: str) -> AsyncIterator[Admin]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=IO_TIMEOUT)) as http:
        yield Admin(url, http)


# --- the same figures with any number of workers -----------------------------------------------


def mixed_config(ok: str, dead: str, empty: str, backend: str, refused: int, admin: str) -> str:
    """Three listeners: `ok` echoes, `dead` finds its only backend refusing (connect_failed),
    `empty` has no available backend (refused as no_backend)."""
    return yaml.safe_dump({
        "listeners": [
            {"name": "ok", "bind": ok, "pool": "echo"},
            {"name": "dead", "bind": dead, "pool": "dead"},
            {"name": "empty", "bind": empty, "pool": "empty"},
        ],
        "pools": [
            {"name": "echo", "backends": [{"address": backend}]},
            {"name": "dead", "retries": 0, "passive": {"consecutive_failures": 0},
             "backends": [{"address": f"{LOOPBACK}:{refused}"}]},
            {"name": "empty", "initial_state": "down",
             "health_check": {"type": "tcp", "interval": "5s", "timeout": "1s"},
             "backends": [{"address": f"{LOOPBACK}:{refused}"}]},
        ],
        "admin": {"bind": admin},
        "shutdown_grace": "1s",
    })


ECHOES, FAILS, EMPTIES, PAYLOAD = 12, 5, 4, 1000


async def send_mix(ok: str, dead: str, empty: str) -> None:
    for i in range(ECHOES):
        host, _, port = ok.rpartition(":")
        async with asyncio.timeout(IO_TIMEOUT):
            reader, writer = await asyncio.open_connection(host, int(port))
        message = bytes([i]) * PAYLOAD
        writer.write(message)
        writer.write_eof()
        assert await read_all(reader, IO_TIMEOUT) == message
        await close_writer(writer)
    for address in [dead] * FAILS + [empty] * EMPTIES:
        host, _, port = address.rpartition(":")
        async with asyncio.timeout(IO_TIMEOUT):
            reader, writer = await asyncio.open_connection(host, int(port))
        with contextlib.suppress(ConnectionError):
            assert await read_all(reader, IO_TIMEOUT) == b""
        await close_writer(writer)


def figures(status: dict[str, Any], metrics: str) -> dict[str, Any]:
    """Every traffic figure of the status document and the exposition (not gauges of time)."""
    listeners = {
        lst["name"]: {k: lst[k] for k in ("active", "accepted", "connect_failed", "bytes_in",
                                           "bytes_out", "rejected", "ended")}
        for lst in status["listeners"]
    }
    backends = {
        (pool["name"], b["id"]): {k: b[k] for k in ("active", "total", "connect_failures",
                                                     "bytes_in", "bytes_out")}
        for pool in status["pools"] for b in pool["backends"]
    }
    samples = {}
    for line in metrics.splitlines():
        if line.startswith("#") or not line.startswith("pointsman_"):
            continue
        name, _, value = line.rpartition(" ")
        # Not traffic figures: time, per-process and per-socket gauges (one listening socket
        # per worker), node-wide kernel counters that other programs move too.
        if any(part in name for part in ("_seconds", "process_", "event_loop", "worker_",
                                          "_capacity", "ready", "health_check", "accept_queue",
                                          "pointsman_tcp_", "build_info")):
            continue
        samples[re.sub(r'backend="[^"]*"', "backend=*", name)] = float(value)  # ports differ
    return {"listeners": listeners, "backends": backends, "metrics": samples}


async def run_mix(workers: int) -> dict[str, Any]:
    ok, dead, empty, admin = (f"{LOOPBACK}:{free_port()}" for _ in range(4))
    with refused_port() as refused:
        async with echo_backend() as backend:
            config = mixed_config(ok, dead, empty, backend.address, refused, admin)
            async with running(config, workers=workers), admin_client(f"http://{admin}") as api:
                await send_mix(ok, dead, empty)
                expected_ended = ECHOES + FAILS

                async def settled() -> bool:
                    _, status = await api.get("/api/v1/status")
                    by_name = {lst["name"]: lst for lst in status["listeners"]}
                    ended = sum(by_name["ok"]["ended"].values()) + sum(by_name["dead"]["ended"].values())
                    empty_refused = sum(by_name["empty"]["rejected"].values())
                    return ended >= expected_ended and empty_refused >= EMPTIES \
                        and all(lst["active"] == 0 for lst in by_name.values())

                deadline = asyncio.get_running_loop().time() + REPORT_DEADLINE
                while not await settled():
                    assert asyncio.get_running_loop().time() < deadline, "figures never settled"
                    await asyncio.sleep(0.1)
                _, status = await api.get("/api/v1/status")
                _, metrics = await api.get("/metrics")
                cli = await asyncio.to_thread(subprocess.run, [
                    sys.executable, "-m", "pointsman", "status", "--admin", f"http://{admin}"],
                    capture_output=True, text=True, timeout=20)
    assert cli.returncode == 0, cli.stderr
    result = figures(status, metrics)
    # `pointsman status` columns: pool, backend, state, weight, active, conn/s, last check.
    result["cli"] = [[cell.strip() for cell in line.split("│")[1:-1]][2:6]
                     for line in cli.stdout.splitlines() if "echo" in line]
    result["role"] = status["role"]
    return result


async def test_two_workers_report_the_same_figures_as_one() -> None:
    one = await run_mix(1)
    two = await run_mix(2)
    assert (one.pop("role"), two.pop("role")) == ("single", "control")
    # Ports differ between the runs; the figures must not.
    assert two["listeners"] == one["listeners"]
    assert list(two["backends"].values()) == list(one["backends"].values())
    assert two["cli"] == one["cli"] == [["up", "1", "0", "0.0"]]
    assert two["metrics"] == one["metrics"]
    ok = one["listeners"]["ok"]
    assert (ok["bytes_in"], ok["bytes_out"]) == (ECHOES * PAYLOAD, ECHOES * PAYLOAD)
    assert one["listeners"]["dead"]["connect_failed"] == FAILS
    assert sum(one["listeners"]["empty"]["rejected"].values()) == EMPTIES
    [echo_backend_figures] = [v for (pool, _), v in one["backends"].items() if pool == "echo"]
    assert echo_backend_figures["total"] == ECHOES


# --- per-client state across workers ---------------------------------------------------------------

SOURCES = [f"127.0.0.{i}" for i in range(2, 22)]


async def test_affinity_holds_for_every_source_across_two_workers() -> None:
    """100 connections from each of 20 sources: each source always reaches one backend."""
    async with named_backends("b1", "b2") as (b1, b2):
        listen = f"{LOOPBACK}:{free_port()}"
        config = yaml.safe_dump({
            "listeners": [{"name": "lb", "bind": listen, "pool": "p"}],
            "pools": [{"name": "p", "algorithm": "round_robin",
                       "affinity": {"timeout": "10m"},
                       "backends": [b1.config(), b2.config()]}],
        })
        seen: dict[str, Counter[str]] = {source: Counter() for source in SOURCES}
        async with running(config, workers=2):

            async def client(source: str) -> None:
                for _ in range(100):
                    name, _, writer = await open_named(listen, source)
                    seen[source][name] += 1
                    await close_writer(writer)

            await asyncio.gather(*(client(source) for source in SOURCES))
    assert all(len(backends) == 1 for backends in seen.values()), seen
    assert {name for backends in seen.values() for name in backends} == {"b1", "b2"}


async def test_per_source_cap_admits_exactly_the_cap_with_two_workers() -> None:
    cap, tries = 5, 8
    async with echo_backend() as backend:
        listen = f"{LOOPBACK}:{free_port()}"
        config = yaml.safe_dump({
            "listeners": [{"name": "lb", "bind": listen, "pool": "p",
                           "limits": {"max_connections_per_source": cap}}],
            "pools": [{"name": "p", "backends": [{"address": backend.address}]}],
        })
        admitted: dict[str, int] = {}
        async with running(config, workers=2):
            streams = []
            try:
                for source in SOURCES:
                    admitted[source] = 0
                    for _ in range(tries):
                        host, _, port = listen.rpartition(":")
                        reader, writer = await asyncio.open_connection(
                            host, int(port), local_addr=(source, 0))
                        streams.append(writer)
                        try:
                            await roundtrip(reader, writer, b"ping", IO_TIMEOUT)
                        except (ConnectionError, asyncio.IncompleteReadError):
                            continue
                        admitted[source] += 1
            finally:
                for writer in streams:
                    await close_writer(writer)
    assert admitted == {source: cap for source in SOURCES}


# --- supervision -------------------------------------------------------------------------------------


def two_worker_config(listen: str, backend: str, admin: str, grace: str = "1s") -> str:
    return yaml.safe_dump({
        "workers": 2,
        "listeners": [{"name": "lb", "bind": listen, "pool": "p"}],
        "pools": [{"name": "p", "backends": [{"address": backend}]}],
        "admin": {"bind": admin},
        "shutdown_grace": grace,
    })


async def test_killed_workers_are_restarted_and_readiness_names_the_listener_meanwhile() -> None:
    listen, admin = f"{LOOPBACK}:{free_port()}", f"{LOOPBACK}:{free_port()}"
    async with echo_backend() as backend:
        config = two_worker_config(listen, backend.address, admin)
        async with running(config, workers=2) as node, admin_client(f"http://{admin}") as api:
            before = {w.index: w.pid for w in node.workers()}
            for pid in before.values():
                assert pid is not None
                os.kill(pid, signal.SIGKILL)
            seen_503 = None
            deadline = asyncio.get_running_loop().time() + 10.0
            while seen_503 is None:
                code, body = await api.get("/readyz")
                if code == 503:
                    seen_503 = body
                assert asyncio.get_running_loop().time() < deadline, "never saw 503"
                await asyncio.sleep(0.01)
            await wait_for(lambda: all(w.state == "running" for w in node.workers())
                           and all(lst.accepting for lst in node.listeners.values()),
                           15.0, what="workers back")
            code, _ = await api.get("/readyz")
            _, status = await api.get("/api/v1/status")
            host, _, port = listen.rpartition(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            await roundtrip(reader, writer, b"after restart", IO_TIMEOUT)
            await close_writer(writer)
    assert seen_503["not_accepting"] == ["lb"] and seen_503["ready"] is False
    assert code == 200
    workers = status["workers"]
    assert [w["restarts"] for w in workers] == [1, 1]
    assert [w["last_exit_code"] for w in workers] == [-signal.SIGKILL, -signal.SIGKILL]
    assert all(w["pid"] not in before.values() and w["state"] == "running" for w in workers)


async def test_workers_finish_their_connections_and_exit_when_the_control_process_is_killed(
        tmp_path: Path) -> None:
    listen, admin = f"{LOOPBACK}:{free_port()}", f"{LOOPBACK}:{free_port()}"
    async with echo_backend() as backend:
        config = two_worker_config(listen, backend.address, admin, grace="20s")
        async with pointsman_process_async(config, tmp_path) as proc, \
                admin_client(f"http://{admin}") as api:
            await wait_for_async(lambda: ready(api), 10.0)
            _, status = await api.get("/api/v1/status")
            pids = [w["pid"] for w in status["workers"]]
            host, _, port = listen.rpartition(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            await roundtrip(reader, writer, b"before", IO_TIMEOUT)
            proc.popen.kill()
            await asyncio.to_thread(proc.popen.wait, 5)
            killed_at = asyncio.get_running_loop().time()

            async def refused() -> bool:
                try:
                    _, w = await asyncio.open_connection(host, int(port))
                except ConnectionRefusedError:
                    return True
                await close_writer(w)
                return False

            await wait_for_async(refused, 5.0)
            stopped_accepting = asyncio.get_running_loop().time() - killed_at
            await roundtrip(reader, writer, b"still served", IO_TIMEOUT)  # established: carries on
            assert all(alive(pid) for pid in pids)  # waiting for that connection (grace 20 s)
            await close_writer(writer)
            await wait_for(lambda: not any(alive(pid) for pid in pids), 10.0, what="workers exit")
    print(f"workers stopped accepting {stopped_accepting:.3f}s after the control process died")
    assert stopped_accepting < 1.5


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError, ValueError), open(f"/proc/{pid}/stat") as f:
        if f.read().split(") ", 1)[1].startswith("Z"):  # a zombie has exited
            return False
    return True


async def ready(api: Admin) -> bool:
    try:
        code, _ = await api.get("/readyz")
    except aiohttp.ClientError:
        return False
    return code == 200


async def wait_for_async(predicate: Any, timeout: float) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, f"not true after {timeout}s"
        await asyncio.sleep(0.02)


async def test_node_is_typed_as_control_with_workers() -> None:
    async with echo_backend() as backend:
        listen = f"{LOOPBACK}:{free_port()}"
        config = yaml.safe_dump({
            "listeners": [{"name": "lb", "bind": listen, "pool": "p"}],
            "pools": [{"name": "p", "backends": [{"address": backend.address}]}],
        })
        async with running(config, workers=2) as node:
            assert isinstance(node, Node) and node.role == "control"
            assert [p.process for p in node.processes()] == ["control", "worker-0", "worker-1"]


# --- one thread per data-path process ----------------------------------------------------------------


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


async def test_every_process_that_carries_connections_has_one_thread(workers: int,
                                                                    tmp_path: Path) -> None:
    """In a process of more than one thread every system call takes and drops a reference on
    its descriptor's file (one thread skips that): a cost on each recv and send of the data path.
    Nothing leaves a thread behind there: the admin API bound on an address (no name lookup:
    libuv starts four resolver threads for the first and keeps them), its scrapes and status
    (their threads leave when done: loop.PassingThreads), the flow log to a file, health checks;
    with one process (where the admin API shares the data path's process) or workers."""
    listen, admin = f"{LOOPBACK}:{free_port()}", f"{LOOPBACK}:{free_port()}"
    async with echo_backend() as backend:
        config = yaml.safe_dump({
            "workers": workers,
            "listeners": [{"name": "lb", "bind": listen, "pool": "p"}],
            "pools": [{"name": "p", "health_check": {"interval": "200ms", "timeout": "100ms"},
                       "backends": [{"address": backend.address}]}],
            "admin": {"bind": admin},
            "flow_log": {"path": str(tmp_path / "flows.jsonl")},
        })
        async with pointsman_process_async(config, tmp_path) as proc, \
                admin_client(f"http://{admin}") as api:
            await wait_for_async(lambda: ready(api), 10.0)
            host, _, port = listen.rpartition(":")
            for n in range(4):
                reader, writer = await asyncio.open_connection(host, int(port))
                await roundtrip(reader, writer, b"one thread %d" % n, IO_TIMEOUT)
                await close_writer(writer)
            code, metrics = await api.get("/metrics")
            assert code == 200 and "pointsman_" in metrics
            _, status = await api.get("/api/v1/status")
            data_path = [proc.popen.pid] if workers == 1 else [w["pid"] for w in status["workers"]]
            await wait_for(lambda: all(threads(pid) == 1 for pid in data_path), 5.0,
                           what="one thread in each data-path process")
