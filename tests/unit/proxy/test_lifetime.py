"""max_connection_duration's sweep (pointsman/proxy/lifetime.py), pure, time given as an
argument; and the config -> engine keepalive conversion (targets.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, cast

from hypothesis import given
from hypothesis import strategies as st

from pointsman.config.model import TcpKeepaliveConfig
from pointsman.proxy.engine.api import Keepalive
from pointsman.proxy.flows import Flow
from pointsman.proxy.lifetime import NEVER, Lifetimes, smallest_bound
from pointsman.proxy.targets import engine_keepalive


@dataclass
class Config:
    max_connection_duration: float | None


@dataclass(eq=False)
class Pool:
    """What the sweep reads of a pool: its name and its current config."""

    name: str
    config: Config


def pools(**bounds: float | None) -> dict[str, Any]:
    return {name: Pool(name, Config(bound)) for name, bound in bounds.items()}


def flows(*spec: tuple[float, Any]) -> dict[int, Flow]:
    """Connections 1, 2, ... accepted at the given times, to the given pools (accept order)."""
    return {i + 1: Flow(("192.0.2.1", 1000 + i), pool, started) for i, (started, pool) in enumerate(spec)}


def test_keepalive_conversion() -> None:
    assert engine_keepalive(None) is None
    assert engine_keepalive(TcpKeepaliveConfig(idle=60, interval=10, count=6)) == Keepalive(60, 10, 6)


def test_no_bound_anywhere_means_never() -> None:
    p = pools(a=None)
    lifetimes = Lifetimes()
    assert lifetimes.due == 0.0  # the first tick looks
    assert lifetimes.sweep(flows((0.0, p["a"])), p, 100.0) == []
    assert lifetimes.due == NEVER
    assert smallest_bound(p.values()) == NEVER


def test_cuts_what_is_too_old_and_says_when_to_look_again() -> None:
    p = pools(short=1.0, long=10.0, free=None)
    table = flows((0.0, p["long"]), (0.5, p["short"]), (1.0, p["free"]), (1.5, p["short"]),
                  (1.75, p["short"]))
    lifetimes = Lifetimes()
    assert lifetimes.sweep(table, p, 2.0) == [2]
    assert lifetimes.due == 2.5  # connection 4 reaches its bound then
    del table[2]
    assert lifetimes.sweep(table, p, 2.5) == [4]
    assert lifetimes.due == 2.75
    del table[4]
    assert lifetimes.sweep(table, p, 2.75) == [5]
    del table[5]
    assert lifetimes.sweep(table, p, 3.0) == []
    assert lifetimes.due == 4.0  # a connection accepted now to `short`; `long` only at 10


def test_stops_at_the_first_connection_younger_than_any_bound() -> None:
    p = pools(short=1.0)
    table = flows(*((float(i), p["short"]) for i in range(1000)))
    lifetimes = Lifetimes()
    assert lifetimes.sweep(table, p, 3.5) == [1, 2, 3]
    assert lifetimes.due == 3.0 + 1.0  # connection 4 (accepted at 3.0)


def test_a_reload_applies_new_bounds_to_open_connections() -> None:
    p = pools(a=None)
    table = flows((0.0, p["a"]), (5.0, p["a"]))
    lifetimes = Lifetimes()
    assert lifetimes.sweep(table, p, 6.0) == [] and lifetimes.due == NEVER
    p["a"].config = Config(2.0)  # Pool.reconfigure swaps the config in place
    lifetimes.changed()
    assert lifetimes.due == 0.0
    assert lifetimes.sweep(table, p, 6.0) == [1]
    assert lifetimes.due == 7.0


def test_connections_still_reading_a_preamble_wait() -> None:
    p = pools(a=1.0)
    table = flows((0.0, p["a"]))
    table[1].more().preamble = cast(Any, object())
    lifetimes = Lifetimes()
    assert lifetimes.sweep(table, p, 5.0) == []
    assert lifetimes.due == 6.0


@given(st.lists(st.tuples(st.floats(0, 100), st.sampled_from(["a", "b", "c"])), max_size=40),
       st.floats(0, 100))
def test_exactly_the_old_ones_are_cut_and_none_is_missed(spec: list[tuple[float, str]],
                                                         since: float) -> None:
    p = pools(a=3.0, b=None, c=7.5)
    table = flows(*sorted(((started, name) for started, name in spec), key=lambda s: s[0]))
    for flow in table.values():
        flow.pool = p[flow.pool]
    now = max((flow.started for flow in table.values()), default=0.0) + since
    lifetimes = Lifetimes()
    victims = lifetimes.sweep(table, p, now)
    expected = [cid for cid, flow in table.items()
                if flow.pool.config.max_connection_duration is not None
                and now - flow.started >= flow.pool.config.max_connection_duration]
    assert victims == expected
    # the next look is no later than the first connection left that will need it
    rest = [flow.started + flow.pool.config.max_connection_duration
            for cid, flow in table.items() if cid not in victims
            and flow.pool.config.max_connection_duration is not None]
    assert lifetimes.due <= min([*rest, now + 3.0])
    assert lifetimes.due > now or math.isclose(lifetimes.due, now)
    assert lifetimes.due <= now + 3.0
