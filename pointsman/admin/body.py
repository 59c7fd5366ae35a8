"""Request bodies of the admin API, decoded with limits: a body too large, not UTF-8, nested too
deep or not JSON is a `BodyError` with a status and a reason, never an exception a client can
turn into a 500.

The depth is measured by a scan of brackets before anything is parsed, because `json.loads`
recurses once per level and a body of 100,000 `[` raises RecursionError from deep inside it.
"""

from __future__ import annotations

import json
import re
from typing import Any

# The largest body the API takes today is {"weight": 1000}; 64 KiB leaves room for later calls and
# bounds what one client can make us buffer.
MAX_BODY_BYTES = 64 * 1024
# Real bodies are one level deep; 32 leaves room and stays far below the interpreter's recursion
# limit (1000), which json.loads reaches near depth 1000.
MAX_JSON_DEPTH = 32

# The bytes that matter to nesting: brackets, and quotes and backslashes (brackets inside strings
# do not count). All are ASCII, and UTF-8 never uses ASCII bytes inside a multi-byte character,
# so the scan works on the raw bytes before they are decoded.
_STRUCTURE = re.compile(rb'[\[\]{}"\\]')


class BodyError(ValueError):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def nesting_depth(data: bytes) -> int:
    """The deepest nesting of arrays and objects in `data`, ignoring brackets inside strings.
    Meaningful for valid JSON; for anything else a number the parser then refuses anyway."""
    depth = deepest = 0
    in_string = False
    skip = -1  # the position of the character a backslash escapes
    for match in _STRUCTURE.finditer(data):
        position = match.start()
        if position == skip:
            continue
        char = data[position]
        if in_string:
            if char == 0x5C:  # backslash
                skip = position + 1
            elif char == 0x22:  # quote
                in_string = False
        elif char == 0x22:
            in_string = True
        elif char in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        elif char in (0x5D, 0x7D) and depth > 0:  # ] }
            depth -= 1
    return deepest


def decode_json(data: bytes, max_bytes: int = MAX_BODY_BYTES, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """The JSON value in `data` (RFC 8259: UTF-8), or BodyError(413 or 400, reason)."""
    if len(data) > max_bytes:
        raise BodyError(413, f"the body is {len(data)} bytes; the limit is {max_bytes}")
    if not data.strip():
        raise BodyError(400, "expected a JSON body, got none")
    if (depth := nesting_depth(data)) > max_depth:
        raise BodyError(400, f"JSON nested {depth} levels deep; the limit is {max_depth}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BodyError(400, f"the body is not UTF-8 (at byte {exc.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise BodyError(400, f"the body is not JSON: {exc.msg} at line {exc.lineno} column "
                             f"{exc.colno}") from None
    except (ValueError, RecursionError) as exc:  # e.g. an integer of more than 4300 digits
        raise BodyError(400, f"the body is not usable JSON: {exc}") from None
