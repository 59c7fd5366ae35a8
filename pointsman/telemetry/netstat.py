"""The kernel's TCP counters for SYN and accept-queue pressure, read from /proc/net/netstat.

The file holds pairs of lines per section: a header line naming the counters, then a line with
their values, both prefixed with the section name (`TcpExt: SyncookiesSent ...`,
`TcpExt: 0 ...`). It describes the network namespace of the process that reads it, which is the
namespace pointsman's listeners live in. The counters are node-wide (per namespace): the kernel
does not split them per socket, so they cover every listener on the host, pointsman's or not.

`parse` is pure (text in, numbers out); `read` is the thin adapter, one small file read per
scrape (about 2 KiB, answered from kernel memory, no blocking I/O).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

PATH = Path("/proc/net/netstat")
MAX_BYTES = 65536
"""Bound on what is read: the file is ~2.5 KiB on Linux 6.x (three sections); a tenfold growth
of the kernel's counter list still fits."""


class NetstatError(ValueError):
    """The text is not in the /proc/net/netstat layout (a header and a value line per section)."""


def parse(text: str) -> dict[str, dict[str, int]]:
    """Section name -> counter name -> value. Raises NetstatError on a malformed layout."""
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) % 2:
        raise NetstatError(f"{len(lines)} lines: expected header and value lines in pairs")
    out: dict[str, dict[str, int]] = {}
    for header, values in zip(lines[::2], lines[1::2], strict=True):
        section, names = _split(header)
        again, numbers = _split(values)
        if section != again:
            raise NetstatError(f"section {section!r} is followed by {again!r}")
        if len(names) != len(numbers):
            raise NetstatError(f"{section}: {len(names)} names but {len(numbers)} values")
        try:
            out[section] = {name: int(n) for name, n in zip(names, numbers, strict=True)}
        except ValueError:
            raise NetstatError(f"{section}: a value is not an integer") from None
    return out


def _split(line: str) -> tuple[str, list[str]]:
    section, sep, rest = line.partition(":")
    if not sep or not section or " " in section:
        raise NetstatError(f"no 'Section:' prefix in {line[:40]!r}")
    return section, rest.split()


@dataclass(frozen=True, slots=True)
class SynCounters:
    """The TcpExt counters that show SYN and accept-queue pressure (all monotonic).

    - listen_overflows: a handshake could not complete because the listener's accept queue was
      full (SYN or final ACK dropped); the client retransmits after its RTO (1 s, then 3 s...).
    - listen_drops: every SYN or ACK a listener dropped, overflows included (also memory,
      unknown listener, bad cookie).
    - syn_retrans: SYNs and SYN-ACKs this host retransmitted: its own connects (to backends)
      and handshakes it answered that the client did not complete.
    - syncookies_sent / _recv / _failed: a SYN queue filled up, so the host answered with
      cookies instead of keeping state; cookies echoed back valid / invalid.
    """

    listen_overflows: int
    listen_drops: int
    syn_retrans: int
    syncookies_sent: int
    syncookies_recv: int
    syncookies_failed: int


FIELDS = {
    "listen_overflows": "ListenOverflows",
    "listen_drops": "ListenDrops",
    "syn_retrans": "TCPSynRetrans",
    "syncookies_sent": "SyncookiesSent",
    "syncookies_recv": "SyncookiesRecv",
    "syncookies_failed": "SyncookiesFailed",
}


def syn_counters(sections: Mapping[str, Mapping[str, int]]) -> SynCounters:
    """Pick the SYN counters out of parsed sections; a counter this kernel lacks reads 0."""
    tcp = sections.get("TcpExt", {})
    return SynCounters(**{field: tcp.get(name, 0) for field, name in FIELDS.items()})


def read(path: Path = PATH) -> SynCounters | None:
    """The SYN counters of this process's network namespace; None where they cannot be read
    (not Linux, /proc not mounted, an unexpected layout)."""
    try:
        with path.open("rb") as f:
            text = f.read(MAX_BYTES).decode("ascii", errors="replace")
        return syn_counters(parse(text))
    except (OSError, NetstatError):
        return None
