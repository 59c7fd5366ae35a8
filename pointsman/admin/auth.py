"""Who may call what on the admin API: bearer tokens with a name and a role, compared as bytes in
constant time, and which calls are open, reads or writes.

Pure: the server reads the token files and the raw header bytes and asks `Tokens.check`. Every
answer is a `Verdict`; nothing here raises on what a client sends (a non-ASCII or binary header
value is just a token that matches nothing).

The rules (docs/config.md, "admin"):
- `/healthz`, `/readyz` and the status page's HTML are always open (they carry no state worth
  hiding, and probes must not need a secret).
- With no token configured, everything else is open (the config check refuses that on a
  non-loopback bind).
- With any token configured, every mutating call needs a `write` token.
- With any `read` token configured (`admin.read_token_file` or `admin.tokens` with `role: read`),
  reads (status, metrics, events, openapi, node) need a token too, of either role.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pointsman.config.model import DEFAULT_TOKEN_NAME, READ_TOKEN_NAME, AdminConfig

Role = Literal["read", "write"]

OPEN_PATHS = frozenset({"/", "/healthz", "/readyz"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# A token longer than this is a mistake (a key file, a certificate), not a bearer token.
MAX_TOKEN_BYTES = 4096
REQUIRED = "a bearer token is required"


class Access(enum.Enum):
    OPEN = "open"
    READ = "read"
    WRITE = "write"


def access_for(method: str, path: str) -> Access:
    """What a request needs, from its method and path alone, so routes added later inherit it."""
    if path in OPEN_PATHS:
        return Access.OPEN
    return Access.READ if method.upper() in SAFE_METHODS else Access.WRITE


@dataclass(frozen=True, slots=True)
class Credential:
    name: str
    role: Role
    digest: bytes  # SHA-256 of the secret: equal lengths, so comparing leaks no length

    @classmethod
    def of(cls, name: str, role: Role, secret: bytes) -> Credential:
        return cls(name, role, hashlib.sha256(secret).digest())


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    status: int  # 200 when allowed, else 401 or 403
    reason: str
    token: str | None  # the name of the token that matched, if any


def check_secret(raw: bytes, where: str) -> bytes:
    """A token file's content, stripped; ValueError naming `where` when it cannot be a token.
    Tokens are visible ASCII without spaces (RFC 6750's b64token is a subset), so that every
    HTTP client can send them and a stray newline or BOM is caught at start, not at 3 a.m."""
    secret = raw.strip()
    if not secret:
        raise ValueError(f"{where} is empty")
    if len(secret) > MAX_TOKEN_BYTES:
        raise ValueError(f"{where} holds {len(secret)} bytes; a token is at most {MAX_TOKEN_BYTES}")
    if any(byte < 0x21 or byte > 0x7E for byte in secret):
        raise ValueError(f"{where}: a token is visible ASCII characters without spaces")
    return secret


def bearer(values: Sequence[bytes]) -> bytes | None:
    """The token of exactly one `Authorization: Bearer <token>` header value, else None (none,
    several, another scheme, or an empty token are all the same: no token)."""
    if len(values) != 1:
        return None
    scheme, space, token = values[0].strip(b" \t").partition(b" ")
    token = token.strip(b" \t")
    if not space or scheme.lower() != b"bearer" or not token:
        return None
    return token


class Tokens:
    """The configured credentials and the rules above."""

    def __init__(self, credentials: Sequence[Credential]) -> None:
        self.credentials = tuple(credentials)
        self.reads_need_token = any(c.role == "read" for c in self.credentials)
        self.writes_need_token = bool(self.credentials)

    def match(self, authorization: Sequence[bytes]) -> Credential | None:
        given = bearer(authorization)
        if given is None:
            return None
        digest = hashlib.sha256(given).digest()
        found = None
        for credential in self.credentials:  # no early exit: every token is compared
            if hmac.compare_digest(digest, credential.digest) and found is None:
                found = credential
        return found

    def check(self, access: Access, authorization: Sequence[bytes]) -> Verdict:
        if access is Access.OPEN:
            return Verdict(True, 200, "open", None)
        found = self.match(authorization)
        name = found.name if found is not None else None
        needed = self.writes_need_token if access is Access.WRITE else self.reads_need_token
        if not needed:
            return Verdict(True, 200, "no token needed", name)
        if found is None:
            return Verdict(False, 401, REQUIRED, None)
        if access is Access.WRITE and found.role != "write":
            return Verdict(False, 403, f"token {found.name!r} may only read", found.name)
        return Verdict(True, 200, f"token {found.name!r}", found.name)


def token_sources(admin: AdminConfig) -> list[tuple[str, Role, str, str]]:
    """(name, role, file, config key) of every configured token, in config order."""
    sources: list[tuple[str, Role, str, str]] = []
    if admin.token_file:
        sources.append((DEFAULT_TOKEN_NAME, "write", admin.token_file, "admin.token_file"))
    if admin.read_token_file:
        sources.append((READ_TOKEN_NAME, "read", admin.read_token_file, "admin.read_token_file"))
    for i, token in enumerate(admin.tokens):
        sources.append((token.name, token.role, token.file, f"admin.tokens[{i}].file"))
    return sources


def admin_warnings(admin: AdminConfig | None) -> list[str]:
    """What `pointsman check` warns about in the admin section (valid, but unwise)."""
    if admin is None:
        return []
    warnings = []
    if admin.tls is None and not _is_loopback(admin.bind.host):
        warnings.append(f"admin.bind {admin.bind} is not a loopback address and admin.tls is not "
                        "set: tokens and status cross the network in clear text")
    return warnings


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
