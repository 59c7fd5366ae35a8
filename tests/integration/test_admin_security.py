"""The admin plane secured: HTTPS and mutual TLS with certificates this test makes (openssl CLI),
the CLI's --cacert/--cert/--key (and their environment variables), read tokens, named tokens with
roles, the audit event naming the token, start-up errors that name the key, and `check`'s
warning about a clear-text admin bind."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from pointsman.admin.server import AdminSetupError, load_tokens, server_tls
from pointsman.app import AdminService
from pointsman.config.model import AdminConfig, AdminTlsConfig
from pointsman.telemetry.eventlog import EVENTS
from pointsman.telemetry.events import EventFilter
from tests.support import LOOPBACK, free_port, pointsman_process, running

pytestmark = [pytest.mark.timeout(90), pytest.mark.peer("openssl")]

CLI_TIMEOUT = 20.0
WRITE_SECRET = "alice-writes-0123"
READ_SECRET = "grafana-reads-4567"
OPENSSL_TIMEOUT = 20.0


# --- certificates made here --------------------------------------------------------------------------


@dataclass(frozen=True)
class Certs:
    ca: Path  # signs the server and the client "alice-laptop"
    server: Path
    server_key: Path
    client: Path
    client_key: Path
    stranger: Path  # a client certificate from another CA
    stranger_key: Path


def openssl(*args: str | Path) -> None:
    binary = shutil.which("openssl")
    if binary is None:
        pytest.skip("openssl is not installed (apt-get install openssl)")
    done = subprocess.run([binary, *map(str, args)], capture_output=True, text=True,
                          timeout=OPENSSL_TIMEOUT)
    assert done.returncode == 0, done.stderr


def make_certs(where: Path) -> Certs:
    """A CA, a server certificate for 127.0.0.1 and a client certificate it signed, and a
    self-signed stranger (P-256 keys: fast to make)."""
    key = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2")
    ca, ca_key = where / "ca.pem", where / "ca.key"
    openssl("req", "-x509", *key, "-keyout", ca_key, "-out", ca, "-subj", "/CN=pointsman test CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    signed = ("-CA", ca, "-CAkey", ca_key, "-addext", "basicConstraints=critical,CA:FALSE")
    openssl("req", "-x509", *key, *signed, "-keyout", where / "server.key", "-out", where / "server.pem",
            "-subj", f"/CN={LOOPBACK}", "-addext", f"subjectAltName=IP:{LOOPBACK}",
            "-addext", "extendedKeyUsage=serverAuth")
    openssl("req", "-x509", *key, *signed, "-keyout", where / "client.key", "-out", where / "client.pem",
            "-subj", "/CN=alice-laptop", "-addext", "extendedKeyUsage=clientAuth")
    openssl("req", "-x509", *key, "-keyout", where / "stranger.key", "-out", where / "stranger.pem",
            "-subj", "/CN=mallory", "-addext", "extendedKeyUsage=clientAuth")
    return Certs(ca, where / "server.pem", where / "server.key", where / "client.pem",
                 where / "client.key", where / "stranger.pem", where / "stranger.key")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


def client_context(certs: Certs, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certs.ca))
    if cert is not None:
        context.load_cert_chain(str(cert), str(key))
    return context


def config_text(admin: dict[str, Any], listen: str | None = None) -> str:
    return yaml.safe_dump({
        "listeners": [{"name": "lb", "bind": listen or f"{LOOPBACK}:{free_port()}", "pool": "p"}],
        "pools": [{"name": "p", "backends": [{"address": f"{LOOPBACK}:{free_port()}", "name": "a"},
                                             {"address": f"{LOOPBACK}:{free_port()}", "name": "b"}]}],
        "admin": admin,
        "workers": 1,
        "shutdown_grace": "0.2s",
    }, sort_keys=False)


def secrets(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "alice.token").write_text(WRITE_SECRET + "\n")
    (tmp_path / "grafana.token").write_text(READ_SECRET + "\n")
    return {"alice": str(tmp_path / "alice.token"), "grafana": str(tmp_path / "grafana.token")}


async def fetch(url: str, *, method: str = "GET", token: str | None = None,
                ssl_context: ssl.SSLContext | bool = True) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http, \
            http.request(method, url, headers=headers, ssl=ssl_context) as r:
        body = await r.json() if r.content_type == "application/json" else await r.text()
        return r.status, body


def tracebacks(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


# --- TLS and mutual TLS ------------------------------------------------------------------------------


async def test_https_serves_the_api_and_plain_http_gets_nothing(
        certs: Certs, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    admin = f"{LOOPBACK}:{free_port()}"
    tls = {"cert_file": str(certs.server), "key_file": str(certs.server_key)}
    tokens = secrets(tmp_path)
    config = config_text({"bind": admin, "tls": tls,
                          "tokens": [{"name": "alice", "file": tokens["alice"], "role": "write"}]})
    async with running(config) as runtime:
        [service] = [s for s in runtime.services if isinstance(s, AdminService)]
        assert service.server is not None and service.server.url == f"https://{admin}/"
        trusted = client_context(certs)
        assert await fetch(f"https://{admin}/healthz", ssl_context=trusted) == (200, "ok\n")
        code, doc = await fetch(f"https://{admin}/api/v1/status", ssl_context=trusted)
        assert code == 200 and doc["pools"][0]["name"] == "p"
        code, body = await fetch(f"https://{admin}/api/v1/pools/p/backends/a/drain", method="POST",
                                 token=WRITE_SECRET, ssl_context=trusted)
        assert (code, body["state"]) == (200, "draining")

        with pytest.raises(aiohttp.ClientError):  # plain HTTP to the TLS port
            await fetch(f"http://{admin}/healthz")
        with pytest.raises(aiohttp.ClientConnectorCertificateError):  # a client that trusts no CA
            await fetch(f"https://{admin}/healthz", ssl_context=ssl.create_default_context())
        assert runtime.pools["p"].member("b").machine.state.value == "up"
    assert tracebacks(caplog) == []


async def test_mutual_tls_admits_only_certificates_the_client_ca_signed(
        certs: Certs, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    admin = f"{LOOPBACK}:{free_port()}"
    tls = {"cert_file": str(certs.server), "key_file": str(certs.server_key),
           "client_ca_file": str(certs.ca)}
    tokens = secrets(tmp_path)
    config = config_text({"bind": admin, "tls": tls,
                          "tokens": [{"name": "alice", "file": tokens["alice"], "role": "write"}]})
    seen = EVENTS.ring.recorded
    async with running(config) as runtime:
        for refused in (client_context(certs),  # no certificate
                        client_context(certs, certs.stranger, certs.stranger_key)):  # wrong CA
            with pytest.raises((aiohttp.ClientError, ssl.SSLError)):
                await fetch(f"https://{admin}/healthz", ssl_context=refused)
        mine = client_context(certs, certs.client, certs.client_key)
        assert await fetch(f"https://{admin}/healthz", ssl_context=mine) == (200, "ok\n")
        code, body = await fetch(f"https://{admin}/api/v1/pools/p/backends/a/drain", method="POST",
                                 token=WRITE_SECRET, ssl_context=mine)
        assert (code, body["state"]) == (200, "draining")
        assert runtime.pools["p"].member("a").machine.state.value == "draining"
    [audit] = [e.event for e in EVENTS.ring.query(EventFilter(after=seen, kinds=frozenset({"admin"})))]
    assert (audit.token, audit.client_cert, audit.status) == ("alice", "alice-laptop", 200)
    assert tracebacks(caplog) == []


# --- tokens: read tokens, roles, the audit ------------------------------------------------------------


READS = ("/api/v1/status", "/metrics", "/api/v1/events", "/openapi.json", "/api/v1/node")


async def test_reads_need_a_token_once_a_read_token_is_configured(tmp_path: Path) -> None:
    admin = f"{LOOPBACK}:{free_port()}"
    tokens = secrets(tmp_path)
    config = config_text({"bind": admin, "token_file": tokens["alice"],
                          "read_token_file": tokens["grafana"]})
    async with running(config):
        url = f"http://{admin}"
        for open_path in ("/healthz", "/readyz", "/"):
            code, _ = await fetch(url + open_path)
            assert code in (200, 503), open_path  # readyz: the backends are not listening
        for path in READS:
            assert (await fetch(url + path))[0] == 401, path
            assert (await fetch(url + path, token="nope"))[0] == 401, path
            assert (await fetch(url + path, token=READ_SECRET))[0] == 200, path
            assert (await fetch(url + path, token=WRITE_SECRET))[0] == 200, path  # write implies read
        code, body = await fetch(url + "/api/v1/status")
        assert body == {"error": "a bearer token is required"}
        _, spec = await fetch(url + "/openapi.json", token=READ_SECRET)
        assert spec["paths"]["/api/v1/status"]["get"]["security"] == [{"bearer": []}]
        assert "security" not in spec["paths"]["/healthz"]["get"]


async def test_roles_are_enforced_and_the_audit_names_the_token(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pointsman.audit")
    admin = f"{LOOPBACK}:{free_port()}"
    tokens = secrets(tmp_path)
    config = config_text({"bind": admin, "tokens": [
        {"name": "alice", "file": tokens["alice"], "role": "write"},
        {"name": "grafana", "file": tokens["grafana"], "role": "read"}]})
    seen = EVENTS.ring.recorded
    async with running(config) as runtime:
        url = f"http://{admin}"
        drain = url + "/api/v1/pools/p/backends/a/drain"
        assert (await fetch(url + "/api/v1/status", token=READ_SECRET))[0] == 200
        code, body = await fetch(drain, method="POST", token=READ_SECRET)
        assert (code, body) == (403, {"error": "token 'grafana' may only read"})
        assert runtime.pools["p"].member("a").machine.state.value == "up"
        code, _ = await fetch(drain, method="POST", token=WRITE_SECRET)
        assert code == 200
        assert runtime.pools["p"].member("a").machine.state.value == "draining"
        code, _ = await fetch(drain, method="POST")
        assert code == 401
        code, doc = await fetch(url + f"/api/v1/events?kind=admin&after={seen}", token=READ_SECRET)
        assert code == 200

    served = [(e["token"], e["status"], e["result"], e["pool"], e["backend"]) for e in doc["events"]]
    assert served == [("grafana", 403, "token 'grafana' may only read", "p", "a"),
                      ("alice", 200, "ok", "p", "a"),
                      (None, 401, "a bearer token is required", "p", "a")]
    assert all(e["client"].startswith(f"{LOOPBACK}:") and e["method"] == "POST" for e in doc["events"])
    assert doc["events"][1]["detail"] == {"pool": "p", "backend": "a", "state": "draining", "active": 0}
    logged = [json.loads(r.getMessage()) for r in caplog.records if r.name == "pointsman.audit"]
    assert [(line["token"], line["status"]) for line in logged] == [
        ("grafana", 403), ("alice", 200), (None, 401)]
    assert [line["seq"] for line in logged] == [e["seq"] for e in doc["events"]]
    assert [r.levelname for r in caplog.records if r.name == "pointsman.audit"] == [
        "WARNING", "INFO", "WARNING"]


# --- start-up errors and check -----------------------------------------------------------------------


def test_unusable_token_and_tls_files_are_named_at_start(certs: Certs, tmp_path: Path) -> None:
    empty = tmp_path / "empty.token"
    empty.write_text("\n")
    cases: list[tuple[dict[str, Any], str]] = [
        ({"token_file": str(tmp_path / "nope")}, f"admin.token_file {tmp_path / 'nope'}: No such file"),
        ({"read_token_file": str(empty)}, f"admin.read_token_file {empty} is empty"),
        ({"tokens": [{"name": "x", "file": str(certs.server_key), "role": "read"}]},
         "admin.tokens[0].file"),
    ]
    for admin, message in cases:
        with pytest.raises(AdminSetupError, match=re.escape(message)):
            load_tokens(AdminConfig.model_validate(admin))
    with pytest.raises(AdminSetupError, match=re.escape("admin.tls.cert_file")):
        server_tls(AdminTlsConfig(cert_file=str(certs.ca), key_file=str(certs.server_key)))
    with pytest.raises(AdminSetupError, match=re.escape("admin.tls.client_ca_file")):
        server_tls(AdminTlsConfig(cert_file=str(certs.server), key_file=str(certs.server_key),
                                  client_ca_file=str(tmp_path / "nope.pem")))


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("POINTSMAN_")}
    return subprocess.run([sys.executable, "-m", "pointsman", *args], capture_output=True, text=True,
                          timeout=CLI_TIMEOUT, env={**clean, **(env or {})})


def test_a_bad_token_file_stops_pointsman_run_with_the_key_named(tmp_path: Path) -> None:
    path = tmp_path / "pointsman.yaml"
    path.write_text(config_text({"bind": f"{LOOPBACK}:{free_port()}",
                                 "tokens": [{"name": "x", "file": str(tmp_path / "gone"), "role": "write"}]}))
    done = cli("run", str(path))
    assert done.returncode == 1
    assert f"cannot start: admin.tokens[0].file {tmp_path / 'gone'}: No such file" in done.stderr
    assert "Traceback" not in done.stderr


def test_check_warns_of_a_non_loopback_admin_bind_without_tls(certs: Certs, tmp_path: Path) -> None:
    tokens = secrets(tmp_path)
    path = tmp_path / "pointsman.yaml"
    path.write_text(config_text({"bind": "0.0.0.0:9900", "token_file": tokens["alice"]}))
    done = cli("check", str(path))
    assert done.returncode == 0 and done.stdout.startswith("ok lb:")
    assert "warning: admin.bind 0.0.0.0:9900 is not a loopback address and admin.tls is not set" \
        in done.stderr
    path.write_text(config_text({"bind": "0.0.0.0:9900", "token_file": tokens["alice"],
                                 "tls": {"cert_file": str(certs.server), "key_file": str(certs.server_key)}}))
    done = cli("check", str(path))
    assert (done.returncode, done.stderr) == (0, "")
    path.write_text(config_text({"bind": "0.0.0.0:9900"}))  # no token at all: still refused
    done = cli("check", str(path))
    assert done.returncode == 1 and "required when admin.bind is not a loopback" in done.stderr


# --- the CLI over mutual TLS ---------------------------------------------------------------------------


@pytest.fixture
def mtls_pointsman(certs: Certs, tmp_path: Path) -> Iterator[str]:
    """`pointsman run` with its admin API on mutual TLS; yields the https URL."""
    admin = f"{LOOPBACK}:{free_port()}"
    tokens = secrets(tmp_path)
    tls = {"cert_file": str(certs.server), "key_file": str(certs.server_key),
           "client_ca_file": str(certs.ca)}
    text = config_text({"bind": admin, "tls": tls,
                        "tokens": [{"name": "alice", "file": tokens["alice"], "role": "write"}]})
    with pointsman_process(text, tmp_path) as proc:
        proc.wait_lines(lambda lines: any(line.startswith("admin api") for line in lines))
        assert f"admin api and status page on https://{admin}/" in proc.lines
        yield f"https://{admin}"
        assert "Traceback" not in proc.stderr()


def test_the_cli_speaks_mutual_tls(certs: Certs, tmp_path: Path, mtls_pointsman: str) -> None:
    url = mtls_pointsman
    tls = ["--cacert", str(certs.ca), "--cert", str(certs.client), "--key", str(certs.client_key)]
    token = ["--token-file", str(tmp_path / "alice.token")]

    done = cli("status", "--admin", url, *tls, *token)
    assert done.returncode == 0, done.stderr
    assert "a" in done.stdout and "b" in done.stdout

    done = cli("drain", "p", "a", "--admin", url, *tls, *token)
    assert (done.returncode, done.stdout) == (0, "p/a: draining (0 active)\n"), done.stderr

    env = {"POINTSMAN_ADMIN": url, "POINTSMAN_CACERT": str(certs.ca), "POINTSMAN_CERT": str(certs.client),
           "POINTSMAN_KEY": str(certs.client_key), "POINTSMAN_TOKEN": WRITE_SECRET}
    done = cli("enable", "p", "a", env=env)
    assert (done.returncode, done.stdout) == (0, "p/a: up (0 active)\n"), done.stderr

    # Without a client certificate the server refuses the handshake; the CLI says it cannot reach.
    done = cli("drain", "p", "a", "--admin", url, "--cacert", str(certs.ca), *token)
    assert done.returncode == 1 and "cannot reach" in done.stderr, done.stderr
    done = cli("drain", "p", "a", "--admin", url.replace("https", "http"), *tls, *token)
    assert done.returncode == 1 and "are for an https:// admin URL" in done.stderr
    done = cli("drain", "p", "a", "--admin", url, "--cacert", str(certs.ca), "--key",
               str(certs.client_key), *token)
    assert done.returncode == 1 and "--key needs --cert" in done.stderr
    done = cli("drain", "p", "a", "--admin", url, "--cacert", str(tmp_path / "nope.pem"), *token)
    assert done.returncode == 1 and "cannot use the TLS files" in done.stderr
    assert "Traceback" not in done.stderr
