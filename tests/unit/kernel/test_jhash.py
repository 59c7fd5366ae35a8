"""jhash and nft's `jhash ... mod N seed S`: golden vectors from a real kernel, and properties."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pointsman.balance.base import Candidate
from pointsman.balance.hashing import source_key
from pointsman.balance.maglev import Maglev
from pointsman.kernel.jhash import (
    DEFAULT_SEED,
    jhash,
    kernel_key_hash,
    nft_jhash,
    reciprocal_scale,
    registers,
    slot_of,
    source_key_fields,
)

U32_MAX = 0xFFFFFFFF

# Provenance: Linux 6.18 (x86_64), nftables 1.0.6, in a fresh network namespace. An output chain
# `udp dport P ct mark set jhash <key> mod M seed S` per row; a UDP datagram from each source to
# 127.0.0.1 / ::1 port P; the marks read back with `conntrack -L`. With mod 2**32-1 the mark is
# reciprocal_scale(h, 2**32-1), i.e. the raw 32-bit hash minus one (for h > 0), which pins the
# full hash, not only a residue. The same procedure runs live in tests/netns/test_kernel_jhash.py.
GOLDEN = [
    # (source ip, source port, hash key, modulus, seed, mark)
    ("127.0.0.1", 40001, "source_ip", U32_MAX, DEFAULT_SEED, 4184334210),
    ("127.1.2.3", 40002, "source_ip", U32_MAX, DEFAULT_SEED, 2635152590),
    ("127.0.0.1", 40003, "source_ip_port", U32_MAX, DEFAULT_SEED, 1633859805),
    ("127.10.20.30", 65535, "source_ip_port", U32_MAX, DEFAULT_SEED, 522860959),
    ("fd00:99::1", 40005, "source_ip", U32_MAX, DEFAULT_SEED, 1154375968),
    ("::1", 40006, "source_ip", U32_MAX, DEFAULT_SEED, 2191050934),
    ("fd00:99::2", 40007, "source_ip_port", U32_MAX, 0, 3395933184),
    ("fd00:99::3", 1, "source_ip_port", U32_MAX, 0, 1331141606),
    ("127.0.0.9", 12345, "source_ip_port", 4093, DEFAULT_SEED, 2425),
    ("127.0.0.10", 80, "source_ip_port", 4093, DEFAULT_SEED, 497),
    ("127.0.0.11", 1111, "source_ip", 7, 0xDEADBEEF, 3),
    ("127.0.0.12", 2222, "source_ip", 7, 0xDEADBEEF, 4),
]


@pytest.mark.parametrize(("ip", "port", "hash_key", "modulus", "seed", "mark"), GOLDEN)
def test_golden_vectors_from_the_kernel(ip: str, port: int, hash_key: str, modulus: int, seed: int,
                                        mark: int) -> None:
    key = source_key(ip, port, hash_key)
    assert nft_jhash(registers(key, source_key_fields(key)), modulus, seed) == mark


def test_lookup3_reference_values() -> None:
    # The values lookup3.c's own self-test (driver5) prints for hashlittle(): "" with initval 0
    # is 0xdeadbeef, "Four score and seven years ago" is 0x17770551 with initval 0 and 0xcd628161
    # with initval 1. On a little-endian machine the kernel's jhash is the same function.
    assert jhash(b"") == 0xDEADBEEF
    assert jhash(b"Four score and seven years ago") == 0x17770551
    assert jhash(b"Four score and seven years ago", 1) == 0xCD628161


def test_registers_pad_each_field_to_four_bytes() -> None:
    assert registers(b"\x01\x02\x03\x04\x00\x50", (4, 2)) == b"\x01\x02\x03\x04\x00\x50\x00\x00"
    assert registers(b"\x01\x02") == b"\x01\x02\x00\x00"
    with pytest.raises(ValueError, match="do not make"):
        registers(b"\x01\x02\x03", (4,))


def test_source_key_fields() -> None:
    assert source_key_fields(source_key("10.0.0.1", 5, "source_ip")) == (4,)
    assert source_key_fields(source_key("10.0.0.1", 5, "source_ip_port")) == (4, 2)
    assert source_key_fields(source_key("fd00::1", 5, "source_ip_port")) == (16, 2)
    with pytest.raises(ValueError, match="not a source key"):
        source_key_fields(b"abc")


def test_modulus_bounds() -> None:
    with pytest.raises(ValueError):
        nft_jhash(b"abcd", 0, 1)
    with pytest.raises(ValueError):
        kernel_key_hash(2**32)


@given(st.integers(0, U32_MAX), st.integers(1, U32_MAX))
def test_reciprocal_scale_stays_below_the_modulus(value: int, modulus: int) -> None:
    assert 0 <= reciprocal_scale(value, modulus) < modulus


@given(st.binary(max_size=64), st.integers(0, U32_MAX))
def test_jhash_is_32_bits(data: bytes, seed: int) -> None:
    assert 0 <= jhash(data, seed) <= U32_MAX


@given(st.ip_addresses(v=4).map(str), st.integers(0, 65535), st.sampled_from([3, 13, 4093, 65537]))
def test_kernel_key_hash_is_the_slot(ip: str, port: int, slots: int) -> None:
    key = source_key(ip, port, "source_ip_port")
    key_hash = kernel_key_hash(slots)
    assert key_hash(key) == slot_of(key, slots) < slots


def test_maglev_with_the_kernel_hash_picks_the_kernel_slot() -> None:
    slots = 13
    candidates = [Candidate(f"b{i}", 1.0) for i in range(3)]
    maglev = Maglev(candidates, slots, home_weights=[1.0] * 3, key_hash=kernel_key_hash(slots))
    for port in range(1000, 1100):
        key = source_key("10.99.1.2", port, "source_ip_port")
        assert maglev.pick(key) == maglev.table[slot_of(key, slots)]


def test_maglev_default_hash_is_unchanged() -> None:
    candidates = [Candidate(f"b{i}", 1.0) for i in range(3)]
    default = Maglev(candidates, 13)
    explicit = Maglev(candidates, 13, key_hash=lambda key: kernel_key_hash(13)(key))
    assert default.table == explicit.table  # the hash picks a slot; it never changes the table
