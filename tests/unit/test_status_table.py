"""`pointsman status`'s table: caps next to the open connections, the queue of a capped pool."""

from __future__ import annotations

from typing import Any

from pointsman.admin.table import render_status


def status(active: int, total: int, cap: int | None, waiting: int) -> dict[str, Any]:
    backend = {"id": "a", "state": "up", "weight": 1, "active": active, "total": total,
               "last_check": None, "max_connections": cap}
    return {"version": "0.1.0", "node": "n1", "pools": [
        {"name": "p", "backends": [backend],
         "queue": {"length": waiting, "max": 1000, "timeout": 5.0, "queued_total": 7}}]}


def test_a_capped_backend_shows_its_cap_and_the_pool_its_queue() -> None:
    text = render_status(status(0, 10, 2, 0), status(2, 30, 2, 3), 2.0)
    row = next(line for line in text.splitlines() if " a " in line)
    assert "2/2" in row and "10.0" in row  # (30 - 10) / 2 s
    assert "pool p: 3 waiting in the queue (max 1000, timeout 5s, 7 queued so far)" in text


def test_without_caps_no_cap_and_no_queue_line() -> None:
    text = render_status(status(0, 0, None, 0), status(1, 4, None, 0), 1.0)
    assert "/" not in next(line for line in text.splitlines() if " a " in line)
    assert "queue" not in text
