"""PROXY protocol on real loopback sockets: accepting a header (required, optional, off; trusted
sources; malformed, split and never-finished headers) and sending one to the backend (v1, v2 with
TLVs, received TLVs passed through, UDP).

Headers are built with the project's builders and the backend parses what it receives with the
project's parser, so every assertion is on bytes a real peer would see.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
import yaml

from pointsman.protocols.proxy_protocol import (
    TLV_ALPN,
    TLV_AUTHORITY,
    TLV_CRC32C,
    TLV_UNIQUE_ID,
    Command,
    Family,
    ProxyHeader,
    Transport,
    build_v1,
    build_v2,
    parse,
)
from pointsman.telemetry.flow import RejectReason
from tests.support import (
    LOOPBACK,
    Backend,
    backend,
    close_writer,
    connect,
    free_port,
    one_pool_config,
    read_all,
    running,
    wait_closed,
    wait_for,
)

pytestmark = pytest.mark.timeout(30)

CLIENT = ("203.0.113.7", 40001)  # the address a trusted proxy in front of us vouches for
IO_TIMEOUT = 2.0
HEADER_TIMEOUT = 0.3  # proxy_protocol.timeout in the deadline test
TRICKLE = 0.002  # pause between single bytes so they leave as separate segments (traffic shape)


# --- a backend that records what it received -----------------------------------------------------


@dataclass
class Capture:
    """Every connection's full byte stream (to EOF), and the TCP peer it came from."""

    streams: list[bytes] = field(default_factory=list)
    peers: list[tuple[str, int]] = field(default_factory=list)
    info: Backend | None = None

    @property
    def address(self) -> str:
        assert self.info is not None
        return self.info.address


@contextlib.asynccontextmanager
async def capture_backend() -> AsyncIterator[Capture]:
    """Reads each connection to EOF, keeps the bytes, answers with their count and closes."""
    capture = Capture()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        data = await read_all(reader, IO_TIMEOUT)
        capture.peers.append((peer[0], peer[1]))
        capture.streams.append(data)
        writer.write(f"got {len(data)}\n".encode())
        await writer.drain()

    async with backend(handler) as info:
        capture.info = info
        yield capture


async def send_and_close(
    listen: str, data: bytes, *, source: str | None = None, trickle: bool = False
) -> bytes:
    """Connect (from `source` if given), send `data`, FIN, and return the whole reply."""
    host, _, port = listen.rpartition(":")
    async with asyncio.timeout(IO_TIMEOUT):
        reader, writer = await asyncio.open_connection(
            host, int(port), local_addr=(source, 0) if source else None)
    try:
        if trickle:
            writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for i in range(len(data)):
                writer.write(data[i : i + 1])
                await writer.drain()
                await asyncio.sleep(TRICKLE)
        else:
            writer.write(data)
        writer.write_eof()
        return await read_all(reader, IO_TIMEOUT)
    finally:
        await close_writer(writer)


def header_for(listen: str, version: int, client: tuple[str, int] = CLIENT, **v2: Any) -> bytes:
    host, _, port = listen.rpartition(":")
    destination = (host, int(port))
    if version == 1:
        return build_v1(client, destination)
    return build_v2(Command.PROXY, Transport.STREAM, client, destination, **v2)


def split_header(stream: bytes) -> tuple[ProxyHeader, bytes]:
    """Parse the PROXY header the backend received; return it and the payload after it."""
    parsed = parse(stream)
    assert parsed is not None, f"incomplete PROXY header at the backend: {stream[:64]!r}"
    header, used = parsed
    return header, stream[used:]


def listener_config(accept: str, **extra: Any) -> dict[str, Any]:
    return {"proxy_protocol": {"accept": accept, **extra}}


def client_hello(server_name: str, alpn: list[str] | None = None) -> bytes:
    """A real ClientHello from Python's ssl module (OpenSSL), read off a memory BIO."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if alpn:
        context.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    assert hello[:1] == b"\x16", "expected a TLS handshake record"
    return hello


# --- accepting a header --------------------------------------------------------------------------


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("accept", ["required", "optional"])
async def test_header_is_stripped_and_its_client_is_the_flow_client(
    accept: str, version: int, tmp_path: Path
) -> None:
    flows = tmp_path / "flows.jsonl"
    async with capture_backend() as peer:
        listen = f"{LOOPBACK}:{free_port()}"
        data = yaml.safe_load(one_pool_config(listen, [peer.address],
                                              listener=listener_config(accept)))
        data["flow_log"] = {"path": str(flows)}
        async with running(yaml.safe_dump(data)) as runtime:
            payload = b"hello behind a proxy\n"
            reply = await send_and_close(listen, header_for(listen, version) + payload)
            assert reply == f"got {len(payload)}\n".encode()
            stats = runtime.listeners["lb"].stats
            await wait_for(lambda: stats.active == 0, IO_TIMEOUT, what="flow ended")

            def logged() -> list[dict[str, Any]]:
                text = flows.read_text() if flows.exists() else ""
                return [json.loads(line) for line in text.splitlines() if line]

            await wait_for(lambda: len(logged()) == 1, IO_TIMEOUT, what="flow record written")

    assert peer.streams == [payload]  # the header never reaches the backend
    record = logged()[0]
    assert record["client"] == f"{CLIENT[0]}:{CLIENT[1]}", record
    assert not stats.rejected


async def test_optional_accepts_plain_traffic_with_the_tcp_peer_as_client() -> None:
    async with capture_backend() as peer:
        listen = f"{LOOPBACK}:{free_port()}"
        pool = {"proxy_protocol": {"send": "v1"}}
        config = one_pool_config(listen, [peer.address], listener=listener_config("optional"),
                                 pool=pool)
        async with running(config) as runtime:
            # "PROX" then not "Y ": a prefix of the signature that turns out to be plain data.
            for payload in (b"GET / HTTP/1.0\r\n\r\n", b"PROXIMITY alert\n"):
                await send_and_close(listen, payload, source="127.0.0.5")
    assert len(peer.streams) == 2
    for stream, payload in zip(peer.streams, (b"GET / HTTP/1.0\r\n\r\n", b"PROXIMITY alert\n"),
                               strict=True):
        header, rest = split_header(stream)
        assert header.source is not None and header.source[0] == "127.0.0.5"
        assert rest == payload
    assert not runtime.listeners["lb"].stats.rejected


async def test_accept_off_forwards_a_header_as_payload() -> None:
    async with capture_backend() as peer:
        listen = f"{LOOPBACK}:{free_port()}"
        async with running(one_pool_config(listen, [peer.address])):
            sent = header_for(listen, 2) + b"payload"
            await send_and_close(listen, sent)
    assert peer.streams == [sent]


async def test_required_refuses_a_connection_without_header() -> None:
    async with capture_backend() as peer:
        listen = f"{LOOPBACK}:{free_port()}"
        config = one_pool_config(listen, [peer.address], listener=listener_config("required"))
        async with running(config) as runtime:
            reader, writer = await connect(listen)
            writer.write(b"GET / HTTP/1.0\r\n\r\n")
            await wait_closed(reader, IO_TIMEOUT)
            await close_writer(writer)
            stats = runtime.listeners["lb"].stats
            await wait_for(lambda: stats.active == 0, IO_TIMEOUT, what="refused flow ended")
    assert stats.rejected == {RejectReason.PROXY_HEADER_MISSING: 1}
    assert peer.streams == []


async def test_header_from_an_untrusted_source_is_refused() -> None:
    async with capture_backend() as peer:
        listen = f"{LOOPBACK}:{free_port()}"
        accept = listener_config("optional", trusted_sources=["127.0.0.2/32"])
        async with running(one_pool_config(listen, [peer.address], listener=accept)) as runtime:
            stats = runtime.listeners["lb"].stats
            sent = header_for(listen, 1) + b"spoofed"
            reader, writer = await connect(listen)  # from 127.0.0.1: not trusted
            writer.write(sent)
            await wait_closed(reader, IO_TIMEOUT)
            await close_writer(writer)
            await wait_for(lambda: stats.active == 0, IO_TIMEOUT, what="refused flow ended")
            assert stats.rejected == {RejectReason.PROXY_HEADER_UNTRUSTED: 1}
            assert peer.info is not None and peer.info.accepted == 0
            # The same header from the trusted address goes through, stripped.
            assert await send_and_close(listen, sent, source="127.0.0.2") == b"got 7\n"
    assert peer.streams == [b"spoofed"]
    assert stats.rejected == {RejectReason.PROXY_HEADER_UNTRUSTED: 1}


@pytest.mark.parametrize("bad", [
    b"PROXY TCP4 999.0.0.1 127.0.0.1 1 2\r\n",  # not an IPv4 address
    b"PROXY TCP4 1.2.3.4 127.0.0.1 01 2\r\n",  # heading zero in a port
    b"PROXY " + b"A" * 120,  # no CRLF within 107 bytes
    b"\r\n\r\n\x00\r\nQUIT\n\x31\x11\x00\x0c" + bytes(12),  # v2 with version 3
], ids=["v1-address", "v1-port", "v1-too-long", "v2-version"])
async def test_malformed_header_closes_only_that_connection(bad: bytes) -> None:
    async with capture_backend() as peer:
        listen = f"{LOOPBACK}:{free_port()}"
        config = one_pool_config(listen, [peer.address], listener=listener_config("required"))
        async with running(config) as runtime:
            stats = runtime.listeners["lb"].stats
            # A good connection already open, before the bad one arrives...
            good_reader, good_writer = await connect(listen)
            good_writer.write(header_for(listen, 2) + b"first ")
            reader, writer = await connect(listen)
            writer.write(bad)
            await wait_closed(reader, IO_TIMEOUT)
            await close_writer(writer)
            await wait_for(lambda: stats.rejected[RejectReason.BAD_PROXY_HEADER] == 1, IO_TIMEOUT,
                           what="bad header counted")
            # ... still carries data after it, and a new one after it works too.
            good_writer.write(b"second")
            good_writer.write_eof()
            assert await read_all(good_reader, IO_TIMEOUT) == b"got 12\n"
            await close_writer(good_writer)
            assert await send_and_close(listen, header_for(listen, 1) + b"third") == b"got 5\n"
    assert sorted(peer.streams) == [b"first second", b"third"]
    assert stats.rejected == {RejectReason.BAD_PROXY_HEADER: 1}


@pytest.mark.parametrize("version", [1, 2])
async def test_header_split_byte_by_byte(version: int) -> None:
    async with capture_backend() as peer:
        listen = f"{LOOPBACK}:{free_port()}"
        pool = {"proxy_protocol": {"send": "v2"}}
        config = one_pool_config(listen, [peer.address], listener=listener_config("required"),
                                 pool=pool)
        async with running(config):
            payload = b"after a trickled header"
            await send_and_close(listen, header_for(listen, version) + payload, trickle=True)
    header, rest = split_header(peer.streams[0])
    assert header.source == CLIENT
    assert rest == payload


async def test_header_that_never_completes_times_out() -> None:
    async with capture_backend() as peer:
        listen = f"{LOOPBACK}:{free_port()}"
        accept = listener_config("required", timeout=f"{HEADER_TIMEOUT * 1000:.0f}ms")
        async with running(one_pool_config(listen, [peer.address], listener=accept)) as runtime:
            stats = runtime.listeners["lb"].stats
            reader, writer = await connect(listen)
            loop = asyncio.get_running_loop()
            began = loop.time()
            writer.write(b"PROXY TCP4 203.0.113.7 ")  # a valid prefix, and then nothing
            await wait_closed(reader, HEADER_TIMEOUT + 2.0)
            waited = loop.time() - began
            await close_writer(writer)
            await wait_for(lambda: stats.active == 0, IO_TIMEOUT, what="timed-out flow ended")
    assert HEADER_TIMEOUT * 0.9 <= waited <= HEADER_TIMEOUT + 1.0, waited
    assert stats.rejected == {RejectReason.INSPECT_TIMEOUT: 1}
    assert peer.streams == []


async def test_header_client_picks_the_backend_with_a_hash_policy() -> None:
    """source_hash keys on the header's client, not on the proxy's address (always 127.0.0.1)."""
    async with capture_backend() as first, capture_backend() as second:
        listen = f"{LOOPBACK}:{free_port()}"
        pool = {"algorithm": "source_hash", "proxy_protocol": {"send": "v1"}}
        config = one_pool_config(listen, [first.address, second.address],
                                 listener=listener_config("required"), pool=pool)
        clients = [(f"198.51.100.{i}", 5000 + i) for i in range(1, 13)]
        async with running(config):
            for _ in range(2):  # every client twice, with a different source port the second time
                for ip, port in clients:
                    await send_and_close(listen, header_for(listen, 1, (ip, port)) + ip.encode())

    placed: dict[str, set[int]] = {}
    for index, peer in enumerate((first, second)):
        for stream in peer.streams:
            header, rest = split_header(stream)
            assert header.source is not None and rest.decode() == header.source[0]
            placed.setdefault(rest.decode(), set()).add(index)
    assert sorted(placed) == sorted(ip for ip, _ in clients)
    assert all(len(backends) == 1 for backends in placed.values()), placed  # sticky per client
    assert {next(iter(b)) for b in placed.values()} == {0, 1}  # and both backends chosen


# --- sending a header ----------------------------------------------------------------------------


async def test_send_v1_carries_the_received_client_and_destination() -> None:
    async with capture_backend() as peer:
        listen = f"{LOOPBACK}:{free_port()}"
        config = one_pool_config(listen, [peer.address], listener=listener_config("required"),
                                 pool={"proxy_protocol": {"send": "v1"}})
        async with running(config):
            vouched = build_v2(Command.PROXY, Transport.STREAM, CLIENT, ("192.0.2.10", 443))
            await send_and_close(listen, vouched + b"data")
    header, rest = split_header(peer.streams[0])
    assert header.version == 1
    assert header.source == CLIENT
    assert header.destination == ("192.0.2.10", 443)
    assert rest == b"data"


async def test_send_v2_with_authority_and_unique_id_tlvs() -> None:
    """The authority TLV is the SNI the ClientHello carried; the hello itself follows unchanged."""
    async with capture_backend() as peer:
        listen = f"{LOOPBACK}:{free_port()}"
        data = {
            "listeners": [{
                "name": "lb", "bind": listen, "default_pool": "p",
                "proxy_protocol": {"accept": "required"},
                "tls_routes": [{"server_names": ["db.example.com"], "pool": "p"}],
            }],
            "pools": [{
                "name": "p", "backends": [{"address": peer.address}],
                "proxy_protocol": {"send": "v2", "tlvs": {"authority": True, "unique_id": True}},
            }],
        }
        async with running(yaml.safe_dump(data)):
            hello = client_hello("db.example.com")
            for _ in range(2):
                await send_and_close(listen, header_for(listen, 1) + hello)
    ids = []
    for stream in peer.streams:
        header, rest = split_header(stream)
        assert (header.version, header.command) == (2, Command.PROXY)
        assert (header.family, header.transport) == (Family.INET, Transport.STREAM)
        assert header.source == CLIENT
        assert header.tlv(TLV_AUTHORITY) == b"db.example.com"
        unique = header.tlv(TLV_UNIQUE_ID)
        assert unique is not None and len(unique) == 16
        ids.append(unique)
        assert rest == hello
    assert len(ids) == 2 and ids[0] != ids[1]


async def test_received_tlvs_are_passed_through() -> None:
    async with capture_backend() as peer:
        listen = f"{LOOPBACK}:{free_port()}"
        config = one_pool_config(listen, [peer.address], listener=listener_config("required"),
                                 pool={"proxy_protocol": {"send": "v2"}})
        async with running(config):
            tlvs = [(TLV_ALPN, b"h2"), (0xE0, b"tenant-7"), (0xE1, b"")]
            vouched = header_for(listen, 2, tlvs=tlvs, crc32c=True)
            await send_and_close(listen, vouched + b"x")
    header, rest = split_header(peer.streams[0])
    assert header.source == CLIENT
    assert list(header.tlvs) == tlvs  # in order; the old CRC32C described the old header
    assert header.tlv(TLV_CRC32C) is None
    assert rest == b"x"


# --- UDP -----------------------------------------------------------------------------------------


class HeaderStrippingEcho(asyncio.DatagramProtocol):
    """Parses the v2 header in front of each datagram and answers with the payload uppercased."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.headers: list[ProxyHeader] = []
        self.payloads: list[bytes] = []
        self.errors: list[str] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)  # uvloop's: no subclass

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        parsed = parse(data)
        if parsed is None:
            self.errors.append(f"no complete header in {data[:32]!r}")
            return
        header, used = parsed
        self.headers.append(header)
        self.payloads.append(data[used:])
        assert self.transport is not None
        self.transport.sendto(data[used:].upper(), addr)


class Replies(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.queue.put_nowait(data)


async def test_udp_every_datagram_gets_a_v2_dgram_header() -> None:
    loop = asyncio.get_running_loop()
    back_transport, back = await loop.create_datagram_endpoint(
        HeaderStrippingEcho, local_addr=(LOOPBACK, 0))
    back_port = back_transport.get_extra_info("sockname")[1]
    listen_port = free_port(kind=socket.SOCK_DGRAM)
    listen = f"{LOOPBACK}:{listen_port}"
    config = one_pool_config(listen, [f"{LOOPBACK}:{back_port}"], listener={"protocol": "udp"},
                             pool={"proxy_protocol": {"send": "v2"}})
    client_transport, client = await loop.create_datagram_endpoint(
        Replies, local_addr=(LOOPBACK, 0))
    client_addr = client_transport.get_extra_info("sockname")
    payloads = [b"first", b"second datagram", b"x" * 1200]
    try:
        async with running(config):
            for payload in payloads:
                client_transport.sendto(payload, (LOOPBACK, listen_port))
                async with asyncio.timeout(IO_TIMEOUT):
                    assert await client.queue.get() == payload.upper()
    finally:
        client_transport.close()
        back_transport.close()
    assert back.errors == []
    assert back.payloads == payloads  # boundaries kept: one header per datagram, nothing else
    for header in back.headers:
        assert (header.version, header.command) == (2, Command.PROXY)
        assert (header.family, header.transport) == (Family.INET, Transport.DGRAM)
        assert header.source == (client_addr[0], client_addr[1])
        assert header.destination == (LOOPBACK, listen_port)
