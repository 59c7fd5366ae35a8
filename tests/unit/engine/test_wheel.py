"""The timer wheel: every item fires once, never before its tick, at the first expire at or
after it, wherever it was filed and however far the clock jumps."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from hypothesis import given
from hypothesis import strategies as st

from pointsman.proxy.engine.wheel import SLOTS, Wheel


@dataclass(eq=False)
class Item:
    name: int
    tslot: int = -1
    tdue: int = 0


def test_fires_at_its_tick_not_before() -> None:
    wheel: Wheel[Item] = Wheel(100)
    a, b = Item(1), Item(2)
    wheel.file(a, 105)
    wheel.file(b, 105 + SLOTS)  # same slot, one turn later
    assert wheel.expire(104) == []
    assert wheel.expire(105) == [a]
    assert wheel.count == 1
    assert wheel.expire(104 + SLOTS) == []
    assert wheel.expire(105 + SLOTS) == [b]
    assert wheel.count == 0 and b.tslot == -1


def test_refile_and_remove() -> None:
    wheel: Wheel[Item] = Wheel(0)
    a = Item(1)
    wheel.file(a, 10)
    wheel.file(a, 20)  # moved, not duplicated
    assert wheel.count == 1
    assert wheel.expire(15) == []
    wheel.remove(a)
    wheel.remove(a)  # twice is harmless
    assert wheel.count == 0 and wheel.expire(30) == []


def test_a_past_tick_is_filed_as_the_next() -> None:
    wheel: Wheel[Item] = Wheel(50)
    a = Item(1)
    wheel.file(a, 3)
    assert a.tdue == 51
    assert wheel.expire(51) == [a]


@given(st.lists(st.integers(0, 3 * SLOTS), min_size=1, max_size=60),
       st.lists(st.integers(1, SLOTS + 50), min_size=1, max_size=40))
def test_every_item_fires_once_at_the_first_expire_after_its_due(dues: list[int],
                                                                 steps: list[int]) -> None:
    wheel: Wheel[Item] = Wheel(0)
    items = [Item(i) for i in range(len(dues))]
    for item, due in zip(items, dues, strict=True):
        wheel.file(item, due)
    fired: dict[int, int] = {}
    now = 0
    for step in [*steps, 4 * SLOTS]:
        previous, now = now, now + step
        for item in wheel.expire(now):
            assert item.name not in fired
            assert previous < max(item.tdue, 1) <= now
            fired[item.name] = now
    assert sorted(fired) == list(range(len(items)))
    assert wheel.count == 0


def test_an_emptied_slot_gives_its_memory_back() -> None:
    """A slot that once held many items does not keep its large table when it runs empty (a
    dict never shrinks): over time every slot would otherwise hold its busiest moment's size."""
    wheel: Wheel[Item] = Wheel(0)
    empty = sys.getsizeof({})
    items = [Item(i) for i in range(1000)]
    for item in items:
        wheel.file(item, 5)
    for item in items[:500]:
        wheel.remove(item)
    assert sys.getsizeof(wheel.slots[5]) > empty  # still in use: untouched
    for item in items[500:]:
        wheel.remove(item)
    assert sys.getsizeof(wheel.slots[5]) == empty
    for item in items:
        wheel.file(item, 7)
    assert len(wheel.expire(7)) == 1000
    assert sys.getsizeof(wheel.slots[7]) == empty
    assert wheel.count == 0
