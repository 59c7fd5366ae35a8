"""The connection preamble (PROXY header, then ClientHello peek), fed in every split."""

from __future__ import annotations

import pytest

from pointsman.protocols.errors import ProtocolError
from pointsman.protocols.proxy_protocol import Command, Transport, build_v1, build_v2
from pointsman.proxy.preamble import Preamble, Refusal, Refused, Route
from tests.unit.protocols.hello_builder import client_hello

ROUTES = (
    Route(("db.example.com", "*.db.example.com"), (), "db"),
    Route((), ("h2",), "grpc"),
)


def build_client_hello(server_name: str, alpn: tuple[str, ...] = ("http/1.1",)) -> bytes:
    return client_hello(server_name=server_name.encode(), protocols=[p.encode() for p in alpn])


def feed_bytewise(preamble: Preamble, data: bytes):  # type: ignore[no-untyped-def]
    """Feed the growing buffer one byte at a time; only the last call may decide."""
    for end in range(1, len(data)):
        assert preamble.feed(data[:end]) is None
    return preamble.feed(data)


def test_v2_header_then_hello_routes_by_sni_and_keeps_hello_bytes() -> None:
    header = build_v2(Command.PROXY, Transport.STREAM, ("198.51.100.7", 40000), ("10.0.0.1", 443))
    hello = build_client_hello(server_name="a.db.example.com")
    decision = feed_bytewise(Preamble("required", True, ROUTES, "web"), header + hello)
    assert decision.pool == "db"
    assert decision.consumed == len(header)
    assert decision.client == ("198.51.100.7", 40000)
    assert decision.server_name == "a.db.example.com"


def test_alpn_route_and_default() -> None:
    assert Preamble("off", True, ROUTES, "web").feed(
        build_client_hello(server_name="x.example", alpn=("h2",))).pool == "grpc"
    assert Preamble("off", True, ROUTES, "web").feed(
        build_client_hello(server_name="x.example")).pool == "web"
    plain = Preamble("off", True, ROUTES, "web").feed(b"GET / HTTP/1.1\r\n")
    assert plain is not None and (plain.pool, plain.consumed) == ("web", 0)


def test_optional_accept_takes_plain_traffic_and_v1() -> None:
    plain = Preamble("optional", True, (), "app").feed(b"hello")
    assert plain is not None and plain.header is None and plain.client is None
    line = build_v1(("192.0.2.1", 1234), ("192.0.2.2", 80))
    decision = feed_bytewise(Preamble("optional", True, (), "app"), line)
    assert decision.consumed == len(line) and decision.client == ("192.0.2.1", 1234)
    with_payload = Preamble("optional", True, (), "app").feed(line + b"payload")
    assert with_payload is not None and with_payload.consumed == len(line)


def test_refusals_and_errors() -> None:
    with pytest.raises(Refused) as missing:
        Preamble("required", True, (), "app").feed(b"plain bytes")
    assert missing.value.reason is Refusal.MISSING_HEADER
    with pytest.raises(Refused) as untrusted:
        Preamble("optional", False, (), "app").feed(build_v1(("192.0.2.1", 1), ("192.0.2.2", 2)))
    assert untrusted.value.reason is Refusal.UNTRUSTED_HEADER
    with pytest.raises(ProtocolError):
        Preamble("required", True, (), "app").feed(b"PROXY TCP4 300.1.1.1 1.1.1.1 1 2\r\n")
    broken = bytearray(build_client_hello(server_name="db.example.com"))
    broken[5] = 2  # handshake type: server_hello, not client_hello
    with pytest.raises(ProtocolError):
        Preamble("off", True, ROUTES, "web").feed(bytes(broken))


def test_local_command_keeps_the_tcp_peer() -> None:
    header = build_v2(Command.LOCAL, Transport.UNSPEC, None, None)
    decision = Preamble("required", True, (), "app").feed(header)
    assert decision is not None and decision.client is None and decision.consumed == len(header)
