"""A listener's allow/deny lists as the kernel holds them: two nftables interval sets. Pure.

The proxy asks `protect.acl.Acl.refuses` per connection; the kernel data plane puts the same lists
into two sets of the listener (`l_<name>_allow`, `l_<name>_deny`, `flags interval`) that its
rules look the client's source address up in, so a refused SYN is dropped in the kernel.

A kernel listener serves one address family (DNAT cannot change it, so VIPs and backends share
one), and every client packet it sees is of that family: only that family's prefixes can ever
match, and the others are left out. IPv4-mapped prefixes were already stored as IPv4 by
`protect.acl.normalise`, the rule the proxy applies.

The rules never change with the lists (a structure change would be a bigger transaction, and the
rules must not depend on whether a list is empty):

- deny: `saddr @deny drop`. An empty set matches nothing.
- allow: `saddr != @allow drop`, and an empty allow list (no allow list: everyone passes) is
  written as the whole address space, so the same rule lets everyone through.

Prefixes are merged into sorted, disjoint, non-adjacent intervals before they are written: nft
refuses overlapping elements in an interval set ("10.0.0.0/8" and "10.1.0.0/16" together), and
merging makes the set the smallest that matches the same addresses, so that changes can be
written as a diff of intervals (a one-prefix change to a list of 100 000 is one element).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pointsman.protect.acl import AclLists, normalise

Interval = tuple[int, int]
"""First and last address of a run of addresses, as integers."""

_BITS = {4: 32, 6: 128}


def _span(prefix: str) -> tuple[int, Interval]:
    """(IP version, interval) of one prefix. IPv4 in canonical form ("10.0.0.0/8", what
    `AclLists` holds) takes a fast path (inet_pton: a 100 000-prefix list converts in a tenth of
    the time `ipaddress` takes); anything else goes through `normalise`."""
    address, _, length = prefix.partition("/")
    if ":" not in address and length.isdigit() and int(length) <= 32:
        try:
            number = int.from_bytes(socket.inet_pton(socket.AF_INET, address), "big")
        except OSError:
            pass
        else:
            host = (1 << (32 - int(length))) - 1
            if not number & host:
                return 4, (number, number | host)
    network = normalise(prefix)
    return network.version, (int(network.network_address), int(network.broadcast_address))


def merged(prefixes: Iterable[str], version: int) -> tuple[Interval, ...]:
    """The prefixes of IP `version` (others are left out) as sorted, disjoint, non-adjacent
    intervals covering exactly the same addresses."""
    spans = []
    for prefix in prefixes:
        found, span = _span(prefix)
        if found == version:
            spans.append(span)
    spans.sort()
    out: list[Interval] = []
    for first, last in spans:
        if out and first <= out[-1][1] + 1:
            if last > out[-1][1]:
                out[-1] = (out[-1][0], last)
        else:
            out.append((first, last))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class KernelAcl:
    """The contents of a listener's two sets."""

    version: int  # 4 or 6: the listener's family
    allow: tuple[Interval, ...]
    deny: tuple[Interval, ...]


def kernel_acl(lists: AclLists, version: int) -> KernelAcl:
    """The sets for `lists` on a listener of IP `version` (an empty allow list allows all)."""
    allow = merged(lists.allow, version) if lists.allow else ((0, (1 << _BITS[version]) - 1),)
    return KernelAcl(version, allow, merged(lists.deny, version))


def _address(value: int, version: int) -> str:
    return str(ipaddress.IPv4Address(value) if version == 4 else ipaddress.IPv6Address(value))


def _prefix_length(interval: Interval, version: int) -> int | None:
    """The prefix length when the interval is exactly one prefix, else None."""
    first, last = interval
    size = last - first + 1
    if size & (size - 1) or first % size:
        return None
    return _BITS[version] - (size.bit_length() - 1)


def element_text(interval: Interval, version: int) -> str:
    """One set element as nft text: "192.0.2.7", "10.0.0.0/8" or "10.0.0.3-10.0.0.9"."""
    length = _prefix_length(interval, version)
    if length == _BITS[version]:
        return _address(interval[0], version)
    if length is not None:
        return f"{_address(interval[0], version)}/{length}"
    return f"{_address(interval[0], version)}-{_address(interval[1], version)}"


def element_json(interval: Interval, version: int) -> Any:
    """One set element in libnftables JSON (an address, a prefix or a range)."""
    length = _prefix_length(interval, version)
    if length == _BITS[version]:
        return _address(interval[0], version)
    if length is not None:
        return {"prefix": {"addr": _address(interval[0], version), "len": length}}
    return {"range": [_address(interval[0], version), _address(interval[1], version)]}


@dataclass(frozen=True, slots=True)
class SetDiff:
    """Element changes that turn one set's intervals into another's."""

    delete: tuple[Interval, ...]
    add: tuple[Interval, ...]


def set_diff(old: Iterable[Interval], new: Iterable[Interval]) -> SetDiff:
    """Intervals to delete and to add. Both sides are disjoint interval sets, so what is kept and
    what is added never overlap: the kernel can apply both in one transaction."""
    before, after = set(old), set(new)
    return SetDiff(tuple(sorted(before - after)), tuple(sorted(after - before)))
