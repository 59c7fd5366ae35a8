"""Builders shared by the kernel unit tests: configs and snapshots without a running pool."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from pointsman.config.model import ListenerConfig, PoolConfig
from pointsman.pool.snapshot import BackendView
from pointsman.pool.state import BackendState


def listener(**overrides: Any) -> ListenerConfig:
    data: dict[str, Any] = {"name": "web", "bind": "10.99.100.1:80", "pool": "web",
                            "dataplane": "kernel", "kernel": {"slots": 13}}
    data.update(overrides)
    return ListenerConfig.model_validate(data)


def pool(**overrides: Any) -> PoolConfig:
    data: dict[str, Any] = {
        "name": "web",
        "algorithm": "maglev",
        "backends": [{"address": f"10.99.{11 + i}.2:8080", "name": f"b{i + 1}"} for i in range(3)],
    }
    data.update(overrides)
    return PoolConfig.model_validate(data)


def view(index: int, weight: int = 1, state: BackendState = BackendState.UP,
         effective: float | None = None) -> BackendView:
    up = state is BackendState.UP
    eff = effective if effective is not None else (float(weight) if up else 0.0)
    return BackendView(f"b{index + 1}", f"10.99.{11 + index}.2", 8080, weight, eff, state)


@contextlib.contextmanager
def scheduled_first() -> Iterator[bool]:
    """Run this thread, and the threads it starts, under SCHED_FIFO for the block, if allowed.

    Tests that count asyncio's slow-callback warnings measure wall time per callback. On a machine
    shared with other busy processes, the scheduler can leave a runnable loop off the CPU for tens
    of milliseconds, which says nothing about the code under test; a real-time priority keeps
    other tenants from doing that, so what remains is what the code does to the loop (waits for
    I/O, locks or the GIL). Without the privilege the block runs as usual (yields False).
    """
    try:
        policy, param = os.sched_getscheduler(0), os.sched_getparam(0)
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    except (OSError, AttributeError):
        yield False
        return
    try:
        yield True
    finally:
        os.sched_setscheduler(0, policy, param)
