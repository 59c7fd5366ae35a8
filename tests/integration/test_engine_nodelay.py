"""TCP_NODELAY, identical in both engines: `add_listener(nodelay=...)` puts it on the listening
socket, which every accepted socket inherits (no system call per connection), and on or off
as asked, so a socket handed over with a stale setting follows the call; `target(nodelay=...)`
on every backend socket."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from pointsman.proxy.engine import new_engine
from pointsman.proxy.engine.simple import RoundRobinPolicy
from tests.integration.engine_support import ENGINES, open_raw
from tests.support import LOOPBACK, wait_for


def nodelay_of(local: tuple[str, int], peer: tuple[str, int]) -> int:
    """TCP_NODELAY of this process's TCP socket (the engine runs here) with this local and peer
    address, read through a duplicate descriptor."""
    for name in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                continue
            with socket.socket(fileno=os.dup(int(name))) as sock:
                if sock.family != socket.AF_INET or sock.type != socket.SOCK_STREAM:
                    continue
                if sock.getsockname() == local and sock.getpeername() == peer:
                    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        except OSError:  # gone meanwhile, or not connected
            continue
    raise AssertionError(f"no socket {local} -> {peer} in this process")


@pytest.mark.parametrize("name", ENGINES)
@pytest.mark.parametrize("nodelay", [True, False], ids=["on", "off"])
async def test_accepted_and_backend_sockets_get_nodelay(name: str, nodelay: bool) -> None:
    loop = asyncio.get_running_loop()
    engine = new_engine(loop, name)
    with socket.socket() as server, socket.socket() as sock:
        server.bind((LOOPBACK, 0))
        server.listen()
        server.setblocking(False)
        sock.bind((LOOPBACK, 0))
        sock.listen()
        # handed over with the opposite setting: the call decides
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0 if nodelay else 1)
        target = engine.target(0, LOOPBACK, server.getsockname()[1], nodelay=nodelay)
        try:
            lid = engine.add_listener(sock, RoundRobinPolicy([target]), nodelay=nodelay)
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == int(nodelay)
            client = await open_raw(sock.getsockname())
            backend, _ = await asyncio.wait_for(loop.sock_accept(server), 5.0)
            with client, backend:
                await wait_for(lambda: engine.active(lid) == 1, 5.0, what="accepted")
                want = 1 if nodelay else 0
                assert nodelay_of(client.getpeername(), client.getsockname()) == want
                assert nodelay_of(backend.getpeername(), backend.getsockname()) == want
        finally:
            engine.shutdown(0)
