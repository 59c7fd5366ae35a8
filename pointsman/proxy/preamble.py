"""What a TCP connection says before its payload: an optional PROXY header, then (for TLS
routing) a ClientHello that is peeked at, never consumed. Pure: bytes in, a decision out.

`Preamble.feed(buffer)` takes every byte received so far and returns None (need more), a
`Decision`, or raises `ProtocolError` (malformed header or hello) or `Refused` (a header from an
untrusted source, or none where one is required).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from pointsman.protocols.errors import ProtocolError
from pointsman.protocols.proxy_protocol import Command, Detected, Family, ProxyHeader, detect, parse
from pointsman.protocols.tls_clienthello import ClientHelloReader, looks_like_tls, match_server_name


class Refusal(enum.StrEnum):
    MISSING_HEADER = "proxy_header_missing"
    UNTRUSTED_HEADER = "proxy_header_untrusted"


class Refused(Exception):
    def __init__(self, reason: Refusal) -> None:
        super().__init__(reason.value)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Route:
    server_names: tuple[str, ...]
    alpn: tuple[str, ...]
    pool: str

    def matches(self, server_name: str | None, alpn: Sequence[str]) -> bool:
        """Every criterion the route names must match (names: any of them; ALPN: any offered)."""
        if self.server_names and (server_name is None or not any(
                match_server_name(pattern, server_name) for pattern in self.server_names)):
            return False
        return not self.alpn or any(protocol in self.alpn for protocol in alpn)


@dataclass(frozen=True, slots=True)
class Decision:
    header: ProxyHeader | None
    consumed: int  # bytes of PROXY header to strip; everything after is forwarded as is
    pool: str
    server_name: str | None = None
    unrouted: bool = False  # a ClientHello that matched no TLS route (counted for F7 alerts)

    @property
    def client(self) -> tuple[str, int] | None:
        """The client address the header carries (None: use the TCP peer)."""
        header = self.header
        if header is None or header.command is not Command.PROXY:
            return None
        if header.family in (Family.INET, Family.INET6) and isinstance(header.source, tuple):
            return header.source
        return None


class Preamble:
    def __init__(
        self,
        accept: str,
        trusted: bool,
        routes: Sequence[Route],
        default_pool: str,
    ) -> None:
        self.accept = accept
        self.trusted = trusted
        self.routes = routes
        self.default_pool = default_pool
        self._header: ProxyHeader | None = None
        self._consumed: int | None = None if accept != "off" else 0
        self._hello = ClientHelloReader()
        self._fed = 0

    @property
    def may_replace_peer(self) -> bool:
        """A PROXY header from this peer would be believed: the client address is not known
        until it has been read."""
        return self.accept != "off" and self.trusted

    @property
    def in_header(self) -> bool:
        """True while the PROXY header stage is not over (errors then are header errors)."""
        return self._consumed is None

    def feed(self, buffer: bytes | bytearray) -> Decision | None:
        if self._consumed is None and not self._read_header(buffer):
            return None
        start = self._consumed or 0
        if not self.routes:
            return Decision(self._header, start, self.default_pool)
        rest = memoryview(buffer)[start:]
        if not rest:
            return None
        if not looks_like_tls(rest[0]):
            return Decision(self._header, start, self.default_pool)
        hello = self._hello.feed(rest[self._fed:])  # the reader takes only new bytes
        self._fed = len(rest)
        if hello is None:
            return None
        for route in self.routes:
            if route.matches(hello.server_name, hello.alpn):
                return Decision(self._header, start, route.pool, hello.server_name)
        return Decision(self._header, start, self.default_pool, hello.server_name, unrouted=True)

    def _read_header(self, buffer: bytes | bytearray) -> bool:
        """True once the PROXY stage is over (header parsed, or plain traffic where optional)."""
        kind = detect(buffer)
        if kind is Detected.NEED_MORE:
            return False
        if kind is Detected.PLAIN:
            if self.accept == "required":
                raise Refused(Refusal.MISSING_HEADER)
            self._consumed = 0
            return True
        if not self.trusted:
            raise Refused(Refusal.UNTRUSTED_HEADER)
        parsed = parse(buffer)
        if parsed is None:
            return False
        self._header, self._consumed = parsed
        return True


__all__ = ["Decision", "Preamble", "ProtocolError", "Refusal", "Refused", "Route"]
