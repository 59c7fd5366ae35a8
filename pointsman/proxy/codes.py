"""The listener's vocabulary on the engine's wire: reasons as small integers, and back (pure).

The engine stores the codes a policy gives it (a refusal's, an operator close's) and hands them
back untouched in an ended connection's record (`detail`); it knows no reasons of its own beyond
`End`. This module is the one table between those integers and the telemetry reasons, and the
one rule that turns a record (`End`, detail) into what the counters say: a refusal
(`RejectReason`, counted once in `rejected`) or an end (`EndReason`, counted once in `ended`).
"""

from __future__ import annotations

from pointsman.proxy.engine.api import ENGINE_ERROR, POLICY_ERROR, End
from pointsman.telemetry.flow import EndReason, RejectReason

Outcome = RejectReason | EndReason

_REJECT_BASE = 1  # refusal codes: 1 + the reason's index
_END_BASE = 64  # close codes (operator, shutdown): 64 + the reason's index
_REJECTS = tuple(RejectReason)
_ENDS = tuple(EndReason)
REJECT_CODE: dict[RejectReason, int] = {r: _REJECT_BASE + i for i, r in enumerate(_REJECTS)}
END_CODE: dict[EndReason, int] = {r: _END_BASE + i for i, r in enumerate(_ENDS)}
assert len(_REJECTS) < _END_BASE - _REJECT_BASE and _END_BASE + len(_ENDS) < ENGINE_ERROR

# What the engine decides alone, without a code from us.
_PLAIN: dict[int, EndReason] = {
    End.CLIENT_FIN: EndReason.CLIENT_FIN,
    End.BACKEND_FIN: EndReason.BACKEND_FIN,
    End.CLIENT_RESET: EndReason.CLIENT_RESET,
    End.BACKEND_RESET: EndReason.BACKEND_RESET,
    End.IDLE_TIMEOUT: EndReason.IDLE_TIMEOUT,
    End.HALF_CLOSE_TIMEOUT: EndReason.HALF_CLOSE_TIMEOUT,
    End.CLIENT_TIMEOUT: EndReason.KEEPALIVE_TIMEOUT,
    End.BACKEND_TIMEOUT: EndReason.KEEPALIVE_TIMEOUT,
}


# The same, as a table indexed by the End value (None: ask `outcome`): the hot path's lookup.
PLAIN_END: tuple[EndReason | None, ...] = tuple(_PLAIN.get(i) for i in range(max(End) + 1))


def code_reason(code: int) -> Outcome:
    """The reason behind a code we gave the engine. POLICY_ERROR (our policy raised) and
    ENGINE_ERROR (the engine hit a bug on this connection) are ours: `internal_error`."""
    index = code - _REJECT_BASE
    if 0 <= index < len(_REJECTS):
        return _REJECTS[index]
    index = code - _END_BASE
    if 0 <= index < len(_ENDS):
        return _ENDS[index]
    if code == POLICY_ERROR:
        return RejectReason.INTERNAL_ERROR
    return EndReason.INTERNAL_ERROR  # ENGINE_ERROR, or a code we never gave (a bug as well)


def outcome(reason: int, detail: int, backend_failed: bool) -> Outcome:
    """How one ended connection counts.

    `backend_failed`: a backend of ours failed at least once while this connection tried to
    connect. Giving up after that is `connect_failed` (an end, the backend's doing); giving up
    after only shortages of our own (descriptors, ports) is a `local_resource` refusal, never
    the backend's fault, whatever the last attempt's error was.
    """
    plain = _PLAIN.get(reason)
    if plain is not None:
        return plain
    if reason in (End.CONNECT_FAILED, End.LOCAL_RESOURCE):
        return EndReason.CONNECT_FAILED if backend_failed else RejectReason.LOCAL_RESOURCE
    if reason in (End.REFUSED, End.CLOSED):
        return code_reason(detail)
    return EndReason.INTERNAL_ERROR


__all__ = ["END_CODE", "ENGINE_ERROR", "PLAIN_END", "POLICY_ERROR", "REJECT_CODE", "Outcome",
           "code_reason", "outcome"]
