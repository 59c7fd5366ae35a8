"""Health probes against real peers on 127.0.0.1: asyncio servers, redis, nginx, openssl.

Each peer runs in the foreground on a free loopback port and is killed in its fixture's
finalizer. Readiness is a connect poll with a deadline; no fixed sleeps synchronise anything.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import cast

import pytest

from pointsman.health.checker import HealthChecker, HealthTarget
from pointsman.health.probes import ProbeResult, ProbeSpec, probe

pytestmark = pytest.mark.timeout(60)

HOST = "127.0.0.1"
PEER_START_DEADLINE = 10.0


def free_port(kind: socket.SocketKind = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_accepting(port: int, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Poll connect until the peer accepts, it exits, or the deadline passes."""
    deadline = time.monotonic() + PEER_START_DEADLINE
    while True:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"peer {proc.args!r} exited with {proc.returncode} before accepting")
        try:
            socket.create_connection((HOST, port), timeout=0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                pytest.fail(f"nothing accepted on port {port} within {PEER_START_DEADLINE}s")
            time.sleep(0.02)


def need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} is not installed (apt-get install {binary})")
    return path


def start_peer(args: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def closed_port() -> int:
    """A TCP port nobody listens on (found free, then released)."""
    return free_port()


# --- peers ----------------------------------------------------------------------------------


@pytest.fixture
def redis_port(tmp_path: Path) -> Iterator[int]:
    binary = need("redis-server")
    port = free_port()
    args = [binary, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no",
            "--dir", str(tmp_path)]
    for proc in start_peer(args, tmp_path / "redis.log"):
        wait_accepting(port, proc)
        yield port


NGINX_CONF = """\
daemon off;
master_process off;
pid {prefix}/nginx.pid;
error_log stderr;
events {{}}
http {{
    access_log off;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    server {{
        listen {host}:{port};
        location /healthz {{ return 200 "ok"; }}
        location /bad {{ return 503; }}
    }}
}}
"""


@pytest.fixture
def nginx_port(tmp_path: Path) -> Iterator[int]:
    binary = need("nginx")
    port = free_port()
    conf = tmp_path / "nginx.conf"
    conf.write_text(NGINX_CONF.format(prefix=tmp_path, host=HOST, port=port))
    # -e: the error log before the config is read; Debian's default path may not be writable.
    args = [binary, "-e", "stderr", "-p", str(tmp_path), "-c", str(conf)]
    for proc in start_peer(args, tmp_path / "nginx.log"):
        wait_accepting(port, proc)
        yield port


@pytest.fixture
def tls_port(tmp_path: Path) -> Iterator[int]:
    binary = need("openssl")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [binary, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=db.example",
         "-days", "1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=30,
    )
    port = free_port()
    # -www answers without reading stdin, so s_server keeps serving with stdin closed.
    args = [binary, "s_server", "-accept", f"{HOST}:{port}", "-cert", str(cert), "-key", str(key),
            "-www"]
    for proc in start_peer(args, tmp_path / "s_server.log"):
        wait_accepting(port, proc)
        yield port


@pytest.fixture
async def tcp_server() -> AsyncIterator[int]:
    """An asyncio server that accepts and closes every connection."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(handle, HOST, 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


class Echo(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self.transport.sendto(b"echo:" + data, addr)


@pytest.fixture
async def udp_echo_port() -> AsyncIterator[int]:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(Echo, local_addr=(HOST, 0))
    try:
        yield transport.get_extra_info("sockname")[1]
    finally:
        transport.close()


# --- tcp ------------------------------------------------------------------------------------


async def test_tcp_pass(tcp_server: int) -> None:
    result = await probe(ProbeSpec(type="tcp", timeout=2.0), HOST, tcp_server)
    assert result.ok, result
    assert 0 <= result.latency < 2.0


async def test_tcp_refused() -> None:
    result = await probe(ProbeSpec(type="tcp", timeout=2.0), HOST, closed_port())
    assert (result.ok, result.detail) == (False, "refused")


async def test_timeout_against_a_silent_peer() -> None:
    # A server that accepts but never answers: send_expect must give up at the timeout.
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    server = await asyncio.start_server(silent, HOST, 0)
    try:
        port = server.sockets[0].getsockname()[1]
        spec = ProbeSpec(type="send_expect", timeout=0.3, send=b"hi", expect=b"never")
        result = await probe(spec, HOST, port)
    finally:
        server.close()
        await server.wait_closed()
    assert (result.ok, result.detail) == (False, "timeout")
    assert 0.25 < result.latency < 2.0


# --- send_expect against redis --------------------------------------------------------------


@pytest.mark.peer("redis-server")
async def test_send_expect_redis_pong(redis_port: int) -> None:
    spec = ProbeSpec(type="send_expect", timeout=2.0, send=b"PING\r\n", expect=b"+PONG")
    result = await probe(spec, HOST, redis_port)
    assert (result.ok, result.detail) == (True, "matched")


@pytest.mark.peer("redis-server")
async def test_send_expect_redis_regex(redis_port: int) -> None:
    spec = ProbeSpec(type="send_expect", timeout=2.0, send=b"INFO replication\r\n",
                     expect_regex=re.compile(rb"role:(master|slave)"))
    assert (await probe(spec, HOST, redis_port)).ok


@pytest.mark.peer("redis-server")
async def test_send_expect_redis_no_match(redis_port: int) -> None:
    # QUIT makes redis answer +OK and close: the probe sees EOF without a match, not a timeout.
    spec = ProbeSpec(type="send_expect", timeout=2.0, send=b"QUIT\r\n", expect=b"+NOPE")
    result = await probe(spec, HOST, redis_port)
    assert (result.ok, result.detail) == (False, "no match")


@pytest.mark.peer("redis-server")
async def test_send_expect_redis_wrong_reply_waits_for_timeout(redis_port: int) -> None:
    spec = ProbeSpec(type="send_expect", timeout=0.5, send=b"PING\r\n", expect=b"+NOPE")
    result = await probe(spec, HOST, redis_port)
    assert (result.ok, result.detail) == (False, "timeout")


# --- http against nginx ---------------------------------------------------------------------


@pytest.mark.peer("nginx")
async def test_http_nginx_pass(nginx_port: int) -> None:
    spec = ProbeSpec(type="http", timeout=2.0, http_path="/healthz", http_host="example")
    result = await probe(spec, HOST, nginx_port)
    assert (result.ok, result.detail) == (True, "status 200")


@pytest.mark.peer("nginx")
async def test_http_nginx_503_fails(nginx_port: int) -> None:
    spec = ProbeSpec(type="http", timeout=2.0, http_path="/bad", http_expect_status=(200, 204))
    result = await probe(spec, HOST, nginx_port)
    assert (result.ok, result.detail) == (False, "status 503")


@pytest.mark.peer("nginx")
async def test_http_nginx_expected_404(nginx_port: int) -> None:
    spec = ProbeSpec(type="http", timeout=2.0, http_path="/missing", http_expect_status=(404,))
    assert (await probe(spec, HOST, nginx_port)).ok


@pytest.mark.peer("redis-server")
async def test_http_against_redis_is_closed_before_status(redis_port: int) -> None:
    # Redis drops a connection that sends an HTTP header (its cross-protocol scripting guard).
    result = await probe(ProbeSpec(type="http", timeout=2.0), HOST, redis_port)
    assert (result.ok, result.detail) == (False, "closed before status")


async def test_http_against_a_banner_is_bad_reply() -> None:
    async def banner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"SSH-2.0-OpenSSH_9.2\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(banner, HOST, 0)
    try:
        port = server.sockets[0].getsockname()[1]
        result = await probe(ProbeSpec(type="http", timeout=2.0), HOST, port)
    finally:
        server.close()
        await server.wait_closed()
    assert not result.ok and result.detail.startswith("bad reply: not an HTTP response"), result


# --- tls against openssl s_server -----------------------------------------------------------


@pytest.mark.peer("openssl")
async def test_tls_handshake_pass(tls_port: int) -> None:
    spec = ProbeSpec(type="tls", timeout=5.0, tls_server_name="db.example")
    result = await probe(spec, HOST, tls_port)
    assert result.ok, result
    assert result.detail.startswith("handshake ok (TLS")


@pytest.mark.peer("openssl")
async def test_tls_verify_rejects_self_signed(tls_port: int) -> None:
    spec = ProbeSpec(type="tls", timeout=5.0, tls_server_name="db.example", tls_verify=True)
    result = await probe(spec, HOST, tls_port)
    assert not result.ok and result.detail.startswith("tls: "), result
    assert "CERTIFICATE_VERIFY_FAILED" in result.detail


async def test_tls_against_plain_server_that_closes(tcp_server: int) -> None:
    spec = ProbeSpec(type="tls", timeout=2.0, tls_server_name="db.example")
    result = await probe(spec, HOST, tcp_server)
    assert not result.ok and result.detail.startswith("tls: "), result


async def test_tls_refused() -> None:
    result = await probe(ProbeSpec(type="tls", timeout=2.0), HOST, closed_port())
    assert (result.ok, result.detail) == (False, "refused")


# --- udp ------------------------------------------------------------------------------------


async def test_udp_echo_pass(udp_echo_port: int) -> None:
    spec = ProbeSpec(type="udp", timeout=2.0, send=b"ping", expect=b"echo:ping")
    result = await probe(spec, HOST, udp_echo_port)
    assert (result.ok, result.detail) == (True, "matched")


async def test_udp_echo_no_match(udp_echo_port: int) -> None:
    spec = ProbeSpec(type="udp", timeout=2.0, send=b"ping", expect=b"pong")
    result = await probe(spec, HOST, udp_echo_port)
    assert (result.ok, result.detail) == (False, "no match")


async def test_udp_closed_port_is_refused() -> None:
    spec = ProbeSpec(type="udp", timeout=2.0, send=b"ping", expect=b"pong")
    result = await probe(spec, HOST, free_port(socket.SOCK_DGRAM))
    assert (result.ok, result.detail) == (False, "refused")


# --- HealthChecker against a server stopped and restarted -----------------------------------


class Results:
    """The checker's on_result callback; the test waits on it for conditions, not for times."""

    def __init__(self) -> None:
        self.seen: list[tuple[ProbeResult, bool | None]] = []
        self._changed = asyncio.Event()

    def __call__(self, backend_id: str, result: ProbeResult, verdict: bool | None) -> None:
        self.seen.append((result, verdict))
        self._changed.set()

    async def wait_for_verdict(self, verdict: bool, since: int) -> list[tuple[bool, bool | None]]:
        """Wait until `verdict` is reported after index `since`; return (ok, verdict) up to it."""
        async with asyncio.timeout(10):
            while verdict not in (v for _, v in self.seen[since:]):
                self._changed.clear()
                await self._changed.wait()
        window = [(r.ok, v) for r, v in self.seen[since:]]
        return window[: window.index((verdict, verdict)) + 1]

    async def wait_for_count(self, n: int) -> None:
        async with asyncio.timeout(10):
            while len(self.seen) < n:
                self._changed.clear()
                await self._changed.wait()


async def test_checker_finds_a_stopped_backend_and_its_return() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(handle, HOST, 0)
    port = server.sockets[0].getsockname()[1]
    results = Results()
    checker = HealthChecker(results)
    spec = ProbeSpec(type="tcp", timeout=0.5)
    checker.set_targets(
        [HealthTarget("b1", HOST, port, spec, interval=0.05, jitter=0.1, rise=2, fall=3)]
    )
    task = asyncio.create_task(checker.run())
    try:
        await results.wait_for_count(2)
        assert all(r.ok and v is None for r, v in results.seen)

        server.close()
        await server.wait_closed()
        down = await results.wait_for_verdict(False, since=len(results.seen))
        # A probe already connected when the listener closed may still pass; then exactly
        # `fall` refusals, the last one flipping the verdict.
        assert down[-3:] == [(False, None), (False, None), (False, False)]
        assert all(ok for ok, _ in down[:-3])
        assert [r.detail for r, _ in results.seen[-3:]] == ["refused"] * 3

        server = await asyncio.start_server(handle, HOST, port)
        up = await results.wait_for_verdict(True, since=len(results.seen))
        assert up[-2:] == [(True, None), (True, True)]
        assert all(not ok for ok, _ in up[:-2])
        assert checker.statistics()["b1"].healthy
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        server.close()
        await server.wait_closed()
