"""What the kernel must do for one listener, decided in pure functions.

`spec_for` turns a listener and its pool config into a `ListenerSpec` (or says, all at once, why
the kernel cannot serve them); `slot_targets` turns a pool snapshot into the slot table: for each
of the listener's `slots`, the backend address new flows hashed (or counted) there are sent to.

How each algorithm maps onto the kernel's one lookup, `dnat to <index> map @slots`:

- maglev: index = `jhash <hash key> mod slots`; the table is pointsman's own weighted Maglev
  (`Maglev(candidates, slots, home_weights).table`, NSDI 2016 section 3.4), so the kernel picks
  what `Maglev(..., key_hash=kernel_key_hash(slots)).pick(key)` picks for the same client.
- round_robin: index = `numgen inc mod slots`, slot i holding the (i mod n)-th available backend.
  `slots` is prime, so where the counter wraps one backend can get one extra turn per cycle of
  `slots` connections (< 0.1 % at the default 4093).
- weighted_round_robin: the same counter over a table holding the first `slots` picks of nginx's
  smooth weighted round robin, so every backend's share of slots is its share of weight.

least_connections and power_of_two need live load per pick and source_hash is rendezvous hashing
over the backend list (no table): the kernel cannot do them, so such listeners are refused rather
than silently served by something else.

With `nat: stateless` no conntrack entry pins a flow, so every packet is sent where its slot
points: the index must be a function of the flow (jhash of the source), never a counter, and only
maglev qualifies. The slot table is the same in both modes, so a client lands on the same backend
whichever mode serves it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pointsman.balance.base import Candidate
from pointsman.balance.maglev import Maglev, is_prime
from pointsman.balance.weighted_round_robin import WeightedRoundRobin
from pointsman.config.model import ListenerConfig, PoolConfig
from pointsman.kernel.jhash import DEFAULT_SEED
from pointsman.pool.snapshot import BackendView

KERNEL_ALGORITHMS = ("maglev", "round_robin", "weighted_round_robin")
"""Algorithms the kernel data plane can serve (see the module docstring for how)."""

Family = Literal["ip", "ip6"]
Dispatch = Literal["jhash", "numgen"]
Nat = Literal["conntrack", "stateless"]
Target = tuple[str, int]
"""A backend address as the slot map holds it: (IP literal, port)."""


class KernelConfigError(RuntimeError):
    """The listener asks for something the kernel data plane cannot do; `issues` says what.

    A RuntimeError, like the other reasons the kernel data plane cannot start, so `pointsman run`
    prints it as "cannot start: ..." and exits."""

    def __init__(self, listener: str, issues: Sequence[str]) -> None:
        self.listener = listener
        self.issues = tuple(issues)
        super().__init__(f"listener {listener} (dataplane: kernel): " + "; ".join(issues))


@dataclass(frozen=True, slots=True)
class VipPorts:
    """One `bind` entry as the rules match it: an address and a port range (first == last for
    one port). Every port of a range is DNATed to the backend's port, as the proxy data plane
    forwards every socket of a range to the backend's port."""

    address: str
    first: int
    last: int

    @property
    def ports(self) -> str:
        """The port match as nft writes it: "443" or "30000-30100"."""
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"


@dataclass(frozen=True, slots=True)
class ListenerSpec:
    """Everything the nftables rules of one listener depend on.

    `vip` and `port` are the first bind entry's address and first port; `binds` lists every entry
    (empty: just `vip:port`). A stateless listener has exactly one address and one port."""

    name: str
    family: Family
    vip: str
    port: int
    protocol: Literal["tcp", "udp"]
    slots: int
    algorithm: str  # one of KERNEL_ALGORITHMS: fills the slot table
    dispatch: Dispatch  # what indexes it: jhash of the hash key (maglev) or a counter
    hash_key: Literal["source_ip", "source_ip_port"]
    snat: bool
    seed: int = DEFAULT_SEED
    nat: Nat = "conntrack"
    binds: tuple[VipPorts, ...] = ()

    @property
    def stateless(self) -> bool:
        return self.nat == "stateless"

    @property
    def entries(self) -> tuple[VipPorts, ...]:
        """Every address and port range the listener's rules match."""
        return self.binds or (VipPorts(self.vip, self.port, self.port),)


def family_of(address: str) -> Family:
    return "ip6" if ipaddress.ip_address(address).version == 6 else "ip"


def spec_for(listener: ListenerConfig, pool: PoolConfig) -> ListenerSpec:
    """Validate and translate; raises `KernelConfigError` listing every problem at once."""
    issues: list[str] = []
    entries, vip = _vips(listener, issues)
    if not is_prime(listener.kernel.slots):
        issues.append(f"kernel.slots must be prime (the Maglev table size), got {listener.kernel.slots}")
    if pool.algorithm not in KERNEL_ALGORITHMS:
        issues.append(f"pool {pool.name}: algorithm {pool.algorithm} is not available in the kernel "
                      f"(use one of {', '.join(KERNEL_ALGORITHMS)})")
    if pool.affinity is not None:
        issues.append(f"pool {pool.name}: affinity is not available in the kernel (conntrack keeps "
                      "each flow on its backend; maglev with hash_key source_ip keeps a source's)")
    if pool.proxy_protocol.send != "off":
        issues.append(f"pool {pool.name}: proxy_protocol.send needs the proxy data plane")
    if pool.source.mode != "default" or pool.source.addresses:
        issues.append(f"pool {pool.name}: source addresses are for the proxy; the kernel uses "
                      "kernel.snat (masquerade or none)")
    if listener.tls_routes or listener.default_pool is not None:
        issues.append("tls_routes read the ClientHello: they need the proxy data plane")
    if listener.proxy_protocol.accept != "off":
        issues.append("proxy_protocol.accept needs the proxy data plane")
    if listener.acl_on != "peer":
        issues.append("acl_on: proxy_header needs the proxy data plane (the kernel judges the "
                      "packet's source address: use acl_on: peer)")
    if listener.kernel.nat == "stateless" and pool.algorithm != "maglev":
        issues.append(f"pool {pool.name}: nat: stateless needs algorithm maglev ({pool.algorithm} "
                      "counts new flows; with no conntrack entry to pin a flow, every packet would "
                      "be counted to the next backend)")
    if listener.kernel.datapath == "tc":
        issues.extend(_tc_issues(listener, vip))
    limits = listener.limits
    if (limits.max_connections_per_source is not None or limits.new_connections_per_second is not None
            or limits.new_connections_per_second_per_source is not None):
        issues.append("limits are enforced by the proxy data plane only")
    if vip is not None:
        for backend in pool.backends:
            try:
                address = ipaddress.ip_address(backend.address.host)
            except ValueError:
                issues.append(f"backend {backend.id}: needs an IP address, got {backend.address.host!r}")
                continue
            if address.version != vip.version:
                issues.append(f"backend {backend.id}: IPv{address.version} behind an "
                              f"IPv{vip.version} VIP (DNAT cannot change the family)")
    if issues:
        raise KernelConfigError(listener.name, issues)
    assert vip is not None
    return ListenerSpec(
        name=listener.name,
        family="ip6" if vip.version == 6 else "ip",
        vip=str(vip),
        port=entries[0].first,
        protocol=listener.protocol,
        slots=listener.kernel.slots,
        algorithm=pool.algorithm,
        dispatch="jhash" if pool.algorithm == "maglev" else "numgen",
        hash_key=pool.hash_key,
        snat=listener.kernel.snat == "masquerade",
        nat=listener.kernel.nat,
        binds=entries if len(entries) > 1 or entries[0].first != entries[0].last else (),
    )


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _tc_issues(listener: ListenerConfig, vip: IPAddress | None) -> list[str]:
    """What `kernel.datapath: tc` (bpf/stateless.c) does not do that nftables does."""
    issues = []
    if vip is not None and vip.version != 4:
        issues.append("datapath: tc serves IPv4 VIPs only (use datapath: nftables for IPv6)")
    if listener.allow or listener.deny:
        issues.append("datapath: tc has no allow/deny lists (use datapath: nftables for them)")
    return issues


def _vips(listener: ListenerConfig, issues: list[str]) -> tuple[tuple[VipPorts, ...], IPAddress | None]:
    """The bind entries as VIPs and port ranges, and the first VIP (None if it is not one);
    problems go to `issues`."""
    entries: list[VipPorts] = []
    first: IPAddress | None = None
    for entry in listener.bind:
        try:
            vip = ipaddress.ip_address(entry.host)
        except ValueError:
            issues.append(f"bind must be an IP address, got {entry.host!r}")
            continue
        if vip.is_unspecified:
            issues.append(f"bind must be a specific address (the VIP), not {entry.host}")
        if first is None:
            first = vip
        elif vip.version != first.version:
            issues.append(f"bind mixes IPv{first.version} and IPv{vip.version} ({first}, {vip}): "
                          "a kernel listener serves one family (its backends'); use a listener "
                          "per family")
        entries.append(VipPorts(str(vip), entry.first, entry.last))
    if listener.kernel.nat == "stateless" and (
            len(entries) > 1 or any(e.first != e.last for e in entries)):
        issues.append("nat: stateless needs one address and one port (replies are rewritten to "
                      "the VIP and port with no state that says which of several the client "
                      "used); use nat: conntrack for address lists and port ranges")
    return tuple(entries), first


def slot_indices(algorithm: str, backends: Sequence[BackendView], slots: int) -> list[int]:
    """Backend index (into `backends`) per slot; -1 where no backend is available."""
    candidates = [Candidate(b.id, b.effective_weight) for b in backends]
    if algorithm == "maglev":
        home = [float(b.weight) for b in backends]
        return list(Maglev(candidates, slots, home_weights=home).table)
    available = [i for i, c in enumerate(candidates) if c.weight > 0]
    if not available:
        return [-1] * slots
    if algorithm == "round_robin":
        count = len(available)
        return [available[i % count] for i in range(slots)]
    if algorithm == "weighted_round_robin":
        picker = WeightedRoundRobin(candidates)
        return [pick if (pick := picker.pick(b"")) is not None else -1 for _ in range(slots)]
    raise ValueError(f"algorithm {algorithm!r} is not available in the kernel")


def target_of(backend: BackendView) -> Target:
    """The backend's address as the kernel writes it back (IPv6 in canonical form)."""
    return str(ipaddress.ip_address(backend.host)), backend.port


def slot_targets(algorithm: str, backends: Sequence[BackendView], slots: int) -> list[Target | None]:
    """The slot map's contents: the backend address per slot, None for an empty slot."""
    table = slot_indices(algorithm, backends, slots)
    addresses = [target_of(b) for b in backends]
    return [addresses[i] if i >= 0 else None for i in table]


@dataclass(frozen=True, slots=True)
class SlotDiff:
    """The element changes that turn one slot map into another."""

    delete: tuple[int, ...]
    add: tuple[tuple[int, Target], ...]

    def __len__(self) -> int:
        return len(self.delete) + len(self.add)


def slot_diff(old: Sequence[Target | None], new: Sequence[Target | None]) -> SlotDiff:
    """Elements to delete and to add; a changed slot is both (one transaction applies both)."""
    if len(old) != len(new):
        raise ValueError(f"slot tables differ in size: {len(old)} and {len(new)}")
    delete = tuple(i for i, (a, b) in enumerate(zip(old, new, strict=True)) if a is not None and a != b)
    add = tuple((i, b) for i, (a, b) in enumerate(zip(old, new, strict=True)) if b is not None and a != b)
    return SlotDiff(delete, add)
