"""Runtime changes without a reload, through real sockets, with one process and with workers:
backends added and removed through the admin API, weights that survive reloads (they used to
revert), and `state_file`: what a restart reads back, and where the file wins."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import yaml

from pointsman.protect.acl import AclLists
from tests.integration.operator_support import (
    TOKEN,
    admin_node,
    names_reached,
    open_connections,
    run_node,
)
from tests.integration.peers import exchange, named_backends
from tests.support import wait_closed, wait_for

STEP = 5.0


async def reached_only(address: str, wanted: set[str], count: int = 12) -> None:
    """Every one of `count` new connections reaches a backend of `wanted` (with workers, a
    change reaches each worker a moment after the API answered)."""
    deadline = asyncio.get_running_loop().time() + STEP
    while True:
        seen = set(await names_reached(address, count))
        if seen <= wanted:
            return
        assert asyncio.get_running_loop().time() < deadline, f"reached {seen}, wanted {wanted}"


async def test_a_weight_set_through_the_api_survives_a_reload(tmp_path: Path, workers: int) -> None:
    async with named_backends("a", "b") as peers, admin_node(tmp_path, peers, workers) as n:
        assert set(await names_reached(n.listen, 8)) == {"a", "b"}
        assert await n.call("PUT", "/api/v1/pools/p/backends/a/weight", {"weight": 0}) == (
            200, {"pool": "p", "backend": "a", "weight": 0})
        await reached_only(n.listen, {"b"})
        assert n.backend("a")["weight_set_at_runtime"]
        # A reload that does not touch a's weight keeps the one set at run time ...
        await n.reload(connect_timeout="3s")
        assert n.backend("a")["weight"] == 0
        await reached_only(n.listen, {"b"})
        # ... a reload that changes it in the file takes the file's.
        n.data["pools"][0]["backends"][0]["weight"] = 2
        await n.reload()
        assert n.backend("a")["weight"] == 2 and not n.backend("a")["weight_set_at_runtime"]
        deadline = asyncio.get_running_loop().time() + STEP
        while "a" not in await names_reached(n.listen, 12):
            assert asyncio.get_running_loop().time() < deadline, "a never served again"


async def test_backends_added_and_removed_at_run_time(tmp_path: Path, workers: int) -> None:
    async with named_backends("a", "b") as (a, b), admin_node(tmp_path, [a], workers) as n:
        code, body = await n.call("POST", "/api/v1/pools/p/backends",
                                  {"address": b.address, "name": "b", "weight": 2})
        assert code == 201, body
        assert (body["backend"], body["address"], body["state"]) == ("b", b.address, "up")
        assert n.backend("b")["added_at_runtime"]
        deadline = asyncio.get_running_loop().time() + STEP
        while "b" not in await names_reached(n.listen, 12):  # the workers have it too
            assert asyncio.get_running_loop().time() < deadline, "b never served"
        # Mistakes are refused and change nothing.
        assert (await n.call("POST", "/api/v1/pools/p/backends",
                             {"address": b.address, "name": "b"}))[0] == 409
        code, body = await n.call("POST", "/api/v1/pools/p/backends", {"address": "nowhere"})
        assert code == 400 and "address" in body["error"]
        assert (await n.call("POST", "/api/v1/pools/p/backends", {"address": b.address,
                                                                  "weight": 9999}))[0] == 400
        assert (await n.call("POST", "/api/v1/pools/q/backends", {"address": b.address}))[0] == 404
        assert (await n.call("DELETE", "/api/v1/pools/p/backends/c"))[0] == 404
        # A reload keeps the backend added at run time.
        await n.reload(connect_timeout="3s")
        assert [m.id for m in n.node.pools["p"].members()] == ["a", "b"]
        # Removing a with a connection open: it drains, and goes once the connection ends.
        _, reader, writer = await first_to(n.listen, "a")
        code, body = await n.call("DELETE", "/api/v1/pools/p/backends/a")
        assert (code, body["removed"], body["state"]) == (202, False, "draining")
        assert n.backend("a")["removing"]
        await exchange(reader, writer, b"still served\n")
        writer.close()
        await wait_for(lambda: [m.id for m in n.node.pools["p"].members()] == ["b"], STEP,
                       what="a removed once its connection ended")
        await reached_only(n.listen, {"b"})
        assert (await n.call("DELETE", "/api/v1/pools/p/backends/b"))[0] == 409  # the last one
        # A reload of a file that still has a, unchanged: a stays removed.
        await n.reload(connect_timeout="4s")
        assert [m.id for m in n.node.pools["p"].members()] == ["b"]
        # A file that changes a's entry brings it back.
        n.data["pools"][0]["backends"][0]["weight"] = 3
        await n.reload()
        assert [m.id for m in n.node.pools["p"].members()] == ["a", "b"]


async def first_to(address: str, name: str) -> tuple[str, asyncio.StreamReader,
                                                     asyncio.StreamWriter]:
    for _ in range(40):
        [(got, reader, writer)] = await open_connections(address, 1)
        if got == name:
            return got, reader, writer
        writer.close()
    raise AssertionError(f"no connection reached {name}")


async def test_a_removal_waits_at_most_the_drain_timeout(tmp_path: Path, workers: int) -> None:
    async with named_backends("a", "b") as peers, \
            admin_node(tmp_path, peers, workers, drain_timeout="300ms") as n:
        _, reader, writer = await first_to(n.listen, "a")
        code, body = await n.call("DELETE", "/api/v1/pools/p/backends/a")
        assert (code, body["removed"]) == (202, False)
        # cut at the deadline (a reset: the client must not take it for a complete stream)
        assert await wait_closed(reader, STEP) == "reset"
        await wait_for(lambda: [m.id for m in n.node.pools["p"].members()] == ["b"], STEP,
                       what="a removed")
        writer.close()


async def test_enable_cancels_a_removal(tmp_path: Path) -> None:
    async with named_backends("a", "b") as peers, admin_node(tmp_path, peers) as n:
        _, _, writer = await first_to(n.listen, "a")
        assert (await n.call("DELETE", "/api/v1/pools/p/backends/a"))[0] == 202
        assert (await n.call("POST", "/api/v1/pools/p/backends/a/enable"))[0] == 200
        writer.close()
        await wait_for(lambda: n.backend("a")["active"] == 0, STEP, what="a idle")
        n.node.changes.tick()  # what the next tick would do: nothing left to remove
        assert not n.backend("a")["removing"] and n.backend("a")["state"] == "up"
        assert [m.id for m in n.node.pools["p"].members()] == ["a", "b"]


async def test_the_state_file_brings_runtime_changes_back_after_a_restart(
        tmp_path: Path, workers: int) -> None:
    state = tmp_path / "state.json"
    async with named_backends("a", "b", "c", "d") as (a, b, c, d):
        async with admin_node(tmp_path, [a, b, c], workers) as n:
            n.data["state_file"] = str(state)
            n.data["listeners"][0]["deny"] = ["127.0.0.9"]
            await n.reload()
            assert (await n.call("PUT", "/api/v1/pools/p/backends/a/weight", {"weight": 5}))[0] == 200
            assert (await n.call("POST", "/api/v1/pools/p/backends/b/drain"))[0] == 200
            assert (await n.call("POST", "/api/v1/pools/p/backends",
                                 {"address": d.address, "name": "d"}))[0] == 201
            # No connection to c: removed at once by one process; workers report every half
            # second, so the control process waits for a report taken after the drain.
            assert (await n.call("DELETE", "/api/v1/pools/p/backends/c"))[0] == (
                200 if workers == 1 else 202)
            await wait_for(lambda: "c" not in {m.id for m in n.node.pools["p"].members()}, STEP,
                           what="c removed")
            assert (await n.call("PUT", "/api/v1/listeners/lb/deny",
                                 ["127.0.0.9", "127.0.0.10"]))[0] == 200
            await wait_for(lambda: state.exists() and "127.0.0.10" in state.read_text()
                           and n.node.changes.statistics()["state_file"]["writes"] >= 1, STEP,
                           what="the state file written")
            saved = json.loads(state.read_text())
            assert saved["pools"]["p"]["backends"]["a"] == {"weight": 5, "file_weight": 1}
            assert saved["pools"]["p"]["backends"]["b"] == {"state": "draining"}
            assert saved["pools"]["p"]["removed"]["c"]["name"] == "c"
            status = (await n.call("GET", "/api/v1/status"))[1]["runtime"]
            assert status["state_file"]["path"] == str(state) and status["state_file"]["writes"] >= 1
        # A restart: the runtime changes are back, as they were.
        async with run_node(n.path, workers) as node:
            pool = node.pools["p"]
            assert {m.id: (m.weight, m.machine.state.value) for m in pool.members()} == {
                "a": (5, "up"), "b": (1, "draining"), "d": (1, "up")}
            lists = node.listeners["lb"].acl_lists  # type: ignore[attr-defined]
            assert isinstance(lists, AclLists)
            assert lists.deny == ("127.0.0.9/32", "127.0.0.10/32")
            assert Counter(await names_reached(n.listen, 12)).keys() <= {"a", "d"}
        # The file changed a's weight and the deny list meanwhile: the file wins for those.
        data = yaml.safe_load(n.path.read_text())
        data["pools"][0]["backends"][0]["weight"] = 2
        data["listeners"][0]["deny"] = ["127.0.0.11"]
        n.path.write_text(yaml.safe_dump(data))
        async with run_node(n.path, workers) as node:
            pool = node.pools["p"]
            assert {m.id: (m.weight, m.machine.state.value) for m in pool.members()} == {
                "a": (2, "up"), "b": (1, "draining"), "d": (1, "up")}
            assert node.listeners["lb"].acl_lists.deny == ("127.0.0.11/32",)  # type: ignore[attr-defined]
        saved = json.loads(state.read_text())
        assert "a" not in saved["pools"]["p"]["backends"]  # forgotten: the file won
        assert "lb" not in saved.get("listeners", {})


async def test_a_bad_state_file_is_kept_aside_and_the_node_starts(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    state.write_text("{ not json")
    async with named_backends("a") as peers, \
            admin_node(tmp_path, peers, state_file=str(state)) as n:
        assert await names_reached(n.listen, 2) == ["a", "a"]
        [aside] = tmp_path.glob("state.json.bad-*")
        assert aside.read_text() == "{ not json"


async def test_cli_backend_add_and_remove(tmp_path: Path) -> None:
    async with named_backends("a", "b") as (a, b), admin_node(tmp_path, [a]) as n:
        (tmp_path / "cli.token").write_text(TOKEN)

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "pointsman", *args, "--admin", n.url,
                                   "--token-file", str(tmp_path / "cli.token")],
                                  capture_output=True, text=True, timeout=30)

        result = await asyncio.to_thread(cli, "backend", "add", "p", b.address, "--weight", "3")
        assert result.returncode == 0, result.stderr
        assert result.stdout == f"p/{b.address}: added ({b.address}, up)\n"
        assert n.node.pools["p"].member(b.address).weight == 3
        result = await asyncio.to_thread(cli, "backend", "remove", "p", "a")
        assert (result.returncode, result.stdout) == (0, "p/a: removed\n"), result.stderr
        result = await asyncio.to_thread(cli, "backend", "remove", "p", "a")
        assert result.returncode == 1 and "404" in result.stderr and "no backend 'a'" in result.stderr
        assert [m.id for m in n.node.pools["p"].members()] == [b.address]
