"""Stable hashing shared by every hash policy (source hash, Maglev, sticky keys).

Hash policies must agree across worker processes, restarts and machines, so they use one fixed
function, xxHash64 (https://github.com/Cyan4973/xxHash, XXH64), and never Python's `hash()`, which
is randomised per process for str and bytes (PYTHONHASHSEED).
"""

from __future__ import annotations

import ipaddress
from socket import AF_INET, AF_INET6, inet_pton
from typing import Protocol

import xxhash

HASH_KEYS = ("source_ip", "source_ip_port")
"""The connection fields a hash policy may key on."""

_V4_MAPPED = bytes(10) + b"\xff\xff"  # the first 12 bytes of ::ffff:a.b.c.d


class _Hash64(Protocol):
    def __call__(self, data: bytes, seed: int = 0, /) -> int: ...


stable_hash64: _Hash64 = xxhash.xxh64_intdigest
"""`stable_hash64(data, seed=0)`: XXH64 of `data` as an unsigned 64-bit integer.

`seed` gives independent hash functions over the same input (Maglev needs two per backend). Bound
straight to the C function, not wrapped: pickers call it once per backend per connection, and a
Python wrapper costs more than the hash itself.
"""


def client_ip(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """Parse a client address; an IPv4-mapped IPv6 address (a v4 client seen on a dual-stack
    socket) becomes the IPv4 address, so hashing, limits and trust treat both alike."""
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def source_key(ip: str, port: int, hash_key: str) -> bytes:
    """Build the hash key for a client address.

    The packed binary address is used rather than the text, so "1.2.3.4", "::ffff:1.2.3.4" (a
    v4 client seen on a dual-stack socket) and differently spelled IPv6 addresses all hash alike.
    For "source_ip_port" the port follows as two big-endian bytes.
    """
    if hash_key == "source_ip":
        return packed_ip(ip)
    if hash_key == "source_ip_port":
        if not 0 <= port <= 0xFFFF:
            raise ValueError(f"port out of range: {port}")
        return packed_ip(ip) + port.to_bytes(2, "big")
    raise ValueError(f"unknown hash key {hash_key!r}; expected one of {HASH_KEYS}")


def packed_ip(ip: str) -> bytes:
    """`client_ip(ip).packed`: the spellings inet_pton reads (every address the kernel hands
    us) by inet_pton, about ten times faster than `ipaddress`, which a hash pool would pay on
    every connection; anything else (a scope id, a bad address: ValueError) by `ipaddress`."""
    try:
        return inet_pton(AF_INET, ip)
    except OSError:
        pass
    try:
        packed = inet_pton(AF_INET6, ip)
    except OSError:
        return client_ip(ip).packed
    return packed[12:] if packed[:12] == _V4_MAPPED else packed
