"""Health-check dialects, sans I/O: build requests and judge replies, bytes in and out.

Readers return a value, None for "need more data", or raise `BadReply` when the peer's bytes can
never become a valid reply. Config helpers (`unescape`, `parse_hex`, `build_http_request`) raise
plain ValueError: those are our operator's mistakes, not the peer's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "MAX_AGENT_LINE",
    "MAX_AGENT_PERCENT",
    "MAX_REPLY_BYTES",
    "MAX_STATUS_LINE",
    "AgentReply",
    "BadReply",
    "build_http_request",
    "expect_matches",
    "host_header",
    "parse_agent_line",
    "parse_hex",
    "parse_http_status",
    "unescape",
]

# Most bytes of a reply a probe reads before judging it. HAProxy's tcp-check and http-check look
# only at what fits in one check buffer (tune.bufsize, 16 KiB by default); a health reply that
# needs more is a misconfigured check, and the cap bounds what a broken peer makes us hold.
MAX_REPLY_BYTES = 16 * 1024

# Longest HTTP status line accepted. A real one is about 20 bytes ("HTTP/1.1 200 OK"); nginx's
# proxy_buffer_size (one page, 4 KiB on x86-64) must hold the whole status line and headers of an
# upstream response, so a status line longer than that is garbage, not slowness.
MAX_STATUS_LINE = 4096

# RFC 9112 section 4: status-line = HTTP-version SP status-code SP [ reason-phrase ], where
# reason-phrase = 1*( HTAB / SP / VCHAR / obs-text ). Some servers drop the SP before an empty
# reason, so it is optional here.
_STATUS_LINE = re.compile(rb"HTTP/[0-9]\.[0-9] ([1-9][0-9]{2})(?:[ \t][\t\x20-\x7e\x80-\xff]*)?")
_HTTP_PREFIX = b"HTTP/"

# Longest agent reply line read. HAProxy reads an agent's reply into one check buffer (16 KiB by
# default) but a real reply is a few words ("up 75% # load 0.3"); 1 KiB leaves room for a long
# description while a peer streaming garbage is cut off early.
MAX_AGENT_LINE = 1024

# Largest weight percentage an agent may ask for. Operator weights go up to 1000; letting an
# agent multiply one by at most 10 keeps every effective weight within 10000.
MAX_AGENT_PERCENT = 1000

# HAProxy's agent grammar: words separated by spaces, tabs or commas, in any order; "#" starts a
# free-text description. Operational words set the health verdict, administrative words the
# operator state, a percentage the weight.
_AGENT_SEPARATORS = re.compile(r"[ \t,]+")
_AGENT_PERCENT = re.compile(r"([0-9]{1,9})%")
_AGENT_STATE = {"up": "up", "down": "down", "fail": "down", "stopped": "down"}
_AGENT_ADMIN = {"ready": "ready", "drain": "drain", "maint": "maint", "maintenance": "maint"}

_SIMPLE_ESCAPES = {"r": b"\r", "n": b"\n", "t": b"\t", "\\": b"\\", "0": b"\x00"}
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
# Request-target and Host must be visible ASCII: no spaces, no CR/LF that would split the request.
_VISIBLE_ASCII = re.compile(r"[\x21-\x7e]+")


class BadReply(ValueError):
    """The peer sent bytes that cannot be the start of a valid reply."""


@dataclass(frozen=True, slots=True)
class AgentReply:
    """One agent-check answer. Each part is None when the agent did not say it."""

    state: Literal["up", "down"] | None = None  # a health verdict (through rise/fall)
    admin: Literal["ready", "drain", "maint"] | None = None  # an operator-like state
    percent: int | None = None  # weight as a percentage of the configured weight
    description: str = ""

    def __str__(self) -> str:
        words: list[str] = [w for w in (self.state, self.admin) if w is not None]
        if self.percent is not None:
            words.append(f"{self.percent}%")
        text = "agent: " + " ".join(words)
        return f"{text} ({self.description})" if self.description else text


def parse_agent_line(line: bytes) -> AgentReply:
    """Judge one agent reply line (without its line end), as HAProxy's agent-check reads it.

    When a kind of word appears twice the last one counts, as in HAProxy. Raises BadReply for
    an empty reply, a non-ASCII one, an unknown word or a percentage above MAX_AGENT_PERCENT:
    a reply we cannot read must not keep a backend in service.
    """
    try:
        text = line.decode("ascii").rstrip("\r\n")
    except UnicodeDecodeError:
        raise BadReply(f"agent reply is not ASCII: {line[:32]!r}") from None
    text, _, description = text.partition("#")
    state: Literal["up", "down"] | None = None
    admin: Literal["ready", "drain", "maint"] | None = None
    percent: int | None = None
    words = [w for w in _AGENT_SEPARATORS.split(text.strip()) if w]
    if not words:
        raise BadReply("empty agent reply")
    for word in words:
        lower = word.lower()
        if lower in _AGENT_STATE:
            state = "up" if _AGENT_STATE[lower] == "up" else "down"
        elif lower in _AGENT_ADMIN:
            admin = _admin_word(lower)
        elif (match := _AGENT_PERCENT.fullmatch(lower)) is not None:
            percent = int(match.group(1))
            if percent > MAX_AGENT_PERCENT:
                raise BadReply(f"agent weight {word} above {MAX_AGENT_PERCENT}%")
        else:
            raise BadReply(f"unknown agent word {word[:32]!r}")
    return AgentReply(state, admin, percent, description.strip()[:200])


def _admin_word(word: str) -> Literal["ready", "drain", "maint"]:
    admin = _AGENT_ADMIN[word]
    return "ready" if admin == "ready" else "drain" if admin == "drain" else "maint"


def expect_matches(reply: bytes, expect: bytes | None, regex: re.Pattern[bytes] | None) -> bool:
    """True when `reply` contains `expect` and `regex` finds a match; an absent check passes.

    `expect` is a substring search, like HAProxy's `expect string`: a banner or a reply with a
    trailing CRLF still matches. Called again as more bytes arrive, so it must be (and is)
    monotonic for substring checks; an anchored regex may need the full reply.
    """
    if expect is not None and expect not in reply:
        return False
    return regex is None or regex.search(reply) is not None


def parse_http_status(data: bytes) -> int | None:
    """Return the status code of the response starting `data`, or None if more bytes are needed.

    Raises BadReply when `data` cannot be the start of an HTTP/1.x response. Informational (1xx)
    responses are returned as they are; a check expecting them is the operator's choice.
    """
    head = data[: len(_HTTP_PREFIX)]
    if not _HTTP_PREFIX.startswith(head):
        raise BadReply(f"not an HTTP response: {data[:16]!r}")
    end = data.find(b"\n", 0, MAX_STATUS_LINE + 1)
    if end < 0:
        if len(data) > MAX_STATUS_LINE:
            raise BadReply(f"status line longer than {MAX_STATUS_LINE} bytes")
        return None
    line = data[:end].removesuffix(b"\r")
    match = _STATUS_LINE.fullmatch(line)
    if match is None:
        raise BadReply(f"malformed status line: {line[:64]!r}")
    return int(match.group(1))


def build_http_request(path: str, host: str) -> bytes:
    """An HTTP/1.1 GET for `path` that asks the server to close the connection after replying."""
    if not path.startswith("/") or not _VISIBLE_ASCII.fullmatch(path):
        raise ValueError(f"http path must start with / and be visible ASCII: {path!r}")
    if not _VISIBLE_ASCII.fullmatch(host):
        raise ValueError(f"http host must be visible ASCII without spaces: {host!r}")
    return (
        f"GET {path} HTTP/1.1\r\n"
        f"Host: {host}\r\n"
        "User-Agent: pointsman-health-check\r\n"
        "Accept: */*\r\n"
        "Connection: close\r\n"
        "\r\n"
    ).encode("ascii")


def host_header(host: str, port: int) -> str:
    """The Host header value for an address: IPv6 literals in brackets, port always included."""
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def unescape(s: str) -> bytes:
    r"""Turn a config string with C-style escapes into bytes.

    Understood: \r \n \t \\ \0 and \xHH. Anything else after a backslash is a ValueError, so a
    typo never silently sends a literal backslash. Other characters are encoded as UTF-8.
    """
    out = bytearray()
    i = 0
    while i < len(s):
        ch = s[i]
        if ch != "\\":
            out += ch.encode("utf-8")
            i += 1
            continue
        if i + 1 >= len(s):
            raise ValueError(f"trailing backslash in {s!r}")
        code = s[i + 1]
        if code in _SIMPLE_ESCAPES:
            out += _SIMPLE_ESCAPES[code]
            i += 2
        elif code == "x":
            digits = s[i + 2 : i + 4]
            if len(digits) != 2 or not set(digits) <= _HEX_DIGITS:
                raise ValueError(f"\\x needs two hex digits at offset {i} in {s!r}")
            out.append(int(digits, 16))
            i += 4
        else:
            raise ValueError(f"unknown escape \\{code} at offset {i} in {s!r}")
    return bytes(out)


def parse_hex(s: str) -> bytes:
    """Bytes from a hex string (`send_hex`); whitespace between digits is allowed."""
    digits = "".join(s.split())
    if len(digits) % 2 or not set(digits) <= _HEX_DIGITS:
        raise ValueError(f"send_hex must be an even number of hex digits: {s!r}")
    return bytes.fromhex(digits)
