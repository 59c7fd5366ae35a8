"""What a pool says to the other processes of a node, as typed values.

An owner pool (the control process) emits `BackendEvent` and `WeightChange` for every decision it
applies, so mirror pools (in workers) can apply the same decisions in the same order. A mirror
pool emits `PassiveSignal` for what its data plane saw (connect failures, and the first success
after them), so the owner can decide on ejection. `PoolState` carries a whole pool's decisions at
once, for a worker that starts while the owner already holds state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pointsman.pool.state import BackendState, Event


@dataclass(frozen=True, slots=True)
class BackendEvent:
    pool: str
    backend: str
    event: Event
    reason: str


@dataclass(frozen=True, slots=True)
class WeightChange:
    pool: str
    backend: str
    weight: int


@dataclass(frozen=True, slots=True)
class AgentScale:
    """An agent check's weight percentage, as a factor on the operator's weight."""

    pool: str
    backend: str
    scale: float


@dataclass(frozen=True, slots=True)
class PassiveSignal:
    """A connect outcome seen by a mirror's data plane: `ok` False is a failure, True the first
    success after failures (successes are not sent one by one)."""

    pool: str
    backend: str
    ok: bool


@dataclass(frozen=True, slots=True)
class BackendDecisions:
    """One backend's state as the owner holds it: enough for a mirror to continue from."""

    backend: str
    state: BackendState
    health_ok: bool
    ejecting: bool
    weight: int
    up_for: float | None = None  # seconds in service (a slow-start ramp continues from there)


@dataclass(frozen=True, slots=True)
class PoolState:
    pool: str
    backends: tuple[BackendDecisions, ...]


PoolMessage = BackendEvent | WeightChange | AgentScale | PassiveSignal
PoolSink = Callable[[PoolMessage], None]
