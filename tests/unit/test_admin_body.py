"""Admin request bodies (admin/body.py): the bracket scan agrees with the real nesting depth, and
any bytes at all give a JSON value or a BodyError with a 4xx, never another exception."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pointsman.admin.body import MAX_BODY_BYTES, MAX_JSON_DEPTH, BodyError, decode_json, nesting_depth

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet=st.sampled_from('ab"\\[]{}é\n')),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(alphabet=st.sampled_from('k"\\[]{'), max_size=4), children, max_size=3),
    max_leaves=20,
)


def depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    return 0


@given(JSON, st.booleans())
def test_the_scan_measures_the_real_depth(value: Any, ascii_only: bool) -> None:
    data = json.dumps(value, ensure_ascii=ascii_only).encode()
    assert nesting_depth(data) == depth(value)
    if depth(value) <= MAX_JSON_DEPTH:
        assert decode_json(data) == value


@pytest.mark.parametrize(("data", "expected"), [
    (b'{"a": "[[[{{{"}', 1), (b'["\\"[", ["\\\\"], [[]]]', 3), (b'"\\\\\\"]["', 0),
    (b"[" * 5 + b"]" * 5, 5), (b"", 0), (b'"unterminated [[[', 0), (b'["a\\', 1),
    (b"]]]][[", 0),  # invalid: a parser fails at the first byte, before any nesting
])
def test_brackets_inside_strings_do_not_count(data: bytes, expected: int) -> None:
    assert nesting_depth(data) == expected


@pytest.mark.parametrize(("data", "status", "reason"), [
    (b"[" * 100_000 + b"]" * 100_000, 413, "the limit is 65536"),
    (b"[" * 30_000, 400, "nested 30000 levels deep; the limit is 32"),
    (b'{"a":' * 33 + b"1" + b"}" * 33, 400, "nested 33 levels deep"),
    (b" " * (MAX_BODY_BYTES + 1), 413, "the limit is"),
    (b"", 400, "expected a JSON body, got none"),
    (b" \r\n", 400, "expected a JSON body, got none"),
    (b'{"weight": "\xff"}', 400, "not UTF-8 (at byte 12)"),
    (b"\xef\xbb\xbf{}", 400, "not JSON"),  # a BOM: RFC 8259 says do not send one
    (b"not json", 400, "not JSON: Expecting value at line 1 column 1"),
    (b"1" * 5000, 400, "not usable JSON"),  # past Python's int-digits limit
])
def test_bad_bodies_are_4xx_with_a_reason(data: bytes, status: int, reason: str) -> None:
    with pytest.raises(BodyError) as info:
        decode_json(data)
    assert info.value.status == status
    assert reason in info.value.reason


def test_depth_at_the_limit_is_fine() -> None:
    data = b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH
    assert depth(decode_json(data)) == MAX_JSON_DEPTH


@given(st.binary(max_size=300))
def test_any_bytes_give_a_value_or_a_body_error(data: bytes) -> None:
    try:
        decode_json(data)
    except BodyError as exc:
        assert exc.status in (400, 413) and exc.reason


@given(st.binary(max_size=300))
def test_bytes_after_a_valid_prefix_never_hide_its_depth(noise: bytes) -> None:
    """A parser recurses through the valid prefix before it fails on what follows; whatever
    follows, the scan counts at least that prefix's depth."""
    prefix = b"[" * 40 + b'"x]\\"' + b"," + b'"[["'
    assert nesting_depth(prefix + noise) >= 40


def test_the_scan_is_linear_on_hostile_strings() -> None:
    """Many quotes and no closing one, or a final lone backslash, must not make the string
    pattern start over at every quote (which would be quadratic)."""
    for data in (b'"' + b'\\"' * 30_000, b'"' + b'\\"' * 30_000 + b"\\", b'"' * 60_000 + b"["):
        assert nesting_depth(data) <= 1  # and it returns: quadratic would take minutes


@given(st.integers(33, 3000), st.sampled_from([b"[", b'{"k":']))
def test_deep_nesting_never_reaches_the_parser(levels: int, opener: bytes) -> None:
    with pytest.raises(BodyError, match="levels deep"):
        decode_json(opener * levels)
