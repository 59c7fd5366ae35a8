"""`pointsman fleet status`: every registered node as a terminal table (pure: data in, text out)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from io import StringIO
from typing import Any

from rich.console import Console
from rich.table import Table

HEALTH_STYLE = {"serving": "green", "degraded": "dark_orange", "draining": "blue"}


def parse_nodes(values: Sequence[bytes]) -> list[dict[str, Any]]:
    """Node registrations (JSON); a value that is not a JSON object is shown as unreadable."""
    nodes = []
    for raw in values:
        try:
            doc = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            doc = None
        nodes.append(doc if isinstance(doc, dict) else {"name": "?", "health": "unreadable"})
    return sorted(nodes, key=lambda d: str(d.get("name")))


def _uptime(started_at: object, now: float) -> str:
    if not isinstance(started_at, int | float):
        return "-"
    seconds = max(0, int(now - started_at))
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _pools(pools: object) -> str:
    if not isinstance(pools, dict):
        return "-"
    return ", ".join(f"{name} {p.get('available', '?')}/{p.get('backends', '?')}"
                     for name, p in sorted(pools.items()) if isinstance(p, dict))


def render_fleet(nodes: Sequence[Mapping[str, Any]], config_revision: int,
                 drained: Mapping[str, str], now: float, title: str = "pointsman fleet") -> str:
    """One row per node; a node on an older config revision, or drained but not registered, shows."""
    table = Table(title=f"{title} (config revision {config_revision or 'none'})")
    for column in ("node", "health", "config", "pools (available/backends)", "listeners", "version",
                   "uptime", "admin"):
        table.add_column(column)
    seen = set()
    for node in nodes:
        name = str(node.get("name"))
        seen.add(name)
        health = str(node.get("health", "?"))
        revision = node.get("config_revision")
        config = str(revision) if revision == config_revision else f"[red]{revision} (behind)[/]"
        listeners = node.get("listeners")
        table.add_row(name, f"[{HEALTH_STYLE.get(health, 'red')}]{health}[/]", config,
                      _pools(node.get("pools")),
                      str(len(listeners)) if isinstance(listeners, list) else "-",
                      str(node.get("version", "-")), _uptime(node.get("started_at"), now),
                      str(node.get("admin", "-")))
    for name in sorted(set(drained) - seen):
        table.add_row(name, "[grey50]not registered (drained)[/]", "-", "-", "-", "-", "-", "-")
    out = StringIO()
    Console(file=out, width=140, force_terminal=False).print(table)
    if not nodes:
        out.write("no node is registered\n")
    return out.getvalue()
