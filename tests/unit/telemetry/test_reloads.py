"""`@tracked` records every outcome of a reload method in its owner's history."""

from __future__ import annotations

import time

import pytest

from pointsman.telemetry.reloads import ReloadHistory, history, tracked


class Owner:
    def __init__(self, outcomes: list[list[str] | Exception]) -> None:
        self.outcomes = outcomes

    @tracked
    async def reload(self) -> list[str]:
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


async def test_outcomes_are_counted_and_the_last_one_is_kept() -> None:
    owner = Owner([[], ["line 3: bad"], OSError("cannot bind"), []])
    assert history(owner) == ReloadHistory(0, 0, True, None)  # start: a good config, no reload
    before = time.time()
    assert await owner.reload() == []
    assert await owner.reload() == ["line 3: bad"]
    assert (history(owner).accepted, history(owner).refused, history(owner).last_ok) == (1, 1, False)
    with pytest.raises(OSError):
        await owner.reload()
    assert (history(owner).refused, history(owner).last_ok) == (2, False)
    assert await owner.reload() == []
    h = history(owner)
    assert (h.accepted, h.refused, h.last_ok) == (2, 2, True)
    assert h.last_at is not None and before <= h.last_at <= time.time()


async def test_each_owner_has_its_own_history() -> None:
    one, two = Owner([["bad"]]), Owner([[]])
    await one.reload()
    await two.reload()
    assert (history(one).refused, history(two).refused) == (1, 0)
