"""CRC-32C (Castagnoli), the checksum carried by the PROXY v2 PP2_TYPE_CRC32C TLV.

The PROXY spec (section 2.2.3) points at RFC 4960 appendix B, which defines the parameters:
polynomial 0x1EDC6F41 (0x82F63B78 bit-reflected, since input and output are reflected), initial
value 0xFFFFFFFF, final XOR 0xFFFFFFFF. Check value: crc32c(b"123456789") == 0xE3069283.

Table-driven, one byte per step: PROXY headers are capped at a few KiB, so a pure-Python loop
costs microseconds and we avoid a C dependency.
"""

from __future__ import annotations

_POLY_REFLECTED = 0x82F63B78
_MASK = 0xFFFFFFFF


def _make_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ _POLY_REFLECTED if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_TABLE = _make_table()


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """Return the CRC-32C of `data`; pass a previous result as `crc` to continue a running sum."""
    value = crc ^ _MASK
    table = _TABLE
    for byte in data:
        value = table[(value ^ byte) & 0xFF] ^ (value >> 8)
    return value ^ _MASK
