"""exec and agent health checks, and health_check.address, against real processes and sockets.

exec: a script that exits 0 or 1 on a flag file, one that sees the backend in its environment,
and one that hangs past the timeout with a child of its own: both must be gone afterwards.
agent: a TCP server answering each word of HAProxy's grammar; the pool must apply each.
"""

from __future__ import annotations

import asyncio
import os
import stat
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from pointsman.health.probes import ProbeSpec, probe
from pointsman.pool.pool import Pool
from pointsman.pool.state import BackendState
from tests.integration.peers import config_text, listen_address, named_backends
from tests.support import LOOPBACK, free_port, running, wait_for

UP, DOWN = BackendState.UP, BackendState.DOWN
DRAINING, MAINTENANCE = BackendState.DRAINING, BackendState.MAINTENANCE

# Deadline for a state change that needs a few check intervals on a loaded 2-core VM.
SETTLE = 10.0


def script(path: Path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def gone(pid: int) -> bool:
    """True when `pid` no longer runs (gone, or a zombie waiting for its parent to reap it)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return fields[0] in ("Z", "X")


async def test_exec_exit_status_and_environment(tmp_path: Path) -> None:
    check = script(tmp_path / "check.sh", 'echo "$POINTSMAN_BACKEND_ADDRESS $POINTSMAN_BACKEND_NAME '
                   '$POINTSMAN_CHECK_PORT"\n[ -e "$FLAG" ]\n')
    os.environ["FLAG"] = str(tmp_path / "flag")
    try:
        spec = ProbeSpec(type="exec", timeout=5.0, command=(check,), environment=(
            ("POINTSMAN_BACKEND_ADDRESS", "10.0.0.1:5432"), ("POINTSMAN_BACKEND_NAME", "pg-a")))
        failed = await probe(spec, "127.0.0.1", 7000)
        (tmp_path / "flag").touch()
        passed = await probe(spec, "127.0.0.1", 7000)
    finally:
        del os.environ["FLAG"]
    assert (failed.ok, failed.detail) == (False, "exit 1: 10.0.0.1:5432 pg-a 7000")
    assert (passed.ok, passed.detail) == (True, "exit 0: 10.0.0.1:5432 pg-a 7000")


async def test_exec_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    hang = script(tmp_path / "hang.sh", f'sleep 300 &\necho "$$ $!" > {pids}\nwait\n')
    spec = ProbeSpec(type="exec", timeout=0.5, command=(hang,))
    started = time.monotonic()
    result = await probe(spec, "127.0.0.1", 1)
    assert (result.ok, result.detail) == (False, "timeout")
    assert time.monotonic() - started < 3.0
    leader, child = (int(p) for p in pids.read_text().split())
    await wait_for(lambda: gone(leader) and gone(child), 5.0, what="script and its child gone")


async def test_exec_leftovers_of_a_finished_command_are_killed(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    leaves = script(tmp_path / "leaves.sh", f'sleep 300 >/dev/null 2>&1 &\necho $! > {pids}\nexit 0\n')
    result = await probe(ProbeSpec(type="exec", timeout=5.0, command=(leaves,)), "127.0.0.1", 1)
    assert result.ok
    child = int(pids.read_text())
    await wait_for(lambda: gone(child), 5.0, what="the left-behind child gone")


async def test_exec_missing_program() -> None:
    result = await probe(ProbeSpec(type="exec", command=("/nonexistent/check",)), "127.0.0.1", 1)
    assert not result.ok and "no such file" in result.detail


async def wait_state(pool: Pool, backend: str, state: BackendState) -> None:
    await wait_for(lambda: pool.member(backend).machine.state is state, SETTLE,
                   what=f"{backend} {state.value}")


async def test_exec_check_moves_a_backend_through_the_runtime(tmp_path: Path) -> None:
    flag = tmp_path / "healthy"
    flag.touch()
    check = script(tmp_path / "check.sh", f'[ -e {flag} ] && [ "$POINTSMAN_BACKEND_NAME" = a ]\n')
    async with named_backends("a") as (a,):
        text = config_text([{"name": "lb", "bind": listen_address(), "pool": "p"}], [{
            "name": "p", "backends": [a.config()],
            "health_check": {"type": "exec", "command": [check], "interval": "0.1s",
                             "timeout": "0.1s", "rise": 1, "fall": 1}}])
        async with running(text) as runtime:
            pool = runtime.pools["p"]
            await wait_for(lambda: pool.member("a").checks >= 1, SETTLE, what="a first check")
            assert pool.member("a").machine.state is UP
            flag.unlink()
            await wait_state(pool, "a", DOWN)
            flag.touch()
            await wait_state(pool, "a", UP)


class Agent:
    """An agent-check server: answers `reply` (one line) to every connection, then closes."""

    def __init__(self) -> None:
        self.reply = b"up\n"
        self.port = 0
        self.received: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            received = await asyncio.wait_for(reader.read(100), 0.05)
        except TimeoutError:
            received = b""
        self.received.append(received)
        writer.write(self.reply)
        await writer.drain()
        writer.close()


@pytest.fixture
async def agent() -> AsyncIterator[Agent]:
    served = Agent()
    served.server = await asyncio.start_server(served._serve, LOOPBACK, 0)
    served.port = served.server.sockets[0].getsockname()[1]
    try:
        yield served
    finally:
        served.server.close()
        await served.server.wait_closed()


async def test_agent_words_are_applied(agent: Agent) -> None:
    async with named_backends("a", "b") as (a, b):
        text = config_text([{"name": "lb", "bind": listen_address(), "pool": "p"}], [{
            "name": "p", "algorithm": "weighted_round_robin",
            "backends": [a.config(weight=4, health_check_address=f"{LOOPBACK}:{agent.port}"),
                         b.config(health_check_address=f"{LOOPBACK}:{free_port()}")],
            "health_check": {"type": "agent", "interval": "0.1s", "timeout": "0.1s",
                             "rise": 2, "fall": 2, "send": "p/a\\n"}}])
        async with running(text) as runtime:
            pool = runtime.pools["p"]
            await wait_state(pool, "b", DOWN)  # nothing listens on b's agent port
            member = pool.member("a")

            def weight() -> float:
                return next(v.effective_weight for v in pool.snapshot.backends if v.id == "a")

            steps: list[tuple[bytes, Callable[[], bool]]] = [
                (b"down # disk full\n", lambda: member.machine.state is DOWN),
                (b"up\n", lambda: member.machine.state is UP),
                (b"up 50%\n", lambda: weight() == 2.0),
                (b"drain\n", lambda: member.machine.state is DRAINING),
                (b"ready\n", lambda: member.machine.state is UP),
                (b"maint\r\n", lambda: member.machine.state is MAINTENANCE),
                (b"ready 100%", lambda: member.machine.state is UP and weight() == 4.0),
                (b"maintenance\n", lambda: member.machine.state is MAINTENANCE),
                (b"ready,25%\n", lambda: member.machine.state is UP and weight() == 1.0),
            ]
            for reply, done in steps:
                agent.reply = reply
                await wait_for(done, SETTLE, what=f"after agent reply {reply!r}")
            assert agent.received[-1] == b"p/a\n"  # health_check.send, as HAProxy's agent-send
            history = [(t.new.value, t.reason) for t in member.machine.history]
            assert ("down", "health check failed: agent: down (disk full)") in history
            assert ("draining", "agent: drain") in history
            agent.reply = b"nonsense\n"
            await wait_state(pool, "a", DOWN)  # an unreadable agent is a failing check
            last = member.last_check
            assert last is not None and last.detail == "bad reply: unknown agent word 'nonsense'"


async def test_health_check_address_probes_a_sidecar() -> None:
    async with named_backends("a", "sidecar") as (a, sidecar):
        text = config_text([{"name": "lb", "bind": listen_address(), "pool": "p"}], [{
            "name": "p", "backends": [a.config()],
            "health_check": {"type": "tcp", "address": sidecar.address, "interval": "0.1s",
                             "timeout": "0.1s", "rise": 1, "fall": 1}}])
        async with running(text) as runtime:
            pool = runtime.pools["p"]
            await wait_for(lambda: sidecar.accepted >= 2, SETTLE, what="the sidecar probed")
            assert a.accepted == 0  # the backend itself is never probed
            sidecar.stop_listening()
            await wait_state(pool, "a", DOWN)
            assert pool.member("a").last_check is not None
