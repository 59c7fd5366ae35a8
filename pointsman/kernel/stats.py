"""What the kernel listener reports: nftables counters and conntrack use, and its own map updates.

The counts belong to the kernel. A background task of the listener reads them (one netlink dump
and two /proc files, in a worker thread) every `REFRESH_SECONDS` into a `KernelReading`; a
scrape builds a `KernelListenerStats` from the latest reading (no I/O, microseconds), so counters
can be up to about `REFRESH_SECONDS` old (`age` says by how much). A snapshot is a fresh object
each time: it can be thrown away or zeroed by anyone (the supervisor's aggregation resets listener
stats) without touching the reading. Only the map-update counters are pointsman's own; the
snapshot carries copies, current at the time of the call.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from pointsman.kernel.conntrack import ConntrackUsage
from pointsman.kernel.netlink import CounterValue
from pointsman.kernel.plan import Target
from pointsman.kernel.ruleset import Names
from pointsman.telemetry.flow import DropReason
from pointsman.telemetry.histogram import Histogram

_ZERO = CounterValue(0, 0)

REFRESH_SECONDS = 1.0
"""How often a kernel listener reads its counters: the most a scrape's figures lag the kernel's."""


@dataclass(frozen=True, slots=True)
class KernelReading:
    """One read of the kernel's counters and conntrack use; `at` is time.monotonic() of the read."""

    counters: Mapping[str, CounterValue]
    conntrack: ConntrackUsage | None
    at: float


EMPTY_READING = KernelReading(MappingProxyType({}), None, 0.0)


@dataclass(slots=True)
class MapUpdates:
    """The listener's own record of slot-map programming (owned by the listener, copied out)."""

    applied: int = 0
    failed: int = 0
    elements: int = 0  # element changes in the last transaction
    # Slots that changed backend, summed over every update after the first fill. With nat:
    # stateless these are the slots whose established flows moved (and were reset).
    slots_changed: int = 0
    # Publication of a pool snapshot to its transaction committed in the kernel (queueing,
    # table computation and the transaction itself).
    latency: Histogram = field(default_factory=Histogram)

    def copy(self) -> MapUpdates:
        latency = Histogram(self.latency.bounds)
        latency.merge(self.latency)
        return MapUpdates(self.applied, self.failed, self.elements, self.slots_changed, latency)


@dataclass(frozen=True, slots=True)
class Retired:
    """What the counters of backends that left the listener had counted when they were removed,
    so the listener's totals (sums over its backends) never go back. Read just before the
    transaction that deletes them: what they count after that read is lost (milliseconds)."""

    new: int = 0
    packets_in: int = 0
    bytes_in: int = 0
    packets_out: int = 0
    bytes_out: int = 0

    def plus(self, listener: str, counters: Mapping[str, CounterValue], indices: Iterable[int]) -> Retired:
        """These totals and the counters of the backends with these counter indices."""
        n = Names(listener)
        new, p_in, b_in, p_out, b_out = (self.new, self.packets_in, self.bytes_in, self.packets_out,
                                         self.bytes_out)
        for index in indices:
            new += counters.get(n.backend_counter(index, "new"), _ZERO).packets
            inbound = counters.get(n.backend_counter(index, "in"), _ZERO)
            outbound = counters.get(n.backend_counter(index, "out"), _ZERO)
            p_in, b_in = p_in + inbound.packets, b_in + inbound.bytes
            p_out, b_out = p_out + outbound.packets, b_out + outbound.bytes
        return Retired(new, p_in, b_in, p_out, b_out)


NO_RETIRED = Retired()


@dataclass(frozen=True, slots=True)
class KernelBackendStats:
    backend: str  # id
    address: Target
    slots: int  # slots of the table pointing at it (0: not taking new flows)
    new_connections: int
    packets_in: int  # client -> backend
    bytes_in: int
    packets_out: int  # backend -> client
    bytes_out: int


class KernelListenerStats:
    """One reading of a kernel listener's counters.

    Bytes are IP packet lengths (headers included): seen in the forward hook with conntrack (so
    flows of clients on the load balancer host itself count new connections but no bytes), in
    prerouting (in) and postrouting (out) when stateless, where new connections are TCP SYNs.
    `age` is how old the kernel figures are (seconds since the reading; 0 if never read).
    """

    __slots__ = (
        "age",
        "backends",
        "bytes_in",
        "bytes_out",
        "conntrack_entries",
        "conntrack_max",
        "denied",
        "map_updates",
        "nat",
        "new_connections",
        "packets_in",
        "packets_out",
        "rejected",
        "slots",
    )

    def __init__(self, slots: int, updates: MapUpdates, conntrack: ConntrackUsage | None,
                 nat: str = "conntrack", age: float = 0.0) -> None:
        self.nat = nat
        self.age = age
        self.slots = slots
        self.new_connections = 0  # first packets DNATed or refused (NAT chains see one per flow)
        self.rejected = 0  # refused: no backend in the slot
        # Dropped by the allow/deny lists: packets that would open a flow (TCP SYNs, a UDP
        # flow's first datagram; stateless UDP: every datagram), retransmissions included.
        self.denied = 0
        self.packets_in = 0
        self.bytes_in = 0
        self.packets_out = 0
        self.bytes_out = 0
        self.conntrack_entries = conntrack.entries if conntrack is not None else 0
        self.conntrack_max = conntrack.limit if conntrack is not None else 0
        self.map_updates = updates
        self.backends: tuple[KernelBackendStats, ...] = ()

    @classmethod
    def read(
        cls,
        listener: str,
        counters: Mapping[str, CounterValue],
        backends: Mapping[Target, tuple[str, int, int]],
        slots: int,
        updates: MapUpdates,
        conntrack: ConntrackUsage | None,
        nat: str = "conntrack",
        age: float = 0.0,
        retired: Retired = NO_RETIRED,
    ) -> KernelListenerStats:
        """Build from a counter dump; `backends` maps address -> (id, counter index, slots held).

        The listener's totals are its backends' sums plus what `retired` backends had counted:
        no listener counter sits on the forwarding path (ruleset.py). The `new` counter holds
        the first packets no backend took (refused or denied)."""
        n = Names(listener)
        stats = cls(slots, updates, conntrack, nat, age)
        stats.rejected = counters.get(n.counter("rejected"), _ZERO).packets
        stats.denied = counters.get(n.counter("denied"), _ZERO).packets
        rows = []
        for address, (backend_id, index, held) in backends.items():
            new = counters.get(n.backend_counter(index, "new"), _ZERO)
            b_in = counters.get(n.backend_counter(index, "in"), _ZERO)
            b_out = counters.get(n.backend_counter(index, "out"), _ZERO)
            rows.append(KernelBackendStats(backend_id, address, held, new.packets, b_in.packets,
                                           b_in.bytes, b_out.packets, b_out.bytes))
        stats.backends = tuple(rows)
        stats.new_connections = (counters.get(n.counter("new"), _ZERO).packets + retired.new
                                 + sum(r.new_connections for r in rows))
        stats.packets_in = retired.packets_in + sum(r.packets_in for r in rows)
        stats.bytes_in = retired.bytes_in + sum(r.bytes_in for r in rows)
        stats.packets_out = retired.packets_out + sum(r.packets_out for r in rows)
        stats.bytes_out = retired.bytes_out + sum(r.bytes_out for r in rows)
        return stats

    # The status document (admin/status.py) shows non-TCP listeners with the UDP listener's
    # fields; for the kernel, "sessions" are conntrack entries and the capacity is their bound.
    # A stateless listener has no entries of its own: it shows none.

    @property
    def sessions(self) -> int:
        return self.conntrack_entries if self.nat == "conntrack" else 0

    @property
    def capacity(self) -> int:
        return self.conntrack_max

    @property
    def sessions_created(self) -> int:
        return self.new_connections

    @property
    def datagrams_in(self) -> int:
        return self.packets_in

    @property
    def datagrams_out(self) -> int:
        return self.packets_out

    @property
    def drops(self) -> Counter[DropReason]:
        return Counter({DropReason.NO_BACKEND: self.rejected, DropReason.DENIED: self.denied})

    @property
    def sessions_ended(self) -> Counter[str]:
        return Counter()
