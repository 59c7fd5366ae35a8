"""Source allow/deny lists for a listener: prefix sets and the rule that combines them. Pure.

`Acl.refuses(ip)` is asked once per new connection (TCP) or new session (UDP), so a lookup must
stay cheap with thousands of prefixes. A `PrefixSet` keeps, per address family and per prefix
length present, a set of network numbers (the address shifted right by the host bits): a lookup
is one shift and one set probe per distinct prefix length, at most 33 (IPv4) or 129 (IPv6)
whatever the number of prefixes. Real lists use a handful of lengths.

The rule: deny wins; else, with an allow list, only its prefixes pass; with none, everyone does.
Client addresses follow `client_ip`'s rule: an IPv4-mapped IPv6 peer (a v4 client on a dual-stack
socket) is judged as the IPv4 address, exactly as hashing, limits and PROXY trust judge it; for
the same reason a prefix written inside ::ffff:0:0/96 is stored as the IPv4 prefix it maps.
`address_key` applies that rule on packed bytes (inet_pton), about eight times cheaper than
parsing with `ipaddress`; a unit test holds it equal to `client_ip` on every input.

`AclLists` is what a listener holds: the lists in force and the lists its config file said when
they were last loaded, so that a list changed through the admin API survives a reload that does
not change that list in the file (and a file that changes it wins). Nothing here does I/O.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Literal

from pointsman.balance.hashing import client_ip

__all__ = ["MAX_PREFIXES", "Acl", "AclLists", "AclOn", "PrefixSet", "address_key", "canonical",
           "normalise", "parse_networks"]

AclOn = Literal["peer", "proxy_header"]
Kind = Literal["allow", "deny"]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Most prefixes one list may hold. A full IPv4 country block list is a few tens of thousands of
# prefixes; the cap bounds what one admin API call can make us hold (about 100 bytes a prefix).
MAX_PREFIXES = 100_000

_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_MAPPED_PACKED = bytes(10) + b"\xff\xff"


def address_key(ip: str) -> tuple[int, int]:
    """(IP version, address as an integer) of a client address, IPv4-mapped ones as IPv4.
    ValueError when `ip` is not an IP address."""
    try:
        if ":" in ip:
            packed = socket.inet_pton(socket.AF_INET6, ip)
            if packed[:12] == _MAPPED_PACKED:
                return 4, int.from_bytes(packed[12:], "big")
            return 6, int.from_bytes(packed, "big")
        return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, ip), "big")
    except OSError:
        address = client_ip(ip)  # a scoped address ("fe80::1%eth0"), or a ValueError
        return address.version, int(address)


Prefix = tuple[int, int, int]  # (IP version, network number with host bits cleared, length)


def _prefix(value: object) -> Prefix:
    """Parse one prefix. IPv4 goes through inet_pton (about ten times cheaper than `ipaddress`, so
    a list of 100 000 prefixes compiles in a fraction of a second); the rest through `normalise`.
    A unit test holds both paths equal."""
    if isinstance(value, str) and ":" not in value:
        address, slash, length = value.strip().partition("/")
        if length.isdigit() if slash else True:
            try:
                number = int.from_bytes(socket.inet_pton(socket.AF_INET, address), "big")
            except OSError:
                pass
            else:
                bits = int(length) if slash else 32
                if bits <= 32 and (not slash or length == str(bits)):
                    return 4, number >> (32 - bits) << (32 - bits), bits
    network = normalise(value)
    return network.version, int(network.network_address), network.prefixlen


def canonical(value: object) -> str:
    """The canonical text of one prefix ("10.0.0.0/8"); ValueError names a bad one."""
    version, number, bits = _prefix(value)
    if version == 4:
        return f"{socket.inet_ntop(socket.AF_INET, number.to_bytes(4, 'big'))}/{bits}"
    return str(ipaddress.IPv6Network((number, bits)))


def normalise(value: object) -> Network:
    """One prefix as written ("10.0.0.0/8", "2001:db8::/32", "192.0.2.7"); host bits are cleared.
    A prefix inside ::ffff:0:0/96 becomes the IPv4 prefix it maps. ValueError names the input."""
    if not isinstance(value, str):
        raise ValueError(f"expected an address or prefix such as 10.0.0.0/8, got {value!r}")
    try:
        network = ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise ValueError(f"expected an address or prefix such as 10.0.0.0/8, got {value!r}") from None
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96 and \
            network.subnet_of(_MAPPED):
        mapped = ipaddress.IPv4Address(int(network.network_address) & 0xFFFFFFFF)
        return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


def parse_networks(values: Iterable[object]) -> tuple[str, ...]:
    """Canonical, de-duplicated prefixes in first-seen order; ValueError on the first bad one or
    past MAX_PREFIXES."""
    out: dict[str, None] = {}
    for value in values:
        out[canonical(value)] = None
        if len(out) > MAX_PREFIXES:
            raise ValueError(f"more than {MAX_PREFIXES} prefixes in one list")
    return tuple(out)


class PrefixSet:
    """Membership of an address in any of a set of prefixes (both families)."""

    __slots__ = ("_v4", "_v6", "size")

    def __init__(self, networks: Iterable[str | Network]) -> None:
        tables: dict[int, dict[int, set[int]]] = {4: {}, 6: {}}
        count = 0
        for item in networks:
            version, number, length = _prefix(item if isinstance(item, str) else str(item))
            shift = (32 if version == 4 else 128) - length
            tables[version].setdefault(shift, set()).add(number >> shift)
            count += 1
        self.size = count
        # Longest prefixes first (smallest shift): the order does not change the answer, only
        # which probe finds a hit first; specific entries (single hosts) are the common case.
        self._v4 = tuple((shift, frozenset(nets)) for shift, nets in sorted(tables[4].items()))
        self._v6 = tuple((shift, frozenset(nets)) for shift, nets in sorted(tables[6].items()))

    def __contains__(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        return self.has(address.version, int(address))

    def has(self, version: int, value: int) -> bool:
        """True when the address `value` of IP `version` is in one of the prefixes."""
        # A plain loop, not any(<generator>): this runs per connection and the generator costs more.
        for shift, networks in self._v4 if version == 4 else self._v6:  # noqa: SIM110
            if value >> shift in networks:
                return True
        return False

    def __len__(self) -> int:
        return self.size


@dataclass(frozen=True, slots=True)
class Acl:
    """The compiled lists of one listener. `allow` None: no allow list (everyone may pass)."""

    allow: PrefixSet | None
    deny: PrefixSet
    on: AclOn = "peer"

    def refuses(self, ip: str) -> bool:
        """True when `ip` (a peer or PROXY-header address, as text) must be refused."""
        try:
            version, value = address_key(ip)
        except ValueError:
            return self.allow is not None  # not an IP (a Unix peer): only an allow list refuses
        if self.deny.has(version, value):
            return True
        return self.allow is not None and not self.allow.has(version, value)


@dataclass(frozen=True, slots=True)
class AclLists:
    """A listener's lists in force, and what its config file said when they were last loaded.

    An empty allow list means "no allow list" (everyone not denied passes), so that clearing the
    list through the API, or leaving it out of the file, can never lock every client out; to
    refuse everyone, deny 0.0.0.0/0 and ::/0.
    """

    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    on: AclOn = "peer"
    file_allow: tuple[str, ...] = ()
    file_deny: tuple[str, ...] = ()

    @classmethod
    def from_file(cls, allow: Iterable[str], deny: Iterable[str], on: AclOn,
                  previous: AclLists | None = None) -> AclLists:
        """The lists after a (re)load: a list the file changed takes the file's value; a list the
        file left as it was keeps what is in force (perhaps set through the admin API)."""
        file_allow, file_deny = parse_networks(allow), parse_networks(deny)
        if previous is None:
            return cls(file_allow, file_deny, on, file_allow, file_deny)
        return cls(
            previous.allow if previous.file_allow == file_allow else file_allow,
            previous.deny if previous.file_deny == file_deny else file_deny,
            on, file_allow, file_deny,
        )

    def replaced(self, kind: Kind, networks: Iterable[object]) -> AclLists:
        """The lists with one of them replaced (an admin API call); ValueError on a bad prefix."""
        parsed = parse_networks(networks)
        return replace(self, allow=parsed) if kind == "allow" else replace(self, deny=parsed)

    def get(self, kind: Kind) -> tuple[str, ...]:
        return self.allow if kind == "allow" else self.deny

    @property
    def changed_at_runtime(self) -> bool:
        return (self.allow, self.deny) != (self.file_allow, self.file_deny)

    def compile(self) -> Acl | None:
        """The matcher, or None when both lists are empty (then nothing is checked at all)."""
        if not self.allow and not self.deny:
            return None
        return Acl(PrefixSet(self.allow) if self.allow else None, PrefixSet(self.deny), self.on)
