"""Counters across processes: workers dump their stats objects to plain dicts, the control process
adds them up into its own objects of the same types, which the exporters then read unchanged."""

from __future__ import annotations

from collections import Counter
from typing import Any

from pointsman.telemetry.histogram import Histogram


def dump(stats: object) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in getattr(type(stats), "__slots__", ()):
        value = getattr(stats, name)
        if isinstance(value, Histogram):
            out[name] = ("h", list(value.counts), value.sum, value.count)
        elif isinstance(value, Counter):
            out[name] = ("c", {str(k): v for k, v in value.items()})
        else:
            out[name] = value
    return out


def reset(stats: object) -> None:
    """Zero every count of `stats` (keeping histogram bounds) before adding workers up."""
    for name in getattr(type(stats), "__slots__", ()):
        value = getattr(stats, name)
        if isinstance(value, Histogram):
            value.counts = [0] * len(value.counts)
            value.sum = 0.0
            value.count = 0
        elif isinstance(value, Counter):
            value.clear()
        elif isinstance(value, int | float):
            setattr(stats, name, 0)


def add(stats: object, payload: dict[str, Any]) -> None:
    """Add one worker's dump into `stats`. Counter keys come back as the enum of the target."""
    for name, value in payload.items():
        current = getattr(stats, name, None)
        if current is None:
            continue
        if isinstance(current, Histogram) and isinstance(value, tuple) and value[0] == "h":
            for i, n in enumerate(value[1]):
                current.counts[i] += n
            current.sum += value[2]
            current.count += value[3]
        elif isinstance(current, Counter) and isinstance(value, tuple) and value[0] == "c":
            for key, n in value[1].items():
                current[key] += n  # a StrEnum key and its str value are the same key
        elif isinstance(current, int | float) and isinstance(value, int | float):
            setattr(stats, name, current + value)

