"""Build TLS ClientHello bytes by hand for tests, field by field from RFC 8446 4.1.2.

Defaults give a TLS 1.3-style hello of about 2 KiB like a current browser's: SNI, ALPN,
supported_versions and an X25519MLKEM768 key share (group 0x11EC, 1184-byte ML-KEM-768
encapsulation key + 32-byte X25519 share, draft-ietf-tls-ecdhe-mlkem), plus padding (RFC 7685).
Key material is zeros: only the sizes matter to a parser that never does crypto.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def u8(value: int) -> bytes:
    return value.to_bytes(1, "big")


def u16(value: int) -> bytes:
    return value.to_bytes(2, "big")


def vec8(body: bytes) -> bytes:
    return u8(len(body)) + body


def vec16(body: bytes) -> bytes:
    return u16(len(body)) + body


def extension(ext_type: int, data: bytes) -> bytes:
    return u16(ext_type) + vec16(data)


def sni(*names: bytes, name_type: int = 0) -> bytes:
    """server_name (RFC 6066 3): a ServerNameList of the given host names."""
    return extension(0, vec16(b"".join(u8(name_type) + vec16(name) for name in names)))


def alpn(*protocols: bytes) -> bytes:
    """application_layer_protocol_negotiation (RFC 7301 3.1)."""
    return extension(16, vec16(b"".join(vec8(protocol) for protocol in protocols)))


def supported_versions(*versions: int) -> bytes:
    """supported_versions (RFC 8446 4.2.1), ClientHello form."""
    return extension(43, vec8(b"".join(u16(version) for version in versions)))


def key_share(mlkem_share_size: int = 1184 + 32) -> bytes:
    """key_share (RFC 8446 4.2.8): X25519MLKEM768 (0x11EC) and X25519 (0x001D) entries."""
    entries = u16(0x11EC) + vec16(bytes(mlkem_share_size)) + u16(0x001D) + vec16(bytes(32))
    return extension(51, vec16(entries))


def client_hello_body(
    *,
    legacy_version: int = 0x0303,
    session_id: bytes = bytes(32),
    cipher_suites: bytes = u16(0x1301) + u16(0x1302) + u16(0x1303),
    compression: bytes = b"\x00",
    extensions: Sequence[bytes] | None = None,
    server_name: bytes = b"www.example.com",
    protocols: Sequence[bytes] = (b"h2", b"http/1.1"),
    padding: int = 512,
) -> bytes:
    """A ClientHello body; pass `extensions` to replace the default extension list entirely."""
    if extensions is None:
        extensions = [
            sni(server_name),
            extension(10, vec16(u16(0x11EC) + u16(0x001D) + u16(0x0017))),  # supported_groups
            extension(13, vec16(u16(0x0403) + u16(0x0804) + u16(0x0401))),  # signature_algorithms
            alpn(*protocols),
            supported_versions(0x0304, 0x0303),
            key_share(),
            extension(21, bytes(padding)),  # padding, RFC 7685
        ]
    return (
        u16(legacy_version)
        + bytes(32)  # random
        + vec8(session_id)
        + vec16(cipher_suites)
        + vec8(compression)
        + vec16(b"".join(extensions))
    )


def handshake(body: bytes, msg_type: int = 1) -> bytes:
    """A handshake message (RFC 8446 4): type, uint24 length, body."""
    return u8(msg_type) + len(body).to_bytes(3, "big") + body


def records(message: bytes, record_size: int = 2**14, content_type: int = 22, version: int = 0x0301) -> bytes:
    """Split `message` into TLSPlaintext records of at most `record_size` bytes (RFC 8446 5.1)."""
    out = bytearray()
    for start in range(0, len(message), record_size):
        fragment = message[start : start + record_size]
        out += u8(content_type) + u16(version) + vec16(fragment)
    return bytes(out)


def client_hello(record_size: int = 2**14, **body_options: Any) -> bytes:
    """Records carrying one ClientHello built from `client_hello_body(**body_options)`."""
    return records(handshake(client_hello_body(**body_options)), record_size)
