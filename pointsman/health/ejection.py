"""Passive ejection: take a backend out after consecutive connect failures on real traffic.

The data plane reports each upstream connect attempt (`record_failure` / `record_success`); after
`consecutive_failures` failures in a row the backend is ejected until a deadline. Repeated
ejections back off exponentially: base, 2*base, 4*base, ... capped at `max_ejection` (Envoy's
outlier detection does the same with base_ejection_time and max_ejection_time).

Decay: the backoff level returns to 0 once a backend has gone `decay_after` seconds (default
`max_ejection`) after the end of its last ejection without being ejected again. We reset fully
rather than stepping down one level at a time: a backend that has carried real traffic for a
whole maximum ejection period has shown it is fixed, and the next failure deserves the short
base ejection again, not a penalty remembered from a previous incident.

`consecutive_failures: 0` turns passive ejection off: `record_failure` never ejects.

Pure: time is always an argument, nothing is scheduled here. The owner sets a timer for the
deadline `record_failure` returns and calls `expired(now)` when it fires.
"""

from __future__ import annotations

__all__ = ["PassiveEjector"]

# 2**MAX_DOUBLINGS * base always exceeds any sane cap; bounding the exponent keeps the float
# finite however many times a backend is ejected.
MAX_DOUBLINGS = 32


class PassiveEjector:
    __slots__ = (
        "_base",
        "_deadline",
        "_decay_after",
        "_ejections",
        "_failures",
        "_last_deadline",
        "_level",
        "_max",
        "_threshold",
    )

    def __init__(
        self,
        consecutive_failures: int,
        base_ejection: float,
        max_ejection: float,
        *,
        decay_after: float | None = None,
    ) -> None:
        if consecutive_failures < 0:
            raise ValueError(f"consecutive_failures must be >= 0 (0 = off): {consecutive_failures}")
        if base_ejection <= 0:
            raise ValueError(f"base_ejection must be positive, got {base_ejection}")
        if max_ejection < base_ejection:
            raise ValueError(
                f"max_ejection ({max_ejection}) must not be less than base_ejection "
                f"({base_ejection})"
            )
        self._threshold = consecutive_failures
        self._base = base_ejection
        self._max = max_ejection
        self._decay_after = max_ejection if decay_after is None else decay_after
        self._failures = 0
        self._level = 0  # ejections in a row without a decay period between them
        self._ejections = 0  # total, for statistics
        self._deadline: float | None = None
        self._last_deadline: float | None = None

    def reconfigure(
        self,
        consecutive_failures: int,
        base_ejection: float,
        max_ejection: float,
        *,
        decay_after: float | None = None,
    ) -> None:
        """Take new settings on a config reload, keeping a running ejection and the backoff level.

        Replacing the ejector instead would forget a running ejection, and the backend would
        never see `expired` report its end.
        """
        fresh = PassiveEjector(
            consecutive_failures, base_ejection, max_ejection, decay_after=decay_after
        )
        self._threshold = fresh._threshold
        self._base = fresh._base
        self._max = fresh._max
        self._decay_after = fresh._decay_after

    @property
    def threshold(self) -> int:
        """Consecutive failures that eject; 0 turns passive ejection off."""
        return self._threshold

    @property
    def failures(self) -> int:
        """Consecutive failures counted so far."""
        return self._failures

    @property
    def level(self) -> int:
        """Doublings the next ejection gets, before any decay (see `duration`)."""
        return self._level

    @property
    def ejections(self) -> int:
        return self._ejections

    @property
    def ejected(self) -> bool:
        """True from an ejection until `expired` reports its end."""
        return self._deadline is not None

    @property
    def deadline(self) -> float | None:
        return self._deadline

    def duration(self, now: float) -> float:
        """How long an ejection starting at `now` would last."""
        return min(self._base * 2.0 ** min(self._level_at(now), MAX_DOUBLINGS), self._max)

    def record_failure(self, now: float) -> float | None:
        """Count one failed connect; return the ejection deadline when this one ejects.

        Failures reported during an ejection (connects started before it) are ignored.
        """
        if self._deadline is not None or self._threshold == 0:
            return None
        self._failures += 1
        if self._failures < self._threshold:
            return None
        self._failures = 0
        self._level = self._level_at(now)
        self._deadline = now + self.duration(now)
        self._level += 1
        self._ejections += 1
        return self._deadline

    def record_success(self) -> None:
        """A connect succeeded: the consecutive failure count starts again."""
        self._failures = 0

    def expired(self, now: float) -> bool:
        """True once per ejection, at or after its deadline: the ejection then ends.

        Consuming on purpose: a timer that fires twice, or a caller that polls, sees the end of
        an ejection exactly once, so `eject_expired` reaches the state machine once.
        """
        if self._deadline is None or now < self._deadline:
            return False
        self._last_deadline = self._deadline
        self._deadline = None
        self._failures = 0
        return True

    def _level_at(self, now: float) -> int:
        if self._last_deadline is not None and now - self._last_deadline >= self._decay_after:
            return 0
        return self._level

    def __repr__(self) -> str:
        return (
            f"PassiveEjector(failures={self._failures}/{self._threshold}, level={self._level}, "
            f"deadline={self._deadline})"
        )
