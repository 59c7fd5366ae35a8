"""Every config shown to operators passes `check`, as written.

- Complete configs (README, every page under docs/) load as they are.
- Fragments (a `listeners:` item without its pool, a lone `health_check:`, an `admin:` section)
  are completed with the least that makes them a config (a name, a bind address, a stub pool or
  listener) and must then load: every key and value they show is validated, so a documented
  `zero_copy: off` that YAML turns into a boolean fails here if the model refuses it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from pointsman.config.loader import load_text

ROOT = Path(__file__).resolve().parents[2]
# Pages whose YAML is meant to be copied. bgp.md, fleet.md and health-checks.md are left out: their
# blocks carry `...` placeholders and several alternatives in one block, written for reading.
PAGES = [ROOT / "README.md", *(ROOT / "docs" / name for name in (
    "config.md", "discovery.md", "edge.md", "kernel.md", "observability.md", "operations.md"))]
BLOCKS = [
    (path, block)
    for path in PAGES
    for block in re.findall(r"```yaml\n(.*?)```", path.read_text(), re.S)
]
EXAMPLES = [(p, b) for p, b in BLOCKS if "listeners:" in b and "pools:" in b]
# An `include:` example names files on the reader's disk; tests/integration/test_config_files.py
# loads a main file with its conf.d the same way.
FRAGMENTS = [(p, b) for p, b in BLOCKS if (p, b) not in EXAMPLES and "include:" not in b]
STUB_BACKEND = {"address": "127.0.0.1:9"}
PLACEHOLDER = ["..."]  # `backends: [...]` in prose: "your backends here"


def ids(items: list[tuple[Path, str]]) -> list[str]:
    return [f"{p.name}:{i}" for i, (p, _) in enumerate(items)]


@pytest.mark.parametrize(("path", "block"), EXAMPLES, ids=ids(EXAMPLES))
def test_example_config_is_valid(path: Path, block: str) -> None:
    config = load_text(block, str(path))
    assert config.listeners and config.pools


def complete(data: dict[str, Any]) -> dict[str, Any]:
    """Fill in what a fragment leaves out, nothing that it says."""
    data = dict(data)
    if "health_check" in data:
        data.setdefault("pools", [{}])
        data["pools"][0]["health_check"] = data.pop("health_check")
    pools = [dict(p) for p in data.get("pools") or []]
    for i, pool in enumerate(pools):
        pool.setdefault("name", f"p{i}")
        if pool.get("backends") in (None, PLACEHOLDER):
            pool["backends"] = [STUB_BACKEND]
    listeners = [dict(item) for item in data.get("listeners") or []]
    for i, listener in enumerate(listeners):
        listener.setdefault("name", f"l{i}")
        listener.setdefault("bind", f"127.0.0.1:{7000 + i}")
        if "pool" not in listener and "default_pool" not in listener:
            listener["pool"] = pools[0]["name"] if pools else "stub"
    wanted = {name for item in listeners for name in (
        item.get("pool"), item.get("default_pool"),
        *(route.get("pool") for route in item.get("tls_routes") or []))} - {None}
    have = {p["name"] for p in pools}
    pools += [{"name": name, "backends": [STUB_BACKEND]} for name in sorted(wanted - have)]
    if not pools:
        pools = [{"name": "stub", "backends": [STUB_BACKEND]}]
    if not listeners:
        listeners = [{"name": "stub", "bind": "127.0.0.1:7999", "pool": pools[0]["name"]}]
    data["pools"], data["listeners"] = pools, listeners
    return data


@pytest.mark.parametrize(("path", "block"), FRAGMENTS, ids=ids(FRAGMENTS))
def test_fragment_is_valid_once_completed(path: Path, block: str) -> None:
    data = yaml.safe_load(block)
    assert isinstance(data, dict), "a YAML example should be a mapping"
    load_text(yaml.safe_dump(complete(data), sort_keys=False), str(path))


def test_there_are_examples() -> None:
    assert len(EXAMPLES) >= 2
    assert len(FRAGMENTS) >= 8
