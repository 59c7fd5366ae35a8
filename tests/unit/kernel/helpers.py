"""Builders shared by the kernel unit tests: configs and snapshots without a running pool."""

from __future__ import annotations

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
