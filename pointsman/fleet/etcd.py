"""A small asyncio client for etcd's v3 JSON gateway (`/v3/kv/range`, `/v3/watch`, `/v3/lease/*`).

Why the gateway and not a gRPC client: the gateway is part of etcd's supported API (`/v3/` since
3.4), it needs nothing beyond aiohttp (already a dependency) and runs on the same event loop as
the data plane, uvloop included; gRPC clients bring grpcio and a pinned protobuf, and protobuf
drift is exactly what broke the old `etcd3` package. Keys and values are base64 in the JSON;
64-bit numbers arrive as strings; fields equal to their default are left out.

Every call tries the endpoints in turn, starting with the last one that answered, so a dead
member costs one refused connect. Errors split in two: `EtcdUnavailable` (no member could serve
the call: retry later) and `EtcdError` (etcd answered and refused: a caller bug or a permission).
"""

from __future__ import annotations

import base64
import json
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar

import aiohttp

from pointsman.fleet.jsonlines import JsonLines, StreamEnded

T = TypeVar("T")

log = logging.getLogger("pointsman.etcd")

# etcd's default --max-request-bytes is 1.5 MiB; base64 and JSON framing add a third. A watch
# message larger than this is refused rather than buffered without bound.
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
CONNECT_TIMEOUT = 1.0  # loopback or LAN: a member that does not accept in 1 s is treated as down
CALL_TIMEOUT = 5.0  # a unary call; etcd's own request timeout is about 5 s (election + commit)

# gRPC status codes that mean "another member, or later, may succeed".
_RETRY_CODES = frozenset({4, 8, 10, 14})  # DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ABORTED, UNAVAILABLE
_AUTH_CODE = 16  # UNAUTHENTICATED: the token expired; authenticate again once


class EtcdError(Exception):
    """etcd answered and refused the call."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class EtcdUnavailable(EtcdError):
    """No member could serve the call (down, no leader, or unreachable)."""


class WatchCompacted(EtcdError):
    """The watch started before the compacted revision: read the current value again."""


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: str
    value: bytes
    mod_revision: int
    create_revision: int = 0
    lease: int = 0


@dataclass(frozen=True, slots=True)
class WatchEvent:
    type: Literal["put", "delete"]
    kv: KeyValue


@dataclass(frozen=True, slots=True)
class EtcdSettings:
    """Where and how to reach etcd (the node file's `config_source.etcd`, or CLI options)."""

    endpoints: tuple[str, ...]
    token_file: str | None = None  # a token, or "user:password" to authenticate with
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


def _b64(text: str | bytes) -> str:
    raw = text.encode() if isinstance(text, str) else text
    return base64.b64encode(raw).decode()


def prefix_end(prefix: str) -> str:
    """The range_end that selects every key starting with `prefix` (etcd's "prefix + 1")."""
    raw = bytearray(prefix.encode())
    for i in range(len(raw) - 1, -1, -1):
        if raw[i] < 0xFF:
            raw[i] += 1
            return _b64(bytes(raw[: i + 1]))
    return _b64(b"\0")  # every key


def _kv(data: dict[str, Any]) -> KeyValue:
    return KeyValue(
        key=base64.b64decode(data.get("key", "")).decode(errors="replace"),
        value=base64.b64decode(data.get("value", "")),
        mod_revision=int(data.get("mod_revision", 0)),
        create_revision=int(data.get("create_revision", 0)),
        lease=int(data.get("lease", 0)),
    )


def _why(exc: BaseException) -> str:
    """A short reason for a failed connection or request (TimeoutError has no message)."""
    return str(exc) or type(exc).__name__


def _revision(body: dict[str, Any]) -> int:
    return int(body.get("header", {}).get("revision", 0))


def _raise_for(body: dict[str, Any], status: int) -> None:
    error = body.get("error")
    if error is None and status < 400:
        return
    if isinstance(error, dict):  # stream errors are wrapped once more
        body = error
    message = str(body.get("message") or body.get("error") or f"HTTP {status}")
    code = body.get("code")
    code = int(code) if isinstance(code, int | str) and str(code).isdigit() else None
    if code in _RETRY_CODES or status in (502, 503, 504) or "leader" in message:
        raise EtcdUnavailable(message, code)
    raise EtcdError(message, code)


class EtcdClient:
    def __init__(self, settings: EtcdSettings, *, call_timeout: float = CALL_TIMEOUT) -> None:
        if not settings.endpoints:
            raise ValueError("etcd needs at least one endpoint")
        self.settings = settings
        self.endpoints = [e.rstrip("/") for e in settings.endpoints]
        self.call_timeout = call_timeout
        self._current = 0
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self._credentials: tuple[str, str] | None = None
        self._token: str | None = None
        if settings.token_file is not None:
            secret = Path(settings.token_file).read_text().strip()
            if not secret:
                raise ValueError(f"etcd token file {settings.token_file} is empty")
            user, sep, password = secret.partition(":")
            if sep:
                self._credentials = (user, password)
            else:
                self._token = secret

    @property
    def endpoint(self) -> str:
        """The member that answered last (the first one tried by the next call)."""
        return self.endpoints[self._current]

    def _ssl(self) -> ssl.SSLContext | None:
        s = self.settings
        if s.ca_file is None and s.cert_file is None:
            return None
        context = ssl.create_default_context(cafile=s.ca_file)
        if s.cert_file is not None:
            context.load_cert_chain(s.cert_file, s.key_file)
        return context

    def _http(self) -> aiohttp.ClientSession:
        if self._closed:
            raise EtcdUnavailable("the etcd client is closed")
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=self._ssl() or False, limit=16)
            self._session = aiohttp.ClientSession(connector=connector)
        return self._session

    async def close(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> EtcdClient:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    # --- unary calls -------------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        return {"Authorization": self._token} if self._token else {}

    async def _post_one(self, endpoint: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        timeout = aiohttp.ClientTimeout(total=self.call_timeout, connect=CONNECT_TIMEOUT)
        try:
            async with self._http().post(endpoint + path, json=body, headers=self._headers(),
                                         timeout=timeout) as resp:
                text = await resp.text()
                status = resp.status
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise EtcdUnavailable(f"{endpoint}: {_why(exc)}") from None
        try:
            data = json.loads(text) if text else {}
        except json.JSONDecodeError:
            raise EtcdUnavailable(f"{endpoint}: not JSON (HTTP {status}): {text[:80]!r}") from None
        if not isinstance(data, dict):
            raise EtcdUnavailable(f"{endpoint}: unexpected answer {text[:80]!r}")
        _raise_for(data, status)
        return data

    async def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST to `path` on each member in turn until one serves it."""

        async def post(endpoint: str) -> dict[str, Any]:
            if self._credentials is not None and self._token is None:
                await self._authenticate(endpoint)
            return await self._post_one(endpoint, path, body)

        return await self._failover(post, "no etcd member answered")

    async def _failover(self, attempt: Callable[[str], Awaitable[T]], what: str) -> T:
        """Run `attempt` on each member in turn, from the last one that worked, until one
        succeeds; an expired auth token is renewed once."""
        reasons: list[str] = []
        reauthenticated = False
        for step in range(len(self.endpoints) + 1):
            index = (self._current + step) % len(self.endpoints)
            try:
                result = await attempt(self.endpoints[index])
            except EtcdUnavailable as exc:
                reasons.append(str(exc))
                continue
            except EtcdError as exc:
                if exc.code == _AUTH_CODE and self._credentials and not reauthenticated:
                    self._token, reauthenticated = None, True
                    continue
                raise
            self._current = index
            return result
        raise EtcdUnavailable(f"{what}: " + "; ".join(dict.fromkeys(reasons)))

    async def _authenticate(self, endpoint: str) -> None:
        assert self._credentials is not None
        user, password = self._credentials
        data = await self._post_one(endpoint, "/v3/auth/authenticate",
                                    {"name": user, "password": password})
        self._token = str(data.get("token", "")) or None

    async def get(self, key: str) -> tuple[KeyValue | None, int]:
        """The key's value (None when absent) and the store's revision at the read."""
        data = await self.call("/v3/kv/range", {"key": _b64(key)})
        kvs = data.get("kvs") or []
        return (_kv(kvs[0]) if kvs else None), _revision(data)

    async def get_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        data = await self.call("/v3/kv/range", {"key": _b64(prefix), "range_end": prefix_end(prefix)})
        return [_kv(kv) for kv in data.get("kvs") or []], _revision(data)

    async def put(self, key: str, value: str | bytes, lease: int = 0) -> int:
        """Write; return the new revision."""
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        return _revision(await self.call("/v3/kv/put", body))

    async def delete(self, key: str) -> int:
        """Delete one key; return how many were deleted (0 or 1)."""
        data = await self.call("/v3/kv/deleterange", {"key": _b64(key)})
        return int(data.get("deleted", 0))

    async def grant(self, ttl: int) -> int:
        data = await self.call("/v3/lease/grant", {"TTL": str(ttl)})
        return int(data["ID"])

    async def keepalive(self, lease: int) -> int:
        """Refresh the lease once; return its remaining TTL, 0 when it has already expired."""
        data = await self.call("/v3/lease/keepalive", {"ID": str(lease)})
        result = data.get("result", data)
        return int(result.get("TTL", 0))

    async def revoke(self, lease: int) -> None:
        try:
            await self.call("/v3/lease/revoke", {"ID": str(lease)})
        except EtcdError as exc:
            if exc.code != 5:  # NOT_FOUND: already expired, which is what we wanted
                raise

    # --- watch ------------------------------------------------------------------------------------

    def watch(self, key: str, *, prefix: bool = False, start_revision: int = 0) -> Watch:
        """`async with client.watch(key, start_revision=rev + 1) as events: async for batch in
        events: ...`; ends by raising EtcdUnavailable (or WatchCompacted), never by returning."""
        request: dict[str, Any] = {"key": _b64(key)}
        if prefix:
            request["range_end"] = prefix_end(key)
        if start_revision:
            request["start_revision"] = str(start_revision)
        return Watch(self, {"create_request": request})


class Watch:
    """One watch stream on one member (a new `Watch` after a failure may use another)."""

    def __init__(self, client: EtcdClient, body: dict[str, Any]) -> None:
        self.client = client
        self.body = body
        self.endpoint = ""
        self._resp: aiohttp.ClientResponse | None = None
        self._lines: JsonLines | None = None

    async def __aenter__(self) -> Watch:
        await self.client._failover(self._open, "no etcd member accepted the watch")
        return self

    async def _open(self, endpoint: str) -> None:
        client = self.client
        if client._credentials is not None and client._token is None:
            await client._authenticate(endpoint)
        # A member cut off from the leader cancels the stream instead of going silent.
        headers = {**client._headers(), "Grpc-Metadata-hasleader": "true"}
        timeout = aiohttp.ClientTimeout(total=None, connect=CONNECT_TIMEOUT, sock_connect=CONNECT_TIMEOUT)
        try:
            resp = await client._http().post(endpoint + "/v3/watch", json=self.body, headers=headers,
                                             timeout=timeout)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise EtcdUnavailable(f"{endpoint}: {_why(exc)}") from None
        self._resp, self.endpoint = resp, endpoint
        self._lines = JsonLines(resp.content, MAX_MESSAGE_BYTES)
        try:
            first = await self._next_message()
            if not first.get("created"):
                raise EtcdUnavailable(f"{endpoint}: watch not created: {first}")
        except BaseException:
            resp.close()
            self._resp = None
            raise

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._resp is not None:
            self._resp.close()  # drop the connection: the server ends its side of the watch
            self._resp = None

    def __aiter__(self) -> AsyncIterator[list[WatchEvent]]:
        return self._batches()

    async def _batches(self) -> AsyncIterator[list[WatchEvent]]:
        while True:
            message = await self._next_message()
            if message.get("canceled"):
                compacted = int(message.get("compact_revision", 0))
                if compacted:
                    raise WatchCompacted(f"watch compacted at revision {compacted}")
                raise EtcdUnavailable(f"{self.endpoint}: watch canceled: "
                                      f"{message.get('cancel_reason', 'no reason given')}")
            events = [
                WatchEvent("delete" if ev.get("type") == "DELETE" else "put", _kv(ev.get("kv", {})))
                for ev in message.get("events") or []
            ]
            if events:
                yield events

    async def _next_message(self) -> dict[str, Any]:
        """The next message of the stream, unwrapped from its "result"."""
        assert self._resp is not None and self._lines is not None
        try:
            data = await self._lines.next()
        except StreamEnded as exc:
            raise EtcdUnavailable(f"{self.endpoint}: watch: {exc}") from None
        _raise_for(data, self._resp.status)
        result = data.get("result", data)
        return result if isinstance(result, dict) else {}
