"""Helpers for the UDP tests: echo backends and clients as asyncio datagram endpoints on loopback.

- `udp_echo(host)` runs an echo backend in the test's loop. It replies with the exact payload and
  records every datagram with the address it came from, which is the side channel that tells a
  test which backend (and which upstream socket, i.e. which session) carried a client's datagram.
- `UdpClient` is one client socket; `request()` sends a datagram and asserts that the exact bytes
  come back, from the listener's own address, within a deadline.
- `udp_config()` writes the YAML for one UDP listener `u` in front of one pool `p`.

Nothing here sleeps to synchronise: receives have deadlines and polls go through `wait_for`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any, cast

import yaml

from pointsman.node.runtime import Node
from pointsman.proxy.udp import UdpListener
from tests.support import LOOPBACK, LOOPBACK6, has_ipv6, hostport

# A reply on loopback takes well under a millisecond; this is the deadline of a test that expects
# one, generous for a loaded 2-core VM.
REPLY_TIMEOUT = 2.0

# Largest UDP payloads: 65535 minus the IPv4 (20) and UDP (8) headers; over IPv6 the 40-byte
# header is not part of the 65535-byte payload length, so only the UDP header counts.
MAX_PAYLOAD_V4 = 65507
MAX_PAYLOAD_V6 = 65527

Addr = tuple[str, int]


def short(addr: tuple[Any, ...]) -> Addr:
    """(host, port) of a socket address (IPv6 ones carry flowinfo and scope id too)."""
    return (str(addr[0]), int(addr[1]))


def family_hosts() -> list[str]:
    return [LOOPBACK, LOOPBACK6] if has_ipv6() else [LOOPBACK]


def max_payload(host: str) -> int:
    return MAX_PAYLOAD_V6 if ":" in host else MAX_PAYLOAD_V4


# --- backends ------------------------------------------------------------------------------------


class UdpEcho(asyncio.DatagramProtocol):
    """An echo backend: replies with exactly what it received, to whoever sent it."""

    def __init__(self, host: str, *, echo: bool = True) -> None:
        self.host = host
        self.port = 0
        self.echo = echo
        self.transport: asyncio.DatagramTransport | None = None
        self.received: list[tuple[Addr, bytes]] = []
        self.by_source: Counter[Addr] = Counter()
        self.lost = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        source = short(addr)
        self.received.append((source, data))
        self.by_source[source] += 1
        if self.echo and self.transport is not None:
            self.transport.sendto(data, addr)

    @property
    def address(self) -> str:
        return hostport(self.host, self.port)

    @property
    def count(self) -> int:
        return len(self.received)

    def push(self, data: bytes, to: Addr) -> None:
        """Send an unsolicited datagram (a server push) to an upstream socket of pointsman."""
        assert self.transport is not None
        self.transport.sendto(data, to)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set()

    def close(self) -> None:
        """Close at teardown; the socket itself closes a moment later, in a loop callback."""
        if self.transport is not None:
            self.transport.close()
            self.transport = None

    async def kill(self) -> None:
        """Kill the backend and return once its port is closed: from then on the kernel answers
        datagrams to it with ICMP port unreachable (until then they would just be lost)."""
        self.close()
        async with asyncio.timeout(REPLY_TIMEOUT):
            await self.lost.wait()


async def start_echo(host: str = LOOPBACK, port: int = 0, *, echo: bool = True) -> UdpEcho:
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    _, protocol = await loop.create_datagram_endpoint(
        lambda: UdpEcho(host, echo=echo), local_addr=(host, port), family=family
    )
    assert protocol.transport is not None
    protocol.port = short(protocol.transport.get_extra_info("sockname"))[1]
    return protocol


@contextlib.asynccontextmanager
async def udp_echo(host: str = LOOPBACK, *, echo: bool = True) -> AsyncIterator[UdpEcho]:
    backend = await start_echo(host, echo=echo)
    try:
        yield backend
    finally:
        backend.close()


@contextlib.asynccontextmanager
async def udp_echoes(host: str = LOOPBACK, count: int = 2) -> AsyncIterator[list[UdpEcho]]:
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(udp_echo(host)) for _ in range(count)]


# --- clients -------------------------------------------------------------------------------------


class _ClientProtocol(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, Addr]] = asyncio.Queue()
        self.errors: list[Exception] = []

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.queue.put_nowait((data, short(addr)))

    def error_received(self, exc: Exception) -> None:
        self.errors.append(exc)


class UdpClient:
    """One client socket talking to one listener address."""

    def __init__(
        self, transport: asyncio.DatagramTransport, protocol: _ClientProtocol, server: Addr
    ) -> None:
        self.transport = transport
        self.protocol = protocol
        self.server = server
        self.local = short(transport.get_extra_info("sockname"))

    @classmethod
    async def open(cls, server: Addr) -> UdpClient:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
        host = LOOPBACK6 if family == socket.AF_INET6 else LOOPBACK
        transport, protocol = await loop.create_datagram_endpoint(
            _ClientProtocol, local_addr=(host, 0), family=family
        )
        return cls(transport, protocol, server)

    def send(self, data: bytes) -> None:
        self.transport.sendto(data, self.server)

    async def recv(self, timeout: float = REPLY_TIMEOUT) -> bytes:
        """The next datagram; it must come from the listener's address."""
        async with asyncio.timeout(timeout):
            data, source = await self.protocol.queue.get()
        assert source == self.server, f"reply from {source}, expected the listener {self.server}"
        return data

    async def request(self, data: bytes, timeout: float = REPLY_TIMEOUT) -> None:
        """Send `data` and assert the exact same bytes come back."""
        self.send(data)
        got = await self.recv(timeout)
        assert len(got) == len(data), f"sent {len(data)} bytes, got {len(got)} back"
        assert got == data, f"payload of {len(data)} bytes came back altered"

    def pending(self) -> int:
        """Datagrams received and not yet read."""
        return self.protocol.queue.qsize()

    def close(self) -> None:
        self.transport.close()


@contextlib.asynccontextmanager
async def udp_clients(server: Addr, count: int = 1) -> AsyncIterator[list[UdpClient]]:
    clients: list[UdpClient] = []
    try:
        for _ in range(count):
            clients.append(await UdpClient.open(server))
        yield clients
    finally:
        for client in clients:
            client.close()


# --- pointsman ----------------------------------------------------------------------------------


def udp_config(
    bind: str,
    backends: list[str],
    *,
    udp: dict[str, Any] | None = None,
    pool: dict[str, Any] | None = None,
) -> str:
    """YAML for one UDP listener `u` in front of one pool `p` (extra keys merge in)."""
    data = {
        "listeners": [
            {"name": "u", "bind": bind, "protocol": "udp", "pool": "p", "udp": udp or {}}
        ],
        "pools": [{"name": "p", "backends": [{"address": a} for a in backends], **(pool or {})}],
        "shutdown_grace": "1s",
    }
    return yaml.safe_dump(data, sort_keys=False)


def udp_listener(runtime: Node, name: str = "u") -> UdpListener:
    listener = runtime.listeners[name]
    assert isinstance(listener, UdpListener)
    return listener


def listener_addr(runtime: Node, name: str = "u") -> Addr:
    return short(udp_listener(runtime, name).sock.getsockname())


def bound_addr(runtime: Node, name: str = "u") -> Addr:
    """Where listener `name` listens, from its config: also for a control process, whose workers
    hold the sockets (`listener_addr` reads the socket of a listener served in this process)."""
    bind = runtime.listeners[name].config.bind.single
    return (bind.host, bind.port)


def session_source(listener: UdpListener, client: UdpClient) -> Addr:
    """The upstream address a client's session uses: what its backend sees as the source."""
    session = listener.sessions[client.local]
    assert session.sock is not None, "the session has no upstream socket"
    return short(session.sock.getsockname())
