"""The state file on disk: atomic writes, a burst of changes written once, read back, and a bad
file kept aside (never lost, never half read)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from pointsman.node.overlay import Overlay
from pointsman.node.statefile import StateFile, read_state, write_atomically
from tests.support import wait_for


def overlay() -> Overlay:
    o = Overlay()
    o.set_weight("p", "a", 7, 1)
    o.set_state("p", "b", "draining")
    return o


def test_written_atomically_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    write_atomically(path, overlay().document())
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temporary file left
    again, problem = read_state(path)
    assert problem is None and again.document() == overlay().document()


def test_no_file_is_an_empty_state(tmp_path: Path) -> None:
    again, problem = read_state(tmp_path / "none.json")
    assert problem is None and not again


def test_a_bad_file_is_kept_aside(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text('{"version": 1, "pools": {"p": {"backends": {"a": {"weight": -1}}}}}')
    again, problem = read_state(path)
    assert not again and problem is not None
    [aside] = list(tmp_path.iterdir())
    assert aside.name.startswith("state.json.bad-")
    assert problem.startswith(f"state file {path} is not usable (pools.p.backends.a.weight: ")
    assert f"kept as {aside}; starting from the config file alone" in problem
    path.write_text("not json")
    assert read_state(path)[1] is not None


async def test_a_burst_of_changes_is_one_write(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    current = overlay()
    documents: list[dict[str, Any]] = []

    def document() -> dict[str, Any]:
        documents.append(current.document())
        return current.document()

    state = StateFile(str(path), document)
    for weight in range(2, 12):
        current.set_weight("p", "a", weight, 1)
        state.changed()
    await wait_for(lambda: state.writes == 1, 5.0, what="one write")
    assert json.loads(path.read_text())["pools"]["p"]["backends"]["a"]["weight"] == 11
    assert len(documents) == 1 and state.errors == 0
    current.set_weight("p", "a", 3, 1)
    state.changed()
    await state.flush()  # shutdown: what is pending is written now
    assert state.writes == 2
    assert json.loads(path.read_text())["pools"]["p"]["backends"]["a"]["weight"] == 3


async def test_a_write_that_fails_is_counted_and_retried_at_the_next_change(tmp_path: Path) -> None:
    path = tmp_path / "gone" / "state.json"
    state = StateFile(str(path), overlay().document)
    state.changed()
    await state.flush()
    assert state.errors == 1 and state.last_error is not None and state.writes == 0
    path.parent.mkdir()
    state.changed()
    await state.flush()
    assert state.writes == 1 and state.last_error is None
    await asyncio.sleep(0)
