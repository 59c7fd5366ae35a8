"""The fleet table (fleet/status.py)."""

from __future__ import annotations

import json

from pointsman.fleet.status import parse_nodes, render_fleet

NOW = 1_000_000.0


def node(name: str, health: str = "serving", revision: int = 7) -> bytes:
    return json.dumps({"name": name, "health": health, "version": "0.1.0", "config_revision": revision,
                       "started_at": NOW - 3725, "listeners": ["tcp 127.0.0.1:80"],
                       "pools": {"web": {"available": 2, "backends": 3}}, "admin": "127.0.0.1:9900"}).encode()


def rows(text: str) -> dict[str, str]:
    return {line.split()[1]: line for line in text.splitlines() if line.startswith("│")}


def test_one_row_per_node_and_a_node_behind_shows() -> None:
    text = render_fleet(parse_nodes([node("lb-b", revision=6), node("lb-a")]), 7, {}, NOW)
    assert "config revision 7" in text
    table = rows(text)
    assert list(table) == ["lb-a", "lb-b"]
    assert "serving" in table["lb-a"] and "web 2/3" in table["lb-a"] and "1h02m" in table["lb-a"]
    assert "6 (behind)" in table["lb-b"]


def test_drained_but_absent_nodes_and_unreadable_values() -> None:
    text = render_fleet(parse_nodes([b"not json", node("lb-a", health="draining")]), 7,
                        {"lb-c": '{"reason": "x"}'}, NOW)
    table = rows(text)
    assert "unreadable" in table["?"]
    assert "draining" in table["lb-a"]
    assert "not registered (drained)" in table["lb-c"]


def test_no_nodes() -> None:
    assert "no node is registered" in render_fleet([], 0, {}, NOW)
