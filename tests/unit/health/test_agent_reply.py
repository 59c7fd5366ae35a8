"""The agent-check reply grammar (HAProxy's), sans I/O: every word, combinations, and garbage."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pointsman.health.dialects import MAX_AGENT_PERCENT, AgentReply, BadReply, parse_agent_line


@pytest.mark.parametrize(("line", "expected"), [
    (b"up", AgentReply(state="up")),
    (b"down", AgentReply(state="down")),
    (b"fail", AgentReply(state="down")),
    (b"stopped", AgentReply(state="down")),
    (b"ready", AgentReply(admin="ready")),
    (b"drain", AgentReply(admin="drain")),
    (b"maint", AgentReply(admin="maint")),
    (b"maintenance", AgentReply(admin="maint")),
    (b"75%", AgentReply(percent=75)),
    (b"0%", AgentReply(percent=0)),
    (b"up 50%", AgentReply(state="up", percent=50)),
    (b"50%,drain", AgentReply(admin="drain", percent=50)),
    (b"UP\tReady 100%\r", AgentReply(state="up", admin="ready", percent=100)),
    (b"down # disk full ", AgentReply(state="down", description="disk full")),
    (b"  up  ,, 10% ", AgentReply(state="up", percent=10)),
    (b"up down", AgentReply(state="down")),  # the last word of a kind wins (HAProxy)
    (b"drain ready", AgentReply(admin="ready")),
])
def test_words(line: bytes, expected: AgentReply) -> None:
    assert parse_agent_line(line) == expected


@pytest.mark.parametrize(("line", "message"), [
    (b"", "empty"),
    (b"   # only a comment", "empty"),
    (b"healthy", "unknown agent word"),
    (b"up 75", "unknown agent word"),
    (b"-5%", "unknown agent word"),
    (b"1001%", "above"),
    (b"up \xff", "not ASCII"),
])
def test_bad_replies(line: bytes, message: str) -> None:
    with pytest.raises(BadReply, match=message):
        parse_agent_line(line)


def test_the_largest_percentage() -> None:
    assert parse_agent_line(f"{MAX_AGENT_PERCENT}%".encode()).percent == MAX_AGENT_PERCENT


def test_describes_itself_for_the_status_page() -> None:
    assert str(parse_agent_line(b"up drain 50% # deploy")) == "agent: up drain 50% (deploy)"


@given(st.binary(max_size=64))
def test_any_bytes_give_a_reply_or_bad_reply(data: bytes) -> None:
    try:
        reply = parse_agent_line(data)
    except BadReply:
        return
    assert reply.state or reply.admin or reply.percent is not None
