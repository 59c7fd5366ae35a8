"""The tc data path's BPF maps, as bytes: pure encoding, no I/O.

`bpf/stateless.c` declares the maps; this module is the other half of that contract. Each
function packs one key or value exactly as the C struct lays it out (little-endian host order
for the integers the program uses as numbers, network order for addresses and ports, which it
copies into packets), and `slot_values` turns the slot table `plan.slot_targets` computes into
the values of the listener's stretch of `slot_map`. Keeping the layout here, next to tests that
pin it, leaves the loader (`tcbpf.py`) a thin adapter.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pointsman.kernel.plan import Target

MAX_LISTENERS = 256
"""`MAX_LISTENERS` in stateless.c: entries of `vips` and `listener_stats`."""
MAX_BACKENDS = 4096
"""`MAX_BACKENDS` in stateless.c: entries of `replies` and `backend_stats`."""
MAX_SLOTS = 1 << 18
"""`MAX_SLOTS` in stateless.c: the entries of `slot_map`, shared by every tc listener."""

PROTOCOLS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}

VIP_KEY = struct.Struct("<4s2sBx")  # addr (network order), port (network order), proto, pad
VIP_VALUE = struct.Struct("<IIIHH")  # base, slots, seed, flags, listener
FLAG_HASH_PORT = 1
"""`FLAG_HASH_PORT`: the slot hash covers the source port too (hash_key: source_ip_port)."""
FLAG_DRAINING = 2
"""`FLAG_DRAINING`: the listener is stopping; the program refuses TCP SYNs and UDP datagrams."""
SLOT_VALUE = struct.Struct("<4s2sH")  # addr, port (network order), backend index
REPLY_VALUE = struct.Struct("<4s2sH")  # vip, vport (network order), backend index
BACKEND_STATS = struct.Struct("<QQQQQ")  # packets_in, bytes_in, packets_out, bytes_out, new_flows
LISTENER_STATS = struct.Struct("<Q")  # rejected
INDEX = struct.Struct("<I")
EMPTY_SLOT = bytes(SLOT_VALUE.size)
"""An empty slot: address 0.0.0.0, which the program reads as "no backend" (drop, rejected)."""


def _addr(address: str) -> bytes:
    ip = ipaddress.ip_address(address)
    if ip.version != 4:
        raise ValueError(f"the tc data path is IPv4 only, got {address}")
    return ip.packed


def _port(port: int) -> bytes:
    return port.to_bytes(2, "big")


def index_key(index: int) -> bytes:
    """The key of an array map (slot_map, backend_stats, listener_stats)."""
    return INDEX.pack(index)


def endpoint_key(address: str, port: int, protocol: str) -> bytes:
    """A key of `vips` (the VIP) or `replies` (a backend): address, port, protocol."""
    return VIP_KEY.pack(_addr(address), _port(port), PROTOCOLS[protocol])


def vip_value(base: int, slots: int, seed: int, hash_port: bool, listener: int,
              draining: bool = False) -> bytes:
    """Where the listener's slots start in `slot_map`, how many, the jhash seed and key, the
    index of its counters, and whether it is stopping."""
    flags = (FLAG_HASH_PORT if hash_port else 0) | (FLAG_DRAINING if draining else 0)
    return VIP_VALUE.pack(base, slots, seed, flags, listener)


def slot_value(target: Target | None, backend: int) -> bytes:
    """One slot: the backend's address and port and the index of its counters."""
    if target is None:
        return EMPTY_SLOT
    return SLOT_VALUE.pack(_addr(target[0]), _port(target[1]), backend)


def reply_value(vip: str, port: int, backend: int) -> bytes:
    """What a backend's replies are rewritten to (the VIP and port), and its counters' index."""
    return REPLY_VALUE.pack(_addr(vip), _port(port), backend)


def slot_values(targets: Sequence[Target | None], index: Mapping[Target, int]) -> list[bytes]:
    """The values of a listener's slots; `index` maps each backend's target to its counters."""
    return [slot_value(t, index[t]) if t is not None else EMPTY_SLOT for t in targets]


def changed_slots(old: Sequence[bytes], new: Sequence[bytes]) -> list[int]:
    """Slots whose value differs: one map update each (an array map's update is atomic per slot)."""
    if len(old) != len(new):
        raise ValueError(f"slot tables differ in size: {len(old)} and {len(new)}")
    return [i for i, (a, b) in enumerate(zip(old, new, strict=True)) if a != b]


@dataclass(frozen=True, slots=True)
class BackendCounters:
    """One backend's counters, summed over CPUs."""

    packets_in: int = 0
    bytes_in: int = 0
    packets_out: int = 0
    bytes_out: int = 0
    new_flows: int = 0


def sum_per_cpu(raw: bytes, cpus: int, record: struct.Struct) -> tuple[int, ...]:
    """Sum a per-CPU array value (`cpus` records, each padded to 8 bytes) field by field."""
    stride = (record.size + 7) // 8 * 8
    if len(raw) < stride * cpus:
        raise ValueError(f"a per-CPU value of {len(raw)} bytes is short for {cpus} CPUs")
    totals = [0] * len(record.unpack_from(raw, 0))
    for cpu in range(cpus):
        for i, value in enumerate(record.unpack_from(raw, cpu * stride)):
            totals[i] += value
    return tuple(totals)


def backend_counters(raw: bytes, cpus: int) -> BackendCounters:
    return BackendCounters(*sum_per_cpu(raw, cpus, BACKEND_STATS))


class SlotSpace:
    """Hands out stretches of the shared `slot_map` to listeners (first fit), and indices of the
    counter maps: one owner of the layout, so two listeners never share a slot or a counter."""

    def __init__(self, size: int = MAX_SLOTS) -> None:
        self.size = size
        self._taken: dict[str, tuple[int, int]] = {}

    def take(self, listener: str, slots: int) -> int:
        """The base of a free stretch of `slots` entries for `listener`: its own if it holds one
        of that size, else a new one that does not overlap the one it holds (so the old table
        serves until the listener switches to the new one), which it then releases."""
        held = self._taken.get(listener)
        if held is not None and held[1] == slots:
            return held[0]
        base = 0
        for start, count in sorted(self._taken.values()):
            if start - base >= slots:
                break
            base = max(base, start + count)
        if base + slots > self.size:
            raise ValueError(f"the tc slot map has no room for {slots} more slots "
                             f"({self.size} in all, shared by every tc listener)")
        self._taken[listener] = (base, slots)
        return base

    def release(self, listener: str) -> None:
        self._taken.pop(listener, None)


class Indices:
    """Small integers for names (listeners, backends), reused after release, below `limit`."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held: dict[str, int] = {}
        self._free: list[int] = []

    def take(self, name: str) -> int:
        if name in self._held:
            return self._held[name]
        if self._free:
            index = self._free.pop()
        elif len(self._held) < self.limit:
            index = len(self._held)
        else:
            raise ValueError(f"no more than {self.limit} in the tc data path's maps")
        self._held[name] = index
        return index

    def release(self, name: str) -> int | None:
        index = self._held.pop(name, None)
        if index is not None:
            self._free.append(index)
        return index
