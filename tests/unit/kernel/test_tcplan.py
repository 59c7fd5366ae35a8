"""tcplan.plan_writes: the tc listener's map operations, applied to maps simulated as dicts.

After every single operation the maps must make sense to the BPF program (`consistent`): every
slot the `vips` entry points at is empty or names a backend whose `replies` entry (to that VIP
and port, with the same counter index) and counters exist. After the last, the maps hold exactly
the new table, the wanted backends' reply entries and nothing left of the old ones.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from pointsman.kernel.plan import ListenerSpec, Target, slot_targets
from pointsman.kernel.tcmaps import (
    EMPTY_SLOT,
    FLAG_DRAINING,
    FLAG_HASH_PORT,
    PROTOCOLS,
    REPLY_VALUE,
    SLOT_VALUE,
    VIP_KEY,
    VIP_VALUE,
    Indices,
    SlotSpace,
    endpoint_key,
    index_key,
    slot_values,
)
from pointsman.kernel.tcplan import Held, Op, plan_writes
from pointsman.pool.snapshot import BackendView
from pointsman.pool.state import BackendState

Maps = dict[str, dict[bytes, bytes]]
POOL = [(f"10.0.1.{i + 1}", 8080 + i % 2) for i in range(5)]
CPUS = 2


def spec(vip: str = "10.0.0.100", port: int = 80, protocol: str = "tcp", slots: int = 13,
         hash_key: str = "source_ip_port") -> ListenerSpec:
    return ListenerSpec("web", "ip", vip, port, protocol, slots, "maglev", "jhash", hash_key,  # type: ignore[arg-type]
                        False, nat="stateless")


def table(up: Sequence[int], slots: int) -> list[Target | None]:
    views = [BackendView(f"b{i}", *POOL[i], 1, 1.0, BackendState.UP) for i in up]
    return slot_targets("maglev", views, slots)


def apply(maps: Maps, op: Op) -> None:
    entries = maps.setdefault(op.map, {})
    if op.action == "write":
        entries[op.key] = op.value
    elif op.action == "delete":
        entries.pop(op.key, None)
    else:
        ksize, vsize = len(op.key) // op.count, len(op.value) // op.count
        for i in range(op.count):
            entries[op.key[i * ksize:(i + 1) * ksize]] = op.value[i * vsize:(i + 1) * vsize]


def consistent(maps: Maps, tables: Sequence[Sequence[bytes]]) -> None:
    """The program's view holds together, and the table the `vips` entry points at is whole:
    one of `tables` (the old one or the new one), never a mix or another listener's leftovers."""
    for key, value in maps.get("vips", {}).items():
        vip, vport, proto = VIP_KEY.unpack(key)
        base, slots, _, _, _ = VIP_VALUE.unpack(value)
        stretch = [maps.get("slot_map", {}).get(index_key(base + i), EMPTY_SLOT) for i in range(slots)]
        assert any(stretch == list(t) for t in tables), "the VIP points at a table not fully written"
        for i, slot in enumerate(stretch):
            if slot == EMPTY_SLOT:
                continue
            addr, port, backend = SLOT_VALUE.unpack(slot)
            reply = maps.get("replies", {}).get(VIP_KEY.pack(addr, port, proto))
            assert reply is not None, f"slot {i} names a backend with no reply entry"
            assert REPLY_VALUE.unpack(reply) == (vip, vport, backend)
            assert index_key(backend) in maps.get("backend_stats", {})


def step(maps: Maps, held: Held, new: ListenerSpec, targets: list[Target | None], space: SlotSpace,
         indices: Indices, draining: bool = False) -> Held:
    index = {t: held.backends[t] if t in held.backends else indices.take(f"{t}")
             for t in set(targets) if t is not None}
    base = space.take("web", new.slots)
    writes = plan_writes(held, new, targets, base, index, listener=3, cpus=CPUS, draining=draining)
    for op in writes.ops:
        apply(maps, op)
        consistent(maps, [held.slots, writes.after.slots])
    for target in writes.removed:
        indices.release(f"{target}")
    final(maps, new, targets, writes.after, draining)
    return writes.after


def final(maps: Maps, new: ListenerSpec, targets: list[Target | None], after: Held, draining: bool) -> None:
    key = endpoint_key(new.vip, new.port, new.protocol)
    assert set(maps["vips"]) == {key}
    base, slots, seed, flags, listener = VIP_VALUE.unpack(maps["vips"][key])
    assert (base, slots, seed, listener) == (after.base, new.slots, new.seed, 3)
    hash_port = FLAG_HASH_PORT if new.hash_key == "source_ip_port" else 0
    assert flags == hash_port | (FLAG_DRAINING if draining else 0)
    stretch = [maps["slot_map"][index_key(base + i)] for i in range(slots)]
    assert stretch == slot_values(targets, after.backends) == list(after.slots)
    wanted = {t for t in targets if t is not None}
    proto = PROTOCOLS[new.protocol]
    assert set(maps.get("replies", {})) == {VIP_KEY.pack(ipaddress.ip_address(a).packed, p.to_bytes(2, "big"),
                                                         proto) for a, p in wanted}
    assert set(after.backends) == wanted


def test_first_fill_zeroes_counters_and_writes_replies_before_the_slots_and_the_vip_last() -> None:
    writes = plan_writes(Held(), spec(), table([0, 1], 13), 0, {POOL[0]: 0, POOL[1]: 1}, 3, CPUS)
    order = [(op.action, op.map) for op in writes.ops]
    assert order == [("write", "backend_stats"), ("write", "replies")] * 2 + [("batch", "slot_map"),
                                                                              ("write", "vips")]
    assert writes.ops[0].value == bytes(40 * CPUS)
    assert (writes.written, writes.slots_changed, writes.removed) == (13, 0, ())


def test_a_backend_leaving_moves_only_its_slots_then_loses_its_reply_entry() -> None:
    maps: Maps = {}
    space, indices = SlotSpace(), Indices(16)
    held = step(maps, Held(), spec(), table([0, 1, 2], 13), space, indices)
    before = list(held.slots)
    writes = plan_writes(held, spec(), table([0, 2], 13), 0, dict(held.backends), 3, CPUS)
    assert [op.map for op in writes.ops] == ["slot_map", "vips", "replies"]
    assert writes.ops[-1] == Op("delete", "replies", endpoint_key(*POOL[1], "tcp"))
    moved = [i for i, (a, b) in enumerate(zip(before, writes.after.slots, strict=True)) if a != b]
    assert writes.slots_changed == writes.ops[0].count == len(moved) > 0
    assert writes.removed == (POOL[1],)


def test_no_change_rewrites_only_the_vip_entry() -> None:
    maps: Maps = {}
    held = step(maps, Held(), spec(), table([0, 1], 13), SlotSpace(), Indices(16))
    writes = plan_writes(held, spec(), table([0, 1], 13), held.base, dict(held.backends), 3, CPUS,
                         draining=True)
    assert [op.map for op in writes.ops] == ["vips"]
    assert VIP_VALUE.unpack(writes.ops[0].value)[3] == FLAG_HASH_PORT | FLAG_DRAINING


specs = st.builds(spec, vip=st.sampled_from(["10.0.0.100", "10.0.0.101"]), port=st.sampled_from([80, 81]),
                  protocol=st.sampled_from(["tcp", "udp"]), slots=st.sampled_from([7, 11, 13]),
                  hash_key=st.sampled_from(["source_ip", "source_ip_port"]))
states = st.tuples(specs, st.lists(st.integers(0, len(POOL) - 1), unique=True, max_size=len(POOL)),
                   st.booleans())


@settings(max_examples=60, deadline=None)
@given(st.lists(states, min_size=1, max_size=6))
def test_every_sequence_of_changes_stays_consistent_after_every_operation(
        changes: list[tuple[ListenerSpec, list[int], bool]]) -> None:
    maps: Maps = {}
    space, indices = SlotSpace(size=64), Indices(16)
    held = Held()
    for new, up, draining in changes:
        held = step(maps, held, new, table(up, new.slots), space, indices, draining)


def test_a_held_state_without_slots_rewrites_every_slot() -> None:
    """After a failed update the listener forgets what the slots hold: the next one writes all."""
    maps: Maps = {}
    held = step(maps, Held(), spec(), table([0, 1], 13), SlotSpace(), Indices(16))
    forgot = Held(held.spec, held.base, (), held.backends)
    writes = plan_writes(forgot, spec(), table([0, 1], 13), held.base, dict(held.backends), 3, CPUS)
    assert [op.map for op in writes.ops] == ["slot_map", "vips"]
    assert (writes.written, writes.slots_changed) == (13, 0)
