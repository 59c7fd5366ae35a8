"""Drain deadlines and maintenance that closes sessions, through real sockets, with one process
and with workers: connections to a draining backend live until `drain_timeout` (the pool's, or
the one given to that drain), then are closed and counted as `drain_timeout`; maintenance with
`{"close": true}` closes them at once (`closed_by_operator`); other backends' connections carry
on. With workers the control process owns the deadline and tells each worker to close."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from pointsman.telemetry.flow import EndReason
from tests.integration.operator_support import TOKEN, admin_node, open_connections
from tests.integration.peers import exchange, named_backends
from tests.support import wait_closed, wait_for

STEP = 5.0


async def still_open(connections: list[tuple[str, asyncio.StreamReader, asyncio.StreamWriter]]
                     ) -> None:
    for name, reader, writer in connections:
        await exchange(reader, writer, f"{name} still here\n".encode())


async def test_the_pools_drain_timeout_closes_what_is_left(tmp_path: Path, workers: int) -> None:
    async with named_backends("a", "b") as peers, \
            admin_node(tmp_path, peers, workers, drain_timeout="600ms") as n:
        connections = await open_connections(n.listen, 8)
        on_a = [c for c in connections if c[0] == "a"]
        on_b = [c for c in connections if c[0] == "b"]
        assert on_a and on_b
        code, body = await n.call("POST", "/api/v1/pools/p/backends/a/drain")
        assert code == 200 and body["state"] == "draining"
        assert n.backend("a")["drain_closes_in"] is not None
        await still_open(on_a)  # draining is not closing: they live until the deadline
        for _, reader, _ in on_a:
            assert await wait_closed(reader, STEP) in ("eof", "reset")
        await still_open(on_b)
        await wait_for(lambda: n.stats().ended[EndReason.DRAIN_TIMEOUT] == len(on_a), STEP,
                       what="the closed connections counted as drain_timeout")
        assert n.backend("a")["drain_closes_in"] is None
        assert n.backend("a")["state"] == "draining"
        assert n.stats().ended[EndReason.CLOSED_BY_OPERATOR] == 0
        for _, _, writer in on_b:
            writer.close()


async def test_a_timeout_given_to_one_drain_overrides_the_pools(tmp_path: Path,
                                                                workers: int) -> None:
    async with named_backends("a", "b") as peers, \
            admin_node(tmp_path, peers, workers, drain_timeout="1h") as n:
        connections = await open_connections(n.listen, 6)
        on_a = [c for c in connections if c[0] == "a"]
        assert (await n.call("POST", "/api/v1/pools/p/backends/a/drain",
                             {"timeout": "soon"}))[0] == 400
        assert (await n.call("POST", "/api/v1/pools/p/backends/a/drain", {"wait": 1}))[0] == 400
        assert n.backend("a")["state"] == "up"  # refused calls change nothing
        code, body = await n.call("POST", "/api/v1/pools/p/backends/a/drain", {"timeout": "300ms"})
        assert (code, body["timeout"], body["state"]) == (200, 0.3, "draining")
        for _, reader, _ in on_a:
            assert await wait_closed(reader, STEP) in ("eof", "reset")
        await wait_for(lambda: n.stats().ended[EndReason.DRAIN_TIMEOUT] == len(on_a), STEP,
                       what="drain_timeout counted")
        for _, _, writer in connections:
            writer.close()


async def test_enable_before_the_deadline_keeps_the_connections(tmp_path: Path) -> None:
    async with named_backends("a", "b") as peers, \
            admin_node(tmp_path, peers, drain_timeout="400ms") as n:
        connections = await open_connections(n.listen, 4)
        on_a = [c for c in connections if c[0] == "a"]
        assert (await n.call("POST", "/api/v1/pools/p/backends/a/drain"))[0] == 200
        assert (await n.call("POST", "/api/v1/pools/p/backends/a/enable"))[0] == 200
        assert n.backend("a")["drain_closes_in"] is None
        await asyncio.sleep(0.6)  # past the deadline the drain had: nothing may close them
        await still_open(on_a)
        assert n.stats().ended[EndReason.DRAIN_TIMEOUT] == 0
        for _, _, writer in connections:
            writer.close()


async def test_maintenance_with_close_ends_the_sessions_now(tmp_path: Path, workers: int) -> None:
    async with named_backends("a", "b") as peers, admin_node(tmp_path, peers, workers) as n:
        connections = await open_connections(n.listen, 6)
        on_b = [c for c in connections if c[0] == "b"]
        on_a = [c for c in connections if c[0] == "a"]
        await wait_for(lambda: n.backend("b")["active"] == len(on_b), STEP,
                       what="the control process counts b's connections")
        code, body = await n.call("POST", "/api/v1/pools/p/backends/b/maintenance",
                                  {"close": True})
        assert (code, body["state"], body["closed"]) == (200, "maintenance", len(on_b))
        for _, reader, _ in on_b:
            assert await wait_closed(reader, STEP) in ("eof", "reset")
        await still_open(on_a)
        await wait_for(lambda: n.stats().ended[EndReason.CLOSED_BY_OPERATOR] == len(on_b), STEP,
                       what="closed_by_operator counted")
        # Without close, maintenance leaves open connections alone (as before).
        assert (await n.call("POST", "/api/v1/pools/p/backends/a/maintenance"))[0] == 200
        await still_open(on_a)
        assert (await n.call("POST", "/api/v1/pools/p/backends/a/maintenance",
                             {"close": "yes"}))[0] == 400
        for _, _, writer in on_a:
            writer.close()


async def test_cli_drain_timeout_and_maintenance_close(tmp_path: Path) -> None:
    async with named_backends("a", "b") as peers, admin_node(tmp_path, peers) as n:
        connections = await open_connections(n.listen, 4)
        on_a = [c for c in connections if c[0] == "a"]
        on_b = [c for c in connections if c[0] == "b"]
        (tmp_path / "cli.token").write_text(TOKEN)

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "pointsman", *args, "--admin", n.url,
                                   "--token-file", str(tmp_path / "cli.token")],
                                  capture_output=True, text=True, timeout=30)

        result = await asyncio.to_thread(cli, "drain", "p", "a", "--timeout", "200ms")
        assert result.returncode == 0, result.stderr
        assert result.stdout == f"p/a: draining ({len(on_a)} active); closing what is left in 200ms\n"
        for _, reader, _ in on_a:
            assert await wait_closed(reader, STEP) in ("eof", "reset")
        result = await asyncio.to_thread(cli, "maintenance", "p", "b", "--close")
        assert result.returncode == 0, result.stderr
        assert result.stdout == f"p/b: maintenance (0 active); closed {len(on_b)}\n"
        for _, reader, _ in on_b:
            assert await wait_closed(reader, STEP) in ("eof", "reset")
        bad = await asyncio.to_thread(cli, "drain", "p", "a", "--timeout", "later")
        assert bad.returncode == 2 and "--timeout" in bad.stderr
