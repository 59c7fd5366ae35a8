"""A listener on several addresses and port ranges, through real sockets, with one process and
with workers: every address serves, UDP replies leave by the port the client wrote to (one
session per port), a reload that changes the list restarts the listener on the new set, and the
status document, `check` and the accept-queue metrics see every socket."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pointsman.admin.status import status
from pointsman.proxy.udp import UdpListener
from tests.integration.operator_support import admin_node, names_reached
from tests.integration.peers import named_backends
from tests.integration.udp_support import udp_clients, udp_echo
from tests.support import LOOPBACK, LOOPBACK6, free_port, free_range, has_ipv6, hostport, running

STEP = 5.0


async def test_a_list_and_a_range_serve_on_every_address(tmp_path: Path, workers: int) -> None:
    first = free_range(3)
    other = free_port("127.0.0.2")
    addresses = [hostport(LOOPBACK, first + i) for i in range(3)] + [hostport("127.0.0.2", other)]
    binds = [f"{LOOPBACK}:{first}-{first + 2}", f"127.0.0.2:{other}"]
    if has_ipv6():
        six = free_port(LOOPBACK6)
        binds.append(hostport(LOOPBACK6, six))
        addresses.append(hostport(LOOPBACK6, six))
    async with named_backends("a") as peers, admin_node(tmp_path, peers, workers,
                                                        listen=binds[0]) as n:
        n.data["listeners"][0]["bind"] = binds
        await n.reload()
        for address in addresses:
            assert await names_reached(address, 2) == ["a", "a"], address
        [listener] = status(n.node)["listeners"]
        assert listener["binds"] == binds and listener["bind"] == ", ".join(binds)
        assert listener["accepting"]
        code, text = await metrics_text(n)
        assert code == 200
        line = next(ln for ln in text.splitlines()
                    if ln.startswith('pointsman_accept_queue_sockets{listener="lb"'))
        assert float(line.split()[-1]) == len(addresses) * workers  # one socket per address each
        # A reload that narrows the range restarts the listener on the new set.
        n.data["listeners"][0]["bind"] = f"{LOOPBACK}:{first}-{first + 1}"
        await n.reload()
        assert await names_reached(addresses[1], 1) == ["a"]
        with pytest.raises(OSError):
            await names_reached(addresses[2], 1)


async def metrics_text(n: object) -> tuple[int, str]:
    http, url = n.http, n.url  # type: ignore[attr-defined]
    async with http.get(url + "/metrics") as response:
        return response.status, await response.text()


async def test_udp_replies_leave_by_the_port_the_client_wrote_to(workers: int) -> None:
    first = free_range(2)
    async with udp_echo() as backend:
        text = yaml.safe_dump({
            "listeners": [{"name": "u", "bind": f"{LOOPBACK}:{first}-{first + 1}",
                           "protocol": "udp", "pool": "p"}],
            "pools": [{"name": "p", "backends": [{"address": backend.address}]}]})
        async with running(text, workers=workers) as node:
            for port in (first, first + 1):
                async with udp_clients((LOOPBACK, port)) as [client]:
                    await client.request(f"to {port}".encode())  # asserts the reply's source
            # One client socket to both ports: two sessions, each answered from its own port.
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.bind((LOOPBACK, 0))
                sock.settimeout(STEP)
                for port in (first, first + 1, first):
                    sock.sendto(f"hello {port}".encode(), (LOOPBACK, port))
                    data, source = await asyncio.to_thread(sock.recvfrom, 100)
                    assert (data, source) == (f"hello {port}".encode(), (LOOPBACK, port))
                if workers == 1:
                    [listener] = node.listeners.values()
                    assert isinstance(listener, UdpListener)
                    me = sock.getsockname()
                    mine = [key for key in listener.sessions if key[:2] == me]
                    assert sorted(mine) == [(*me, -1, 0), (*me, -1, 1)]


async def test_check_names_the_entry_that_cannot_be_bound(tmp_path: Path) -> None:
    first = free_range(3)
    taken = socket.socket()
    taken.bind((LOOPBACK, first + 1))
    taken.listen()
    path = tmp_path / "binds.yaml"
    path.write_text(yaml.safe_dump({
        "listeners": [{"name": "lb", "bind": [f"{LOOPBACK}:{free_port()}",
                                              f"{LOOPBACK}:{first}-{first + 2}"], "pool": "p"}],
        "pools": [{"name": "p", "backends": [{"address": f"{LOOPBACK}:9"}]}]}, sort_keys=False))
    try:
        result = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "pointsman", "check", str(path)],
            capture_output=True, text=True, timeout=30)
    finally:
        taken.close()
    line = path.read_text().splitlines().index(f"  - {LOOPBACK}:{first}-{first + 2}") + 1
    assert result.returncode == 1
    assert f"{path}:{line}: listeners[0].bind[1]: cannot bind {LOOPBACK}:{first + 1}/tcp: " \
           "address already in use" in result.stderr


async def test_a_taken_port_refuses_the_whole_listener(workers: int) -> None:
    """Binding is all or nothing: a range with one taken port does not start half bound."""
    first = free_range(2)
    taken = socket.socket()
    taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    taken.bind((LOOPBACK, first + 1))
    taken.listen()
    text = yaml.safe_dump({
        "listeners": [{"name": "lb", "bind": f"{LOOPBACK}:{first}-{first + 1}", "pool": "p"}],
        "pools": [{"name": "p", "backends": [{"address": f"{LOOPBACK}:9"}]}]})
    try:
        with pytest.raises(Exception) as caught:
            async with running(text, workers=workers):
                pass
    finally:
        taken.close()
    assert f"{LOOPBACK}:{first + 1}" in str(caught.value)
