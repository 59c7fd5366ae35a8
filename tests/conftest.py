"""Test-wide setup: which event loops the async tests run on.

Integration tests run twice, on plain asyncio and on uvloop (what `pointsman run` uses), because
the two loops differ in exactly what the data path depends on: read sizes, when pause_reading takes
effect, how a half-close is reported. A test picks one with
`@pytest.mark.asyncio(loop_factories=["uvloop"])`. Every other async test runs on plain asyncio.

Process models: a test that takes the `workers` fixture runs with one process (`w1`) and with a
control process and two workers (`w2`, what operators run by default on 2 cores). Workers always
run uvloop, so the `w2` case runs once, in the test's uvloop loop.
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


@pytest.fixture(params=[1, 2], ids=["w1", "w2"])
def workers(request: pytest.FixtureRequest) -> int:
    """How many worker processes the node under test runs (1: a single process)."""
    return int(request.param)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Drop the plain-asyncio run of `w2` cases: the workers run uvloop whatever the test's loop."""
    items[:] = [item for item in items if not _asyncio_with_workers(item)]


def _asyncio_with_workers(item: pytest.Item) -> bool:
    params = getattr(getattr(item, "callspec", None), "params", {})
    factory = params.get("_asyncio_loop_factory")
    return params.get("workers", 1) > 1 and factory is asyncio.new_event_loop


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    factories: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
        "asyncio": asyncio.new_event_loop
    }
    if uvloop is not None and item.path.is_relative_to(_INTEGRATION):
        factories["uvloop"] = uvloop.new_event_loop
    return factories
