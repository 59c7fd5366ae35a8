"""What a tc listener writes into the BPF maps to go from what they hold to a new slot table:
pure, ordered map operations (the listener applies them in order; tcbpf.py does the I/O).

The order is the point (tested with every kind of change in tests/unit/kernel/test_tcplan.py):
at no moment between two operations can the program read a slot that names a backend whose
`replies` entry or counters are missing, or a `vips` entry that points at a stretch of
`slot_map` not fully written:

1. backends joining: counters zeroed, then their `replies` entry;
2. after a reload that changed the VIP, its port or the protocol: the old `vips` entry goes,
   the backends' `replies` entries are rewritten (the old protocol's keys deleted);
3. the slots that changed (all of them in a new stretch), in one batch;
4. the `vips` entry (stretch, size, seed, hash key, counter index, draining);
5. backends leaving (no slot names them any more): their `replies` entries go.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from pointsman.kernel.plan import ListenerSpec, Target
from pointsman.kernel.tcmaps import (
    BACKEND_STATS,
    changed_slots,
    endpoint_key,
    index_key,
    reply_value,
    slot_values,
    vip_value,
)


@dataclass(frozen=True, slots=True)
class Op:
    """One map operation: `write` (key, value), `delete` (key) or `batch` (`count` keys and
    values end to end, each written atomically)."""

    action: Literal["write", "delete", "batch"]
    map: str
    key: bytes
    value: bytes = b""
    count: int = 1


@dataclass(frozen=True, slots=True)
class Held:
    """What the maps hold for one listener (nothing yet: `spec` None)."""

    spec: ListenerSpec | None = None
    base: int = 0
    slots: tuple[bytes, ...] = ()
    backends: Mapping[Target, int] = field(default_factory=dict)  # -> counter index


@dataclass(frozen=True, slots=True)
class Writes:
    ops: tuple[Op, ...]
    after: Held
    removed: tuple[Target, ...]  # backends whose entries went: read their counters, free the index
    written: int  # slots written
    slots_changed: int  # of those, slots that changed backend in place (0 for a new stretch)


def plan_writes(held: Held, spec: ListenerSpec, targets: Sequence[Target | None], base: int,
                index: Mapping[Target, int], listener: int, cpus: int, draining: bool = False) -> Writes:
    """The operations that bring the maps from `held` to `targets` under `spec`, the table
    starting at `base` in `slot_map`; `index` gives every target's counter index (those held
    keep theirs), `listener` the listener's."""
    wanted = {t for t in targets if t is not None}
    backends = {t: held.backends.get(t, index[t]) for t in wanted}
    ops: list[Op] = []
    for target in sorted(wanted - held.backends.keys()):
        zero = bytes(BACKEND_STATS.size * cpus)
        ops.append(Op("write", "backend_stats", index_key(backends[target]), zero))
        ops.append(Op("write", "replies", endpoint_key(*target, spec.protocol),
                      reply_value(spec.vip, spec.port, backends[target])))
    old = held.spec
    if old is not None and (old.vip, old.port, old.protocol) != (spec.vip, spec.port, spec.protocol):
        ops.append(Op("delete", "vips", endpoint_key(old.vip, old.port, old.protocol)))
        for target in sorted(wanted & held.backends.keys()):
            ops.append(Op("write", "replies", endpoint_key(*target, spec.protocol),
                          reply_value(spec.vip, spec.port, backends[target])))
        for target in sorted(held.backends.keys()):
            if old.protocol != spec.protocol:
                ops.append(Op("delete", "replies", endpoint_key(*target, old.protocol)))
    values = slot_values(targets, backends)
    same_stretch = old is not None and base == held.base and len(values) == len(held.slots)
    changed = changed_slots(held.slots, values) if same_stretch else list(range(len(values)))
    if changed:
        ops.append(Op("batch", "slot_map", b"".join(index_key(base + i) for i in changed),
                      b"".join(values[i] for i in changed), len(changed)))
    ops.append(Op("write", "vips", endpoint_key(spec.vip, spec.port, spec.protocol),
                  vip_value(base, spec.slots, spec.seed, spec.hash_key == "source_ip_port", listener,
                            draining=draining)))
    removed = tuple(sorted(held.backends.keys() - wanted))
    for target in removed:
        if old is None or old.protocol == spec.protocol:  # else deleted with the old protocol above
            ops.append(Op("delete", "replies", endpoint_key(*target, spec.protocol)))
    after = Held(spec, base, tuple(values), backends)
    return Writes(tuple(ops), after, removed, len(changed), len(changed) if same_stretch else 0)
