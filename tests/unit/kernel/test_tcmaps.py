"""The tc data path's map encoding (tcmaps.py) against the C structs' layout in bpf/stateless.c."""

from __future__ import annotations

import itertools
import re
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pointsman.kernel import tcmaps
from pointsman.kernel.tcmaps import Indices, SlotSpace

SOURCE = Path(tcmaps.__file__).with_name("bpf") / "stateless.c"


def c_define(name: str) -> int:
    match = re.search(rf"#define {name} (.+)", SOURCE.read_text())
    assert match is not None, name
    return int(eval(match.group(1), {}))  # constant expressions such as (1 << 18)


def test_limits_are_the_programs() -> None:
    assert c_define("MAX_LISTENERS") == tcmaps.MAX_LISTENERS
    assert c_define("MAX_BACKENDS") == tcmaps.MAX_BACKENDS
    assert c_define("MAX_SLOTS") == tcmaps.MAX_SLOTS


def test_struct_sizes_match_the_c_structs() -> None:
    # struct vip_key {be32, be16, u8, u8} = 8; vip_value {u32 x3, u16 x2} = 16;
    # slot_value and reply_value {be32, be16, u16} = 8; backend_stats 5 x u64; listener_stats 1 x u64.
    assert (tcmaps.VIP_KEY.size, tcmaps.VIP_VALUE.size, tcmaps.SLOT_VALUE.size, tcmaps.REPLY_VALUE.size,
            tcmaps.BACKEND_STATS.size, tcmaps.LISTENER_STATS.size) == (8, 16, 8, 8, 40, 8)


def test_endpoint_key_is_network_order_address_and_port_then_protocol() -> None:
    assert tcmaps.endpoint_key("10.0.0.1", 80, "tcp") == bytes([10, 0, 0, 1, 0, 80, 6, 0])
    assert tcmaps.endpoint_key("192.168.1.2", 5353, "udp") == bytes([192, 168, 1, 2, 0x14, 0xE9, 17, 0])


def test_vip_value_is_host_order_numbers() -> None:
    raw = tcmaps.vip_value(base=4093, slots=4093, seed=0x706D616E, hash_port=True, listener=3,
                           draining=False)
    assert struct.unpack("<IIIHH", raw) == (4093, 4093, 0x706D616E, tcmaps.FLAG_HASH_PORT, 3)
    drained = tcmaps.vip_value(0, 7, 1, hash_port=False, listener=0, draining=True)
    assert struct.unpack("<IIIHH", drained)[3] == tcmaps.FLAG_DRAINING


def test_slot_and_reply_values() -> None:
    assert tcmaps.slot_value(("10.0.1.11", 8080), 5) == bytes([10, 0, 1, 11, 0x1F, 0x90, 5, 0])
    assert tcmaps.slot_value(None, 5) == tcmaps.EMPTY_SLOT == bytes(8)
    assert tcmaps.reply_value("10.0.0.100", 80, 258) == bytes([10, 0, 0, 100, 0, 80, 2, 1])


def test_ipv6_is_refused() -> None:
    with pytest.raises(ValueError, match="IPv4 only"):
        tcmaps.endpoint_key("::1", 80, "tcp")


def test_slot_values_and_changes() -> None:
    a, b = ("10.0.1.1", 80), ("10.0.1.2", 80)
    index = {a: 0, b: 1}
    old = tcmaps.slot_values([a, b, a, None], index)
    new = tcmaps.slot_values([a, a, a, b], index)
    assert old[3] == tcmaps.EMPTY_SLOT
    assert tcmaps.changed_slots(old, new) == [1, 3]
    with pytest.raises(ValueError):
        tcmaps.changed_slots(old, new[:2])


def test_per_cpu_values_sum_field_by_field() -> None:
    raw = tcmaps.BACKEND_STATS.pack(1, 100, 2, 200, 1) + tcmaps.BACKEND_STATS.pack(3, 300, 4, 400, 0)
    assert tcmaps.backend_counters(raw, 2) == tcmaps.BackendCounters(4, 400, 6, 600, 1)
    with pytest.raises(ValueError, match="short"):
        tcmaps.backend_counters(raw, 3)


def test_slot_space_first_fit_reuse_and_limit() -> None:
    space = SlotSpace(size=100)
    assert space.take("a", 30) == 0
    assert space.take("b", 30) == 30
    assert space.take("a", 30) == 0  # held: the same stretch
    space.release("a")
    assert space.take("c", 20) == 0  # the freed stretch
    assert space.take("d", 20) == 60
    with pytest.raises(ValueError, match="no room"):
        space.take("e", 30)
    assert space.take("a", 10) == 20  # the hole between c and b
    assert space.take("a", 5) == 80  # a new size: a new stretch, clear of the one it held
    assert space.take("f", 10) == 20  # which is free again


def test_slot_space_failed_take_keeps_the_stretch_held() -> None:
    space = SlotSpace(size=50)
    assert space.take("a", 20) == 0
    with pytest.raises(ValueError):
        space.take("a", 40)
    assert space.take("b", 30) == 20


@given(st.lists(st.tuples(st.sampled_from("abcdefgh"), st.integers(1, 40), st.booleans()), max_size=60))
def test_slot_space_never_overlaps(operations: list[tuple[str, int, bool]]) -> None:
    space = SlotSpace(size=200)
    held: dict[str, tuple[int, int]] = {}
    for name, size, release in operations:
        if release:
            space.release(name)
            held.pop(name, None)
            continue
        try:
            base = space.take(name, size)
        except ValueError:
            continue  # a failed take keeps the old stretch
        held[name] = (base, size)
        assert base + size <= 200
        spans = sorted(held.values())
        assert all(s1 + n1 <= s2 for (s1, n1), (s2, _) in itertools.pairwise(spans))


@given(st.lists(st.tuples(st.sampled_from("abcdefghij"), st.booleans()), max_size=80))
def test_indices_are_unique_and_bounded(operations: list[tuple[str, bool]]) -> None:
    indices = Indices(limit=6)
    held: dict[str, int] = {}
    for name, release in operations:
        if release:
            assert indices.release(name) == held.pop(name, None)
            continue
        try:
            held[name] = indices.take(name)
        except ValueError:
            assert len(held) == 6 and name not in held
            continue
        assert 0 <= held[name] < 6
        assert len(set(held.values())) == len(held)
