"""The Linux kernel's jhash and the nftables `jhash` expression, in Python.

The kernel fast path indexes its slot table with `jhash <key> mod <slots> seed <seed>`; computing the
same number here lets userspace predict, test and explain which backend the kernel picks.

Sources (algorithm only; this is an independent implementation):
- Bob Jenkins, lookup3.c (2006), `hashlittle()`: the mix and final rounds, the 0xdeadbeef start.
- Linux include/linux/jhash.h, `jhash()`: lookup3 with `initval` added to the start value, whole
  12-byte blocks read as native-endian (little-endian on x86 and arm64) 32-bit words, and no final
  round for an empty key.
- Linux net/netfilter/nft_hash.c, `nft_jhash_eval()`: the result is scaled into [0, modulus) with
  `reciprocal_scale(h, n) = (h * n) >> 32` (not `h % n`), then `offset` is added. Without an
  explicit `seed` the kernel draws a random one per rule, so pointsman always writes one.
- nftables registers are 32 bits wide: each field of the key is zero-padded to a multiple of 4
  bytes (`ip saddr . tcp sport` hashes 8 bytes: address, port in network order, two zero bytes).

The golden vectors in tests/unit/kernel/test_jhash.py were read back from a 6.18 kernel through
conntrack marks (`ct mark set jhash ...`), and tests/netns/test_kernel_jhash.py repeats that check
against whatever kernel runs the tests. Little-endian hosts only: on a big-endian kernel the word
reads differ.
"""

from __future__ import annotations

from collections.abc import Callable

JHASH_INITVAL = 0xDEADBEEF
"""lookup3's arbitrary start value, `JHASH_INITVAL` in jhash.h."""

MASK32 = 0xFFFFFFFF
REGISTER_BYTES = 4
"""nftables registers hold 32 bits; shorter fields are zero-padded to this size."""

DEFAULT_SEED = 0x706D616E
"""The seed pointsman writes into every jhash rule (ASCII "pman"). Fixed, so that the kernel and
userspace agree and restarts keep every key on its slot; a random seed would move them."""


def _rol(value: int, shift: int) -> int:
    return ((value << shift) | (value >> (32 - shift))) & MASK32


def _mix(a: int, b: int, c: int) -> tuple[int, int, int]:
    """lookup3 `mix()`: reversible mixing of three 32-bit words."""
    a = ((a - c) & MASK32) ^ _rol(c, 4)
    c = (c + b) & MASK32
    b = ((b - a) & MASK32) ^ _rol(a, 6)
    a = (a + c) & MASK32
    c = ((c - b) & MASK32) ^ _rol(b, 8)
    b = (b + a) & MASK32
    a = ((a - c) & MASK32) ^ _rol(c, 16)
    c = (c + b) & MASK32
    b = ((b - a) & MASK32) ^ _rol(a, 19)
    a = (a + c) & MASK32
    c = ((c - b) & MASK32) ^ _rol(b, 4)
    b = (b + a) & MASK32
    return a, b, c


def _final(a: int, b: int, c: int) -> int:
    """lookup3 `final()`: the last avalanche; only `c` is the hash."""
    c = ((c ^ b) - _rol(b, 14)) & MASK32
    a = ((a ^ c) - _rol(c, 11)) & MASK32
    b = ((b ^ a) - _rol(a, 25)) & MASK32
    c = ((c ^ b) - _rol(b, 16)) & MASK32
    a = ((a ^ c) - _rol(c, 4)) & MASK32
    b = ((b ^ a) - _rol(a, 14)) & MASK32
    c = ((c ^ b) - _rol(b, 24)) & MASK32
    return c


def _word(data: bytes, at: int) -> int:
    return int.from_bytes(data[at:at + 4], "little")


def jhash(data: bytes, initval: int = 0) -> int:
    """Linux `jhash(key, length, initval)` on a little-endian machine: an unsigned 32-bit hash."""
    length = len(data)
    a = b = c = (JHASH_INITVAL + length + initval) & MASK32
    at = 0
    remaining = length
    while remaining > 12:
        a = (a + _word(data, at)) & MASK32
        b = (b + _word(data, at + 4)) & MASK32
        c = (c + _word(data, at + 8)) & MASK32
        a, b, c = _mix(a, b, c)
        at += 12
        remaining -= 12
    if remaining == 0:
        return c
    # The kernel adds the last 1..12 bytes byte by byte into a, b, c; zero bytes add nothing,
    # so padding the tail to 12 bytes and reading words gives the same sums.
    tail = data[at:] + bytes(12 - remaining)
    a = (a + _word(tail, 0)) & MASK32
    b = (b + _word(tail, 4)) & MASK32
    c = (c + _word(tail, 8)) & MASK32
    return _final(a, b, c)


def reciprocal_scale(value: int, modulus: int) -> int:
    """Linux `reciprocal_scale()`: map a 32-bit value into [0, modulus) with a multiply and shift."""
    return (value * modulus) >> 32


def registers(key: bytes, field_sizes: tuple[int, ...] | None = None) -> bytes:
    """Lay out a key as nftables registers hold it: every field zero-padded to 4 bytes.

    `field_sizes` lists the fields of a concatenation in bytes; None treats `key` as one field.
    """
    sizes = (len(key),) if field_sizes is None else field_sizes
    if sum(sizes) != len(key):
        raise ValueError(f"fields of {sizes} bytes do not make a key of {len(key)} bytes")
    out = bytearray()
    at = 0
    for size in sizes:
        out += key[at:at + size]
        out += bytes(-size % REGISTER_BYTES)
        at += size
    return bytes(out)


def nft_jhash(data: bytes, modulus: int, seed: int, offset: int = 0) -> int:
    """What `jhash <data> mod <modulus> seed <seed> offset <offset>` evaluates to.

    `data` are the register bytes (see `registers`), exactly what the kernel hashes.
    """
    if not 1 <= modulus <= MASK32:
        raise ValueError(f"modulus must be between 1 and 2**32 - 1, got {modulus}")
    return reciprocal_scale(jhash(data, seed & MASK32), modulus) + offset


def source_key_fields(key: bytes) -> tuple[int, ...]:
    """Field sizes of a `pointsman.balance.hashing.source_key`: address, then maybe a port."""
    if len(key) in (4, 16):
        return (len(key),)
    if len(key) in (6, 18):
        return (len(key) - 2, 2)
    raise ValueError(f"not a source key (4, 6, 16 or 18 bytes): {len(key)} bytes")


def slot_of(key: bytes, slots: int, seed: int = DEFAULT_SEED) -> int:
    """The kernel slot of a `source_key` (packed address, optionally a 2-byte port)."""
    return nft_jhash(registers(key, source_key_fields(key)), slots, seed)


def kernel_key_hash(slots: int, seed: int = DEFAULT_SEED) -> Callable[[bytes], int]:
    """A `key_hash` for `Maglev` that makes its pick the kernel's: `key_hash(key) % slots` is the
    slot the kernel rule computes for the same source key (the value is already below `slots`)."""
    if not 1 <= slots <= MASK32:
        raise ValueError(f"slots must be between 1 and 2**32 - 1, got {slots}")

    def key_hash(key: bytes) -> int:
        return slot_of(key, slots, seed)

    return key_hash
