"""A real ClientHello from `openssl s_client`, captured on loopback and parsed incrementally.

This is the one test here with a socket and a peer program; it belongs with tests/interop in
spirit and is skipped when openssl is not installed.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time

import pytest

from pointsman.protocols.tls_clienthello import ClientHello, ClientHelloReader

OPENSSL = shutil.which("openssl")
DEADLINE_SECONDS = 10.0


def _capture_hello(listener: socket.socket) -> ClientHello | None:
    """Accept one connection and feed what arrives to a reader until it answers or time is up."""
    deadline = time.monotonic() + DEADLINE_SECONDS
    listener.settimeout(DEADLINE_SECONDS)
    connection, _ = listener.accept()
    with connection:
        reader = ClientHelloReader()
        while (left := deadline - time.monotonic()) > 0:
            connection.settimeout(left)
            chunk = connection.recv(4096)
            if not chunk:
                return None
            hello = reader.feed(chunk)
            if hello is not None:
                return hello
    return None


@pytest.mark.peer("openssl")
@pytest.mark.skipif(OPENSSL is None, reason="openssl is not on PATH")
def test_openssl_s_client_hello() -> None:
    assert OPENSSL is not None
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        client = subprocess.Popen(
            [
                OPENSSL,
                "s_client",
                "-connect",
                f"127.0.0.1:{port}",
                "-servername",
                "X.Example",
                "-alpn",
                "h2,http/1.1",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            hello = _capture_hello(listener)
        finally:
            client.kill()
            client.wait(timeout=DEADLINE_SECONDS)
    assert hello is not None
    assert hello.server_name == "x.example"
    assert hello.alpn == ("h2", "http/1.1")
    assert hello.legacy_version == 0x0303  # what every TLS 1.2+ client sends (RFC 8446 4.1.2)
