"""Durations and percentages as operators write them: "250ms", "2s", "5m", "1h", "10%" or a number."""

from __future__ import annotations

import re

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")


def parse_duration(value: object) -> float:
    """Return seconds for a duration; a bare number is seconds. Negative durations are refused."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration such as '250ms', '2s', '5m', '1h', got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match.group(1)) * _UNITS[match.group(2) or "s"]
    else:
        raise ValueError(f"expected a duration such as '250ms', '2s', '5m', '1h', got {value!r}")
    if seconds < 0:
        raise ValueError(f"a duration cannot be negative, got {value!r}")
    return seconds


def parse_fraction(value: object) -> float:
    """Return a fraction in [0, 1] from "10%" or 0.1."""
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            fraction = float(value.strip()[:-1]) / 100.0
        except ValueError:
            raise ValueError(f"expected a percentage such as '10%', got {value!r}") from None
    elif isinstance(value, int | float) and not isinstance(value, bool):
        fraction = float(value)
    else:
        raise ValueError(f"expected a percentage such as '10%' or a fraction, got {value!r}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"expected a percentage between 0% and 100%, got {value!r}")
    return fraction
