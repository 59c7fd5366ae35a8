"""TLS passthrough routing against real TLS peers: `openssl s_server` backends and `openssl
s_client` clients, with pointsman (in the test's loop) choosing the backend from the ClientHello's
SNI and ALPN and never terminating TLS.

The certificate a client ends up seeing names the backend it reached; the flow log's backend field
says the same from pointsman's side. Hand-built ClientHellos (a large post-quantum-sized key share
split byte by byte, a malformed one) go to a recording backend that checks the exact bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from pointsman.telemetry.flow import RejectReason
from tests.support import (
    LOOPBACK,
    Backend,
    backend,
    close_writer,
    connect,
    free_port,
    read_all,
    running,
    wait_closed,
    wait_for,
)

pytestmark = [pytest.mark.timeout(60), pytest.mark.peer("openssl")]

PEER_START_DEADLINE = 10.0
CLIENT_TIMEOUT = 10.0
IO_TIMEOUT = 2.0
NAMES = {"db": "db.example.com", "web": "web.example", "grpc": "grpc.example"}


# --- peers: certificates and s_server, once per module --------------------------------------------


def openssl() -> str:
    path = shutil.which("openssl")
    if path is None:
        pytest.skip("openssl is not installed (apt-get install openssl)")
    return path


def wait_accepting(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + PEER_START_DEADLINE
    while True:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args!r} exited with {proc.returncode} before accepting")
        try:
            socket.create_connection((LOOPBACK, port), timeout=0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                pytest.fail(f"nothing accepted on port {port} within {PEER_START_DEADLINE}s")
            time.sleep(0.02)


@dataclass(frozen=True)
class TlsPeer:
    name: str
    common_name: str
    port: int

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"


@pytest.fixture(scope="module")
def tls_peers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, TlsPeer]]:
    """One s_server per backend name, each with a self-signed certificate for its own name; the
    grpc one also negotiates ALPN h2. Killed (by pid) when the module is done."""
    binary = openssl()
    workdir = tmp_path_factory.mktemp("tls")
    procs: list[subprocess.Popen[bytes]] = []
    peers: dict[str, TlsPeer] = {}
    try:
        for name, common_name in NAMES.items():
            cert, key = workdir / f"{name}.crt", workdir / f"{name}.key"
            subprocess.run(
                [binary, "req", "-x509", "-newkey", "ec", "-pkeyopt",
                 "ec_paramgen_curve:prime256v1", "-nodes", "-subj", f"/CN={common_name}",
                 "-days", "1", "-keyout", str(key), "-out", str(cert)],
                check=True, capture_output=True, timeout=30,
            )
            port = free_port()
            args = [binary, "s_server", "-accept", f"{LOOPBACK}:{port}", "-cert", str(cert),
                    "-key", str(key), "-www"]
            if name == "grpc":
                args += ["-alpn", "h2"]
            with (workdir / f"{name}.log").open("wb") as log:
                procs.append(subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log,
                                              stderr=log))
            wait_accepting(port, procs[-1])
            peers[name] = TlsPeer(name, common_name, port)
        yield peers
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(5)


# --- pointsman in front of them -----------------------------------------------------------------


@dataclass
class Edge:
    listen: str
    runtime: Any
    flows: Path
    raw: Backend
    received: list[bytes]

    def records(self) -> list[dict[str, Any]]:
        text = self.flows.read_text() if self.flows.exists() else ""
        return [json.loads(line) for line in text.splitlines() if line]

    async def wait_backends(self, count: int) -> list[str]:
        """The backend of each of the first `count` flows, once the flow log has them."""
        await wait_for(lambda: len(self.records()) >= count, IO_TIMEOUT, what=f"{count} flows")
        return [record["backend"] for record in self.records()]


@contextlib.asynccontextmanager
async def edge(peers: dict[str, TlsPeer], tmp_path: Path) -> AsyncIterator[Edge]:
    received: list[bytes] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await read_all(reader, IO_TIMEOUT)
        received.append(data)
        writer.write(f"got {len(data)}\n".encode())
        await writer.drain()

    async with backend(record) as raw:
        listen = f"{LOOPBACK}:{free_port()}"
        flows = tmp_path / "flows.jsonl"
        config = {
            "listeners": [{
                "name": "tls", "bind": listen, "default_pool": "web", "inspect_timeout": "2s",
                "tls_routes": [
                    {"server_names": ["db.example.com", "*.db.example.com"], "pool": "db"},
                    {"alpn": ["h2"], "pool": "grpc"},
                    {"server_names": ["raw.example"], "pool": "raw"},
                ],
            }],
            "pools": [
                *({"name": name, "backends": [{"address": peer.address, "name": name}]}
                  for name, peer in peers.items()),
                {"name": "raw", "backends": [{"address": raw.address, "name": "raw"}]},
            ],
            "flow_log": {"path": str(flows)},
        }
        async with running(yaml.safe_dump(config)) as runtime:
            yield Edge(listen, runtime, flows, raw, received)


async def s_client(listen: str, *options: str) -> str:
    """Run `openssl s_client` through pointsman; return its combined output."""
    proc = await asyncio.create_subprocess_exec(
        openssl(), "s_client", "-connect", listen, "-brief", *options,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        async with asyncio.timeout(CLIENT_TIMEOUT):
            out, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return out.decode(errors="replace")


def peer_certificate(output: str) -> str:
    for line in output.splitlines():
        if line.startswith("Peer certificate:"):
            return line.partition(":")[2].strip()
    raise AssertionError(f"no handshake through pointsman; s_client said:\n{output}")


# --- routing real handshakes --------------------------------------------------------------------


@pytest.mark.parametrize(("options", "expected"), [
    (("-servername", "db.example.com"), "db"),
    (("-servername", "shard7.db.example.com"), "db"),
    (("-servername", "DB.Example.COM"), "db"),  # names compare case-insensitively
    (("-servername", "other.example"), "web"),
    (("-noservername",), "web"),
    (("-servername", "other.example", "-alpn", "h2"), "grpc"),
    (("-servername", "db.example.com", "-alpn", "h2"), "db"),  # the first matching route wins
], ids=["sni", "wildcard", "case", "unknown-sni", "no-sni", "alpn", "first-route"])
async def test_handshake_reaches_the_routed_backend(
    tls_peers: dict[str, TlsPeer], tmp_path: Path, options: tuple[str, ...], expected: str
) -> None:
    async with edge(tls_peers, tmp_path) as lb:
        output = await s_client(lb.listen, *options)
        assert peer_certificate(output) == f"CN = {tls_peers[expected].common_name}", output
        assert await lb.wait_backends(1) == [expected]
        assert not lb.runtime.listeners["tls"].stats.rejected


async def test_post_quantum_key_share_from_openssl(
    tls_peers: dict[str, TlsPeer], tmp_path: Path
) -> None:
    async with edge(tls_peers, tmp_path) as lb:
        output = await s_client(lb.listen, "-servername", "db.example.com",
                                "-groups", "X25519MLKEM768:X25519")
        if "SSL_CONF_cmd(-groups" in output:
            pytest.skip("this openssl cannot offer X25519MLKEM768 (needs OpenSSL >= 3.5); "
                        "test_large_client_hello_split_byte_by_byte covers the size")
        assert peer_certificate(output) == "CN = db.example.com", output


async def test_non_tls_bytes_go_to_the_default_pool(
    tls_peers: dict[str, TlsPeer], tmp_path: Path
) -> None:
    async with edge(tls_peers, tmp_path) as lb:
        reader, writer = await connect(lb.listen)
        writer.write(b"GET / HTTP/1.0\r\nHost: db.example.com\r\n\r\n")
        writer.write_eof()
        with contextlib.suppress(ConnectionError):
            await read_all(reader, IO_TIMEOUT)  # whatever s_server makes of it
        await close_writer(writer)
        assert await lb.wait_backends(1) == ["web"]
        assert not lb.runtime.listeners["tls"].stats.rejected


# --- hand-built ClientHellos ----------------------------------------------------------------------


def _ext(ext_type: int, body: bytes) -> bytes:
    return struct.pack("!HH", ext_type, len(body)) + body


def _vec(size: int, body: bytes) -> bytes:
    return len(body).to_bytes(size, "big") + body


def big_client_hello(server_name: str, records: int = 2) -> bytes:
    """A TLS 1.3 ClientHello (RFC 8446 4.1.2) the size a post-quantum client sends: an
    X25519MLKEM768 key share (group 0x11EC, 1184 + 32 bytes) plus an X25519 one, padded (RFC 7685)
    past 2 KiB, and cut into `records` handshake records as the record layer allows (5.1)."""
    name = server_name.encode()
    extensions = b"".join([
        _ext(0, _vec(2, b"\x00" + _vec(2, name))),  # server_name
        _ext(10, _vec(2, struct.pack("!HH", 0x11EC, 0x001D))),  # supported_groups
        _ext(13, _vec(2, struct.pack("!HH", 0x0403, 0x0804))),  # signature_algorithms
        _ext(43, _vec(1, struct.pack("!H", 0x0304))),  # supported_versions: TLS 1.3
        _ext(51, _vec(2, struct.pack("!HH", 0x11EC, 1216) + os.urandom(1216)
                      + struct.pack("!HH", 0x001D, 32) + os.urandom(32))),  # key_share
        _ext(21, bytes(700)),  # padding
    ])
    body = (b"\x03\x03" + os.urandom(32) + _vec(1, os.urandom(32))
            + _vec(2, struct.pack("!HHH", 0x1301, 0x1302, 0x1303)) + _vec(1, b"\x00")
            + _vec(2, extensions))
    handshake = b"\x01" + _vec(3, body)
    cut = len(handshake) // records + 1
    return b"".join(b"\x16\x03\x01" + _vec(2, handshake[i : i + cut])
                    for i in range(0, len(handshake), cut))


async def trickle(writer: asyncio.StreamWriter, data: bytes) -> None:
    """Write one byte at a time, each its own segment (TCP_NODELAY), letting the loop run in
    between so pointsman (in the same loop) reads them one by one."""
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for i in range(len(data)):
        writer.write(data[i : i + 1])
        await writer.drain()
        await asyncio.sleep(0)


async def test_large_client_hello_split_byte_by_byte(
    tls_peers: dict[str, TlsPeer], tmp_path: Path
) -> None:
    hello = big_client_hello("raw.example")
    assert len(hello) > 2048
    async with edge(tls_peers, tmp_path) as lb:
        reader, writer = await connect(lb.listen)
        await trickle(writer, hello)
        writer.write(b"then the rest of the stream")
        writer.write_eof()
        reply = await read_all(reader, IO_TIMEOUT)
        await close_writer(writer)
        assert await lb.wait_backends(1) == ["raw"]
    assert lb.received == [hello + b"then the rest of the stream"]  # exactly, unmodified
    assert reply == f"got {len(lb.received[0])}\n".encode()


@pytest.mark.parametrize("bad", [
    b"\x16\x03\x01\x00\x06\x02\x00\x00\x02\x03\x03",  # a ServerHello, not a ClientHello
    b"\x16\x03\x01\x00\x00",  # a zero-length handshake record
    b"\x16\x03\x01\x00\x09\x01\x00\x00\x05\x03\x03\x00\x00\x00",  # body truncated inside
], ids=["server-hello", "empty-record", "truncated-body"])
async def test_malformed_client_hello_closes_only_that_connection(
    tls_peers: dict[str, TlsPeer], tmp_path: Path, bad: bytes
) -> None:
    hello = big_client_hello("raw.example", records=1)
    async with edge(tls_peers, tmp_path) as lb:
        stats = lb.runtime.listeners["tls"].stats
        good_reader, good_writer = await connect(lb.listen)
        good_writer.write(hello)
        await wait_for(lambda: lb.raw.accepted == 1, IO_TIMEOUT, what="good one routed")
        reader, writer = await connect(lb.listen)
        writer.write(bad)
        await wait_closed(reader, IO_TIMEOUT)
        await close_writer(writer)
        await wait_for(lambda: stats.rejected[RejectReason.BAD_CLIENT_HELLO] == 1, IO_TIMEOUT,
                       what="bad hello counted")
        good_writer.write(b"!")
        good_writer.write_eof()
        assert await read_all(good_reader, IO_TIMEOUT) == f"got {len(hello) + 1}\n".encode()
        await close_writer(good_writer)
        # A real handshake after it is routed as usual.
        output = await s_client(lb.listen, "-servername", "db.example.com")
        assert peer_certificate(output) == "CN = db.example.com"
    assert lb.received == [hello + b"!"]
    assert stats.rejected == {RejectReason.BAD_CLIENT_HELLO: 1}
