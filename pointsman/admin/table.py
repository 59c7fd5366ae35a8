"""`pointsman status`: the status document as a terminal table (rich)."""

from __future__ import annotations

from io import StringIO
from typing import Any

from rich.console import Console
from rich.table import Table

STATE_STYLE = {"up": "green", "down": "red", "ejected": "dark_orange", "draining": "blue",
               "maintenance": "grey50"}


def render_status(first: dict[str, Any], second: dict[str, Any], seconds: float) -> str:
    before = {(p["name"], b["id"]): b["total"] for p in first["pools"] for b in p["backends"]}
    table = Table(title=f"pointsman {second.get('version', '')} on {second.get('node', '?')}".strip())
    for column in ("pool", "backend", "state", "weight", "active", "conn/s", "last check"):
        table.add_column(column, justify="right" if column in ("weight", "active", "conn/s")
                         else "left")
    for pool in second["pools"]:
        for b in pool["backends"]:
            rate = (b["total"] - before.get((pool["name"], b["id"]), b["total"])) / seconds
            check = b["last_check"]
            table.add_row(pool["name"], b["id"],
                          f"[{STATE_STYLE.get(b['state'], 'white')}]{b['state']}[/]",
                          str(b["weight"]), _active(b), f"{rate:.1f}",
                          "-" if check is None else
                          f"{'ok' if check['ok'] else 'fail'}: {check['detail']}")
    out = StringIO()
    console = Console(file=out, width=120, force_terminal=False)
    console.print(table)
    for line in filter(None, map(_queue_line, second["pools"])):
        console.print(line, highlight=False)
    return out.getvalue()


def _active(backend: dict[str, Any]) -> str:
    """Open connections, against the backend's cap when it has one ("3/4")."""
    cap = backend.get("max_connections")
    return str(backend["active"]) if cap is None else f"{backend['active']}/{cap}"


def _queue_line(pool: dict[str, Any]) -> str:
    """A pool whose backends have caps: who waits in its queue (else nothing to say)."""
    queue = pool.get("queue")
    if not queue or not any(b.get("max_connections") is not None for b in pool["backends"]):
        return ""
    return (f"pool {pool['name']}: {queue['length']} waiting in the queue (max {queue['max']}, "
            f"timeout {queue['timeout']:g}s, {queue['queued_total']} queued so far)")
