"""Slow start: ramp a newly available backend's weight up linearly over a window.

The model is HAProxy's `slowstart` (and nginx Plus's `slow_start`): a backend that has just come up
has cold caches and connection pools, so it gets a growing share instead of its full share at
once. It starts from a small floor above zero, so the very first moments still send a trickle that
proves the backend works, and reaches full weight when the window has passed.

Dynamic algorithms (round_robin, weighted_round_robin, least_connections, power_of_two) use the
ramped weight; hash policies use the configured weight, as HAProxy does, because a ramp would move
keys back and forth while it runs.
"""

from __future__ import annotations

MIN_FRACTION = 0.01
"""Weight fraction at the start of the ramp: 1 % keeps a trickle without a burst."""


def ramp_done(available_since: float | None, now: float, window: float) -> bool:
    """True once the backend is past its slow start window (or has none)."""
    if window <= 0 or available_since is None:
        return True
    return now - available_since >= window


def effective_weight(
    weight: float, available_since: float | None, now: float, window: float
) -> float:
    """Return `weight` scaled by how far through the window the backend is, at least 1 %.

    `available_since` None means the backend has been available since before we knew it (for
    example at startup), so it gets full weight; a window of 0 disables slow start.
    """
    if weight <= 0:
        return 0.0
    if available_since is None or ramp_done(available_since, now, window):
        return weight
    fraction = (now - available_since) / window
    return weight * max(fraction, MIN_FRACTION)
