"""CRC-32C against published check values and a bit-at-a-time reference."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pointsman.protocols.crc32c import crc32c


def _bitwise_crc32c(data: bytes) -> int:
    """Straight from the definition (reflected poly 0x82F63B78), no table: an independent oracle."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 * (crc & 1))
    return crc ^ 0xFFFFFFFF


def test_standard_check_value() -> None:
    # The "check" value every CRC catalogue lists for CRC-32C (iSCSI/Castagnoli).
    assert crc32c(b"123456789") == 0xE3069283


def test_rfc3720_appendix_b4_vectors() -> None:
    # RFC 3720 section B.4 "CRC Examples" (the iSCSI CRC, same parameters as RFC 4960 appendix B).
    assert crc32c(bytes(32)) == 0x8A9136AA
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    assert crc32c(bytes(range(32))) == 0x46DD794E


def test_empty_input() -> None:
    assert crc32c(b"") == 0


@given(st.binary(max_size=512))
def test_matches_bitwise_reference(data: bytes) -> None:
    assert crc32c(data) == _bitwise_crc32c(data)


@given(st.binary(max_size=256), st.binary(max_size=256))
def test_running_sum_equals_one_shot(head: bytes, tail: bytes) -> None:
    assert crc32c(tail, crc32c(head)) == crc32c(head + tail)


def test_accepts_bytearray_and_memoryview() -> None:
    assert crc32c(bytearray(b"123456789")) == crc32c(memoryview(b"123456789")) == 0xE3069283
