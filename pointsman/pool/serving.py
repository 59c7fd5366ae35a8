"""Which backends of a pool serve new connections, and at which weight: primaries, backups, panic.

Pure: the pool passes each backend's state, weights and backup flag; the answer is one effective
weight per backend (0: never picked) and the pool's mode. The rules, in order:

1. **panic** (only with `panic_threshold` > 0): fewer than that fraction of the *eligible*
   primaries are available, and no backup is. Every eligible primary then gets traffic at its
   weight, whatever its health (Envoy's panic mode). Eligible: not draining, not in maintenance,
   weight above 0; operator states and weight 0 are the operator's decision and panic never
   overrides them, which is also why they do not count in the fraction.
2. **primary**: some primary is available: the available primaries (HAProxy: backups idle).
3. **backup**: no primary is available: the available backups, balanced among themselves with the
   pool's algorithm (HAProxy's `backup` without `allbackups`: here all of them, not only the first).
4. **none**: nothing to offer; the data plane refuses, or follows `fallback_pool`.

A working backup beats primaries known to be failing, so panic waits until the backups are gone
too; and since panic always has something to offer while an eligible primary exists, a pool in
panic never hands its connections to its `fallback_pool`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pointsman.pool.state import OPERATOR_STATES, BackendState

Mode = Literal["primary", "backup", "panic", "none"]

__all__ = ["Mode", "Serving", "serving"]


@dataclass(frozen=True, slots=True)
class Serving:
    weights: tuple[float, ...]  # effective weight of each backend, in the pool's order
    mode: Mode
    home: tuple[float, ...]  # each backend's weight when in service (Maglev's home table)


def serving(
    states: Sequence[BackendState],
    live: Sequence[float],
    base: Sequence[float],
    backup: Sequence[bool],
    panic_threshold: float = 0.0,
) -> Serving:
    """`live[i]`: the weight backend i takes now if it serves (0 unless up; slow start applied);
    `base[i]`: its weight in service whatever its health (0 for weight 0)."""
    n = len(states)
    primaries = [i for i in range(n) if not backup[i]]
    backups = [i for i in range(n) if backup[i]]
    available_primaries = [i for i in primaries if live[i] > 0]
    available_backups = [i for i in backups if live[i] > 0]
    eligible = [i for i in primaries if states[i] not in OPERATOR_STATES and base[i] > 0]
    home = tuple(0.0 if backup[i] else base[i] for i in range(n))
    weights = [0.0] * n
    if (panic_threshold > 0 and eligible and not available_backups
            and len(available_primaries) < panic_threshold * len(eligible)):
        for i in eligible:
            weights[i] = live[i] if live[i] > 0 else base[i]
        return Serving(tuple(weights), "panic", home)
    chosen = available_primaries or available_backups
    for i in chosen:
        weights[i] = live[i]
    mode: Mode = "primary" if available_primaries else "backup" if chosen else "none"
    return Serving(tuple(weights), mode, home)
