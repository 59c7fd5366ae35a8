"""Admin API access rules (admin/auth.py): which calls are open, reads or writes; bearer tokens
compared as bytes (anything a client sends is a token that matches or not, never an exception);
roles; the token file rules; the admin config keys and `check`'s warning."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pointsman.admin.auth import (
    MAX_TOKEN_BYTES,
    REQUIRED,
    Access,
    Credential,
    Tokens,
    access_for,
    admin_warnings,
    bearer,
    check_secret,
    token_sources,
)
from pointsman.config.loader import ConfigError, load_text
from pointsman.config.model import AdminConfig

WRITE = Credential.of("ops", "write", b"w-secret")
READ = Credential.of("grafana", "read", b"r-secret")
BASE = """listeners: [{name: web, bind: "127.0.0.1:8000", pool: p}]
pools: [{name: p, backends: [{address: "127.0.0.1:9000"}]}]
"""


@pytest.mark.parametrize(("method", "path", "access"), [
    ("GET", "/healthz", Access.OPEN), ("GET", "/readyz", Access.OPEN), ("GET", "/", Access.OPEN),
    ("POST", "/healthz", Access.OPEN),  # a 405 then, but never a token question
    ("GET", "/metrics", Access.READ), ("GET", "/api/v1/status", Access.READ),
    ("GET", "/api/v1/events", Access.READ), ("GET", "/openapi.json", Access.READ),
    ("HEAD", "/api/v1/status", Access.READ), ("get", "/api/v1/node", Access.READ),
    ("GET", "/no/such/route", Access.READ),
    ("POST", "/api/v1/reload", Access.WRITE), ("PUT", "/api/v1/pools/p/backends/a/weight", Access.WRITE),
    ("DELETE", "/api/v1/anything", Access.WRITE), ("PATCH", "/", Access.OPEN),
    ("BREW", "/api/v1/status", Access.WRITE),  # any method that is not a read is a write
])
def test_access_comes_from_method_and_path(method: str, path: str, access: Access) -> None:
    assert access_for(method, path) is access


@pytest.mark.parametrize(("values", "token"), [
    ([b"Bearer abc"], b"abc"), ([b"bearer abc"], b"abc"), ([b"BEARER  abc  "], b"abc"),
    ([b" Bearer\tx"], None), ([b"Bearer \xc3\xa9"], b"\xc3\xa9"), ([b"Bearer \xff\x00"], b"\xff\x00"),
    ([], None), ([b"Bearer a", b"Bearer a"], None), ([b"abc"], None), ([b"Basic abc"], None),
    ([b"Bearer"], None), ([b"Bearer "], None), ([b""], None),
])
def test_bearer_takes_exactly_one_bearer_header(values: list[bytes], token: bytes | None) -> None:
    assert bearer(values) == token


@given(st.lists(st.binary(max_size=80), max_size=3))
def test_any_header_bytes_are_a_verdict_never_an_exception(values: list[bytes]) -> None:
    tokens = Tokens([WRITE, READ])
    for access in Access:
        verdict = tokens.check(access, values)
        assert verdict.status in (200, 401, 403)
        assert verdict.allowed == (verdict.status == 200)


@given(st.binary(min_size=1, max_size=64).filter(lambda b: b not in (b"w-secret", b"r-secret")))
def test_only_the_secret_itself_matches(secret: bytes) -> None:
    tokens = Tokens([WRITE, READ])
    assert tokens.match([b"Bearer " + secret]) is None
    assert tokens.match([b"Bearer w-secret"]) == WRITE
    assert tokens.match([b"Bearer r-secret"]) == READ


def verdict(tokens: Tokens, access: Access, header: bytes | None) -> tuple[int, str | None]:
    v = tokens.check(access, [header] if header is not None else [])
    return v.status, v.token


def test_without_tokens_everything_is_open() -> None:
    tokens = Tokens([])
    for access in Access:
        assert verdict(tokens, access, None) == (200, None)
        assert verdict(tokens, access, b"Bearer anything") == (200, None)


def test_a_write_token_guards_writes_and_leaves_reads_open() -> None:
    tokens = Tokens([WRITE])
    assert verdict(tokens, Access.WRITE, None) == (401, None)
    assert verdict(tokens, Access.WRITE, b"Bearer wrong") == (401, None)
    assert verdict(tokens, Access.WRITE, b"Bearer w-secret") == (200, "ops")
    assert verdict(tokens, Access.READ, None) == (200, None)
    assert verdict(tokens, Access.READ, b"Bearer w-secret") == (200, "ops")  # named if given


def test_a_read_token_closes_reads_and_cannot_write() -> None:
    tokens = Tokens([WRITE, READ])
    assert verdict(tokens, Access.READ, None) == (401, None)
    assert verdict(tokens, Access.READ, b"Bearer \xc3\xa9") == (401, None)
    assert verdict(tokens, Access.READ, b"Bearer r-secret") == (200, "grafana")
    assert verdict(tokens, Access.READ, b"Bearer w-secret") == (200, "ops")  # write implies read
    assert verdict(tokens, Access.WRITE, b"Bearer r-secret") == (403, "grafana")
    assert tokens.check(Access.WRITE, [b"Bearer r-secret"]).reason == "token 'grafana' may only read"
    assert tokens.check(Access.READ, []).reason == REQUIRED
    assert verdict(tokens, Access.OPEN, None) == (200, None)


def test_read_tokens_alone_leave_no_way_to_write() -> None:
    tokens = Tokens([READ])
    assert verdict(tokens, Access.WRITE, None) == (401, None)
    assert verdict(tokens, Access.WRITE, b"Bearer r-secret") == (403, "grafana")


@pytest.mark.parametrize(("raw", "secret"), [(b"abc\n", b"abc"), (b"  t0k-en_=+/~.  \r\n", b"t0k-en_=+/~.")])
def test_token_files_are_stripped(raw: bytes, secret: bytes) -> None:
    assert check_secret(raw, "f") == secret


@pytest.mark.parametrize(("raw", "message"), [
    (b"", "is empty"), (b" \n", "is empty"), (b"two words", "visible ASCII"),
    ("é".encode(), "visible ASCII"), (b"\xef\xbb\xbfabc", "visible ASCII"),  # a BOM
    (b"x" * (MAX_TOKEN_BYTES + 1), "at most"),
])
def test_bad_token_files_are_refused_naming_the_file(raw: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        check_secret(raw, "admin.tokens[0].file /etc/t")
    assert "admin.tokens[0].file /etc/t" in str(info.value)


# --- the config keys -----------------------------------------------------------------------------------


def test_named_tokens_read_token_and_tls_parse() -> None:
    config = load_text(BASE + """admin:
  bind: "127.0.0.1:9900"
  token_file: /etc/pointsman/admin.token
  read_token_file: /etc/pointsman/read.token
  tokens:
    - {name: alice, file: /etc/pointsman/alice.token, role: write}
    - {name: grafana, file: /etc/pointsman/grafana.token, role: read}
  tls: {cert_file: /etc/pointsman/admin.pem, key_file: /etc/pointsman/admin.key,
        client_ca_file: /etc/pointsman/clients-ca.pem}
""", "<test>")
    admin = config.admin
    assert admin is not None and admin.tls is not None
    assert admin.tls.client_ca_file == "/etc/pointsman/clients-ca.pem"
    assert admin.token_names == ["default", "read", "alice", "grafana"]
    assert [(n, r, k) for n, r, _, k in token_sources(admin)] == [
        ("default", "write", "admin.token_file"), ("read", "read", "admin.read_token_file"),
        ("alice", "write", "admin.tokens[0].file"), ("grafana", "read", "admin.tokens[1].file")]


@pytest.mark.parametrize(("admin", "field", "message"), [
    ("{tokens: [{name: a, file: /x, role: write}, {name: a, file: /y, role: read}]}",
     "admin", "token name 'a' is used twice"),
    ("{token_file: /x, tokens: [{name: default, file: /y, role: read}]}",
     "admin", "token name 'default' is used twice"),
    ("{tokens: [{name: a, file: /x}]}", "admin.tokens[0].role", "required key is missing"),
    ("{tokens: [{name: a, file: /x, role: admin}]}", "admin.tokens[0].role", "read"),
    ("{tokens: [{name: 'a b', file: /x, role: read}]}", "admin.tokens[0].name", "pattern"),
    ("{tls: {cert_file: /x}}", "admin.tls.key_file", "required key is missing"),
    ("{bind: '0.0.0.0:9900'}", "admin.token_file", "required when admin.bind is not a loopback"),
])
def test_bad_admin_sections_name_the_field(admin: str, field: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_text(BASE + f"admin: {admin}\n", "<test>")
    text = str(info.value)
    assert field in text and message in text, text


def test_a_non_loopback_bind_may_use_named_tokens_instead_of_token_file() -> None:
    config = load_text(BASE + "admin: {bind: '0.0.0.0:9900', tokens: [{name: a, file: /x, "
                       "role: write}]}\n", "<test>")
    assert config.admin is not None and config.admin.has_tokens


def test_check_warns_of_a_non_loopback_bind_without_tls() -> None:
    def warnings(**kw: object) -> list[str]:
        return admin_warnings(AdminConfig.model_validate({"token_file": "/x", **kw}))

    assert warnings() == []
    assert warnings(bind="[::1]:9900") == []
    assert warnings(bind="localhost:9900") == []
    [warning] = warnings(bind="10.0.0.5:9900")
    assert "10.0.0.5:9900" in warning and "admin.tls is not set" in warning
    assert warnings(bind="10.0.0.5:9900", tls={"cert_file": "/c", "key_file": "/k"}) == []
    assert admin_warnings(None) == []
