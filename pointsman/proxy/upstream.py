"""Opening the backend side of a TCP connection: which source address, and the PROXY header
pointsman sends first when the pool asks for one."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from collections.abc import Callable, Sequence

from pointsman.config.model import PoolConfig
from pointsman.protocols.proxy_protocol import (
    TLV_CRC32C,
    TLV_NOOP,
    Command,
    ProxyHeader,
    Transport,
    build_v1,
    build_v2,
    tlv_authority,
    tlv_unique_id,
)
from pointsman.proxy.sockets import family_of

IP_TRANSPARENT = 19  # linux/in.h; Python 3.11 has no constant
# A source address that cannot be bound, or has no ephemeral port left to this backend.
NO_SOURCE_ADDRESS = (errno.EADDRNOTAVAIL, errno.EADDRINUSE)
UNIQUE_ID_BYTES = 16  # random per connection: unique enough, well under the spec's 128


def outgoing_header(
    config: PoolConfig,
    client: tuple[str, int],
    local: tuple[str, int] | None,
    received: ProxyHeader | None,
    server_name: str | None,
    transport: Transport = Transport.STREAM,
) -> bytes:
    """The PROXY header for the backend (b"" when the pool sends none).

    The destination is what the client connected to: the received header's, else our own address.
    Received v2 TLVs are passed through (but their CRC32C and NOOP, which describe the old header).
    """
    mode = config.proxy_protocol.send
    if mode == "off":
        return b""
    destination = received.destination if received is not None and isinstance(
        received.destination, tuple) else local
    if mode == "v1":
        return build_v1(client, destination)
    tlvs = [(t, v) for t, v in (received.tlvs if received else ()) if t not in (TLV_CRC32C, TLV_NOOP)]
    if config.proxy_protocol.tlvs.authority and server_name:
        tlvs.append(tlv_authority(server_name))
    if config.proxy_protocol.tlvs.unique_id:
        tlvs.append(tlv_unique_id(os.urandom(UNIQUE_ID_BYTES)))
    return build_v2(Command.PROXY, transport, client, destination, tlvs)


async def open_connection(
    loop: asyncio.AbstractEventLoop,
    factory: Callable[[], asyncio.Protocol],
    host: str,
    port: int,
    config: PoolConfig,
    client_ip: str,
    turn: int,
) -> asyncio.Transport:
    """Connect to a backend, from the address the pool's `source` asks for.

    - transparent: from the client's own address (IP_TRANSPARENT; needs CAP_NET_ADMIN and the
      routing described in docs/edge.md);
    - addresses: from one of several local addresses in turn, so one backend can take more than
      one address's worth of ephemeral ports; an address that cannot be used (gone from the
      host, or out of ports to this backend) is skipped for the next;
    - default: whatever the kernel picks.
    """
    source = config.source
    if source.mode == "transparent":
        sock = socket.socket(family_of(host), socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            sock.bind((client_ip, 0))
            await loop.sock_connect(sock, (host, port))
        except BaseException:
            sock.close()
            raise
        transport, _ = await loop.create_connection(factory, sock=sock)
    elif source.addresses:
        transport = await _connect_from_addresses(loop, factory, host, port, source.addresses, turn)
    else:
        transport, _ = await loop.create_connection(factory, host, port)
    return transport


async def _connect_from_addresses(
    loop: asyncio.AbstractEventLoop,
    factory: Callable[[], asyncio.Protocol],
    host: str,
    port: int,
    addresses: Sequence[str],
    turn: int,
) -> asyncio.Transport:
    """Start at address `turn`; on "no such local address" or "no free port" try the next one, so
    one unusable address does not fail every connection whose turn it is. Raises the last error
    when no address works."""
    for step in range(len(addresses)):
        local = addresses[(turn + step) % len(addresses)]
        try:
            transport, _ = await loop.create_connection(factory, host, port, local_addr=(local, 0))
        except OSError as exc:
            if exc.errno not in NO_SOURCE_ADDRESS or step == len(addresses) - 1:
                raise
            continue
        return transport
    raise ValueError("source.addresses is empty")
