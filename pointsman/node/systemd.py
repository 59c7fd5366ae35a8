"""Telling systemd how the node is doing (`Type=notify`), without libsystemd.

The protocol is one datagram per notification on the unix socket named by `NOTIFY_SOCKET` (a
path, or an abstract name written with a leading "@"), holding `KEY=value` lines:
`READY=1` once every listener is bound, `RELOADING=1` (with `MONOTONIC_USEC`) then `READY=1`
around a reload, `STOPPING=1` when shutdown begins, `STATUS=...` for `systemctl status`, and
`WATCHDOG=1` every half of `WATCHDOG_USEC` while the event loop runs (a stuck loop stops the
pings, and systemd restarts the service). Outside systemd (no `NOTIFY_SOCKET`) every call does
nothing. Worker processes never notify: the control process is the service's main process, and
the variables are removed from the workers' environment.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

log = logging.getLogger("pointsman.systemd")

VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def _address() -> str | None:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return None
    return "\0" + address[1:] if address.startswith("@") else address


def notify(*lines: str) -> bool:
    """Send `lines` as one notification; False when not under systemd or the send failed."""
    address = _address()
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto("\n".join(lines).encode(), address)
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", os.environ.get("NOTIFY_SOCKET"), exc)
        return False
    return True


def ready(status: str) -> None:
    notify("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")


def reloading() -> None:
    notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")


def stopping(status: str) -> None:
    notify("STOPPING=1", f"STATUS={status}")


def watchdog_interval() -> float | None:
    """Half the watchdog timeout systemd set for this process, in seconds (None: no watchdog)."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2_000_000
    except ValueError:
        return None


async def keep_watchdog_fed(interval: float) -> None:
    """Ping the watchdog every `interval` seconds for as long as the loop runs."""
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)


def child_environment() -> dict[str, str]:
    """This process's environment without the systemd variables (for worker processes)."""
    return {k: v for k, v in os.environ.items() if k not in VARIABLES}
