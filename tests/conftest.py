"""Test-wide setup: which event loops the async tests run on.

Integration tests run twice, on plain asyncio and on uvloop (what `pointsman run` uses), because
the two loops differ in exactly what the data path depends on: read sizes, when pause_reading takes
effect, how a half-close is reported. A test picks one with
`@pytest.mark.asyncio(loop_factories=["uvloop"])`. Every other async test runs on plain asyncio.

Process models: a test that takes the `workers` fixture runs with one process (`w1`) and with a
control process and two workers (`w2`, what operators run by default on 2 cores). Workers always
run uvloop, so the `w2` case runs once, in the test's uvloop loop.

Connection engines: a test that takes the `engine` fixture (or a module that says
`pytestmark = pytest.mark.usefixtures("engine")`) runs on the compiled engine (`cython`) and on
the pure-Python one (`python`, the reference), chosen through POINTSMAN_ENGINE, which nodes in the
test's loop, `pointsman run` subprocesses and their workers all read. The engine's own I/O does
not depend on the event loop (one add_reader, timers), so the pure-Python engine runs in the
uvloop loop only, as `pointsman run` does; the compiled one on both loops.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from pointsman.proxy.engine import ENV as ENGINE_ENV
from pointsman.proxy.engine import compiled_available

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


@pytest.fixture(params=["cython", "python"])
def engine(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The connection engine of the nodes this test starts (in its loop or as subprocesses)."""
    name = str(request.param)
    if name == "cython" and not compiled_available():
        pytest.skip("the compiled engine is not built (pip install -e . with a C compiler)")
    monkeypatch.setenv(ENGINE_ENV, name)
    return name


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Drop the plain-asyncio run of `w2` cases (the workers run uvloop whatever the test's
    loop) and of the pure-Python engine (see the module docstring)."""
    items[:] = [item for item in items if not _asyncio_only_repeats(item)]


def _asyncio_only_repeats(item: pytest.Item) -> bool:
    params = getattr(getattr(item, "callspec", None), "params", {})
    if params.get("_asyncio_loop_factory") is not asyncio.new_event_loop:
        return False
    if params.get("workers", 1) > 1:
        return True
    # The engines' own tests (test_engine_*.py) keep every combination.
    return params.get("engine") == "python" and not item.path.name.startswith("test_engine_")


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    factories: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
        "asyncio": asyncio.new_event_loop
    }
    if uvloop is not None and item.path.is_relative_to(_INTEGRATION):
        factories["uvloop"] = uvloop.new_event_loop
    return factories
