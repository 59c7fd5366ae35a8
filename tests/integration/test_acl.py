"""Listener allow/deny lists through real sockets: allowed, denied, both, IPv6 and IPv4-mapped,
PROXY-header addresses, UDP, reload, the admin API and the CLI.

Clients pick their source address inside 127.0.0.0/8 (every one of them is local on Linux), so
one test host plays many clients. Denied connections are closed before anything is read: the
backend never sees them and the listener counts them as `denied`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from pointsman.app import build_node
from pointsman.config.loader import load_file
from pointsman.node.runtime import Node as Runtime
from pointsman.proxy.udp import UdpListener
from pointsman.telemetry.flow import DropReason, RejectReason
from tests.integration.peers import NamedBackend, ask_name, named_backends, tcp_stats
from tests.integration.udp_support import udp_clients, udp_echo
from tests.support import LOOPBACK, LOOPBACK6, free_port, has_ipv6, hostport, wait_for

TOKEN = "acl-t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
STEP = 5.0


async def refused(address: str, source: str | None = None, send: bytes = b"") -> bool:
    """True when the listener closes the connection without a byte of the backend's greeting."""
    host, _, port = address.rpartition(":")
    local = (source, 0) if source is not None else None
    async with asyncio.timeout(STEP):
        reader, writer = await asyncio.open_connection(host.strip("[]"), int(port), local_addr=local)
        try:
            if send:
                writer.write(send)
            data = await reader.read(100)
        except ConnectionResetError:
            data = b""
        finally:
            writer.transport.abort()
    return data == b""


def config(listen: str, backend: NamedBackend, admin: str | None = None, **listener: Any) -> str:
    data: dict[str, Any] = {
        "listeners": [{"name": "lb", "bind": listen, "pool": "p", **listener}],
        "pools": [{"name": "p", "backends": [backend.config()]}],
        "shutdown_grace": "0.2s",
    }
    if admin is not None:
        data["admin"] = {"bind": admin, "token_file": "token"}
    return yaml.safe_dump(data, sort_keys=False)


@dataclass
class Node:
    runtime: Runtime
    path: Path
    listen: str
    url: str
    http: aiohttp.ClientSession

    async def call(self, method: str, path: str, body: Any = None,
                   headers: dict[str, str] | None = None) -> tuple[int, Any]:
        async with self.http.request(method, self.url + path, json=body,
                                     headers=AUTH if headers is None else headers) as r:
            return r.status, await r.json()

    async def reload(self, text: str) -> None:
        self.path.write_text(text)
        assert await self.runtime.reload() == []


@contextlib.asynccontextmanager
async def node(tmp_path: Path, backend: NamedBackend, workers: int = 1,
               **listener: Any) -> AsyncIterator[Node]:
    """pointsman in this loop, loaded from a file (reload re-reads it), admin with a token; with
    `workers` > 1 a control process here and worker processes."""
    (tmp_path / "token").write_text(TOKEN)
    listen = f"{LOOPBACK}:{free_port()}"
    admin = f"{LOOPBACK}:{free_port()}"
    path = tmp_path / "pointsman.yaml"
    path.write_text(config(listen, backend, admin, **listener).replace(
        "token_file: token", f"token_file: {tmp_path / 'token'}"))
    runtime = build_node(load_file(path), config_path=path, announce=lambda line: None,
                         workers=workers)
    await runtime.start()
    try:
        await wait_for(lambda: all(lst.accepting for lst in runtime.listeners.values()), 10.0)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            yield Node(runtime, path, listen, f"http://{admin}", http)
    finally:
        await runtime.shutdown()


def text_for(n: Node, backend: NamedBackend, **listener: Any) -> str:
    """The node's config file with other listener keys (for a reload)."""
    return config(n.listen, backend, n.url.removeprefix("http://"), **listener).replace(
        "token_file: token", f"token_file: {n.path.parent / 'token'}")


async def test_allowed_denied_and_both(tmp_path: Path) -> None:
    async with named_backends("a") as (a,), node(tmp_path, a, allow=["127.0.0.0/29"],
                                                   deny=["127.0.0.2", "127.0.0.6/31"]) as n:
        assert await ask_name(n.listen, "127.0.0.1") == "a"  # allowed
        assert await ask_name(n.listen, "127.0.0.5") == "a"
        assert await refused(n.listen, "127.0.0.2")  # allowed and denied: deny wins
        assert await refused(n.listen, "127.0.0.7")
        assert await refused(n.listen, "127.0.0.9")  # outside the allow list
        assert tcp_stats(n.runtime).rejected[RejectReason.DENIED] == 3
        assert a.accepted == 2  # the backend never saw a denied client


async def test_denied_before_any_byte_is_read(tmp_path: Path) -> None:
    """With a PROXY header required, a denied peer's header is never even parsed."""
    async with named_backends("a") as (a,), node(tmp_path, a, deny=["127.0.0.3"],
                                                   proxy_protocol={"accept": "required"}) as n:
        assert await refused(n.listen, "127.0.0.3", send=b"garbage that is no PROXY header\r\n")
        stats = tcp_stats(n.runtime)
        assert stats.rejected[RejectReason.DENIED] == 1
        assert stats.rejected[RejectReason.BAD_PROXY_HEADER] == 0


@pytest.mark.skipif(not has_ipv6(), reason="no IPv6 on this host")
async def test_ipv6_and_ipv4_mapped_clients() -> None:
    from tests.support import running

    async with named_backends("a") as (a,):
        listen6 = hostport(LOOPBACK6, free_port(LOOPBACK6))
        text = yaml.safe_dump({
            "listeners": [{"name": "v6", "bind": listen6, "pool": "p", "deny": ["::1/128"]},
                          {"name": "v6ok", "bind": hostport(LOOPBACK6, free_port(LOOPBACK6)),
                           "pool": "p", "allow": ["::1"], "deny": ["127.0.0.0/8"]}],
            "pools": [{"name": "p", "backends": [a.config()]}]})
        async with running(text) as runtime:
            assert await refused(listen6)
            assert tcp_stats(runtime, "v6").rejected[RejectReason.DENIED] == 1
            assert await ask_name(str(runtime.config.listeners[1].bind)) == "a"
            # A v4 client seen as ::ffff:127.0.0.1 on a dual-stack socket is judged as IPv4.
            listener = runtime.listeners["v6ok"]
            assert listener.acl is not None  # type: ignore[union-attr]
            assert listener.acl.refuses("::ffff:127.0.0.1")  # type: ignore[union-attr]


async def test_proxy_header_address_is_judged_when_asked(tmp_path: Path) -> None:
    header = b"PROXY TCP4 203.0.113.5 192.0.2.1 40000 443\r\n"
    other = b"PROXY TCP4 198.51.100.7 192.0.2.1 40000 443\r\n"
    pp = {"accept": "required", "trusted_sources": ["127.0.0.0/8"]}
    async with named_backends("a") as (a,), node(tmp_path, a, proxy_protocol=pp,
                                                   acl_on="proxy_header",
                                                   deny=["203.0.113.0/24"]) as n:
        assert await refused(n.listen, send=header)
        assert not await refused(n.listen, send=other)
        assert tcp_stats(n.runtime).rejected[RejectReason.DENIED] == 1
        # acl_on: peer judges the TCP peer (127.0.0.1 here), never the header's address.
        await n.reload(text_for(n, a, proxy_protocol=pp, deny=["203.0.113.0/24"]))
        assert not await refused(n.listen, send=header)


async def becomes_refused(address: str, source: str) -> None:
    """With workers, a list set through the API reaches them a moment after the API answered."""
    deadline = asyncio.get_running_loop().time() + 5.0
    while not await refused(address, source):
        assert asyncio.get_running_loop().time() < deadline, f"{source} still served"


async def test_reload_and_the_admin_api(tmp_path: Path, workers: int) -> None:
    async with named_backends("a") as (a,), node(tmp_path, a, workers,
                                                   deny=["127.0.0.2"]) as n:
        assert await n.call("GET", "/api/v1/listeners/lb/deny") == (200, ["127.0.0.2/32"])
        assert await n.call("PUT", "/api/v1/listeners/lb/deny", ["127.0.0.2", "127.0.0.3/32"],
                            headers={}) == (401, {"error": "a bearer token is required"})
        assert await n.call("PUT", "/api/v1/listeners/lb/deny",
                            ["127.0.0.2", "127.0.0.3/32"]) == (200, ["127.0.0.2/32", "127.0.0.3/32"])
        await becomes_refused(n.listen, "127.0.0.3")
        code, body = await n.call("PUT", "/api/v1/listeners/lb/deny", ["127.0.0.300"])
        assert code == 400 and "127.0.0.300" in body["error"]
        assert (await n.call("PUT", "/api/v1/listeners/lb/deny", {"deny": []}))[0] == 400
        assert (await n.call("GET", "/api/v1/listeners/nope/deny"))[0] == 404
        assert await n.call("GET", "/api/v1/listeners/lb/deny") == (200, ["127.0.0.2/32",
                                                                          "127.0.0.3/32"])
        # A reload that leaves the file's deny list alone keeps the list set through the API ...
        await n.reload(text_for(n, a, deny=["127.0.0.2"], max_connections=50))
        assert await refused(n.listen, "127.0.0.3")
        # ... a reload that changes it takes the file's.
        await n.reload(text_for(n, a, deny=["127.0.0.4"]))
        assert await n.call("GET", "/api/v1/listeners/lb/deny") == (200, ["127.0.0.4/32"])
        assert await ask_name(n.listen, "127.0.0.3") == "a"
        assert await refused(n.listen, "127.0.0.4")
        # The allow list has the same two routes; an empty one means no allow list.
        assert await n.call("PUT", "/api/v1/listeners/lb/allow", ["127.0.0.1"]) == (
            200, ["127.0.0.1/32"])
        await becomes_refused(n.listen, "127.0.0.5")
        assert await n.call("PUT", "/api/v1/listeners/lb/allow", []) == (200, [])
        await wait_for_served(n.listen, "127.0.0.5")


async def wait_for_served(address: str, source: str) -> None:
    deadline = asyncio.get_running_loop().time() + 5.0
    while await refused(address, source):
        assert asyncio.get_running_loop().time() < deadline, f"{source} still refused"


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_a_restarted_worker_keeps_the_lists_set_through_the_api(tmp_path: Path) -> None:
    async with named_backends("a") as (a,), node(tmp_path, a, 2) as n:
        assert (await n.call("PUT", "/api/v1/listeners/lb/deny", ["127.0.0.3"]))[0] == 200
        await becomes_refused(n.listen, "127.0.0.3")
        for worker in n.runtime.workers():
            assert worker.pid is not None
            os.kill(worker.pid, signal.SIGKILL)
        await wait_for(lambda: all(w.restarts == 1 and w.state == "running"
                                   for w in n.runtime.workers())
                       and all(lst.accepting for lst in n.runtime.listeners.values()), 15.0,
                       what="both workers restarted")
        for _ in range(20):  # every connection lands on a restarted worker
            assert await refused(n.listen, "127.0.0.3")
        assert await ask_name(n.listen, "127.0.0.4") == "a"


async def test_cli_deny(tmp_path: Path) -> None:
    async with named_backends("a") as (a,), node(tmp_path, a) as n:
        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "pointsman", *args, "--admin", n.url,
                 "--token-file", str(tmp_path / "token")],
                capture_output=True, text=True, timeout=20)

        done = await asyncio.to_thread(cli, "deny", "lb", "127.0.0.2", "127.0.0.8/30")
        assert (done.returncode, done.stdout) == (
            0, "lb: deny 2 prefixes\n  127.0.0.2/32\n  127.0.0.8/30\n"), done.stderr
        assert await refused(n.listen, "127.0.0.9")
        done = await asyncio.to_thread(cli, "deny", "lb", "--remove", "127.0.0.8/30")
        assert (done.returncode, done.stdout) == (0, "lb: deny 1 prefix\n  127.0.0.2/32\n")
        assert await ask_name(n.listen, "127.0.0.9") == "a"
        done = await asyncio.to_thread(cli, "deny", "lb", "not-a-prefix")
        assert done.returncode == 2 and "not-a-prefix" in done.stderr
        done = await asyncio.to_thread(cli, "deny", "nope", "127.0.0.2")
        assert done.returncode == 1 and "404" in done.stderr


async def test_udp_denied_datagrams_and_sessions() -> None:
    from tests.support import running

    async with udp_echo() as backend:
        port = free_port(kind=socket.SOCK_DGRAM)
        text = yaml.safe_dump({
            "listeners": [{"name": "u", "bind": f"{LOOPBACK}:{port}", "protocol": "udp",
                           "pool": "p", "deny": ["127.0.0.2"]}],
            "pools": [{"name": "p", "backends": [{"address": backend.address}]}]})
        async with running(text) as runtime:
            listener = runtime.listeners["u"]
            assert isinstance(listener, UdpListener)
            async with udp_clients((LOOPBACK, port), 1) as (client,):
                await client.request(b"hello")
                denied = await asyncio.get_running_loop().create_datagram_endpoint(
                    asyncio.DatagramProtocol, local_addr=("127.0.0.2", 0))
                denied[0].sendto(b"let me in", (LOOPBACK, port))
                await wait_for(lambda: listener.stats.drops[DropReason.DENIED] == 1, STEP,
                               what="the denied datagram counted")
                denied[0].close()
                assert backend.count == 1
                # Denying a source with a live session ends the session at once.
                listener.set_acl(listener.acl_lists.replaced("deny", ["127.0.0.1"]))
                assert listener.stats.sessions_ended["denied"] == 1 and not listener.sessions
                client.send(b"after")
                await wait_for(lambda: listener.stats.drops[DropReason.DENIED] == 2, STEP,
                               what="the next datagram dropped")
                assert backend.count == 1
