"""The conntrack side of the kernel fast path: table use, and cutting or counting flows.

Established flows keep their backend because the NAT binding lives in their conntrack entry, not
in our rules; so cutting a backend's flows (on_down: close_sessions) means deleting its entries,
and "drained" means no live entry for the VIP is left. Both go through the conntrack tool
(conntrack-tools, Debian package conntrack), as an asyncio subprocess so the event loop never waits
for it: they happen on state changes and at shutdown, not per packet, and the tool's filters are
the documented interface. `usage` reads two /proc files; the listener calls it from a worker
thread with its counter reads.

After an entry is deleted the next packet of the flow starts a new, unrelated entry: the backend
(which no longer knows the connection) or the host answers it with a reset, so both ends learn the
flow is gone as soon as they send.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from pathlib import Path

from pointsman.kernel.plan import ListenerSpec, Target

PROC = Path("/proc/sys/net/netfilter")
TOOL_TIMEOUT = 10.0  # seconds; the tool walks the whole table (about 1 s per million entries)
DONE_STATES = ("TIME_WAIT", "CLOSE")
"""TCP states of entries that only wait to expire: not a live connection for drain purposes."""

_COUNT = re.compile(r"(\d+) flow entries have been (?:deleted|shown)")


@dataclass(frozen=True, slots=True)
class ConntrackUsage:
    entries: int
    limit: int


def usage(proc: Path = PROC) -> ConntrackUsage | None:
    """Entries in this namespace's conntrack table and nf_conntrack_max; None without conntrack."""
    try:
        entries = int((proc / "nf_conntrack_count").read_text())
        limit = int((proc / "nf_conntrack_max").read_text())
    except (OSError, ValueError):
        return None
    return ConntrackUsage(entries, limit)


def flow_filter(spec: ListenerSpec, backend: Target | None = None) -> list[str]:
    """conntrack filter arguments for the listener's flows (to one backend, if given)."""
    args = ["-p", spec.protocol, "-f", "ipv6" if spec.family == "ip6" else "ipv4",
            "--orig-dst", spec.vip, "--orig-port-dst", str(spec.port)]
    if backend is not None:
        args += ["--reply-src", backend[0], "--reply-port-src", str(backend[1])]
    return args


def parse_count(stderr: str) -> int:
    """The tool's summary line ("N flow entries have been deleted.") as N; 0 if absent."""
    match = _COUNT.search(stderr)
    return int(match.group(1)) if match else 0


def live_lines(listing: str) -> int:
    """Entries in a `conntrack -L` listing that are not merely waiting to expire."""
    return sum(1 for line in listing.splitlines()
               if line.strip() and not any(f" {state} " in line for state in DONE_STATES))


async def delete_flows(spec: ListenerSpec, backend: Target | None = None) -> int:
    """Delete the listener's conntrack entries (to one backend, if given); returns how many."""
    proc = await asyncio.create_subprocess_exec(
        "conntrack", "-D", *flow_filter(spec, backend),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(TOOL_TIMEOUT):
            _, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return parse_count(err.decode(errors="replace"))


async def live_flows(spec: ListenerSpec) -> int:
    """Live (not TIME_WAIT or CLOSE) conntrack entries of the listener."""
    proc = await asyncio.create_subprocess_exec(
        "conntrack", "-L", *flow_filter(spec),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    try:
        async with asyncio.timeout(TOOL_TIMEOUT):
            out, _ = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return live_lines(out.decode(errors="replace"))
