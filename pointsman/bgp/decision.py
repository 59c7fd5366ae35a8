"""What this node should announce, given the state of its pools, listeners and itself.

Pure: no I/O, no clock, no ExaBGP. `decide` maps each configured VIP to a `Decision` (a route to
announce, or none, and why), `plan` turns "what the speaker was told" and "what it should be
told" into the few commands that close the gap. The adapter (`speaker.py`) only carries the
commands; every rule about when a VIP is announced lives here and in the unit tests.

The rules, in order (the first that applies gives the reason):
1. the node is stopping, or an operator drained it (`pointsman node drain`): withdraw everything;
2. a VIP tied to a listener: withdraw while the listener does not accept connections;
3. withdraw while fewer than `min_available` backends are available in the VIP's pool (for a
   listener: in the best of the pools it routes to);
4. otherwise announce, with the VIP's next hop (default: the `bgp.next_hop`, default "self").
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from pointsman.config.model import BgpConfig, BgpVipConfig


class Reason(enum.Enum):
    """Why a VIP is (not) announced: the status field and the log line."""

    SERVING = "serving"
    NODE_STOPPING = "node_stopping"
    NODE_DRAINED = "node_drained"
    LISTENER_NOT_ACCEPTING = "listener_not_accepting"
    TOO_FEW_BACKENDS = "too_few_backends"
    UNKNOWN_TARGET = "unknown_target"  # a reload removed the pool or listener before the VIP


@dataclass(frozen=True, slots=True)
class Route:
    """One route as the speaker announces it: a host prefix and its next hop ("self" or an IP)."""

    prefix: str
    next_hop: str


@dataclass(frozen=True, slots=True)
class NodeView:
    """The inputs of a decision, copied out of the runtime at one instant."""

    available: Mapping[str, int]  # pool name -> backends available now (snapshot.available)
    accepting: Mapping[str, bool] = field(default_factory=dict)  # listener name -> accepting
    listener_pools: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    drained: bool = False
    stopping: bool = False


@dataclass(frozen=True, slots=True)
class Decision:
    vip: BgpVipConfig
    route: Route | None  # None: withdrawn
    reason: Reason
    available: int  # the backends that counted (0 when the reason is about the node)

    @property
    def announced(self) -> bool:
        return self.route is not None

    def describe(self) -> str:
        """One line for the log: what and why."""
        target = f"pool {self.vip.pool}" if self.vip.pool else f"listener {self.vip.listener}"
        if self.route is not None:
            return (f"announce {self.vip.prefix} next-hop {self.route.next_hop} "
                    f"({target}: {self.available} available)")
        why = {
            Reason.NODE_STOPPING: "the node is stopping",
            Reason.NODE_DRAINED: "the node is drained",
            Reason.LISTENER_NOT_ACCEPTING: f"{target} does not accept connections",
            Reason.TOO_FEW_BACKENDS: (f"{target} has {self.available} available backends, "
                                      f"needs {self.vip.min_available}"),
            Reason.UNKNOWN_TARGET: f"{target} does not exist",
        }.get(self.reason, self.reason.value)
        return f"withdraw {self.vip.prefix}: {why}"


def decide(config: BgpConfig, node: NodeView) -> tuple[Decision, ...]:
    """One decision per configured VIP, in config order."""
    return tuple(_decide_one(config, vip, node) for vip in config.vips)


def _decide_one(config: BgpConfig, vip: BgpVipConfig, node: NodeView) -> Decision:
    if node.stopping:
        return Decision(vip, None, Reason.NODE_STOPPING, 0)
    if node.drained:
        return Decision(vip, None, Reason.NODE_DRAINED, 0)
    if vip.listener is not None:
        if vip.listener not in node.listener_pools:
            return Decision(vip, None, Reason.UNKNOWN_TARGET, 0)
        if not node.accepting.get(vip.listener, False):
            return Decision(vip, None, Reason.LISTENER_NOT_ACCEPTING, 0)
        pools = node.listener_pools[vip.listener]
    else:
        assert vip.pool is not None, "the config model requires pool or listener"
        pools = (vip.pool,)
    known = [node.available[name] for name in pools if name in node.available]
    if not known:
        return Decision(vip, None, Reason.UNKNOWN_TARGET, 0)
    available = max(known)
    if available < vip.min_available:
        return Decision(vip, None, Reason.TOO_FEW_BACKENDS, available)
    next_hop = vip.next_hop or config.next_hop
    return Decision(vip, Route(vip.prefix, next_hop), Reason.SERVING, available)


def desired(decisions: tuple[Decision, ...]) -> dict[str, Route]:
    """prefix -> route for every decision that announces."""
    return {d.route.prefix: d.route for d in decisions if d.route is not None}


@dataclass(frozen=True, slots=True)
class Command:
    action: str  # "announce" or "withdraw"
    route: Route


def plan(told: Mapping[str, Route], wanted: Mapping[str, Route]) -> list[Command]:
    """The commands that turn what the speaker was told into what it should announce.

    Withdrawals first, then announcements, each in prefix order (a stable order makes the
    command stream testable). A route whose next hop changed is only re-announced: a new path
    for a prefix replaces the old one from the same peer (RFC 4271 section 3.1, an implicit
    withdraw), which ExaBGP also does in its own RIB, so the prefix is never briefly absent.
    """
    withdraw = [Command("withdraw", route) for prefix, route in sorted(told.items())
                if prefix not in wanted]
    announce = [Command("announce", route) for prefix, route in sorted(wanted.items())
                if told.get(prefix) != route]
    return withdraw + announce
