"""Retry delays (fleet/backoff.py): exponential, full jitter in the upper half, capped."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from pointsman.fleet.backoff import Backoff


def test_grows_then_caps_and_resets() -> None:
    backoff = Backoff(first=0.2, cap=5.0, rng=random.Random(1))
    delays = [backoff.next() for _ in range(10)]
    ceilings = [min(5.0, 0.2 * 2**i) for i in range(10)]
    assert all(c / 2 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    backoff.reset()
    assert backoff.next() <= 0.2


@given(st.integers(min_value=0, max_value=10_000), st.floats(min_value=0.01, max_value=60))
def test_never_beyond_the_cap(failures: int, cap: float) -> None:
    backoff = Backoff(first=0.1, cap=cap, failures=failures, rng=random.Random(failures))
    assert 0 < backoff.next() <= cap
