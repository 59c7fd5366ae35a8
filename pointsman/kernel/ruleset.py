"""The nftables text and JSON pointsman writes, as pure functions of a `ListenerSpec`.

Everything lives in one table, `inet pointsman`; pointsman never reads or writes another. Each
listener owns its objects, all named `l_<listener>_...`, so listeners come and go independently.
Both NAT modes share the counters, the per-backend counter maps, the allow/deny sets and the
local guard:

    counter l_web_new, l_web_rejected, l_web_denied                 per listener (never on the
                                                                    forwarding path: first packets
                                                                    no backend took)
    counter l_web_b<k>_new, _in, _out                               per backend (k: a stable index)
    map     l_web_bnew, l_web_bin, l_web_bout  { ipv4_addr . inet_service : counter }
    set     l_web_allow, l_web_deny  { ipv4_addr; flags interval }  the lists (kernel/acl.py)
    chain   l_web_guard_local filter output      -90   local clients no slot took: reset / ICMP

A forwarded packet is counted once, in its backend's counter; the listener's totals are the sums
(stats.py), so a listener costs no counter of its own per packet. The lists drop what they
refuse before anything else of the listener looks at a packet: in the DNAT chains (conntrack:
only a flow's first packet ever gets there, so established flows are never judged again) or,
stateless, for TCP SYNs in l_web_syn. Each `bind` entry (an address and a port or a port range,
`spec.entries`) gets its own match in every rule that names the VIP; a range is one match
(`tcp dport 30000-30100`), DNATed to the backend's port.

`nat: conntrack` (DNAT; the binding lives in each flow's conntrack entry):

    map     l_web_slots  { typeof numgen inc mod 2 : ip daddr . tcp dport }   slot -> backend
    chain   l_web_dnat        nat    prerouting  -100  DNAT through the slot map
    chain   l_web_guard       filter prerouting  -90   no slot matched: reset / ICMP, counted new
                                                       (only packets still addressed to the VIP
                                                       reach it)
    chain   l_web_dnat_local  nat    output      -100  the same for clients on this host
    chain   l_web_snat        nat    postrouting 100   per-backend new flows; masquerade
    chain   l_web_fwd         filter forward     10    -> l_web_count: bytes both ways

A NAT chain only sees a flow's first packet, so new-flow counters live there and byte counters
live in the forward chain (after DNAT, before SNAT: the backend is `daddr` going in, `saddr`
coming back).

`nat: stateless` (notrack; every packet rewritten, no state anywhere). Every stateless listener
of the table shares two base chains, which dispatch by verdict maps, so a packet crosses one
chain per hook however many listeners there are:

    map     stateless_vips4   { ipv4_addr . inet_proto . inet_service : verdict }  VIP -> goto l_web_sin
    set     stateless_replies4 { ipv4_addr . inet_proto . inet_service }  backends: replies, notrack
    map     stateless_rev4    { ipv4_addr . inet_proto . inet_service : verdict }  -> goto l_web_b<k>_rev
    chain   stateless_in   filter prerouting  -300  VIP packets -> their listener; replies notrack
                                                       (and accept: nothing more to do there)
    chain   stateless_out  filter postrouting  100  replies -> their backend's l_web_b<k>_rev
    (and the same three for IPv6, ..6)
    set     stateless_vports, stateless_bports { inet_service }  the VIPs' and backends' ports:
                                                 a bitmap test in front of each lookup above

and each listener has:

    map     l_web_slot_to  { typeof numgen inc mod 2 : verdict }  slot -> goto l_web_b<k>_sin
    chain   l_web_sin   (regular)  one jhash, one lookup: goto the slot's backend chain; refuse
                                   what no slot took
    chain   l_web_syn   (regular)  TCP SYNs: the lists (jumped to, returns what they let through)

and per backend k (created and removed with its counters):

    chain   l_web_b<k>_sin  (regular)  a SYN -> l_web_b<k>_syn; notrack, write its address (and
                                       port) as constants, count, accept
    chain   l_web_b<k>_syn  (regular)  jump l_web_syn; the same, counting `new` too (TCP)
    chain   l_web_b<k>_rev  (regular)  replies: count, write the VIP (and port) back as constants

-300 is the raw priority: notrack must come before conntrack (-200) sees the packet. The slot
map holds verdicts, not addresses: the hash (over the source, which the rewrite does not touch)
is computed once per packet and its one lookup lands in a chain that writes the backend's
address as a constant and counts with a named counter, so a packet pays no address, port or
counter-map lookup; a port equal to the VIP's is not written at all. It holds the slots the
conntrack mode's map does. The shared reply map sends a backend's replies straight to its own
l_web_b<k>_rev. Replies are rewritten after routing (postrouting): a VIP source before routing
would fail the reverse-path and martian checks. Replies to addresses of this host (health
checks) stay tracked. New-flow counts are TCP SYNs (retransmissions included); UDP has none.
The shared chains and maps stay while the table does (the last listener's removal deletes it).

Structure is written as text (nft 1.0.6 cannot read its own JSON for `typeof` and concatenated
maps); element changes are JSON. Each is one transaction, so the kernel never sees a half-written
listener or slot map.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pointsman.kernel.acl import Interval, KernelAcl, element_json, element_text, kernel_acl, set_diff
from pointsman.kernel.plan import ListenerSpec, Nat, SlotDiff, Target
from pointsman.protect.acl import AclLists

TABLE = "pointsman"
FAMILY = "inet"
TABLE_REF = f"{FAMILY} {TABLE}"

JsonCommand = dict[str, Any]
Index = Mapping[Target, int]
"""Backends and their stable indices (their counters' and, stateless, their chains' names)."""

# No listener counter sits on the path of a forwarded packet: a listener's packets, bytes and
# new flows are the sums of its backends' (stats.py), and `new` counts only the first packets no
# backend took (refused or denied). A counter is a lookup and an atomic add per packet, and the
# per-backend one is counted anyway.
_LISTENER_COUNTERS = ("new", "rejected", "denied")
ACL_SETS = ("allow", "deny")
_BACKEND_MAPS = ("bnew", "bin", "bout")
BACKEND_COUNTER_KINDS = ("new", "in", "out")

PRIORITY_RAW = -300  # NF_IP_PRI_RAW: before conntrack (-200), where notrack must be
PRIORITY_DSTNAT = -100  # NF_IP_PRI_NAT_DST, nft's `dstnat`
PRIORITY_GUARD = -90  # after DNAT: only packets to the VIP that no slot took are still addressed to it
PRIORITY_SRCNAT = 100  # NF_IP_PRI_NAT_SRC, nft's `srcnat`; stateless replies are rewritten here too
PRIORITY_COUNT = 10  # after the usual filter chains (0): count what they let through

# Numeric priorities: nft 1.0.6 accepts names such as `dstnat` only on some hooks.
_HOOKS = {
    "dnat": f"type nat hook prerouting priority {PRIORITY_DSTNAT}",
    "dnat_local": f"type nat hook output priority {PRIORITY_DSTNAT}",
    "guard": f"type filter hook prerouting priority {PRIORITY_GUARD}",
    "guard_local": f"type filter hook output priority {PRIORITY_GUARD}",
    "snat": f"type nat hook postrouting priority {PRIORITY_SRCNAT}",
    "fwd": f"type filter hook forward priority {PRIORITY_COUNT}",
}

# Chains per mode in deletion order: base chains (which jump) before the chains they jump to.
_CHAINS: dict[Nat, tuple[str, ...]] = {
    "conntrack": ("dnat", "dnat_local", "guard", "guard_local", "snat", "fwd", "count"),
    "stateless": ("guard_local", "sin", "syn"),
}

# Shared by every stateless listener of the table: one base chain per hook, dispatching by a
# verdict map on (address, protocol, port), so a packet crosses one chain whatever the number
# of listeners, and a packet of no listener costs one lookup per family and hook.
SHARED_IN = "stateless_in"  # filter prerouting -300: VIP packets -> l_<name>_sin; replies notrack
SHARED_OUT = "stateless_out"  # filter postrouting 100: replies -> l_<name>_b<k>_rev
_SHARED_HOOKS = {
    SHARED_IN: f"type filter hook prerouting priority {PRIORITY_RAW}",
    SHARED_OUT: f"type filter hook postrouting priority {PRIORITY_SRCNAT}",
}
_FAMILIES = (("ip", "ipv4", "ipv4_addr"), ("ip6", "ipv6", "ipv6_addr"))
VIP_PORTS = "stateless_vports"
"""Every stateless listener's port: the bitmap in front of the VIP maps."""
BACKEND_PORTS = "stateless_bports"
"""Every stateless backend's port, in front of the reply set and map. Ports are added, never
taken out (another listener may share one; nft 1.0.6 cannot count): one left behind costs only
the hash lookup it would have saved. They go with the table."""


def shared_vips(family: str) -> str:
    """VIP . protocol . port -> goto the listener's l_<name>_sin."""
    return f"stateless_vips{'6' if family == 'ip6' else '4'}"


def shared_replies(family: str) -> str:
    """Backend address . protocol . port of every stateless listener: replies, not tracked."""
    return f"stateless_replies{'6' if family == 'ip6' else '4'}"


def shared_rev(family: str) -> str:
    """Backend address . protocol . port -> goto its chain l_<name>_b<k>_rev."""
    return f"stateless_rev{'6' if family == 'ip6' else '4'}"


def _shared_text() -> list[str]:
    """The shared dispatch (idempotent: re-created by every stateless listener's structure)."""
    t = TABLE_REF
    lines = []
    for fam, _, addr in _FAMILIES:
        key = f"{addr} . inet_proto . inet_service"
        lines += [f"add map {t} {shared_vips(fam)} {{ type {key} : verdict ; }}",
                  f"add set {t} {shared_replies(fam)} {{ type {key} ; }}",
                  f"add map {t} {shared_rev(fam)} {{ type {key} : verdict ; }}"]
    lines += [f"add set {t} {name} {{ type inet_service ; }}" for name in (VIP_PORTS, BACKEND_PORTS)]
    for chain, hook in _SHARED_HOOKS.items():
        lines += [f"add chain {t} {chain} {{ {hook} ; policy accept ; }}", f"flush chain {t} {chain}"]
    # Each lookup of a shared map sits behind a test of the port alone, in a bitmap: a packet of
    # no listener (a reply on the way in, a client's packet on the way out, other traffic) fails
    # there, cheaply, instead of missing in the hash (docs/kernel.md, Measurements).
    for fam, nfproto, _ in _FAMILIES:  # a family's two rules together: IPv4 replies skip the IPv6 VIPs
        lines.append(f"add rule {t} {SHARED_IN} meta nfproto {nfproto} th dport @{VIP_PORTS} "
                     f"{fam} daddr . meta l4proto . th dport vmap @{shared_vips(fam)}")
        # Replies to this host's own addresses (health checks) stay tracked. A reply is done
        # here: `accept` spares it the other family's rules.
        lines.append(f"add rule {t} {SHARED_IN} meta nfproto {nfproto} th sport @{BACKEND_PORTS} "
                     f"{fam} saddr . meta l4proto . th sport @{shared_replies(fam)} "
                     "fib daddr type != local notrack accept")
    for fam, nfproto, _ in _FAMILIES:
        lines.append(f"add rule {t} {SHARED_OUT} meta nfproto {nfproto} th sport @{BACKEND_PORTS} "
                     f"{fam} saddr . meta l4proto . th sport vmap @{shared_rev(fam)}")
    return lines


def _key_text(spec: ListenerSpec, address: str, port: int) -> str:
    return f"{address} . {spec.protocol} . {port}"


def _dispatch_elements(spec: ListenerSpec, backends: Index) -> list[tuple[str, str]]:
    """(shared set or map, element text) of one stateless listener: its VIP and its backends."""
    n = Names(spec.name)
    elements = [(shared_vips(spec.family), f"{_key_text(spec, spec.vip, spec.port)} : goto {n.chain('sin')}")]
    for (address, port), index in sorted(backends.items()):
        key = _key_text(spec, address, port)
        elements += [(shared_replies(spec.family), key),
                     (shared_rev(spec.family), f"{key} : goto {n.backend_chain(index, 'rev')}")]
    return elements


def _dispatch_removal(spec: ListenerSpec, backends: Index) -> list[str]:
    """Delete the listener's dispatch elements, whether or not they are there: nft 1.0.6 has no
    `destroy`, and `add` of an element that exists is a no-op, so add, then delete."""
    t = TABLE_REF
    lines = []
    for name, element in _dispatch_elements(spec, backends):
        key = element.split(" : ")[0]
        lines += [f"add element {t} {name} {{ {element} }}", f"delete element {t} {name} {{ {key} }}"]
    return lines


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

    def backend_chain(self, index: int, kind: str) -> str:
        """A stateless backend's own chain: `sin`, `syn` or `rev` (BACKEND_CHAINS)."""
        return f"{self.prefix}_b{index}_{kind}"

    @property
    def slots(self) -> str:
        return f"{self.prefix}_slots"

    @property
    def slot_map(self) -> str:
        """The stateless slot map (verdicts): slot -> goto the backend's chain."""
        return f"{self.prefix}_slot_to"

    def acl(self, kind: str) -> str:
        """The allow or deny set (kernel/acl.py)."""
        return f"{self.prefix}_{kind}"

    def backend_map(self, kind: str) -> str:
        return f"{self.prefix}_b{kind}"

    def owns(self, name: str) -> bool:
        return name.startswith(self.prefix + "_")

    def mode_maps(self, nat: Nat) -> tuple[str, ...]:
        """Maps only one NAT mode uses (deleted when a reload switches modes)."""
        return (self.slots,) if nat == "conntrack" else (self.slot_map,)


def _addr_type(spec: ListenerSpec) -> str:
    return "ipv6_addr" if spec.family == "ip6" else "ipv4_addr"


def _vip_matches(spec: ListenerSpec) -> list[str]:
    """Packets to the listener: one match per bind entry (a port range is one match)."""
    return [f"{spec.family} daddr {e.address} {spec.protocol} dport {e.ports}" for e in spec.entries]


def _ct_matches(spec: ListenerSpec) -> list[str]:
    """Packets of flows whose original destination is the listener's (either direction, after
    DNAT): one match per bind entry."""
    return [f"meta l4proto {spec.protocol} ct original {spec.family} daddr {e.address} "
            f"ct original proto-dst {e.ports}" for e in spec.entries]


def _acl_drops(spec: ListenerSpec, n: Names) -> list[str]:
    """Drop what the lists refuse (deny first: deny wins). Counted as denied, and as new where
    the listener counts new flows (the proxy counts a denied connection as accepted and
    rejected); stateless UDP counts no new flows."""
    saddr = f"{spec.family} saddr"
    new = "" if spec.stateless and spec.protocol == "udp" else f"counter name \"{n.counter('new')}\" "
    counted = f"{new}counter name \"{n.counter('denied')}\" drop"
    return [f"{saddr} @{n.acl('deny')} {counted}", f"{saddr} != @{n.acl('allow')} {counted}"]


def _index_expr(spec: ListenerSpec) -> str:
    """The slot of a packet. Stateless hashes `th sport`: the same two bytes as `tcp sport` (the
    same hash, so the same slots as conntrack's), without the protocol test nft puts in front of
    `tcp sport` (the shared dispatch's key already holds the protocol): two expressions fewer on
    every packet to the VIP."""
    if spec.dispatch == "numgen":
        return f"numgen inc mod {spec.slots}"
    key = f"{spec.family} saddr"
    if spec.hash_key == "source_ip_port":
        key += f" . {'th' if spec.stateless else spec.protocol} sport"
    return f"jhash {key} mod {spec.slots} seed 0x{spec.seed:08x}"


def _reject(spec: ListenerSpec) -> str:
    return "reject with tcp reset" if spec.protocol == "tcp" else "reject with icmpx port-unreachable"


_SYN = "tcp flags & (syn | ack) == syn"
"""A TCP packet opening a flow (SYN without ACK): the stateless mode's "new flow"."""


def _refuses(spec: ListenerSpec, n: Names, new: bool = False, only: str = "") -> list[str]:
    """The guard's rules: a packet still addressed to the VIP found no backend. `new`: it opens a
    flow, so it counts as a new one too (a DNATed flow counts in its backend's `new` instead).
    `only`: a further match, before the counters (stateless TCP: the SYN test)."""
    counted = (f"counter name \"{n.counter('new')}\" " if new else "") + \
        f"counter name \"{n.counter('rejected')}\" {_reject(spec)}"
    return [f"{match} {only}{counted}" for match in _vip_matches(spec)]


def _strays(spec: ListenerSpec, conntrack: bool) -> list[str]:
    """conntrack: a packet conntrack calls invalid (a late FIN or RST of a flow whose entry is
    gone: flushed, expired, or from before a restart) opens nothing, so it is refused uncounted;
    counting it would add a new and a refused connection that never were."""
    if not conntrack:
        return []
    return [f"{match} ct state invalid {_reject(spec)}" for match in _vip_matches(spec)]


def _target_text(target: Target) -> str:
    return f"{target[0]} . {target[1]}"


def _conntrack_rules(spec: ListenerSpec, n: Names) -> list[tuple[str, str]]:
    """Per bind entry: the ACL drops, then DNAT through the slot map (a NAT chain sees only a
    flow's first packet, so established flows never meet the ACL rules)."""
    fam, proto = spec.family, spec.protocol
    rules: list[tuple[str, str]] = []
    for match in _vip_matches(spec):
        dnat = f"{match} dnat {fam} addr . port to {_index_expr(spec)} map @{n.slots}"
        for chain in ("dnat", "dnat_local"):
            rules += [(chain, f"{match} {drop}") for drop in _acl_drops(spec, n)]
            rules.append((chain, dnat))
    cts = _ct_matches(spec)
    # A flow to an address with no element here breaks this rule only: keep masquerade apart.
    rules += [("snat", f"{ct} counter name {fam} daddr . {proto} dport map @{n.backend_map('new')}")
              for ct in cts]
    if spec.snat:
        rules += [("snat", f"{ct} masquerade") for ct in cts]
    rules += [("fwd", f"{ct} jump {n.chain('count')}") for ct in cts]
    rules += [
        ("count", f"ct direction original counter name {fam} daddr . {proto} dport "
                  f"map @{n.backend_map('in')}"),
        ("count", f"ct direction reply counter name {fam} saddr . {proto} sport "
                  f"map @{n.backend_map('out')}"),
    ]
    return rules


def _stateless_rules(spec: ListenerSpec, n: Names) -> list[tuple[str, str]]:
    """The per-packet path is short on purpose (docs/kernel.md, Measurements): a packet to the
    VIP is hashed once and its slot's verdict sends it to its backend's chain, which writes
    constants, counts and accepts. A TCP SYN is told apart there (one flag test) and takes the
    backend's `syn` chain, which jumps to l_web_syn for the lists and counts `new` too. What no
    slot took (an empty slot: the lookup fails) falls through to the refusals."""
    index = _index_expr(spec)
    # The shared prerouting chain sends the VIP's packets here (its verdict map). `notrack` is
    # in the backends' chains: a packet dropped or refused here never reaches conntrack anyway.
    rules: list[tuple[str, str]] = []
    if spec.protocol == "tcp":
        # The lists judge only what opens a flow (a SYN), so established flows go on; l_web_syn
        # returns to the backend's chain for what they let through.
        rules += [("syn", drop) for drop in _acl_drops(spec, n)]
    else:
        # UDP has no packet that opens a flow: a denied source's datagrams are all dropped.
        rules += [("sin", drop) for drop in _acl_drops(spec, n)]
    rules.append(("sin", f"{index} vmap @{n.slot_map}"))
    if spec.protocol == "tcp":  # a SYN no slot took is a new flow refused
        rules += [("sin", refuse) for refuse in _refuses(spec, n, new=True, only=f"{_SYN} ")]
    rules += [("sin", refuse) for refuse in _refuses(spec, n)]
    return rules


BACKEND_CHAINS = ("sin", "syn", "rev")
"""A stateless backend's chains, for either protocol (`syn` stays empty for UDP), so a reload
that changes the protocol leaves no chain behind that still counts in the backend's counters."""

BackendRule = tuple[str, str, list[JsonCommand]]
"""(chain kind, the rule as nft text, the same as JSON expressions)."""


def _backend_rules(spec: ListenerSpec, index: int, target: Target) -> list[BackendRule]:
    """A stateless backend's rules, in order: the destination (or, on replies, the source)
    written as constants, the backend's named counters. The port is left alone where it equals
    the VIP's (a stateless listener has one port)."""
    n = Names(spec.name)
    fam, proto = spec.family, spec.protocol
    address, port = target
    same_port = port == spec.port

    def mangle(protocol: str, field: str, value: str | int) -> tuple[str, JsonCommand]:
        return (f"{protocol} {field} set {value}",
                {"mangle": {"key": {"payload": {"protocol": protocol, "field": field}}, "value": value}})

    def counted(*kinds: str) -> list[tuple[str, JsonCommand]]:
        return [(f'counter name "{name}"', {"counter": name})
                for name in (n.backend_counter(index, kind) for kind in kinds)]

    def rule(kind: str, parts: list[tuple[str, JsonCommand]]) -> BackendRule:
        return kind, " ".join(text for text, _ in parts), [expr for _, expr in parts]

    to = [mangle(fam, "daddr", address)] + ([] if same_port else [mangle(proto, "dport", port)])
    back = [mangle(fam, "saddr", spec.vip)] + ([] if same_port else [mangle(proto, "sport", spec.port)])
    accept = [("accept", {"accept": None})]
    notrack = [("notrack", {"notrack": None})]
    rules = []
    if proto == "tcp":
        syn = n.backend_chain(index, "syn")
        flags = {"&": [{"payload": {"protocol": "tcp", "field": "flags"}}, ["syn", "ack"]]}
        rules.append(rule("sin", [(_SYN, {"match": {"op": "==", "left": flags, "right": "syn"}}),
                                  (f"goto {syn}", {"goto": {"target": syn}})]))
        rules.append(rule("syn", [(f"jump {n.chain('syn')}", {"jump": {"target": n.chain("syn")}})]))
        rules.append(rule("syn", notrack + to + counted("new", "in") + accept))
    rules.append(rule("sin", notrack + to + counted("in") + accept))
    rules.append(rule("rev", counted("out") + back))
    return rules


def _backend_text(spec: ListenerSpec, index: int, target: Target) -> list[str]:
    """Create (or rewrite) a stateless backend's counters and chains (idempotent)."""
    n, t = Names(spec.name), TABLE_REF
    lines = [f"add counter {t} {n.backend_counter(index, kind)}" for kind in BACKEND_COUNTER_KINDS]
    for kind in BACKEND_CHAINS:
        chain = n.backend_chain(index, kind)
        lines += [f"add chain {t} {chain}", f"flush chain {t} {chain}"]
    lines += [f"add rule {t} {n.backend_chain(index, kind)} {text}"
              for kind, text, _ in _backend_rules(spec, index, target)]
    return lines


def _backend_chains_removal(spec: ListenerSpec, indices: Iterable[int]) -> list[str]:
    """Delete stateless backends' chains whether or not they are there (add, flush, delete):
    after whatever jumps to them, before the counters they name."""
    n, t = Names(spec.name), TABLE_REF
    lines = []
    for index in sorted(set(indices)):
        for kind in BACKEND_CHAINS:
            chain = n.backend_chain(index, kind)
            lines += [f"add chain {t} {chain}", f"flush chain {t} {chain}", f"delete chain {t} {chain}"]
    return lines


def _mode_maps_text(spec: ListenerSpec, n: Names) -> list[str]:
    t = TABLE_REF
    fam, proto = spec.family, spec.protocol
    if spec.nat == "conntrack":
        return [f"add map {t} {n.slots} {{ typeof numgen inc mod 2 : {fam} daddr . {proto} dport ; }}"]
    return [f"add map {t} {n.slot_map} {{ typeof numgen inc mod 2 : verdict ; }}"]


def _slot_elements_text(spec: ListenerSpec, n: Names, targets: Sequence[Target | None],
                        backends: Index) -> list[str]:
    t = TABLE_REF
    filled = [(i, x) for i, x in enumerate(targets) if x is not None]
    if spec.nat == "conntrack":
        lines = [f"flush map {t} {n.slots}"]
        if filled:
            lines.append(f"add element {t} {n.slots} {{ "
                         f"{', '.join(f'{i} : {_target_text(x)}' for i, x in filled)} }}")
        return lines
    lines = [f"flush map {t} {n.slot_map}"]
    if filled:
        elements = ", ".join(f"{i} : goto {n.backend_chain(backends[x], 'sin')}" for i, x in filled)
        lines.append(f"add element {t} {n.slot_map} {{ {elements} }}")
    return lines


def _teardown_lines(spec: ListenerSpec, nat: Nat, chains: Iterable[str], backends: Index) -> list[str]:
    """Delete a mode's chains and maps in the order references allow: the listener's chains
    emptied (their rules name the slot map), the slot maps (stateless: their elements jump to
    the backends' chains), the backends' chains (their `syn` chains jump to l_web_syn), then
    the listener's chains."""
    n, t = Names(spec.name), TABLE_REF
    chains = list(chains)
    lines = [f"flush chain {t} {n.chain(kind)}" for kind in chains]
    lines += [f"delete map {t} {name}" for name in n.mode_maps(nat)]
    if nat == "stateless":
        lines += _backend_chains_removal(spec, backends.values())
    return lines + [f"delete chain {t} {n.chain(kind)}" for kind in chains]


def _version(spec: ListenerSpec) -> int:
    return 6 if spec.family == "ip6" else 4


def open_acl(spec: ListenerSpec) -> KernelAcl:
    """The sets of a listener with no lists: everyone passes."""
    return kernel_acl(AclLists(), _version(spec))


def _acl_text(spec: ListenerSpec, n: Names, acl: KernelAcl) -> list[str]:
    """Both sets' contents, replaced (flush and add: part of the caller's transaction)."""
    lines = []
    for kind, intervals in (("allow", acl.allow), ("deny", acl.deny)):
        lines.append(f"flush set {TABLE_REF} {n.acl(kind)}")
        if intervals:
            elements = ", ".join(element_text(i, acl.version) for i in intervals)
            lines.append(f"add element {TABLE_REF} {n.acl(kind)} {{ {elements} }}")
    return lines


def listener_text(spec: ListenerSpec, targets: Sequence[Target | None] | None = None,
                  previous: Nat | None = None, backends: Index | None = None,
                  acl: KernelAcl | None = None, was: ListenerSpec | None = None,
                  held: Index | None = None) -> str:
    """Create (or re-create the rules of) one listener, with its slot map's full contents.

    Idempotent: `add` of an existing table, chain, map or counter is a no-op, chains are flushed
    and refilled, so a reload that changes slots, hash key or SNAT keeps the counters. `previous`
    is the NAT mode the kernel holds now: if it differs, that mode's own chains and maps go first.
    `was` is the whole spec the kernel holds (it gives `previous`): a stateless one's entries in
    the shared dispatch go first. `backends` are the backends that have counters, with their
    indices: every backend the kernel holds and every one `targets` names (`add_backend_commands`
    adds the joining ones' counters to the maps): with stateless, their chains and their entries
    in the shared dispatch are written again. `held` are the backends the kernel holds now (default:
    `backends`): only theirs are taken out of the shared dispatch first, since an entry names its
    backend's chain, which a joining backend does not have yet. `acl` refills the allow and deny
    sets (None: no lists), in the same transaction that creates them: an allow set left empty
    would refuse everyone.
    """
    n = Names(spec.name)
    t = TABLE_REF
    backends = backends or {}
    lines = [f"add table {t}"]
    if was is not None:
        previous = was.nat
        if was.stateless:  # before its chains change: the entries name them
            lines += _dispatch_removal(was, held if held is not None else backends)
    if previous is not None and previous != spec.nat:
        lines += _teardown_lines(spec, previous, (c for c in _CHAINS[previous] if c not in _CHAINS[spec.nat]),
                                 backends)
    lines += [f"add counter {t} {n.counter(kind)}" for kind in _LISTENER_COUNTERS]
    lines += _mode_maps_text(spec, n)
    lines += [f"add map {t} {n.backend_map(kind)} {{ type {_addr_type(spec)} . inet_service : counter ; }}"
              for kind in BACKEND_COUNTER_KINDS]
    lines += [f"add set {t} {n.acl(kind)} {{ type {_addr_type(spec)} ; flags interval ; }}"
              for kind in ACL_SETS]
    lines += _acl_text(spec, n, acl if acl is not None else open_acl(spec))
    chains = _CHAINS[spec.nat]
    for kind in chains:
        hook = _HOOKS.get(kind)
        lines.append(f"add chain {t} {n.chain(kind)}" + (f" {{ {hook} ; policy accept ; }}" if hook else ""))
    lines += [f"flush chain {t} {n.chain(kind)}" for kind in chains]
    # conntrack: a refused first packet counts as new (its DNAT rule counts nothing: a DNATed
    # flow counts in its backend's `new`). Stateless: local clients never reach l_web_sin.
    conntrack = spec.nat == "conntrack"
    rules = [("guard_local", refuse) for refuse in _strays(spec, conntrack)]
    rules += [("guard_local", refuse) for refuse in _refuses(spec, n, new=conntrack)]
    if conntrack:
        rules += [("guard", refuse) for refuse in _strays(spec, conntrack)]
        rules += [("guard", refuse) for refuse in _refuses(spec, n, new=True)]
    rules += _conntrack_rules(spec, n) if spec.nat == "conntrack" else _stateless_rules(spec, n)
    lines += [f"add rule {t} {n.chain(kind)} {rule}" for kind, rule in rules]
    if spec.stateless:  # before the slot maps and the dispatch that jump to them
        for target, index in sorted(backends.items()):
            lines += _backend_text(spec, index, target)
    if targets is not None:
        lines += _slot_elements_text(spec, n, targets, backends)
    if spec.stateless:
        lines += _shared_text()
        lines += [f"add element {t} {name} {{ {element} }}"
                  for name, element in _dispatch_elements(spec, backends)]
        ports = sorted({port for _, port in backends})
        lines.append(f"add element {t} {VIP_PORTS} {{ {spec.port} }}")
        if ports:
            lines.append(f"add element {t} {BACKEND_PORTS} {{ {', '.join(map(str, ports))} }}")
    return "\n".join(lines) + "\n"


def remove_listener_text(spec: ListenerSpec, backend_counters: Iterable[str] = (),
                         backends: Index | None = None) -> str:
    """Delete one listener's objects in one transaction (rules first, then what they used).

    With conntrack, established flows keep working: their NAT lives in conntrack entries, not in
    these rules. Stateless flows end here: nothing rewrites their packets any more.
    """
    n = Names(spec.name)
    t = TABLE_REF
    # The shared dispatch's entries name the chains: they go first (`backends`: stateless).
    backends = backends or {}
    lines = _dispatch_removal(spec, backends) if spec.stateless else []
    lines += _teardown_lines(spec, spec.nat, _CHAINS[spec.nat], backends)  # before the counters
    lines += [f"delete map {t} {n.backend_map(kind)}" for kind in BACKEND_COUNTER_KINDS]
    lines += [f"delete set {t} {n.acl(kind)}" for kind in ACL_SETS]
    lines += [f"delete counter {t} {n.counter(kind)}" for kind in _LISTENER_COUNTERS]
    lines += [f"delete counter {t} {name}" for name in backend_counters]
    return "\n".join(lines) + "\n"


def stop_new_flows_text(spec: ListenerSpec) -> str:
    """Stop taking new flows (the guard refuses them); established flows and counting go on.

    conntrack: no DNAT rule, so new flows stay addressed to the VIP (established ones have their
    NAT in conntrack) and the guard refuses them. stateless TCP: SYNs are refused before the
    rewrite. Stateless UDP has no way to tell a new flow: everything is refused.
    """
    n = Names(spec.name)
    t = TABLE_REF
    if spec.nat == "conntrack":
        return "".join(f"flush chain {t} {n.chain(kind)}\n" for kind in ("dnat", "dnat_local"))
    sin = n.chain("sin")
    if spec.protocol == "tcp":
        return (f"insert rule {t} {sin} {_SYN} counter name \"{n.counter('new')}\" "
                f"counter name \"{n.counter('rejected')}\" {_reject(spec)}\n")
    return (f"flush chain {t} {sin}\nadd rule {t} {sin} notrack\n"
            + "".join(f"add rule {t} {sin} {r}\n" for r in _refuses(spec, n)))


# --- JSON: elements and counters ---------------------------------------------------------------------


def _ref(name: str) -> dict[str, str]:
    return {"family": FAMILY, "table": TABLE, "name": name}


def _concat(target: Target) -> dict[str, list[str | int]]:
    return {"concat": [target[0], target[1]]}


def _dispatch_key(spec: ListenerSpec, target: Target) -> dict[str, list[str | int]]:
    return {"concat": [target[0], spec.protocol, target[1]]}


def slot_commands(spec: ListenerSpec, diff: SlotDiff, backends: Index | None = None) -> list[JsonCommand]:
    """Apply a slot diff: deletes, then adds (a changed slot is in both). Stateless: `backends`
    gives each added target's index (its chains)."""
    n = Names(spec.name)
    commands: list[JsonCommand] = []
    if spec.nat == "conntrack":
        if diff.delete:
            commands.append({"delete": {"element": {**_ref(n.slots), "elem": list(diff.delete)}}})
        if diff.add:
            elem = [[i, _concat(target)] for i, target in diff.add]
            commands.append({"add": {"element": {**_ref(n.slots), "elem": elem}}})
        return commands
    if diff.delete:
        commands.append({"delete": {"element": {**_ref(n.slot_map), "elem": list(diff.delete)}}})
    if diff.add:
        assert backends is not None, "stateless slots need the backends' indices"
        elem = [[i, {"goto": {"target": n.backend_chain(backends[target], "sin")}}] for i, target in diff.add]
        commands.append({"add": {"element": {**_ref(n.slot_map), "elem": elem}}})
    return commands


def replace_slots_commands(spec: ListenerSpec, targets: Sequence[Target | None],
                           backends: Index | None = None) -> list[JsonCommand]:
    """Replace the whole slot map (flush and fill): the fallback when a diff cannot apply."""
    n = Names(spec.name)
    filled = tuple((i, x) for i, x in enumerate(targets) if x is not None)
    commands: list[JsonCommand] = [{"flush": {"map": _ref(name)}} for name in n.mode_maps(spec.nat)]
    return commands + slot_commands(spec, SlotDiff((), filled), backends)


def _backend_chain_commands(spec: ListenerSpec, index: int, target: Target) -> list[JsonCommand]:
    """A stateless backend's chains, created or rewritten (add, flush, add the rule)."""
    n = Names(spec.name)
    commands: list[JsonCommand] = []
    for kind in BACKEND_CHAINS:
        ref = _ref(n.backend_chain(index, kind))
        commands += [{"add": {"chain": ref}}, {"flush": {"chain": ref}}]
    for kind, _, exprs in _backend_rules(spec, index, target):
        rule = {"family": FAMILY, "table": TABLE, "chain": n.backend_chain(index, kind), "expr": exprs}
        commands.append({"add": {"rule": rule}})
    return commands


def add_backend_commands(spec: ListenerSpec, index: int, target: Target) -> list[JsonCommand]:
    """Counters for a backend joining the listener, their entries in the counter maps, and (for
    stateless) its chains and its address in the set and map that tell replies apart."""
    n = Names(spec.name)
    commands: list[JsonCommand] = []
    for kind in BACKEND_COUNTER_KINDS:
        name = n.backend_counter(index, kind)
        commands.append({"add": {"counter": _ref(name)}})
        commands.append({"add": {"element": {**_ref(n.backend_map(kind)),
                                             "elem": [[_concat(target), name]]}}})
    if spec.stateless:
        commands += _backend_chain_commands(spec, index, target)
        key = _dispatch_key(spec, target)
        commands.append({"add": {"element": {**_ref(BACKEND_PORTS), "elem": [target[1]]}}})
        commands.append({"add": {"element": {**_ref(shared_replies(spec.family)), "elem": [key]}}})
        commands.append({"add": {"element": {**_ref(shared_rev(spec.family)), "elem": [
            [key, {"goto": {"target": n.backend_chain(index, "rev")}}]]}}})
    return commands


def remove_backend_commands(spec: ListenerSpec, index: int, target: Target) -> list[JsonCommand]:
    """The reverse of `add_backend_commands`: what jumps to its chains first (its slots are
    already elsewhere: the slot diff comes before this), then its chains, then the counters."""
    n = Names(spec.name)
    commands: list[JsonCommand] = []
    if spec.stateless:
        key = _dispatch_key(spec, target)
        commands += [{"delete": {"element": {**_ref(name), "elem": [key]}}}
                     for name in (shared_rev(spec.family), shared_replies(spec.family))]
        for kind in BACKEND_CHAINS:
            ref = _ref(n.backend_chain(index, kind))
            commands += [{"flush": {"chain": ref}}, {"delete": {"chain": ref}}]
    commands += [{"delete": {"element": {**_ref(n.backend_map(kind)), "elem": [_concat(target)]}}}
                 for kind in BACKEND_COUNTER_KINDS]
    commands += [{"delete": {"counter": _ref(n.backend_counter(index, kind))}}
                 for kind in BACKEND_COUNTER_KINDS]
    return commands


def acl_commands(spec: ListenerSpec, old: KernelAcl | None, new: KernelAcl) -> list[JsonCommand]:
    """Bring the allow and deny sets from `old` to `new`: only the intervals that changed, or
    (old None: unknown) the whole sets replaced. Part of one transaction with whatever else the
    caller sends, so no packet sees a half-changed list."""
    n = Names(spec.name)
    commands: list[JsonCommand] = []
    for kind in ACL_SETS:
        ref = _ref(n.acl(kind))
        wanted = new.allow if kind == "allow" else new.deny
        delete: tuple[Interval, ...]
        if old is None:
            commands.append({"flush": {"set": ref}})
            delete, add = (), wanted
        else:
            diff = set_diff(old.allow if kind == "allow" else old.deny, wanted)
            delete, add = diff.delete, diff.add
        if delete:
            commands.append({"delete": {"element": {**ref, "elem": [element_json(i, new.version)
                                                                    for i in delete]}}})
        if add:
            commands.append({"add": {"element": {**ref, "elem": [element_json(i, new.version)
                                                                 for i in add]}}})
    return commands
