"""Totals across processes: sums of statistics objects of one type (pure).

A control process keeps the latest statistics of each worker and sums them when read (a scrape,
the status document), never on every message. Each statistics class names its gauges (`GAUGES`:
values that describe now, like open connections) apart from its counters (totals since start): a
worker that exits leaves its counters in the totals, so they never go backwards, while its gauges
leave with it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import TypeVar

from pointsman.telemetry.histogram import Histogram

T = TypeVar("T")


def _slots(obj: object) -> tuple[str, ...]:
    return tuple(getattr(type(obj), "__slots__", ()))


def _gauges(obj: object) -> frozenset[str]:
    return frozenset(getattr(type(obj), "GAUGES", ()))


def blank(like: T) -> T:
    """A new object of `like`'s type with every count zero (histogram bounds kept)."""
    out = object.__new__(type(like))
    for name in _slots(like):
        value = getattr(like, name)
        if isinstance(value, Histogram):
            value = Histogram(value.bounds)
        elif isinstance(value, Counter):
            value = Counter()
        elif isinstance(value, int | float) and not isinstance(value, bool):
            value = type(value)(0)
        setattr(out, name, value)
    return out


def add(into: object, part: object, gauges: bool = True) -> None:
    """Add `part`'s counts into `into` (same type); gauges only when `gauges`."""
    skip = frozenset() if gauges else _gauges(part)
    for name in _slots(part):
        if name in skip:
            continue
        value = getattr(part, name)
        current = getattr(into, name)
        if isinstance(current, Histogram):
            current.merge(value)
        elif isinstance(current, Counter):
            current.update(value)
        elif isinstance(current, int | float) and not isinstance(current, bool):
            setattr(into, name, current + value)


def total(live: Iterable[T], retired: T | None = None) -> T | None:
    """The sum of `live` objects (gauges included) and the counters of `retired`; None when
    there is nothing to sum."""
    out: T | None = None
    for part in live:
        if out is None:
            out = blank(part)
        add(out, part)
    if retired is not None:
        if out is None:
            out = blank(retired)
        add(out, retired, gauges=False)
    return out


def counters_of(stats: T) -> T:
    """A copy of `stats` with its gauges zeroed: what an exited process leaves in the totals."""
    out = blank(stats)
    add(out, stats, gauges=False)
    return out
