"""The engines' keepalive options, identical in both: `target(keepalive=...)` on every backend
socket, `add_listener(keepalive=...)` / `set_listener_keepalive` on the listening socket (which
accepted sockets inherit), bounds checked when given. What a dead peer does to a connection is
tested through the listener in a namespace (test_keepalive.py)."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from pointsman.proxy.engine import new_engine
from pointsman.proxy.engine.api import Keepalive
from pointsman.proxy.engine.simple import RoundRobinPolicy
from tests.integration.engine_support import ENGINES, open_raw, proxy
from tests.support import LOOPBACK, wait_for


def keepalive_of(sock: socket.socket) -> tuple[int, int, int, int]:
    return (sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT))


@pytest.mark.parametrize("name", ENGINES)
@pytest.mark.parametrize("bad", [Keepalive(0, 1, 1), Keepalive(1, 32768, 1), Keepalive(1, 1, 128)])
async def test_out_of_range_values_are_refused(name: str, bad: Keepalive) -> None:
    engine = new_engine(asyncio.get_running_loop(), name)
    try:
        with pytest.raises(ValueError, match="keepalive"):
            engine.target(1, LOOPBACK, 9, keepalive=bad)
        with socket.socket() as sock:
            sock.bind((LOOPBACK, 0))
            sock.listen()
            with pytest.raises(ValueError, match="keepalive"):
                engine.add_listener(sock, object(), keepalive=bad)  # type: ignore[arg-type]
    finally:
        engine.shutdown(0)


def own_socket(local: tuple[str, int], peer: tuple[str, int]) -> tuple[int, int, int, int]:
    """The keepalive options of the TCP socket of this process (the engine runs here) with this
    local and peer address, read through a duplicate descriptor."""
    for name in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                continue
            with socket.socket(fileno=os.dup(int(name))) as sock:
                if sock.family != socket.AF_INET or sock.type != socket.SOCK_STREAM:
                    continue
                if sock.getsockname() == local and sock.getpeername() == peer:
                    return keepalive_of(sock)
        except OSError:  # gone meanwhile, or not connected
            continue
    raise AssertionError(f"no socket {local} -> {peer} in this process")


@pytest.mark.parametrize("name", ENGINES)
async def test_backend_and_listener_sockets_get_the_options(name: str) -> None:
    loop = asyncio.get_running_loop()
    with socket.socket() as server:
        server.bind((LOOPBACK, 0))
        server.listen()
        server.setblocking(False)
        async with proxy(name, [server.getsockname()[1]], keepalive=Keepalive(13, 4, 3)) as p:
            p.engine.set_listener_keepalive(p.lid, Keepalive(21, 2, 5))
            assert keepalive_of(p.sock) == (1, 21, 2, 5)  # on the listening socket itself
            client = await open_raw(p.address)
            backend, _ = await asyncio.wait_for(loop.sock_accept(server), 5.0)
            with client, backend:
                # the proxy's socket to the backend, and the one it accepted from the client
                assert own_socket(backend.getpeername(), backend.getsockname()) == (1, 13, 4, 3)
                assert own_socket(client.getpeername(), client.getsockname()) == (1, 21, 2, 5)
                p.engine.set_listener_keepalive(p.lid, None)
                assert keepalive_of(p.sock)[0] == 0
                second = await open_raw(p.address)
                with second:
                    await wait_for(lambda: p.engine.active(p.lid) == 2, 5.0, what="accepted")
                    assert own_socket(second.getpeername(), second.getsockname())[0] == 0
                    # the first connection keeps what it had
                    assert own_socket(client.getpeername(), client.getsockname()) == (1, 21, 2, 5)


@pytest.mark.parametrize("name", ENGINES)
async def test_a_handed_over_socket_loses_a_stale_keepalive(name: str) -> None:
    """A listening socket that comes with keepalive on (systemd's KeepAlive=, an earlier run)
    follows the config: none configured is off."""
    engine = new_engine(asyncio.get_running_loop(), name)
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        sock.listen()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        try:
            engine.add_listener(sock, RoundRobinPolicy([]))
            assert keepalive_of(sock)[0] == 0
        finally:
            engine.shutdown(0)
