"""Test-wide setup: which event loops the async tests run on.

Integration tests run twice, on plain asyncio and on uvloop (what `pointsman run` uses), because
the two loops differ in exactly what the data path depends on: read sizes, when pause_reading takes
effect, how a half-close is reported. A test picks one with
`@pytest.mark.asyncio(loop_factories=["uvloop"])`. Every other async test runs on plain asyncio.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a Linux dependency
    uvloop = None

_INTEGRATION = Path(__file__).parent / "integration"

# `pointsman run` defaults to one worker per CPU. Tests that count exact distributions through a
# subprocess need one process; tests of multi-worker behaviour say `workers: N` in their config.
os.environ.setdefault("POINTSMAN_WORKERS", "1")


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    factories: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
        "asyncio": asyncio.new_event_loop
    }
    if uvloop is not None and item.path.is_relative_to(_INTEGRATION):
        factories["uvloop"] = uvloop.new_event_loop
    return factories
