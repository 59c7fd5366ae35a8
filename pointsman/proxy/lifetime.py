"""How long a TCP connection may live: the `max_connection_duration` sweep (pure: no I/O, time
is an argument).

(Keepalive, the other bound on a connection's life, is the kernel's: the listener's
`tcp_keepalive` is set on its listening sockets, which accepted sockets inherit, and the pool's
on every backend socket through the engine target: `targets.engine_keepalive`. A peer that stops
answering makes its socket fail with ETIMEDOUT; the engine ends the connection as that side's
timeout and resets the other side: `keepalive_timeout`.)

`max_connection_duration` is the policy's: the listener's live tick (every LIVE_INTERVAL while
connections are open) asks `Lifetimes.due` whether a sweep is due, and a sweep returns the
connections older than their pool's bound. The listener's table is in accept order (a dict,
filled at accept), so a sweep walks from the oldest and stops at the first connection younger
than the smallest bound any pool has: it costs the connections it cuts plus those old enough to
be near a bound, never the whole table. Each connection is judged by its pool's config at the
time of the sweep, so a reload that changes a pool's bound applies to open connections too.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pointsman.pool.pool import Pool
    from pointsman.proxy.flows import Flow

NEVER = math.inf


def _bound(pool: Pool) -> float | None:
    return pool.config.max_connection_duration


def smallest_bound(pools: Iterable[Pool]) -> float:
    """The smallest max_connection_duration among `pools` (NEVER when none has one)."""
    return min((b for b in map(_bound, pools) if b is not None), default=NEVER)


class Lifetimes:
    """When one listener's connections must be looked at again for max_connection_duration."""

    __slots__ = ("due",)

    def __init__(self) -> None:
        self.due = 0.0  # the first tick looks

    def changed(self) -> None:
        """A reload may have changed a bound: look again at the next tick."""
        self.due = 0.0

    def sweep(self, connections: Mapping[int, Flow], pools: Mapping[str, Pool],
              now: float) -> list[int]:
        """The connections (ids) older than their pool's bound at `now`; sets `due` to when the
        next one can be. `connections` in accept order; `pools`: every pool a connection of
        this listener can go to (for the smallest bound a new connection can have)."""
        floor = smallest_bound(pools.values())
        victims: list[int] = []
        due = NEVER
        for conn_id, flow in connections.items():
            age = now - flow.started
            if age < floor:  # this one and every younger one: not before started + floor
                due = min(due, flow.started + floor)
                break
            detour = flow.detour
            if detour is not None and detour.preamble is not None:
                due = min(due, now + floor)  # no pool decided yet
                continue
            bound = _bound(flow.pool)
            if bound is None:
                continue
            if age >= bound:
                victims.append(conn_id)
            else:
                due = min(due, flow.started + bound)
        else:
            due = min(due, now + floor)  # a connection accepted from now on
        self.due = due
        return victims
