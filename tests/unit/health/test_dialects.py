from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pointsman.health.dialects import (
    MAX_STATUS_LINE,
    BadReply,
    build_http_request,
    expect_matches,
    host_header,
    parse_hex,
    parse_http_status,
    unescape,
)

# --- unescape -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"PING\r\n", b"PING\r\n"),
        (r"a\tb", b"a\tb"),
        (r"back\\slash", b"back\\slash"),
        (r"nul\0end", b"nul\x00end"),
        (r"\x00\x7f\xFF\xab", b"\x00\x7f\xff\xab"),
        ("already\r\n", b"already\r\n"),  # YAML double quotes unescape before we see it
        ("caf\u00e9", "caf\u00e9".encode()),
        ("", b""),
    ],
)
def test_unescape(text: str, expected: bytes) -> None:
    assert unescape(text) == expected


@pytest.mark.parametrize("text", ["trailing\\", r"\q", r"\x4", r"\xZZ", r"\x"])
def test_unescape_rejects_bad_escapes(text: str) -> None:
    with pytest.raises(ValueError):
        unescape(text)


@given(st.binary(max_size=64))
def test_unescape_round_trips_hex_escaped_bytes(data: bytes) -> None:
    assert unescape("".join(f"\\x{b:02x}" for b in data)) == data


def test_parse_hex() -> None:
    assert parse_hex("01 02 ff\nAB") == b"\x01\x02\xff\xab"
    assert parse_hex("") == b""
    for bad in ("abc", "zz", "0x01"):
        with pytest.raises(ValueError):
            parse_hex(bad)


# --- expect ---------------------------------------------------------------------------------


def test_expect_substring_and_regex() -> None:
    assert expect_matches(b"+PONG\r\n", b"+PONG", None)
    assert expect_matches(b"SSH-2.0-OpenSSH_9.2\r\n", b"SSH-2.0", None)
    assert not expect_matches(b"-ERR\r\n", b"+PONG", None)
    assert expect_matches(b"role:master\r\n", None, re.compile(rb"role:(master|slave)"))
    assert not expect_matches(b"role:sentinel", None, re.compile(rb"role:(master|slave)"))
    assert expect_matches(b"anything", None, None)
    assert expect_matches(b"", None, None)


def test_expect_needs_both_when_both_given() -> None:
    regex = re.compile(rb"\d+")
    assert expect_matches(b"OK 42", b"OK", regex)
    assert not expect_matches(b"OK", b"OK", regex)
    assert not expect_matches(b"42", b"OK", regex)


# --- http -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"HTTP/1.1 200 OK\r\n", 200),
        (b"HTTP/1.0 503 Service Unavailable\r\nServer: x\r\n\r\n", 503),
        (b"HTTP/1.1 204 \r\n", 204),
        (b"HTTP/1.1 204\r\n", 204),
        (b"HTTP/1.1 200 OK\n", 200),
        (b"HTTP/1.1 404 Not\tFound \xe9\r\n", 404),
    ],
)
def test_http_status(data: bytes, status: int) -> None:
    assert parse_http_status(data) == status


@pytest.mark.parametrize("data", [b"", b"H", b"HTTP/", b"HTTP/1.1 20", b"HTTP/1.1 200 OK\r"])
def test_http_status_needs_more(data: bytes) -> None:
    assert parse_http_status(data) is None


def test_http_status_every_prefix_needs_more_until_the_newline() -> None:
    full = b"HTTP/1.1 301 Moved Permanently\r\nLocation: /x\r\n\r\n"
    end = full.index(b"\n")
    for i in range(end + 1):
        assert parse_http_status(full[:i]) is None
    for i in range(end + 1, len(full) + 1):
        assert parse_http_status(full[:i]) == 301


@pytest.mark.parametrize(
    "data",
    [
        b"+PONG\r\n",
        b"http/1.1 200 OK\r\n",
        b"HTTX",
        b"SSH-2.0-OpenSSH\r\n",
        b"HTTP/1.1 2000 OK\r\n",
        b"HTTP/1.1 099 Low\r\n",
        b"HTTP/11 200 OK\r\n",
        b"HTTP/1.1 200 OK\x00\r\n",
        b"HTTP/1.1  200 OK\r\n",
    ],
)
def test_http_status_garbage_raises(data: bytes) -> None:
    with pytest.raises(BadReply):
        parse_http_status(data)


def test_http_status_line_is_capped() -> None:
    assert parse_http_status(b"HTTP/1.1 200 " + b"x" * (MAX_STATUS_LINE - 13)) is None
    with pytest.raises(BadReply, match="longer"):
        parse_http_status(b"HTTP/1.1 200 " + b"x" * MAX_STATUS_LINE)


@given(st.binary(max_size=80))
def test_http_status_never_confuses_need_more_with_bad(data: bytes) -> None:
    try:
        status = parse_http_status(data)
    except BadReply:
        return
    if status is None:
        assert b"\n" not in data
    else:
        assert 100 <= status <= 999


def test_build_http_request() -> None:
    request = build_http_request("/healthz?full=1", "example:8080")
    assert request == (
        b"GET /healthz?full=1 HTTP/1.1\r\n"
        b"Host: example:8080\r\n"
        b"User-Agent: pointsman-health-check\r\n"
        b"Accept: */*\r\n"
        b"Connection: close\r\n"
        b"\r\n"
    )


@pytest.mark.parametrize(
    ("path", "host"),
    [("healthz", "h"), ("/a b", "h"), ("/x\r\nEvil: 1", "h"), ("/", "h\r\nX: y"), ("/", "")],
)
def test_build_http_request_refuses_injection(path: str, host: str) -> None:
    with pytest.raises(ValueError):
        build_http_request(path, host)


def test_host_header() -> None:
    assert host_header("10.0.0.1", 80) == "10.0.0.1:80"
    assert host_header("::1", 8080) == "[::1]:8080"
    assert host_header("api.internal", 443) == "api.internal:443"
