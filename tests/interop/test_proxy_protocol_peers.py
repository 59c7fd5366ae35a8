"""PROXY protocol against the two reference implementations a deployment meets:

- nginx (stream module, `listen ... proxy_protocol`) receives the header pointsman sends, v1 and
  v2, and reports the real client address, in its reply and in its access log;
- HAProxy (`mode tcp`, `send-proxy` / `send-proxy-v2`) sends a header to a pointsman listener with
  `accept: required`, and the backend behind pointsman (pool `send: v1`) sees the original client;
- HAProxy (`accept-proxy`, terminating TLS) decodes the v2 TLVs pointsman adds to a TLS connection
  it routed by SNI: PP2_TYPE_AUTHORITY (the SNI) and PP2_TYPE_UNIQUE_ID.

Clients connect from distinct loopback addresses (127.0.0.9, 127.0.0.7, 127.0.0.11) so the address that comes
out the far end can only have come through the headers. Peers run in the foreground on free
loopback ports, are started before the test's event loop serves anything, and are killed by pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from pointsman.protocols.proxy_protocol import parse
from tests.support import (
    LOOPBACK,
    backend,
    close_writer,
    free_port,
    one_pool_config,
    read_all,
    running,
    wait_for,
)

pytestmark = pytest.mark.timeout(60)

PEER_START_DEADLINE = 10.0
IO_TIMEOUT = 2.0
NGINX_STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")
NGINX_CLIENT = "127.0.0.9"
HAPROXY_CLIENT = "127.0.0.7"
TLS_CLIENT = "127.0.0.11"


def need(binary: str, package: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} is not installed (apt-get install {package})")
    return path


def wait_accepting(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + PEER_START_DEADLINE
    while True:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args!r} exited with {proc.returncode} before accepting:\n"
                        f"{log.read_text(errors='replace')}")
        try:
            socket.create_connection((LOOPBACK, port), timeout=0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                pytest.fail(f"nothing accepted on port {port} within {PEER_START_DEADLINE}s")
            time.sleep(0.02)


@contextlib.contextmanager
def foreground(args: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(5)


async def exchange(address: str, source: str, payload: bytes = b"") -> tuple[bytes, int]:
    """Connect from `source`, send `payload` and FIN, read to EOF: (reply, our source port)."""
    host, _, port = address.rpartition(":")
    async with asyncio.timeout(IO_TIMEOUT):
        reader, writer = await asyncio.open_connection(host, int(port), local_addr=(source, 0))
    own_port = int(writer.get_extra_info("sockname")[1])
    try:
        writer.write(payload)
        writer.write_eof()
        return await read_all(reader, IO_TIMEOUT), own_port
    finally:
        await close_writer(writer)


# --- nginx receives pointsman's header ------------------------------------------------------------

NGINX_CONF = """\
load_module {module};
daemon off;
master_process off;
pid {prefix}/nginx.pid;
error_log stderr;
events {{}}
stream {{
    log_format pp '$proxy_protocol_addr:$proxy_protocol_port via $remote_addr';
    server {{
        listen {host}:{port} proxy_protocol;
        access_log {prefix}/access.log pp;
        return "client $proxy_protocol_addr:$proxy_protocol_port\\n";
    }}
}}
"""


@dataclass(frozen=True)
class Nginx:
    port: int
    access_log: Path

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def proxied(self) -> list[str]:
        """Access log lines of sessions that carried a header (the readiness probe sent none:
        nginx logs it as "-:- via 127.0.0.1")."""
        text = self.access_log.read_text() if self.access_log.exists() else ""
        return [line for line in text.splitlines() if not line.startswith("-:-")]


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[Nginx]:
    binary = need("nginx", "nginx libnginx-mod-stream")
    if not NGINX_STREAM_MODULE.exists():
        pytest.skip(f"{NGINX_STREAM_MODULE} missing (apt-get install libnginx-mod-stream)")
    port = free_port()
    conf = tmp_path / "nginx.conf"
    conf.write_text(NGINX_CONF.format(module=NGINX_STREAM_MODULE, prefix=tmp_path, host=LOOPBACK,
                                      port=port))
    log = tmp_path / "nginx.log"
    # -e: the error log before the config is read; Debian's default path may not be writable.
    with foreground([binary, "-e", "stderr", "-p", str(tmp_path), "-c", str(conf)], log) as proc:
        wait_accepting(port, proc, log)
        yield Nginx(port, tmp_path / "access.log")


@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_nginx_sees_the_client_through_the_header_pointsman_sends(
    nginx: Nginx, version: str
) -> None:
    listen = f"{LOOPBACK}:{free_port()}"
    pool = {"proxy_protocol": {"send": version, "tlvs": {"unique_id": version == "v2"}}}
    async with running(one_pool_config(listen, [nginx.address], pool=pool)):
        reply, client_port = await exchange(listen, NGINX_CLIENT)
    assert reply == f"client {NGINX_CLIENT}:{client_port}\n".encode()
    # The TCP peer nginx saw was pointsman; the header named the client.
    await wait_for(lambda: len(nginx.proxied()) == 1, IO_TIMEOUT, what="nginx access log line")
    assert nginx.proxied() == [f"{NGINX_CLIENT}:{client_port} via {LOOPBACK}"]


# --- HAProxy sends a header to pointsman ------------------------------------------------------

HAPROXY_CONF = """\
global
    maxconn 100
defaults
    mode tcp
    timeout connect 2s
    timeout client 10s
    timeout server 10s
frontend fe
    bind {host}:{port}
    default_backend be
backend be
    server lb {host}:{target} {send}
"""


@dataclass(frozen=True)
class Haproxy:
    port: int
    target: int  # where HAProxy sends: the pointsman listener's port

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"


@pytest.fixture(params=["send-proxy", "send-proxy-v2"])
def haproxy(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Haproxy]:
    binary = need("haproxy", "haproxy")
    port, target = free_port(), free_port()
    conf = tmp_path / "haproxy.cfg"
    conf.write_text(HAPROXY_CONF.format(host=LOOPBACK, port=port, target=target,
                                        send=request.param))
    log = tmp_path / "haproxy.log"
    # -db: foreground, no daemon; pointsman behind it starts in the test.
    with foreground([binary, "-f", str(conf), "-db"], log) as proc:
        wait_accepting(port, proc, log)
        yield Haproxy(port, target)


async def test_haproxy_header_gives_pointsman_the_original_client(haproxy: Haproxy) -> None:
    streams: list[bytes] = []

    async def capture(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await read_all(reader, IO_TIMEOUT)
        streams.append(data)
        writer.write(b"seen " + data[data.index(b"\r\n") + 2 :] if b"\r\n" in data else b"?")
        await writer.drain()

    async with backend(capture) as peer:
        listen = f"{LOOPBACK}:{haproxy.target}"
        listener = {"proxy_protocol": {"accept": "required", "trusted_sources": ["127.0.0.1/32"]}}
        config = one_pool_config(listen, [peer.address], listener=listener,
                                 pool={"proxy_protocol": {"send": "v1"}})
        async with running(config) as runtime:
            reply, client_port = await exchange(haproxy.address, HAPROXY_CLIENT, b"hello")
            stats = runtime.listeners["lb"].stats
            await wait_for(lambda: stats.active == 0, IO_TIMEOUT, what="flow ended")
    assert reply == b"seen hello"
    assert len(streams) == 1
    parsed = parse(streams[0])
    assert parsed is not None
    header, used = parsed
    assert header.version == 1
    assert header.source == (HAPROXY_CLIENT, client_port)
    assert header.destination == (LOOPBACK, haproxy.port)  # what the client connected to
    assert streams[0][used:] == b"hello"
    assert not stats.rejected


# --- HAProxy reads pointsman's v2 TLVs ----------------------------------------------------------

HAPROXY_TLV_CONF = """\
defaults
    mode http
    timeout connect 2s
    timeout client 10s
    timeout server 10s
frontend fe
    bind {host}:{port} accept-proxy ssl crt {pem}
    http-request return status 200 content-type text/plain \
lf-string "%[src]:%[src_port] %[fc_pp_authority] %[fc_pp_unique_id,hex]\\n"
"""
TLS_NAME = "app.example"


@pytest.fixture
def haproxy_tls(tmp_path: Path) -> Iterator[int]:
    """HAProxy terminating TLS behind `accept-proxy`, answering with what the header said."""
    binary = need("haproxy", "haproxy")
    openssl = need("openssl", "openssl")
    cert, key, pem = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "both.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-subj", f"/CN={TLS_NAME}", "-days", "1", "-keyout", str(key), "-out",
         str(cert)], check=True, capture_output=True, timeout=30)
    pem.write_bytes(cert.read_bytes() + key.read_bytes())
    port = free_port()
    conf = tmp_path / "haproxy.cfg"
    conf.write_text(HAPROXY_TLV_CONF.format(host=LOOPBACK, port=port, pem=pem))
    log = tmp_path / "haproxy.log"
    with foreground([binary, "-f", str(conf), "-db"], log) as proc:
        wait_accepting(port, proc, log)
        yield port


async def test_haproxy_reads_the_authority_and_unique_id_tlvs(haproxy_tls: int) -> None:
    """TLS passes through pointsman untouched; the v2 header in front of it carries the SNI as
    PP2_TYPE_AUTHORITY and a per-connection PP2_TYPE_UNIQUE_ID, as HAProxy decodes them."""
    listen = f"{LOOPBACK}:{free_port()}"
    config = yaml.safe_dump({
        "listeners": [{"name": "tls", "bind": listen, "default_pool": "app",
                       "tls_routes": [{"server_names": [TLS_NAME], "pool": "app"}]}],
        "pools": [{"name": "app", "backends": [{"address": f"{LOOPBACK}:{haproxy_tls}"}],
                   "proxy_protocol": {"send": "v2",
                                      "tlvs": {"authority": True, "unique_id": True}}}],
    })
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # a throwaway self-signed certificate
    host, _, port = listen.rpartition(":")
    replies = []
    async with running(config):
        for _ in range(2):
            async with asyncio.timeout(IO_TIMEOUT):
                reader, writer = await asyncio.open_connection(
                    host, int(port), ssl=context, server_hostname=TLS_NAME,
                    local_addr=(TLS_CLIENT, 0))
            client_port = writer.get_extra_info("sockname")[1]
            try:
                writer.write(b"GET / HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n")
                response = await read_all(reader, IO_TIMEOUT)
            finally:
                await close_writer(writer)
            body = response.partition(b"\r\n\r\n")[2].decode()
            replies.append((client_port, body.split()))
    unique_ids = set()
    for client_port, fields in replies:
        source, authority, unique_id = fields
        assert source == f"{TLS_CLIENT}:{client_port}"
        assert authority == TLS_NAME
        assert len(bytes.fromhex(unique_id)) == 16
        unique_ids.add(unique_id)
    assert len(unique_ids) == 2
