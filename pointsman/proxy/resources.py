"""Our own limits: file descriptors, socket buffers, memory and source ports.

When one of them runs out the fault is ours, never the backend's: the connection (or UDP
session) is refused as `local_resource`, the error is counted by operation and errno, logged at
most once per interval, and the pool hears nothing (no passive failure, no ejection).

Also here, run once at start (`prepare_process`): the soft RLIMIT_NOFILE is raised to the hard
limit, with a warning when the configured tables could need more descriptors than that; and the
`MemoryTrimmer` that gives freed buffers back to the kernel once a burst is over.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import logging
import math
import os
import resource
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

from pointsman.config.workers import worker_count

if TYPE_CHECKING:
    from pointsman.config.model import Config

log = logging.getLogger("pointsman.resources")

# Errors that say this process (or host) ran out of something, not that the backend failed:
# descriptors (EMFILE per process, ENFILE per host), socket buffers, memory, and source
# addresses/ports (EADDRNOTAVAIL: no free ephemeral port to this backend, or a source address
# that is not ours; EADDRINUSE: a 4-tuple already taken).
FD_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE})
MEMORY_ERRNOS = frozenset({errno.ENOBUFS, errno.ENOMEM})
PORT_ERRNOS = frozenset({errno.EADDRNOTAVAIL, errno.EADDRINUSE})
LOCAL_ERRNOS = FD_ERRNOS | MEMORY_ERRNOS | PORT_ERRNOS
# The errno label of a refusal made before the kernel said EMFILE: the descriptor table reached
# the reserve kept for the admin listener, health checks and the flow log.
FD_RESERVE = "fd_reserve"
LOG_INTERVAL = 10.0  # seconds between two log lines about the same (listener, op, errno)
# Descriptors per process besides the connection tables: listeners, admin, health checks, the
# flow log, pipes, etcd; a margin rather than a count.
FD_MARGIN = 64


def is_local(exc: BaseException) -> bool:
    """True for an OSError that is a shortage of ours (see LOCAL_ERRNOS)."""
    return isinstance(exc, OSError) and exc.errno in LOCAL_ERRNOS


def errno_name(number: int | None) -> str:
    return errno.errorcode.get(number, str(number)) if number is not None else "unknown"


def fd_reserve(limit: int) -> int:
    """Descriptors the data path leaves free for everything else: 1/64 of the limit, 16 to 256."""
    return max(16, min(256, limit // 64))


def nofile_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def open_descriptors() -> int:
    """How many descriptors this process has open (a directory listing: not for the hot path)."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # the listing's own descriptor
    except OSError:
        return 0


class FdBudget:
    """The descriptors the data path holds, against what it may hold.

    The process has one descriptor table, so this is one object per process (`BUDGET`). The data
    path adds what it opens (a client socket at accept, a backend socket per connect, the pipes
    and duplicates of a spliced connection, a UDP session's socket) and takes it back when it
    closes them: integer adds, per connection. `cap` is the soft RLIMIT_NOFILE minus what was
    open besides (measured when a listener starts) minus a reserve for everything else (admin
    listener, health checks, flow log): when the data path reaches it, listeners stop accepting
    and UDP refuses new sessions, instead of accepting connections that would fail at socket().
    """

    __slots__ = ("cap", "used")

    def __init__(self) -> None:
        self.used = 0
        self.cap = 1 << 62

    def measure(self) -> None:
        """Set the cap from the limit and what is open now besides our own descriptors."""
        limit = nofile_limit()
        if limit == resource.RLIM_INFINITY:
            self.cap = 1 << 62
            return
        others = max(open_descriptors() - self.used, 0)
        self.cap = max(limit - others - fd_reserve(limit), 0)

    def room(self, n: int = 2) -> bool:
        """Room for `n` more (2: a TCP connection's client and backend sockets)."""
        return self.used + n <= self.cap


BUDGET = FdBudget()


class ErrorLog:
    """Counts local resource errors and logs them at most once per LOG_INTERVAL per key, with how
    many were not logged in between, so a storm of EMFILE is one line every ten seconds."""

    __slots__ = ("last", "suppressed")

    def __init__(self) -> None:
        self.last: dict[tuple[str, str, str], float] = {}
        self.suppressed: Counter[tuple[str, str, str]] = Counter()

    def note(self, listener: str, op: str, name: str, now: float | None = None) -> bool:
        """Count one error; True when it was logged (the first of its interval)."""
        key = (listener, op, name)
        now = time.monotonic() if now is None else now
        if now - self.last.get(key, -math.inf) < LOG_INTERVAL:
            self.suppressed[key] += 1
            return False
        self.last[key] = now
        more = self.suppressed.pop(key, 0)
        log.warning("%s: %s failed with %s: out of a local resource, not a backend fault%s",
                    listener, op, name, f" ({more} more since the last message)" if more else "")
        return True


ERRORS = ErrorLog()


# --- at start ------------------------------------------------------------------------------------


def raise_nofile() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return (before, after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == hard:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:
        log.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, exc)
        return soft, soft
    return soft, hard


def descriptors_needed(config: Config, workers: int) -> int:
    """What one data-plane process may hold at once: two per TCP connection of its share of each
    table, one per UDP session, plus the margin."""
    need = FD_MARGIN
    for listener in config.listeners:
        if listener.dataplane == "kernel":
            continue
        if listener.protocol == "udp":
            need += math.ceil(listener.udp.max_sessions / workers)
        else:
            share = math.ceil(listener.max_connections / workers)
            reads_preamble = listener.proxy_protocol.accept != "off" or listener.tls_routes
            need += 2 * (share + (listener.preamble_max_pending if reads_preamble else 0))
    return need


def prepare_process(config: Config | None) -> None:
    """Once, before serving: raise the descriptor limit and say whether the tables fit in it."""
    before, limit = raise_nofile()
    if limit != before:
        log.info("open-file limit raised from %d to %d (the hard limit)", before, limit)
    else:
        log.info("open-file limit is %d", limit)
    if config is None:
        return
    workers = worker_count(config)
    need = descriptors_needed(config, workers)
    if limit != resource.RLIM_INFINITY and need > limit:
        log.warning(
            "the connection tables could need %d file descriptors per process (2 per TCP "
            "connection, 1 per UDP session, plus %d) but the limit is %d: past it new "
            "connections are refused as local_resource; raise LimitNOFILE / ulimit -n or lower "
            "max_connections", need, FD_MARGIN, limit)


# --- giving memory back ----------------------------------------------------------------------------

TRIM_INTERVAL = 2.0  # seconds between looks at whether a burst is over
TRIM_DROP = 0.5  # trim once the open connections fell to half of the peak since the last trim
TRIM_MIN_PEAK = 16  # below this many connections there is no burst worth a heap walk


def _malloc_trim() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


class MemoryTrimmer:
    """Gives freed heap memory back to the kernel after a burst.

    Bytes objects a connection buffers (up to the write high-water mark, plus one read) are
    allocated by glibc's malloc; once freed they stay in its heap and the RSS stays at the peak.
    `malloc_trim(0)` returns free pages from every arena. It costs a walk of the heap, so it runs
    only when the process holds markedly fewer connections than at its peak since the last trim
    (a burst is over), sampled every TRIM_INTERVAL seconds. One per event loop, shared by its
    listeners (`acquire`/`release`, each with a function that says how many it holds open).
    """

    _by_loop: dict[asyncio.AbstractEventLoop, MemoryTrimmer] = {}

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.users = 0
        self.peak = 0
        self.trims = 0
        self.sources: list[Callable[[], int]] = []  # open connections or sessions, per listener
        self._trim = _malloc_trim()
        self._handle: asyncio.TimerHandle | None = None

    @classmethod
    def acquire(cls, loop: asyncio.AbstractEventLoop, source: Callable[[], int]) -> MemoryTrimmer:
        trimmer = cls._by_loop.get(loop)
        if trimmer is None:
            trimmer = cls._by_loop[loop] = MemoryTrimmer(loop)
        trimmer.users += 1
        trimmer.sources.append(source)
        if trimmer._handle is None and trimmer._trim is not None:
            trimmer._handle = loop.call_later(TRIM_INTERVAL, trimmer._tick)
        return trimmer

    def release(self, source: Callable[[], int]) -> None:
        self.users -= 1
        if source in self.sources:
            self.sources.remove(source)
        if self.users <= 0:
            if self._handle is not None:
                self._handle.cancel()
                self._handle = None
            self._by_loop.pop(self.loop, None)

    def _active(self) -> int:
        return sum(source() for source in self.sources)

    def _tick(self) -> None:
        active = self._active()
        self.peak = max(self.peak, active)
        if self.peak >= TRIM_MIN_PEAK and active <= self.peak * TRIM_DROP:
            self.trim()
            self.peak = active
        self._handle = self.loop.call_later(TRIM_INTERVAL, self._tick)

    def trim(self) -> None:
        if self._trim is not None:
            self._trim(0)
            self.trims += 1
