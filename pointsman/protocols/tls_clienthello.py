"""Peek at a TLS ClientHello to route by SNI and ALPN, sans-I/O. No TLS is terminated here.

Sources: RFC 8446 (TLS 1.3) sections 4.1.2 (ClientHello), 4.2 (extensions), 4.2.1
(supported_versions) and 5.1 (record layer); RFC 6066 section 3 (server_name); RFC 7301 section
3.1 (ALPN); RFC 6125 section 6.4.3 (wildcard names).

Every entry point has three outcomes: a `ClientHello`; None, meaning the bytes so far are a valid
prefix and more are needed; or `ProtocolError`. The bytes themselves are never modified or
consumed: the data plane forwards them unchanged to the chosen backend.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pointsman.protocols.errors import ProtocolError, Reason

CONTENT_HANDSHAKE = 22
# Other RFC 8446 content types (change_cipher_spec, alert, application_data) and heartbeat
# (RFC 6520): TLS, but not what a client sends first.
_OTHER_CONTENT_TYPES = frozenset((20, 21, 23, 24))
HANDSHAKE_CLIENT_HELLO = 1
RECORD_HEADER_LENGTH = 5  # RFC 8446 5.1: type (1) + legacy_record_version (2) + length (2)
MAX_RECORD_LENGTH = 2**14  # RFC 8446 5.1: a plaintext fragment "MUST NOT exceed 2^14 bytes"
# Cap on the record bytes (headers included) buffered before the ClientHello is complete. A
# classic hello is 200-600 bytes; a post-quantum hybrid one (X25519MLKEM768 key share: a
# 1184-byte ML-KEM-768 encapsulation key plus 32 bytes of X25519) is about 1.8-2 KiB. 16 KiB, one
# full record (RFC 8446 5.1), is ~8x that, and bounds what an unauthenticated connection can make
# us hold before routing. Counting record headers stops a hello split into 1-byte records from
# growing the buffer 6x past the cap.
MAX_CLIENT_HELLO = 16 * 1024
MAX_HOST_NAME_LENGTH = 253  # RFC 1035 2.3.4: 255 octets on the wire, 253 characters as text
MAX_SESSION_ID_LENGTH = 32  # RFC 8446 4.1.2: legacy_session_id<0..32>

EXT_SERVER_NAME = 0  # RFC 6066 3
EXT_ALPN = 16  # RFC 7301 3.1
EXT_SUPPORTED_VERSIONS = 43  # RFC 8446 4.2.1
_NAME_TYPE_HOST_NAME = 0  # RFC 6066 3

# Letters, digits, hyphen and underscore (seen in real SNI though not in RFC 952 host names),
# 1..63 per label (RFC 1035 2.3.4). A label regex without "." keeps matching linear.
_HOST_NAME = re.compile(r"(?:[a-z0-9_-]{1,63}\.)*[a-z0-9_-]{1,63}")


@dataclass(frozen=True, slots=True)
class ClientHello:
    """What routing needs from a ClientHello. `record_bytes` is informational: the length of the
    records that carried the hello, up to the end of the record in which it completed."""

    server_name: str | None  # host_name, lowercase, no trailing dot; None when not sent
    alpn: tuple[str, ...]  # in client preference order; UTF-8, undecodable bytes escaped
    legacy_version: int  # e.g. 0x0303; TLS 1.3 clients send their versions separately
    supported_versions: tuple[int, ...]  # as sent, GREASE values included
    record_bytes: int


def looks_like_tls(first_byte: int) -> bool:
    """Cheap check on a connection's first byte: True if it can start a TLS handshake record.

    A data plane can send anything else (plain HTTP, SSH...) to a default pool without parsing.
    """
    return first_byte == CONTENT_HANDSHAKE


def parse_client_hello(data: bytes | bytearray | memoryview) -> ClientHello | None:
    """Parse the ClientHello at the start of `data`, which holds all bytes received so far.

    Returns the ClientHello, None if incomplete (call again with more bytes), or raises
    ProtocolError if the bytes are not TLS, not a ClientHello, malformed or over the cap. Each
    call starts over; a connection fed in many small segments should use ClientHelloReader.
    """
    return ClientHelloReader().feed(data)


def match_server_name(pattern: str, name: str) -> bool:
    """Match a configured name against an SNI value, case-insensitively, ignoring a trailing dot.

    "*.example.com" matches exactly one leftmost label ("a.example.com", not "example.com" nor
    "a.b.example.com"), as certificate wildcards do (RFC 6125 6.4.3); "*" elsewhere is literal.
    """
    pattern, name = _normalise(pattern), _normalise(name)
    if not pattern or not name:
        return False
    if pattern.startswith("*."):
        label, dot, rest = name.partition(".")
        return bool(label) and bool(dot) and rest == pattern[2:]
    return pattern == name


def _normalise(name: str) -> str:
    return name.lower().removesuffix(".")


class ClientHelloReader:
    """Incremental ClientHello parser for one connection: feed() each new segment as it arrives.

    Each byte is looked at once (record headers are validated as their bytes arrive), so a peer
    trickling one byte per segment costs linear time, not a re-parse per segment. After a result
    or an error, feed() returns or raises the same thing again.
    """

    def __init__(self) -> None:
        self._header = bytearray()  # the current record header, while incomplete
        self._remaining = 0  # fragment bytes of the current record still to come
        self._record_end = 0  # stream offset just past the current (or last complete) record
        self._handshake = bytearray()  # handshake fragments, reassembled
        self._result: ClientHello | None = None
        self._error: ProtocolError | None = None

    def feed(self, data: bytes | bytearray | memoryview) -> ClientHello | None:
        """Add the next bytes of the stream; return the ClientHello once complete, else None."""
        if self._error is not None:
            raise self._error
        if self._result is None:
            try:
                self._result = self._consume(memoryview(data))
            except ProtocolError as exc:
                self._error = exc
                raise
        return self._result

    def _consume(self, data: memoryview) -> ClientHello | None:
        pos = 0
        while pos < len(data):
            if self._remaining == 0:
                chunk = data[pos : pos + RECORD_HEADER_LENGTH - len(self._header)]
                self._header += chunk
                self._check_record_header()
                if len(self._header) == RECORD_HEADER_LENGTH:
                    self._remaining = int.from_bytes(self._header[3:5], "big")
                    self._record_end += RECORD_HEADER_LENGTH + self._remaining
                    self._header.clear()
            else:
                chunk = data[pos : pos + self._remaining]
                self._remaining -= len(chunk)
                self._handshake += chunk
                hello = self._check_handshake()
                if hello is not None:
                    return hello
            pos += len(chunk)
        return None

    def _check_record_header(self) -> None:
        """Validate the record header bytes received so far (RFC 8446 5.1)."""
        header, first = self._header, self._record_end == 0
        if header[0] != CONTENT_HANDSHAKE:
            if first and header[0] not in _OTHER_CONTENT_TYPES:
                raise ProtocolError(Reason.NOT_TLS, f"first byte {header[0]:#04x}")
            # Handshake messages must not be interleaved with other record types.
            raise ProtocolError(Reason.NOT_HANDSHAKE, f"record content type {header[0]}")
        # legacy_record_version "MUST be ignored", but a major version other than 3 on the first
        # record means this is not TLS at all (or SSL 2, which we do not support).
        if first and len(header) >= 2 and header[1] != 3:
            raise ProtocolError(Reason.NOT_TLS, f"record version major {header[1]}")
        if len(header) < RECORD_HEADER_LENGTH:
            return
        length = int.from_bytes(header[3:5], "big")
        if not 0 < length <= MAX_RECORD_LENGTH:  # zero-length handshake fragments are forbidden
            raise ProtocolError(Reason.BAD_LENGTH, f"record length {length}")
        if self._record_end + RECORD_HEADER_LENGTH + length > MAX_CLIENT_HELLO:
            raise ProtocolError(Reason.TOO_LONG, f"records exceed {MAX_CLIENT_HELLO} bytes")

    def _check_handshake(self) -> ClientHello | None:
        handshake = self._handshake
        if handshake[0] != HANDSHAKE_CLIENT_HELLO:
            raise ProtocolError(Reason.NOT_CLIENT_HELLO, f"handshake type {handshake[0]}")
        if len(handshake) < 4:
            return None
        end = 4 + int.from_bytes(handshake[1:4], "big")
        if end > MAX_CLIENT_HELLO:
            raise ProtocolError(Reason.TOO_LONG, f"ClientHello of {end} bytes")
        if len(handshake) < end:
            return None
        return _parse_body(bytes(handshake[4:end]), self._record_end)


class _Cursor:
    """Reads TLS presentation-language fields (RFC 8446 3), raising `reason` on overrun."""

    __slots__ = ("_data", "_pos", "_reason")

    def __init__(self, data: bytes, reason: Reason) -> None:
        self._data, self._pos, self._reason = data, 0, reason

    @property
    def left(self) -> int:
        return len(self._data) - self._pos

    def take(self, size: int, what: str) -> bytes:
        if size > self.left:
            raise ProtocolError(self._reason, f"{what}: {size} bytes needed, {self.left} left")
        self._pos += size
        return self._data[self._pos - size : self._pos]

    def uint(self, size: int, what: str) -> int:
        return int.from_bytes(self.take(size, what), "big")

    def vector(self, length_size: int, what: str) -> bytes:
        return self.take(self.uint(length_size, what), what)


def _parse_body(body: bytes, record_bytes: int) -> ClientHello:
    """Decode a ClientHello body (RFC 8446 4.1.2), keeping only what routing needs."""
    cursor = _Cursor(body, Reason.TRUNCATED)
    legacy_version = cursor.uint(2, "legacy_version")
    cursor.take(32, "random")
    if len(cursor.vector(1, "legacy_session_id")) > MAX_SESSION_ID_LENGTH:
        raise ProtocolError(Reason.BAD_LENGTH, "legacy_session_id longer than 32")
    suites = cursor.vector(2, "cipher_suites")
    if not suites or len(suites) % 2:
        raise ProtocolError(Reason.BAD_LENGTH, f"cipher_suites of {len(suites)} bytes")
    if not cursor.vector(1, "legacy_compression_methods"):
        raise ProtocolError(Reason.BAD_LENGTH, "no compression methods")
    extensions = _extensions(cursor) if cursor.left else {}  # pre-TLS 1.3 hellos may omit them
    return ClientHello(
        server_name=_server_name(extensions.get(EXT_SERVER_NAME)),
        alpn=_alpn(extensions.get(EXT_ALPN)),
        legacy_version=legacy_version,
        supported_versions=_supported_versions(extensions.get(EXT_SUPPORTED_VERSIONS)),
        record_bytes=record_bytes,
    )


def _extensions(cursor: _Cursor) -> dict[int, bytes]:
    block = _Cursor(cursor.vector(2, "extensions"), Reason.TRUNCATED)
    if cursor.left:
        raise ProtocolError(Reason.BAD_LENGTH, f"{cursor.left} bytes after the extensions")
    found: dict[int, bytes] = {}
    while block.left:
        ext_type = block.uint(2, "extension_type")
        data = block.vector(2, "extension_data")
        if ext_type in found:  # RFC 8446 4.2: at most one extension of each type
            raise ProtocolError(Reason.BAD_EXTENSION, f"duplicate extension {ext_type}")
        found[ext_type] = data
    return found


def _list_cursor(data: bytes, length_size: int, what: str) -> _Cursor:
    """Open a non-empty vector that must fill the whole extension_data."""
    outer = _Cursor(data, Reason.BAD_EXTENSION)
    inner = _Cursor(outer.vector(length_size, what), Reason.BAD_EXTENSION)
    if outer.left or not inner.left:
        raise ProtocolError(Reason.BAD_EXTENSION, f"{what} is empty or has trailing bytes")
    return inner


def _server_name(data: bytes | None) -> str | None:
    """RFC 6066 3: ServerNameList server_name_list<1..2^16-1>, at most one host_name."""
    if data is None:
        return None
    names = _list_cursor(data, 2, "server_name_list")
    host: bytes | None = None
    while names.left:
        name_type = names.uint(1, "name_type")
        name = names.vector(2, "server name")
        if not name:
            raise ProtocolError(Reason.BAD_EXTENSION, "empty server name")
        if name_type == _NAME_TYPE_HOST_NAME:
            if host is not None:
                raise ProtocolError(Reason.BAD_EXTENSION, "more than one host_name")
            host = name
    return None if host is None else _host_name(host)


def _host_name(raw: bytes) -> str:
    """RFC 6066 3: HostName is ASCII, without a trailing dot (tolerated and stripped here)."""
    if raw.isascii():
        name = raw.decode("ascii").lower().removesuffix(".")
        if len(name) <= MAX_HOST_NAME_LENGTH and _HOST_NAME.fullmatch(name):
            return name
    raise ProtocolError(Reason.BAD_SERVER_NAME, f"{raw[:64]!r}")


def _alpn(data: bytes | None) -> tuple[str, ...]:
    """RFC 7301 3.1: ProtocolName protocol_name_list<2..2^16-1>, each name <1..2^8-1>."""
    if data is None:
        return ()
    names = _list_cursor(data, 2, "protocol_name_list")
    protocols = []
    while names.left:
        name = names.vector(1, "protocol name")
        if not name:
            raise ProtocolError(Reason.BAD_EXTENSION, "empty ALPN protocol name")
        protocols.append(name.decode("utf-8", "surrogateescape"))
    return tuple(protocols)


def _supported_versions(data: bytes | None) -> tuple[int, ...]:
    """RFC 8446 4.2.1: ProtocolVersion versions<2..254> in a ClientHello."""
    if data is None:
        return ()
    versions = _list_cursor(data, 1, "supported_versions")
    if versions.left % 2:
        raise ProtocolError(Reason.BAD_EXTENSION, "odd supported_versions length")
    return tuple(versions.uint(2, "version") for _ in range(versions.left // 2))
