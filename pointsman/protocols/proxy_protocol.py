"""HAProxy PROXY protocol, v1 (text) and v2 (binary): detect, parse and build, sans-I/O.

Spec: "The PROXY protocol, Versions 1 & 2", Willy Tarreau, revision 2020/03/05, shipped as
haproxy/doc/proxy-protocol.txt. Section numbers below refer to it.

`parse()` has exactly three outcomes: `(header, bytes_consumed)`; None while the bytes so far are a
valid prefix of a header; or `ProtocolError`. It never consumes past the header: what follows
belongs to the proxied stream. A header whose `source` is None (v1 UNKNOWN, v2 LOCAL, v2 UNSPEC)
means "use the real connection endpoints".

Builders raise `ValueError` on our own bad input (port out of range, path too long): that is a
bug on our side, not a peer's protocol error.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeAlias

from pointsman.protocols.crc32c import crc32c as _crc32c
from pointsman.protocols.errors import ProtocolError, Reason

V1_PREFIX = b"PROXY "
# Section 2.1: the longest legal line, "PROXY UNKNOWN" + two 39-char IPv6 addresses + two 5-digit
# ports, is 107 bytes including CRLF, and a CRLF not found within 107 bytes makes the line invalid.
MAX_V1_LENGTH = 107

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED_LENGTH = 16  # section 2.2: signature (12) + ver_cmd (1) + fam (1) + len (2)
# The v2 length field allows 16 + 65535 bytes, but section 2 says headers are designed to fit the
# 536-byte minimum MSS, and real ones come close: 216 bytes of UNIX addresses plus every registered
# TLV (unique ID <= 128, authority <= 253, SSL with version, cipher and CN) is about 1 KiB at most.
# 4096 leaves room for custom TLVs (cloud load balancers add a few dozen bytes) while capping what
# an unauthenticated connection can make us buffer before routing at one page. Longer: TOO_LONG.
MAX_V2_LENGTH = 4096
MAX_UNIQUE_ID_LENGTH = 128  # section 2.2.5: "an opaque byte sequence of up to 128 bytes"
UNIX_ADDRESS_LENGTH = 108  # section 2.2: AF_UNIX addresses are exactly 108 bytes each
MAX_TLV_VALUE_LENGTH = 0xFFFF  # section 2.2: the TLV length is two bytes

# TLV types, section 2.2. TLVs are kept raw; these name the registered ones.
TLV_ALPN = 0x01
TLV_AUTHORITY = 0x02
TLV_CRC32C = 0x03
TLV_NOOP = 0x04
TLV_UNIQUE_ID = 0x05
TLV_SSL = 0x20  # nested sub-TLVs (0x21..0x25), left raw
TLV_NETNS = 0x30


class Command(enum.IntEnum):
    """v2 command, the low nibble of byte 13 (section 2.2). v1 headers are always PROXY."""

    LOCAL = 0x0
    PROXY = 0x1


class Family(enum.IntEnum):
    """Address family, the high nibble of byte 14 (section 2.2)."""

    UNSPEC = 0x0
    INET = 0x1
    INET6 = 0x2
    UNIX = 0x3


class Transport(enum.IntEnum):
    """Transport protocol, the low nibble of byte 14 (section 2.2)."""

    UNSPEC = 0x0
    STREAM = 0x1
    DGRAM = 0x2


class Detected(enum.Enum):
    """What the first bytes of a stream are, for a listener that accepts PROXY optionally.

    Section 5 warns that guessing lets any client spoof its address: only offer optional
    acceptance on listeners reachable solely by trusted proxies.
    """

    V1 = "v1"
    V2 = "v2"
    PLAIN = "plain"  # not a PROXY header: ordinary traffic
    NEED_MORE = "need_more"  # the bytes so far are a prefix of a signature


Bytes: TypeAlias = bytes | bytearray | memoryview
"""What parsers accept: whatever buffer type the caller accumulates into."""

Address: TypeAlias = tuple[str, int] | str | None
"""(ip, port) for INET/INET6, a path for UNIX, None when the header carries no usable address."""

# Section 2.2, "In practice, the following protocol bytes are expected": the only family and
# transport combinations we accept, each mapped to the size of its address block.
_V2_ADDRESS_SIZE: dict[int, int] = {
    0x00: 0,
    0x11: 12,
    0x12: 12,
    0x21: 36,
    0x22: 36,
    0x31: 2 * UNIX_ADDRESS_LENGTH,
    0x32: 2 * UNIX_ADDRESS_LENGTH,
}
_V1_FAMILIES = {"TCP4": Family.INET, "TCP6": Family.INET6}
_V1_BAD_BYTE = re.compile(rb"[^\x20-\x7e]")  # a v1 line is printable US-ASCII
_V1_PORT = re.compile(r"0|[1-9][0-9]{0,4}")  # section 2.1: decimal, no heading zeroes
_V1_IPV4 = re.compile(r"[0-9.]{7,15}")  # ipaddress then rejects heading zeroes and > 255
_V1_IPV6 = re.compile(r"[0-9A-Fa-f:.]{2,45}")  # no "%scope"; ipaddress checks the structure


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """One parsed PROXY header. TLVs are raw, in wire order, duplicates and NUL bytes kept."""

    version: int
    command: Command
    family: Family
    transport: Transport
    source: Address
    destination: Address
    tlvs: tuple[tuple[int, bytes], ...] = ()

    def tlv(self, tlv_type: int) -> bytes | None:
        """Return the value of the first TLV of `tlv_type`, or None when absent."""
        for found_type, value in self.tlvs:
            if found_type == tlv_type:
                return value
        return None


def detect(data: Bytes) -> Detected:
    """Classify the start of a stream without consuming it."""
    for signature, kind in ((V2_SIGNATURE, Detected.V2), (V1_PREFIX, Detected.V1)):
        seen = min(len(data), len(signature))
        if data[:seen] == signature[:seen]:
            return kind if seen == len(signature) else Detected.NEED_MORE
    return Detected.PLAIN


def parse(data: Bytes) -> tuple[ProxyHeader, int] | None:
    """Parse a v1 or v2 header at the start of `data`.

    Returns (header, bytes consumed), None if more bytes are needed, or raises ProtocolError.
    Call again with the longer buffer as bytes arrive; nothing is kept between calls.
    """
    kind = detect(data)
    if kind is Detected.NEED_MORE:
        return None
    if kind is Detected.V1:
        return _parse_v1(bytes(data[:MAX_V1_LENGTH]))
    if kind is Detected.V2:
        return _parse_v2(data)
    raise ProtocolError(Reason.BAD_SIGNATURE, f"starts with {bytes(data[:8])!r}")


# --- v1 ----------------------------------------------------------------------------------------


def _parse_v1(window: bytes) -> tuple[ProxyHeader, int] | None:
    end = window.find(b"\r\n")
    line = window if end < 0 else window[:end]
    bad = _V1_BAD_BYTE.search(line)
    # A CR as the very last byte of an incomplete line may be the first half of the CRLF.
    if bad and not (end < 0 and bad.start() == len(line) - 1 and line.endswith(b"\r")):
        raise ProtocolError(Reason.BAD_SYNTAX, f"byte {line[bad.start()]:#04x} in v1 line")
    if end < 0:
        if len(window) >= MAX_V1_LENGTH:
            raise ProtocolError(Reason.TOO_LONG, f"no CRLF in the first {MAX_V1_LENGTH} bytes")
        return None
    return _decode_v1_line(line.decode("ascii")), end + 2


def _decode_v1_line(line: str) -> ProxyHeader:
    fields = line.split(" ")  # fields[0] is "PROXY": detect() checked it
    if fields[1] == "UNKNOWN":
        # Section 2.1: the receiver must ignore anything between UNKNOWN and the CRLF.
        return ProxyHeader(1, Command.PROXY, Family.UNSPEC, Transport.UNSPEC, None, None)
    family = _V1_FAMILIES.get(fields[1])
    if family is None:
        raise ProtocolError(Reason.BAD_FAMILY, f"v1 protocol {fields[1][:8]!r}")
    if len(fields) != 6:
        raise ProtocolError(Reason.BAD_SYNTAX, f"{len(fields)} space-separated fields, not 6")
    source = (_v1_address(fields[2], family), _v1_port(fields[4]))
    destination = (_v1_address(fields[3], family), _v1_port(fields[5]))
    return ProxyHeader(1, Command.PROXY, family, Transport.STREAM, source, destination)


def _v1_address(text: str, family: Family) -> str:
    try:
        if family is Family.INET and _V1_IPV4.fullmatch(text):
            return str(ipaddress.IPv4Address(text))
        if family is Family.INET6 and _V1_IPV6.fullmatch(text):
            return str(ipaddress.IPv6Address(text))
    except ValueError:
        pass
    raise ProtocolError(Reason.BAD_ADDRESS, f"{text[:45]!r} is not a valid {family.name} address")


def _v1_port(text: str) -> int:
    if _V1_PORT.fullmatch(text) and int(text) <= 0xFFFF:
        return int(text)
    raise ProtocolError(Reason.BAD_PORT, f"{text[:8]!r}")


# --- v2 ----------------------------------------------------------------------------------------


def _parse_v2(data: Bytes) -> tuple[ProxyHeader, int] | None:
    # Check each fixed field as soon as its byte arrives so garbage is refused early.
    if len(data) > 12 and data[12] >> 4 != 2:
        raise ProtocolError(Reason.BAD_VERSION, f"version {data[12] >> 4}")
    if len(data) > 12 and data[12] & 0x0F not in (Command.LOCAL, Command.PROXY):
        raise ProtocolError(Reason.BAD_COMMAND, f"command {data[12] & 0x0F}")
    if len(data) > 13 and data[13] not in _V2_ADDRESS_SIZE:
        raise ProtocolError(Reason.BAD_FAMILY, f"family/transport byte {data[13]:#04x}")
    if len(data) < V2_FIXED_LENGTH:
        return None
    total = V2_FIXED_LENGTH + int.from_bytes(data[14:16], "big")
    if total > MAX_V2_LENGTH:
        raise ProtocolError(Reason.TOO_LONG, f"v2 header of {total} bytes")
    address_end = V2_FIXED_LENGTH + _V2_ADDRESS_SIZE[data[13]]
    if total < address_end:
        raise ProtocolError(Reason.BAD_LENGTH, f"length {total - 16} < address block")
    if len(data) < total:
        return None
    header = bytes(data[:total])
    command = Command(header[12] & 0x0F)
    family, transport = Family(header[13] >> 4), Transport(header[13] & 0x0F)
    tlvs = _parse_tlvs(header, address_end)
    source: Address = None
    destination: Address = None
    if command is Command.PROXY:  # section 2.2: LOCAL discards the address block
        source, destination = _decode_v2_addresses(family, header[V2_FIXED_LENGTH:address_end])
    return ProxyHeader(2, command, family, transport, source, destination, tlvs), total


def _decode_v2_addresses(family: Family, block: bytes) -> tuple[Address, Address]:
    if family is Family.INET:
        return _ip_port(block[0:4], block[8:10]), _ip_port(block[4:8], block[10:12])
    if family is Family.INET6:
        return _ip_port(block[0:16], block[32:34]), _ip_port(block[16:32], block[34:36])
    if family is Family.UNIX:
        return _unix_path(block[:UNIX_ADDRESS_LENGTH]), _unix_path(block[UNIX_ADDRESS_LENGTH:])
    return None, None  # UNSPEC: section 2.2 says the receiver should ignore address information


def _ip_port(packed: bytes, port: bytes) -> tuple[str, int]:
    return str(ipaddress.ip_address(packed)), int.from_bytes(port, "big")


def _unix_path(raw: bytes) -> str:
    """Decode a NUL-padded sun_path; a leading NUL marks a Linux abstract socket name."""
    name = raw.rstrip(b"\x00")
    if name and raw[0] != 0:
        name = name.split(b"\x00", 1)[0]  # a filesystem path ends at its first NUL
    return name.decode("utf-8", "surrogateescape")  # lossless for non-UTF-8 paths


def _parse_tlvs(header: bytes, start: int) -> tuple[tuple[int, bytes], ...]:
    tlvs: list[tuple[int, bytes]] = []
    crc_at: int | None = None
    pos = start
    while pos < len(header):
        if len(header) - pos < 3:
            raise ProtocolError(Reason.BAD_TLV, f"{len(header) - pos} stray bytes after TLVs")
        tlv_type = header[pos]
        value_at = pos + 3
        pos = value_at + int.from_bytes(header[pos + 1 : value_at], "big")
        if pos > len(header):
            raise ProtocolError(Reason.BAD_TLV, f"TLV {tlv_type:#04x} overruns the header")
        value = header[value_at:pos]
        if tlv_type == TLV_CRC32C:
            if len(value) != 4 or crc_at is not None:
                raise ProtocolError(Reason.BAD_TLV, "CRC32C TLV must be one 4-byte value")
            crc_at = value_at
        elif tlv_type == TLV_UNIQUE_ID and len(value) > MAX_UNIQUE_ID_LENGTH:
            raise ProtocolError(Reason.BAD_TLV, f"unique ID of {len(value)} bytes")
        tlvs.append((tlv_type, value))
    if crc_at is not None:
        _check_crc(header, crc_at)
    return tuple(tlvs)


def _check_crc(header: bytes, crc_at: int) -> None:
    """Section 2.2.3: the CRC covers the whole header with its own 4 bytes zeroed."""
    sent = int.from_bytes(header[crc_at : crc_at + 4], "big")
    computed = _crc32c(header[:crc_at] + bytes(4) + header[crc_at + 4 :])
    if sent != computed:
        raise ProtocolError(Reason.BAD_CRC, f"sent {sent:#010x}, computed {computed:#010x}")


# --- builders ----------------------------------------------------------------------------------

_IP: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address


def build_v1(source: Address, destination: Address) -> bytes:
    """Build a v1 line (TCP only, section 2.1).

    "PROXY UNKNOWN" when either side is not an (ip, port) pair. An IPv4 and an IPv6 side (a
    dual-stack listener) are both sent as IPv6, IPv4 as ::ffff:a.b.c.d, so the client address
    survives instead of degrading to UNKNOWN.
    """
    pair = _ip_pair(source, destination)
    if pair is None:
        return b"PROXY UNKNOWN\r\n"
    (src, sport), (dst, dport) = pair
    proto = "TCP4" if src.version == 4 else "TCP6"
    return f"PROXY {proto} {src} {dst} {sport} {dport}\r\n".encode("ascii")


def build_v2(
    command: Command,
    transport: Transport,
    source: Address,
    destination: Address,
    tlvs: Iterable[tuple[int, bytes]] = (),
    crc32c: bool = False,
) -> bytes:
    """Build a v2 header (section 2.2).

    LOCAL (health checks) carries no address and family UNSPEC. PROXY with two (ip, port) pairs
    gives INET or INET6 (mixed families are sent as IPv6, IPv4-mapped); two paths give UNIX;
    anything else gives UNSPEC, which tells the receiver to use the real endpoints. With
    `crc32c`, a CRC32C TLV is appended last and filled in (section 2.2.3).
    """
    fam, block = _v2_address_block(command, transport, source, destination)
    body = bytearray(block)
    for tlv_type, value in tlvs:
        body += _tlv_bytes(tlv_type, value)
    if crc32c:
        body += _tlv_bytes(TLV_CRC32C, bytes(4))
    if len(body) > 0xFFFF:
        raise ValueError(f"v2 header body of {len(body)} bytes exceeds the 16-bit length field")
    header = bytearray(V2_SIGNATURE)
    header += bytes((0x20 | command, fam)) + len(body).to_bytes(2, "big") + body
    if crc32c:
        header[-4:] = _crc32c(header).to_bytes(4, "big")
    return bytes(header)


def tlv_alpn(value: bytes) -> tuple[int, bytes]:
    """PP2_TYPE_ALPN (section 2.2.1): the negotiated application protocol, e.g. b"h2"."""
    return _checked_tlv(TLV_ALPN, value)


def tlv_authority(value: str) -> tuple[int, bytes]:
    """PP2_TYPE_AUTHORITY (section 2.2.2): the host name the client asked for (SNI), UTF-8."""
    return _checked_tlv(TLV_AUTHORITY, value.encode("utf-8"))


def tlv_unique_id(value: bytes) -> tuple[int, bytes]:
    """PP2_TYPE_UNIQUE_ID (section 2.2.5): an opaque connection ID of at most 128 bytes."""
    if len(value) > MAX_UNIQUE_ID_LENGTH:
        raise ValueError(f"unique ID of {len(value)} bytes exceeds {MAX_UNIQUE_ID_LENGTH}")
    return TLV_UNIQUE_ID, bytes(value)


def _checked_tlv(tlv_type: int, value: bytes) -> tuple[int, bytes]:
    _tlv_bytes(tlv_type, value)
    return tlv_type, bytes(value)


def _tlv_bytes(tlv_type: int, value: bytes) -> bytes:
    if not 0 <= tlv_type <= 0xFF:
        raise ValueError(f"TLV type {tlv_type} is not one byte")
    if len(value) > MAX_TLV_VALUE_LENGTH:
        raise ValueError(f"TLV value of {len(value)} bytes exceeds {MAX_TLV_VALUE_LENGTH}")
    return bytes((tlv_type,)) + len(value).to_bytes(2, "big") + value


def _v2_address_block(
    command: Command, transport: Transport, source: Address, destination: Address
) -> tuple[int, bytes]:
    if command is Command.LOCAL:
        if source is not None or destination is not None:
            raise ValueError("a LOCAL header carries no addresses (section 2.2)")
        return 0x00, b""
    if isinstance(source, str) and isinstance(destination, str):
        return _fam_byte(Family.UNIX, transport), _unix_bytes(source) + _unix_bytes(destination)
    pair = _ip_pair(source, destination)
    if pair is None:
        return 0x00, b""
    (src, sport), (dst, dport) = pair
    family = Family.INET if src.version == 4 else Family.INET6
    block = src.packed + dst.packed + sport.to_bytes(2, "big") + dport.to_bytes(2, "big")
    return _fam_byte(family, transport), block


def _fam_byte(family: Family, transport: Transport) -> int:
    if transport is Transport.UNSPEC:
        raise ValueError("addresses need transport STREAM or DGRAM (section 2.2)")
    return family << 4 | transport


def _ip_pair(source: Address, destination: Address) -> tuple[tuple[_IP, int], tuple[_IP, int]] | None:
    if not (isinstance(source, tuple) and isinstance(destination, tuple)):
        return None
    src, dst = _ip(source[0]), _ip(destination[0])
    if src.version != dst.version:
        src, dst = _as_ipv6(src), _as_ipv6(dst)
    return (src, _port(source[1])), (dst, _port(destination[1]))


def _ip(text: str) -> _IP:
    # Via packed bytes to drop an IPv6 "%scope", which neither wire format can carry.
    return ipaddress.ip_address(ipaddress.ip_address(text).packed)


def _as_ipv6(address: _IP) -> ipaddress.IPv6Address:
    if isinstance(address, ipaddress.IPv6Address):
        return address
    return ipaddress.IPv6Address(b"\x00" * 10 + b"\xff\xff" + address.packed)


def _port(port: int) -> int:
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port {port} out of range")
    return port


def _unix_bytes(path: str) -> bytes:
    raw = path.encode("utf-8", "surrogateescape")
    if len(raw) > UNIX_ADDRESS_LENGTH:
        raise ValueError(f"UNIX path of {len(raw)} bytes exceeds {UNIX_ADDRESS_LENGTH}")
    return raw.ljust(UNIX_ADDRESS_LENGTH, b"\x00")
