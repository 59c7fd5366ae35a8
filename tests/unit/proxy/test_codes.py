"""The listener's reasons on the engine's wire, and how a record counts (pointsman/proxy/codes.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pointsman.proxy.codes import END_CODE, PLAIN_END, REJECT_CODE, code_reason, outcome
from pointsman.proxy.engine.api import ENGINE_ERROR, POLICY_ERROR, End
from pointsman.telemetry.flow import EndReason, RejectReason


def test_every_reason_has_its_own_code_and_comes_back() -> None:
    codes = list(REJECT_CODE.values()) + list(END_CODE.values())
    assert len(set(codes)) == len(codes)
    assert all(0 < code < ENGINE_ERROR for code in codes)  # fits the record's 16-bit detail
    for reason, code in [*REJECT_CODE.items(), *END_CODE.items()]:
        assert code_reason(code) is reason


def test_our_own_bugs_are_internal_errors() -> None:
    assert code_reason(POLICY_ERROR) is RejectReason.INTERNAL_ERROR
    assert code_reason(ENGINE_ERROR) is EndReason.INTERNAL_ERROR
    assert outcome(End.CLOSED, ENGINE_ERROR, False) is EndReason.INTERNAL_ERROR


@pytest.mark.parametrize(("end", "reason"), [
    (End.CLIENT_FIN, EndReason.CLIENT_FIN), (End.BACKEND_FIN, EndReason.BACKEND_FIN),
    (End.CLIENT_RESET, EndReason.CLIENT_RESET), (End.BACKEND_RESET, EndReason.BACKEND_RESET),
    (End.IDLE_TIMEOUT, EndReason.IDLE_TIMEOUT),
    (End.HALF_CLOSE_TIMEOUT, EndReason.HALF_CLOSE_TIMEOUT),
    (End.CLIENT_TIMEOUT, EndReason.KEEPALIVE_TIMEOUT),
    (End.BACKEND_TIMEOUT, EndReason.KEEPALIVE_TIMEOUT)])
def test_what_the_engine_decides_alone(end: End, reason: EndReason) -> None:
    assert outcome(end, 0, False) is reason
    assert PLAIN_END[end] is reason


@pytest.mark.parametrize("end", [End.CONNECT_FAILED, End.LOCAL_RESOURCE])
def test_giving_up_blames_a_backend_only_when_one_failed(end: End) -> None:
    """The last attempt's error does not decide: a backend refused, then our ports ran out,
    is still connect_failed; only shortages of ours is a local_resource refusal."""
    assert outcome(end, 111, True) is EndReason.CONNECT_FAILED
    assert outcome(end, 24, False) is RejectReason.LOCAL_RESOURCE


def test_refusals_and_cuts_carry_their_reason() -> None:
    assert outcome(End.REFUSED, REJECT_CODE[RejectReason.INSPECT_TIMEOUT], False) \
        is RejectReason.INSPECT_TIMEOUT
    # the preamble budget evicts with an operator-style close that is a refusal
    assert outcome(End.CLOSED, REJECT_CODE[RejectReason.PREAMBLE_EVICTED], False) \
        is RejectReason.PREAMBLE_EVICTED
    assert outcome(End.CLOSED, END_CODE[EndReason.SHUTDOWN], True) is EndReason.SHUTDOWN
    assert outcome(End.CLOSED, END_CODE[EndReason.BACKEND_DOWN], False) is EndReason.BACKEND_DOWN
    assert outcome(End.CLOSED, END_CODE[EndReason.MAX_CONNECTION_DURATION], False) \
        is EndReason.MAX_CONNECTION_DURATION


@given(st.sampled_from(list(End)), st.integers(0, 0xFFFF), st.booleans())
def test_every_record_counts_once_as_one_reason(end: End, detail: int, failed: bool) -> None:
    assert isinstance(outcome(end, detail, failed), RejectReason | EndReason)
