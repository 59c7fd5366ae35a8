"""A hashed timer wheel: one slot per tick, one timer per connection, no object per timeout.

Why not `call_later` per connection: a TimerHandle per connection per timeout costs ~3 us and
~200 bytes, and idle timers are re-armed on traffic. Here a connection sits in the slot of its
due tick; traffic only moves its last-activity time, and when its slot comes round the owner
recomputes the real deadline and either fires or re-files it (the same lazy re-arming as the
Python path's `_check_idle`). Deadlines past one turn of the wheel stay in their slot and are
skipped until their turn. Pure: ticks are integers passed in, no clock.
"""

from __future__ import annotations

from typing import Generic, Protocol, TypeVar

SLOTS = 4096  # 41 s of 10 ms ticks per turn


class Timed(Protocol):
    tslot: int  # slot index, -1 when not in the wheel
    tdue: int  # tick it is due


T = TypeVar("T", bound=Timed)


class Wheel(Generic[T]):
    """Items are filed by due tick; `expire(now)` returns those due at or before `now`."""

    __slots__ = ("count", "slots", "tick")

    def __init__(self, now: int) -> None:
        self.slots: list[dict[int, T]] = [{} for _ in range(SLOTS)]
        self.tick = now  # every slot up to and including this tick has been visited
        self.count = 0

    def file(self, item: T, due: int) -> None:
        """Put `item` in (or move it to) the slot of `due`; a past tick is filed as the next."""
        self.remove(item)
        due = max(due, self.tick + 1)
        item.tdue = due
        item.tslot = due % SLOTS
        self.slots[item.tslot][id(item)] = item
        self.count += 1

    def remove(self, item: T) -> None:
        if item.tslot >= 0:
            slot = self.slots[item.tslot]
            del slot[id(item)]
            if not slot:  # a dict keeps its largest table: a fresh one gives the memory back
                self.slots[item.tslot] = {}
            item.tslot = -1
            self.count -= 1

    def expire(self, now: int) -> list[T]:
        """Take out every item due at or before `now`, in no particular order."""
        due: list[T] = []
        if now <= self.tick:
            return due
        steps = min(now - self.tick, SLOTS)
        for step in range(1, steps + 1):
            slot = self.slots[(self.tick + step) % SLOTS]
            if not slot:
                continue
            ready = [item for item in slot.values() if item.tdue <= now]
            for item in ready:
                del slot[id(item)]
                item.tslot = -1
            if not slot:
                self.slots[(self.tick + step) % SLOTS] = {}
            self.count -= len(ready)
            due.extend(ready)
        self.tick = now
        return due
