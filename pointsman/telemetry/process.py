"""Figures of one process (CPU, memory, descriptors, event-loop lag), measured by the process
itself so that a control process can export every worker's figures with a `process` label."""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass

_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True, slots=True)
class ProcessFigures:
    process: str  # "single", "control", "worker-0", ...
    pid: int
    started_at: float  # wall clock
    cpu_seconds: float  # user + system
    resident_bytes: int
    open_fds: int
    max_fds: int
    loop_lag: float  # seconds the last periodic tick ran late


def measure(process: str, started_at: float, loop_lag: float) -> ProcessFigures:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return ProcessFigures(
        process=process,
        pid=os.getpid(),
        started_at=started_at,
        cpu_seconds=usage.ru_utime + usage.ru_stime,
        resident_bytes=_resident_bytes(),
        open_fds=_open_fds(),
        max_fds=resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        loop_lag=loop_lag,
    )


def _resident_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):  # not Linux: the peak is the best we have
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _open_fds() -> int:
    try:
        with os.scandir("/proc/self/fd") as entries:
            return sum(1 for _ in entries) - 1  # the directory's own descriptor
    except OSError:
        return -1
