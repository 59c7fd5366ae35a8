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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pointsman.kernel.plan import ListenerSpec, Target, VipPorts

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


def flow_filter(spec: ListenerSpec, backend: Target | None = None,
                entry: VipPorts | None = None) -> list[str]:
    """conntrack filter arguments for the listener's flows to one bind entry (default: the
    first), to one backend if given. The tool filters one port, not a range: for a port range
    the filter stops at the address, and `in_range` sorts a listing's lines."""
    entry = entry if entry is not None else spec.entries[0]
    args = ["-p", spec.protocol, "-f", "ipv6" if spec.family == "ip6" else "ipv4",
            "--orig-dst", entry.address]
    if entry.first == entry.last:
        args += ["--orig-port-dst", str(entry.first)]
    if backend is not None:
        args += ["--reply-src", backend[0], "--reply-port-src", str(backend[1])]
    return args


_DPORT = re.compile(r"\bdport=(\d+)")


def in_range(line: str, entry: VipPorts) -> bool:
    """Whether a `conntrack -L` line's original destination port is in the entry's range (the
    first `dport=` of a line is the original direction's)."""
    match = _DPORT.search(line)
    return match is not None and entry.first <= int(match.group(1)) <= entry.last


def parse_count(stderr: str) -> int:
    """The tool's summary line ("N flow entries have been deleted.") as N; 0 if absent."""
    match = _COUNT.search(stderr)
    return int(match.group(1)) if match else 0


def live_lines(listing: str) -> int:
    """Entries in a `conntrack -L` listing that are not merely waiting to expire."""
    return sum(1 for line in listing.splitlines()
               if line.strip() and not any(f" {state} " in line for state in DONE_STATES))


async def delete_flows(spec: ListenerSpec, backend: Target | None = None,
                       backends: Sequence[Target] = ()) -> int:
    """Delete the listener's conntrack entries (to one backend, if given); returns how many.

    For a port-range entry the tool cannot filter the range, so the entries are chosen by the
    backend they go to (`backend`, else each of `backends`, the listener's): flows of another
    listener on the same address and protocol to the same backend address and port would go too.
    """
    count = 0
    for entry in spec.entries:
        if entry.first == entry.last:
            count += await _delete(flow_filter(spec, backend, entry))
            continue
        for target in (backend,) if backend is not None else backends:
            count += await _delete(flow_filter(spec, target, entry))
    return count


async def _delete(args: list[str]) -> int:
    proc = await asyncio.create_subprocess_exec(
        "conntrack", "-D", *args,
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
    count = 0
    for entry in spec.entries:
        listing = await _list(flow_filter(spec, entry=entry))
        if entry.first != entry.last:
            listing = "\n".join(line for line in listing.splitlines() if in_range(line, entry))
        count += live_lines(listing)
    return count


async def _list(args: list[str]) -> str:
    proc = await asyncio.create_subprocess_exec(
        "conntrack", "-L", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    try:
        async with asyncio.timeout(TOOL_TIMEOUT):
            out, _ = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return out.decode(errors="replace")
