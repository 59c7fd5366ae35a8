"""The backend state machine: one enum, one transition table, no I/O.

The control plane owns one `BackendStateMachine` per backend and is the only caller of `apply`.
Everything that changes whether a backend receives new connections arrives here as an `Event`:
active health verdicts (`health_up`, `health_down`), passive ejection (`eject`, `eject_expired`)
and operator commands (`drain`, `maintenance`, `enable`).

Two kinds of signal share one displayed state, and the machine must not lose either:

* *Service signals* (health verdict, passive ejection) say whether the backend can serve.
* *Operator states* (`draining`, `maintenance`) say whether the operator lets it serve; they win.

So beside the displayed `state` the machine remembers `health_ok` (the last active verdict) and
`ejecting` (a passive ejection is running). Every event updates that memory, whatever the state;
the table then says what the displayed state becomes. While an operator state holds, health and
ejection events are legal no-ops on the displayed state that only update the memory, so `enable`
can return to what the backend really is now: `down` if the checks fail, `ejected` if an ejection
is still running, else `up`. Table entries that depend on the memory are written `RESUME`.

Events that contradict the memory outside operator states (`health_up` while `up`, `eject` while
`ejected`, ...) are bugs in the caller and raise `IllegalTransition`: the health checker and the
ejector only report flips. Repeated operator commands (`drain` while draining, `enable` while in
service) are legal no-ops, so a script can safely retry one.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass

__all__ = [
    "DEFAULT_INITIAL_STATE",
    "HISTORY_SIZE",
    "OPERATOR_STATES",
    "RESUME",
    "TRANSITIONS",
    "BackendState",
    "BackendStateMachine",
    "Event",
    "IllegalTransition",
    "Transition",
]


class BackendState(enum.StrEnum):
    """What the data plane and the status page see for one backend."""

    UP = "up"
    DOWN = "down"  # active health checks failing (fall reached)
    EJECTED = "ejected"  # passive: too many consecutive connect failures on real traffic
    DRAINING = "draining"  # operator: no new connections, existing ones finish
    MAINTENANCE = "maintenance"  # operator: no new connections, existing may be closed on request


class Event(enum.StrEnum):
    HEALTH_UP = "health_up"  # rise consecutive successes reached
    HEALTH_DOWN = "health_down"  # fall consecutive failures reached
    EJECT = "eject"  # passive ejector threshold reached
    EJECT_EXPIRED = "eject_expired"  # ejection deadline passed
    DRAIN = "drain"
    MAINTENANCE = "maintenance"
    ENABLE = "enable"  # operator returns the backend to service


class _Resume(enum.Enum):
    """Table marker: the target is whatever the service memory says (see `_service_state`)."""

    RESUME = "resume"


RESUME = _Resume.RESUME

OPERATOR_STATES = frozenset({BackendState.DRAINING, BackendState.MAINTENANCE})

# Starting `up` means a fresh start or a reload serves at once; a dead backend is taken out by its
# first `fall` failed checks (seconds). Starting `down` would make every restart an outage until
# `rise` checks pass on every backend. See BackendStateMachine's docstring.
DEFAULT_INITIAL_STATE = BackendState.UP

# Enough to explain the last few minutes of a flapping backend on the status page; bounded so a
# backend flapping for weeks costs no memory.
HISTORY_SIZE = 50

_S = BackendState
_E = Event

# (state, event) -> new displayed state. A missing pair is illegal.
TRANSITIONS: dict[tuple[BackendState, Event], BackendState | _Resume] = {
    (_S.UP, _E.HEALTH_DOWN): _S.DOWN,
    (_S.UP, _E.EJECT): _S.EJECTED,
    (_S.UP, _E.DRAIN): _S.DRAINING,
    (_S.UP, _E.MAINTENANCE): _S.MAINTENANCE,
    (_S.UP, _E.ENABLE): _S.UP,
    # Down: an ejection arriving now is remembered, so a later health_up lands in `ejected`
    # until the ejector's deadline, as the ejector itself believes.
    (_S.DOWN, _E.HEALTH_UP): RESUME,
    (_S.DOWN, _E.EJECT): _S.DOWN,
    (_S.DOWN, _E.EJECT_EXPIRED): _S.DOWN,
    (_S.DOWN, _E.DRAIN): _S.DRAINING,
    (_S.DOWN, _E.MAINTENANCE): _S.MAINTENANCE,
    (_S.DOWN, _E.ENABLE): _S.DOWN,
    (_S.EJECTED, _E.HEALTH_DOWN): _S.DOWN,
    (_S.EJECTED, _E.EJECT_EXPIRED): _S.UP,
    (_S.EJECTED, _E.DRAIN): _S.DRAINING,
    (_S.EJECTED, _E.MAINTENANCE): _S.MAINTENANCE,
    (_S.EJECTED, _E.ENABLE): _S.EJECTED,
    # Operator states: service events only update the memory.
    (_S.DRAINING, _E.HEALTH_UP): _S.DRAINING,
    (_S.DRAINING, _E.HEALTH_DOWN): _S.DRAINING,
    (_S.DRAINING, _E.EJECT): _S.DRAINING,
    (_S.DRAINING, _E.EJECT_EXPIRED): _S.DRAINING,
    (_S.DRAINING, _E.DRAIN): _S.DRAINING,
    (_S.DRAINING, _E.MAINTENANCE): _S.MAINTENANCE,
    (_S.DRAINING, _E.ENABLE): RESUME,
    (_S.MAINTENANCE, _E.HEALTH_UP): _S.MAINTENANCE,
    (_S.MAINTENANCE, _E.HEALTH_DOWN): _S.MAINTENANCE,
    (_S.MAINTENANCE, _E.EJECT): _S.MAINTENANCE,
    (_S.MAINTENANCE, _E.EJECT_EXPIRED): _S.MAINTENANCE,
    (_S.MAINTENANCE, _E.DRAIN): _S.DRAINING,
    (_S.MAINTENANCE, _E.MAINTENANCE): _S.MAINTENANCE,
    (_S.MAINTENANCE, _E.ENABLE): RESUME,
}


class IllegalTransition(Exception):
    """An event that makes no sense in the current state: a bug in whoever sent it."""

    def __init__(self, backend: str, state: BackendState, event: Event, reason: str) -> None:
        who = f"backend {backend!r}: " if backend else ""
        super().__init__(f"{who}event {event} is illegal in state {state} ({reason})")
        self.backend = backend
        self.state = state
        self.event = event
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Transition:
    """One change of displayed state, as the status page, flow log and metrics see it."""

    backend: str
    old: BackendState
    new: BackendState
    event: Event
    reason: str
    at: float


class BackendStateMachine:
    """The state of one backend. Time is always an argument (`now`, any monotonic clock).

    `initial` defaults to `up` (DEFAULT_INITIAL_STATE). HAProxy also starts servers up and lets
    the first `fall` failed checks take them down; Envoy instead starts hosts unhealthy until the
    first check passes. We follow HAProxy: a restart or reload must not turn a working pool into
    an outage for `rise * interval` seconds, and a backend that is really dead is found within
    the first `fall` checks (the checker probes promptly at start). An operator who prefers
    "prove it first" sets `initial_state: down`. `ejected` is never an initial state: an ejection
    needs an ejector running it. For an operator initial state, `health_ok` says what `enable`
    will resume to until the first verdict arrives (default True, as for `up`).
    """

    __slots__ = ("_ejecting", "_health_ok", "_since", "_state", "backend", "history")

    def __init__(
        self,
        initial: BackendState = DEFAULT_INITIAL_STATE,
        now: float = 0.0,
        *,
        backend: str = "",
        health_ok: bool | None = None,
        history_size: int = HISTORY_SIZE,
    ) -> None:
        if initial is BackendState.EJECTED:
            raise ValueError("a backend cannot start ejected")
        if initial is BackendState.UP and health_ok is False:
            raise ValueError("an up backend cannot start with a failing health verdict")
        if initial is BackendState.DOWN and health_ok is True:
            raise ValueError("a down backend cannot start with a passing health verdict")
        self.backend = backend
        self._state: BackendState = initial
        self._since = now
        self._health_ok = initial is not BackendState.DOWN if health_ok is None else health_ok
        self._ejecting = False
        self.history: deque[Transition] = deque(maxlen=history_size)

    @property
    def state(self) -> BackendState:
        return self._state

    @property
    def since(self) -> float:
        """When the displayed state last changed (the `now` given at construction or apply)."""
        return self._since

    @property
    def health_ok(self) -> bool:
        """The last active health verdict, kept through operator states."""
        return self._health_ok

    @property
    def ejecting(self) -> bool:
        """True while a passive ejection runs (until `eject_expired`), kept through other states."""
        return self._ejecting

    @property
    def available(self) -> bool:
        """True when the backend may receive new connections."""
        return self._state is BackendState.UP

    def apply(self, event: Event, reason: str, now: float) -> Transition | None:
        """Apply one event; return the Transition, or None when the displayed state is unchanged.

        Raises IllegalTransition for a (state, event) pair missing from TRANSITIONS; the machine
        is then unchanged.
        """
        target = TRANSITIONS.get((self._state, event))
        if target is None:
            raise IllegalTransition(self.backend, self._state, event, reason)
        self._remember(event)
        new = self._service_state() if isinstance(target, _Resume) else target
        if new is self._state:
            return None
        transition = Transition(self.backend, self._state, new, event, reason, now)
        self._state = new
        self._since = now
        self.history.append(transition)
        return transition

    def restore(self, state: BackendState, health_ok: bool, ejecting: bool, now: float) -> None:
        """Take another machine's state and memory as they are (a mirror joining late): not a
        transition, so nothing is recorded in the history."""
        if state is not self._state:
            self._since = now
        self._state = state
        self._health_ok = health_ok
        self._ejecting = ejecting

    def _remember(self, event: Event) -> None:
        if event is Event.HEALTH_UP:
            self._health_ok = True
        elif event is Event.HEALTH_DOWN:
            self._health_ok = False
        elif event is Event.EJECT:
            self._ejecting = True
        elif event is Event.EJECT_EXPIRED:
            self._ejecting = False

    def _service_state(self) -> BackendState:
        """What the backend is when no operator state holds: checks first, then ejection."""
        if not self._health_ok:
            return BackendState.DOWN
        return BackendState.EJECTED if self._ejecting else BackendState.UP

    def __repr__(self) -> str:
        return (
            f"BackendStateMachine(backend={self.backend!r}, state={self._state}, "
            f"health_ok={self._health_ok}, ejecting={self._ejecting}, since={self._since})"
        )
