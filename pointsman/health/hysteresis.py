"""Rise/fall hysteresis: turn a stream of probe results into a stable verdict.

A healthy target turns unhealthy after `fall` consecutive failures; an unhealthy one turns healthy
after `rise` consecutive successes (HAProxy's `rise`/`fall`, Envoy's healthy/unhealthy threshold).
A result that agrees with the current verdict resets the streak, so results alternating faster
than rise/fall never flip the verdict.
"""

from __future__ import annotations

__all__ = ["Hysteresis"]


class Hysteresis:
    __slots__ = ("_fall", "_healthy", "_rise", "_streak")

    def __init__(self, rise: int, fall: int, healthy: bool) -> None:
        if rise < 1 or fall < 1:
            raise ValueError(f"rise and fall must be at least 1 (got rise={rise}, fall={fall})")
        self._rise = rise
        self._fall = fall
        self._healthy = healthy
        self._streak = 0  # consecutive results disagreeing with the current verdict

    @property
    def healthy(self) -> bool:
        return self._healthy

    @property
    def streak(self) -> int:
        """Consecutive results so far that disagree with the current verdict."""
        return self._streak

    @property
    def rise(self) -> int:
        return self._rise

    @property
    def fall(self) -> int:
        return self._fall

    def record(self, ok: bool) -> bool | None:
        """Record one probe result; return the new verdict when it flips, else None."""
        if ok == self._healthy:
            self._streak = 0
            return None
        self._streak += 1
        if self._streak < (self._rise if ok else self._fall):
            return None
        self._healthy = ok
        self._streak = 0
        return ok

    def __repr__(self) -> str:
        return (
            f"Hysteresis(rise={self._rise}, fall={self._fall}, healthy={self._healthy}, "
            f"streak={self._streak})"
        )
