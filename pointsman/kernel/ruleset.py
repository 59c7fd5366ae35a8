"""The nftables text and JSON pointsman writes, as pure functions of a `ListenerSpec`.

Everything lives in one table, `inet pointsman`; pointsman never reads or writes another. Each
listener owns its objects, all named `l_<listener>_...`, so listeners come and go independently:

    counter l_web_new, l_web_rejected, l_web_in, l_web_out         per listener
    counter l_web_b<k>_new, _in, _out                               per backend (k: a stable index)
    map     l_web_slots  { typeof numgen inc mod 2 : ip daddr . tcp dport }   slot -> backend
    map     l_web_bnew, l_web_bin, l_web_bout  { ipv4_addr . inet_service : counter }
    chain   l_web_dnat        nat    prerouting  -100  count new, DNAT through the slot map
    chain   l_web_dnat_local  nat    output      -100  the same for clients on this host
    chain   l_web_guard       filter prerouting  -90   no slot matched: reset / ICMP
    chain   l_web_guard_local filter output      -90   (only un-NATed packets reach these)
    chain   l_web_snat        nat    postrouting 100   per-backend new flows; masquerade
    chain   l_web_fwd         filter forward     10    -> l_web_count: bytes both ways

A NAT chain only sees a flow's first packet, so new-flow counters live there and byte counters
live in the forward chain (after DNAT, before SNAT: the backend is `daddr` going in, `saddr`
coming back). Structure is written as text (nft 1.0.6 cannot read its own JSON for `typeof` and
concatenated maps); element changes are JSON. Each is one transaction, so the kernel never sees a
half-written listener or slot map.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from pointsman.kernel.plan import ListenerSpec, SlotDiff, Target

TABLE = "pointsman"
FAMILY = "inet"
TABLE_REF = f"{FAMILY} {TABLE}"

JsonCommand = dict[str, Any]

# Chains in deletion order: base chains (which jump) before the chain they jump to.
_BASE_CHAINS = ("dnat", "dnat_local", "guard", "guard_local", "snat", "fwd")
_CHAINS = (*_BASE_CHAINS, "count")
_LISTENER_COUNTERS = ("new", "rejected", "in", "out")
_BACKEND_MAPS = ("bnew", "bin", "bout")
BACKEND_COUNTER_KINDS = ("new", "in", "out")

PRIORITY_DSTNAT = -100  # NF_IP_PRI_NAT_DST, nft's `dstnat`
PRIORITY_GUARD = -90  # after DNAT: only packets to the VIP that no slot took are still addressed to it
PRIORITY_SRCNAT = 100  # NF_IP_PRI_NAT_SRC, nft's `srcnat`
PRIORITY_COUNT = 10  # after the usual filter chains (0): count what they let through


class Names:
    """Object names of one listener. Listener names are [A-Za-z0-9_.-]+, all legal in nft names."""

    __slots__ = ("prefix",)

    def __init__(self, listener: str) -> None:
        self.prefix = f"l_{listener}"

    def chain(self, kind: str) -> str:
        return f"{self.prefix}_{kind}"

    def counter(self, kind: str) -> str:
        return f"{self.prefix}_{kind}"

    def backend_counter(self, index: int, kind: str) -> str:
        return f"{self.prefix}_b{index}_{kind}"

    @property
    def slots(self) -> str:
        return f"{self.prefix}_slots"

    def backend_map(self, kind: str) -> str:
        return f"{self.prefix}_b{kind}"

    def owns(self, name: str) -> bool:
        return name.startswith(self.prefix + "_")


def _addr_type(spec: ListenerSpec) -> str:
    return "ipv6_addr" if spec.family == "ip6" else "ipv4_addr"


def _vip_match(spec: ListenerSpec) -> str:
    return f"{spec.family} daddr {spec.vip} {spec.protocol} dport {spec.port}"


def _ct_match(spec: ListenerSpec) -> str:
    """Packets of flows whose original destination is the VIP (either direction, after DNAT)."""
    return (f"meta l4proto {spec.protocol} ct original {spec.family} daddr {spec.vip} "
            f"ct original proto-dst {spec.port}")


def _index_expr(spec: ListenerSpec) -> str:
    if spec.dispatch == "numgen":
        return f"numgen inc mod {spec.slots}"
    key = f"{spec.family} saddr"
    if spec.hash_key == "source_ip_port":
        key += f" . {spec.protocol} sport"
    return f"jhash {key} mod {spec.slots} seed 0x{spec.seed:08x}"


def _reject(spec: ListenerSpec) -> str:
    return "reject with tcp reset" if spec.protocol == "tcp" else "reject with icmpx port-unreachable"


def _target_text(target: Target) -> str:
    return f"{target[0]} . {target[1]}"


def listener_text(spec: ListenerSpec, targets: Sequence[Target | None] | None = None) -> str:
    """Create (or re-create the rules of) one listener, with its slot map's full contents.

    Idempotent: `add` of an existing table, chain, map or counter is a no-op, chains are flushed
    and refilled, so a reload that changes slots, hash key or SNAT keeps the counters.
    """
    n = Names(spec.name)
    t = TABLE_REF
    lines = [f"add table {t}"]
    lines += [f"add counter {t} {n.counter(kind)}" for kind in _LISTENER_COUNTERS]
    lines.append(f"add map {t} {n.slots} {{ typeof numgen inc mod 2 : "
                 f"{spec.family} daddr . {spec.protocol} dport ; }}")
    lines += [f"add map {t} {n.backend_map(kind)} {{ type {_addr_type(spec)} . inet_service : counter ; }}"
              for kind in BACKEND_COUNTER_KINDS]
    # Numeric priorities: nft 1.0.6 accepts names such as `dstnat` only on some hooks.
    hooks = {
        "dnat": f"type nat hook prerouting priority {PRIORITY_DSTNAT}",
        "dnat_local": f"type nat hook output priority {PRIORITY_DSTNAT}",
        "guard": f"type filter hook prerouting priority {PRIORITY_GUARD}",
        "guard_local": f"type filter hook output priority {PRIORITY_GUARD}",
        "snat": f"type nat hook postrouting priority {PRIORITY_SRCNAT}",
        "fwd": f"type filter hook forward priority {PRIORITY_COUNT}",
    }
    for kind in _BASE_CHAINS:
        lines.append(f"add chain {t} {n.chain(kind)} {{ {hooks[kind]} ; policy accept ; }}")
    lines.append(f"add chain {t} {n.chain('count')}")
    lines += [f"flush chain {t} {n.chain(kind)}" for kind in _CHAINS]
    dnat = (f"{_vip_match(spec)} counter name \"{n.counter('new')}\" "
            f"dnat {spec.family} addr . port to {_index_expr(spec)} map @{n.slots}")
    guard = f"{_vip_match(spec)} counter name \"{n.counter('rejected')}\" {_reject(spec)}"
    ct = _ct_match(spec)
    proto = spec.protocol
    fam = spec.family
    rules = [
        ("dnat", dnat),
        ("dnat_local", dnat),
        ("guard", guard),
        ("guard_local", guard),
        # A flow to an address with no element here breaks this rule only: keep masquerade apart.
        ("snat", f"{ct} counter name {fam} daddr . {proto} dport map @{n.backend_map('new')}"),
    ]
    if spec.snat:
        rules.append(("snat", f"{ct} masquerade"))
    rules += [
        ("fwd", f"{ct} jump {n.chain('count')}"),
        ("count", f"ct direction original counter name \"{n.counter('in')}\""),
        ("count", f"ct direction reply counter name \"{n.counter('out')}\""),
        ("count", f"ct direction original counter name {fam} daddr . {proto} dport "
                  f"map @{n.backend_map('in')}"),
        ("count", f"ct direction reply counter name {fam} saddr . {proto} sport "
                  f"map @{n.backend_map('out')}"),
    ]
    lines += [f"add rule {t} {n.chain(kind)} {rule}" for kind, rule in rules]
    if targets is not None:
        lines.append(f"flush map {t} {n.slots}")
        elements = [f"{i} : {_target_text(x)}" for i, x in enumerate(targets) if x is not None]
        if elements:
            lines.append(f"add element {t} {n.slots} {{ {', '.join(elements)} }}")
    return "\n".join(lines) + "\n"


def remove_listener_text(listener: str, backend_counters: Iterable[str] = ()) -> str:
    """Delete one listener's objects in one transaction (rules first, then what they used).

    Established flows keep working: their NAT lives in conntrack entries, not in these rules.
    """
    n = Names(listener)
    t = TABLE_REF
    lines = [f"flush chain {t} {n.chain(kind)}" for kind in _CHAINS]
    lines += [f"delete chain {t} {n.chain(kind)}" for kind in _CHAINS]
    lines.append(f"delete map {t} {n.slots}")
    lines += [f"delete map {t} {n.backend_map(kind)}" for kind in BACKEND_COUNTER_KINDS]
    lines += [f"delete counter {t} {n.counter(kind)}" for kind in _LISTENER_COUNTERS]
    lines += [f"delete counter {t} {name}" for name in backend_counters]
    return "\n".join(lines) + "\n"


def stop_dnat_text(listener: str) -> str:
    """Stop taking new flows (no DNAT: the guard now refuses them); counting continues."""
    n = Names(listener)
    return "".join(f"flush chain {TABLE_REF} {n.chain(kind)}\n" for kind in ("dnat", "dnat_local"))


# --- JSON: elements and counters ---------------------------------------------------------------------


def _ref(name: str) -> dict[str, str]:
    return {"family": FAMILY, "table": TABLE, "name": name}


def _concat(target: Target) -> dict[str, list[str | int]]:
    return {"concat": [target[0], target[1]]}


def slot_commands(listener: str, diff: SlotDiff) -> list[JsonCommand]:
    """Apply a slot diff: deletes, then adds (a changed slot is in both)."""
    n = Names(listener)
    commands: list[JsonCommand] = []
    if diff.delete:
        commands.append({"delete": {"element": {**_ref(n.slots), "elem": list(diff.delete)}}})
    if diff.add:
        elem = [[i, _concat(target)] for i, target in diff.add]
        commands.append({"add": {"element": {**_ref(n.slots), "elem": elem}}})
    return commands


def replace_slots_commands(listener: str, targets: Sequence[Target | None]) -> list[JsonCommand]:
    """Replace the whole slot map (flush and fill): the fallback when a diff cannot apply."""
    n = Names(listener)
    commands: list[JsonCommand] = [{"flush": {"map": _ref(n.slots)}}]
    elem = [[i, _concat(x)] for i, x in enumerate(targets) if x is not None]
    if elem:
        commands.append({"add": {"element": {**_ref(n.slots), "elem": elem}}})
    return commands


def add_backend_commands(listener: str, index: int, target: Target) -> list[JsonCommand]:
    """Counters for a backend joining the listener, and their entries in the counter maps."""
    n = Names(listener)
    commands: list[JsonCommand] = []
    for kind in BACKEND_COUNTER_KINDS:
        name = n.backend_counter(index, kind)
        commands.append({"add": {"counter": _ref(name)}})
        commands.append({"add": {"element": {**_ref(n.backend_map(kind)),
                                             "elem": [[_concat(target), name]]}}})
    return commands


def remove_backend_commands(listener: str, index: int, target: Target) -> list[JsonCommand]:
    """The reverse of `add_backend_commands`: map entries first, then the counters they name."""
    n = Names(listener)
    commands: list[JsonCommand] = [
        {"delete": {"element": {**_ref(n.backend_map(kind)), "elem": [_concat(target)]}}}
        for kind in BACKEND_COUNTER_KINDS
    ]
    commands += [{"delete": {"counter": _ref(n.backend_counter(index, kind))}}
                 for kind in BACKEND_COUNTER_KINDS]
    return commands
