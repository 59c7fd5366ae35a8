"""Hostile admin clients over raw sockets (an HTTP client library would refuse to send most of
this): non-ASCII and binary Authorization values, binary bytes in other headers and in the path,
bodies that are deeply nested, too large, not UTF-8 or not JSON, to every endpoint, with and
without a token. The admin API answers every one with a status below 500 (503 only from /readyz,
by design), changes no state without a write token, and logs no traceback and no error.

The issue this answers (14.4): `Authorization: Bearer é` gave a 500 and a logged traceback on
every mutating endpoint, and a deeply nested JSON body a RecursionError.
"""

from __future__ import annotations

import json
import socket
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pointsman.admin.openapi import OPENAPI
from tests.support import LOOPBACK, PointsmanProcess, free_port, pointsman_process

WRITE = "fuzz-write-token"
READ = "fuzz-read-token"
RAW_TIMEOUT = 5.0
FUZZ_EXAMPLES = 250  # each a loopback round trip of a few ms: a few seconds in all


@dataclass
class Target:
    admin: str
    proc: PointsmanProcess

    def status(self) -> dict[str, Any]:
        request = urllib.request.Request(f"http://{self.admin}/api/v1/status",
                                         headers={"Authorization": f"Bearer {READ}"})
        with urllib.request.urlopen(request, timeout=5) as r:
            return dict(json.loads(r.read()))


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    """One `pointsman run` for the module, with a write token and a read token (so reads are
    guarded too), and backends nobody listens on (no traffic here)."""
    workdir = tmp_path_factory.mktemp("fuzz")
    (workdir / "write.token").write_text(WRITE)
    (workdir / "read.token").write_text(READ)
    admin = f"{LOOPBACK}:{free_port()}"
    text = yaml.safe_dump({
        "listeners": [{"name": "lb", "bind": f"{LOOPBACK}:{free_port()}", "pool": "p"}],
        "pools": [{"name": "p", "backends": [{"address": f"{LOOPBACK}:{free_port()}", "name": "a"}]}],
        "admin": {"bind": admin, "token_file": str(workdir / "write.token"),
                  "read_token_file": str(workdir / "read.token")},
        "workers": 1,
        "shutdown_grace": "0.2s",
    })
    with pointsman_process(text, workdir) as proc:
        proc.wait_lines(lambda lines: any(line.startswith("admin api") for line in lines))
        yield Target(admin, proc)


def raw_request(admin: str, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]],
                body: bytes | None) -> tuple[int, bytes]:
    """Send exactly these bytes; return the status code and the body of the answer."""
    head = [method + b" " + target + b" HTTP/1.1", b"Host: " + admin.encode(), b"Connection: close"]
    head += [name + b": " + value for name, value in headers]
    if body is not None:
        head.append(b"Content-Length: " + str(len(body)).encode())
    data = b"\r\n".join(head) + b"\r\n\r\n" + (body or b"")
    host, port = admin.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=RAW_TIMEOUT) as sock:
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    parts = status_line.split(b" ")
    assert len(parts) >= 2 and parts[0].startswith(b"HTTP/1."), f"no HTTP answer: {answer[:200]!r}"
    return int(parts[1]), rest.partition(b"\r\n\r\n")[2]


def backends(status: dict[str, Any]) -> list[tuple[str, str, int]]:
    return [(b["id"], b["state"], b["weight"]) for p in status["pools"] for b in p["backends"]]


def assert_no_trouble_logged(proc: PointsmanProcess) -> None:
    log = proc.stderr()
    assert "Traceback" not in log, log[-3000:]
    assert " ERROR " not in log, log[-3000:]


# --- what a hostile client sends ------------------------------------------------------------------


def endpoints() -> list[tuple[str, str]]:
    """Every (method, path) of the API, the path parameters filled with the real pool/backend."""
    found = []
    for path, item in OPENAPI["paths"].items():
        for method in item:
            if method != "parameters":
                found.append((method.upper(), path.replace("{pool}", "p").replace("{backend}", "a")))
    return [*found, ("GET", "/"), ("GET", "/openapi.json")]


ENDPOINTS = endpoints()
HEADER_BYTES = st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
AUTHORIZATION = st.one_of(
    st.none(),
    st.just(f"Bearer {WRITE}".encode()),
    st.just(f"Bearer {READ}".encode()),
    st.just("Bearer é".encode()),
    st.just(b"Bearer \xff\xfe\x80"),
    HEADER_BYTES.map(lambda b: b"Bearer " + b),
    HEADER_BYTES,
    st.text(max_size=20).map(lambda t: ("Bearer " + t).encode("utf-8", "surrogatepass")),
)
BODY = st.one_of(
    st.none(),
    st.just(b'{"weight": 3}'),
    st.integers(33, 50_000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(33, 20_000).map(lambda n: b'{"weight":' * n + b"1" + b"}" * n),
    st.just(b"x" * (70 * 1024)),  # past the 64 KiB limit
    st.just(b'{"weight": "\xff\xfe"}'),
    st.binary(max_size=200),
    st.text(max_size=50).map(lambda t: t.encode("utf-8", "surrogatepass")),
)
PATH_NOISE = st.one_of(
    st.just(b""),
    st.binary(max_size=10).map(lambda b: b.replace(b" ", b"").replace(b"\r", b"").replace(b"\n", b"")),
    st.sampled_from([b"%ff", b"%00", b"%C3%A9", b"?pool=%ff&since=%00", b"?kind=\xc3\xa9", b"/.."]),
)


@st.composite
def hostile_requests(draw: st.DrawFn) -> tuple[bytes, bytes, list[tuple[bytes, bytes]], bytes | None]:
    method, path = draw(st.sampled_from(ENDPOINTS))
    method_bytes = draw(st.sampled_from([method.encode(), method.encode(), b"POST", b"PUT", b"DELETE"]))
    target = path.encode() + draw(PATH_NOISE)
    headers: list[tuple[bytes, bytes]] = []
    if (auth := draw(AUTHORIZATION)) is not None:
        headers.append((b"Authorization", auth))
    if draw(st.booleans()):
        headers.append((b"Content-Type", draw(st.sampled_from([b"application/json", b"text/\xff"]))))
    if draw(st.booleans()):
        headers.append((b"X-Fuzz", draw(HEADER_BYTES)))
    return method_bytes, target, headers, draw(BODY)


# --- the tests ------------------------------------------------------------------------------------------


MUTATING = [(m, p) for m, p in ENDPOINTS if m in ("POST", "PUT")]


@pytest.mark.parametrize(("method", "path"), MUTATING)
@pytest.mark.parametrize("auth", [b"Bearer \xc3\xa9", b"Bearer \xff\xfe", "Bearer ü\u00e9".encode(),
                                  b"\xc3\xa9", f"Bearer {READ}\xc3\xa9".encode()])
def test_non_ascii_tokens_are_401_on_every_mutating_call(
        target: Target, method: str, path: str, auth: bytes) -> None:
    before = target.status()
    code, body = raw_request(target.admin, method.encode(), path.encode(),
                             [(b"Authorization", auth), (b"Content-Type", b"application/json")],
                             b'{"weight": 5}')
    assert code == 401 and json.loads(body) == {"error": "a bearer token is required"}
    assert backends(target.status()) == backends(before)
    assert_no_trouble_logged(target.proc)


@pytest.mark.parametrize(("body", "code", "reason"), [
    (b"[" * 100_000 + b"]" * 100_000, 413, "the limit is 65536"),
    (b"[" * 50_000 + b"]" * 5_000, 400, "levels deep"),
    (b'{"weight":' * 2_000 + b"1" + b"}" * 2_000, 400, "levels deep"),
    (b'{"weight": "\xff"}', 400, "not UTF-8"),
    (b"\xff" * 10, 400, "not UTF-8"),
    (b"", 400, "expected a JSON body"),
])
def test_bad_bodies_are_4xx_with_a_json_reason(target: Target, body: bytes, code: int, reason: str) -> None:
    got, answer = raw_request(target.admin, b"PUT", b"/api/v1/pools/p/backends/a/weight",
                              [(b"Authorization", f"Bearer {WRITE}".encode())], body)
    assert got == code and reason in json.loads(answer)["error"]
    assert backends(target.status()) == [("a", "up", 1)]
    assert_no_trouble_logged(target.proc)


def test_hostile_requests_never_get_a_5xx_or_a_traceback(target: Target) -> None:
    seen: set[int] = set()

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(hostile_requests())
    def fuzz(request: tuple[bytes, bytes, list[tuple[bytes, bytes]], bytes | None]) -> None:
        method, path, headers, body = request
        code, answer = raw_request(target.admin, method, path, headers, body)
        seen.add(code)
        assert code < 500 or (code == 503 and path.startswith(b"/readyz")), (code, request, answer[:300])
        if code >= 400 and code != 503 and answer.startswith(b"{"):
            assert json.loads(answer).get("error"), answer  # the API's own errors carry a reason

    fuzz()
    assert_no_trouble_logged(target.proc)
    assert {200, 400, 401} <= seen, seen  # the fuzz reached handlers, the guard and the parser
