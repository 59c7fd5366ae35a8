"""A tiny client of the admin API for the CLI (standard library only: no event loop needed)."""

from __future__ import annotations

import json
import os
import ssl
import urllib.error
import urllib.parse
import urllib.request
from typing import Any


class AdminError(Exception):
    pass


class AdminClient:
    def __init__(self, url: str, token: str | None = None, timeout: float = 5.0,
                 tls: ssl.SSLContext | None = None) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.tls = tls  # for https: the CA to trust and the client certificate to show

    def request(self, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout, context=self.tls) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            try:
                detail = json.loads(exc.read()).get("error") or exc.reason
            except (json.JSONDecodeError, AttributeError):
                detail = exc.reason
            raise AdminError(f"{exc.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise AdminError(f"cannot reach {self.url}: {exc}") from None

    def status(self) -> Any:
        return self.request("GET", "/api/v1/status")

    def backend_action(self, pool: str, backend: str, action: str) -> Any:
        path = f"/api/v1/pools/{_seg(pool)}/backends/{_seg(backend)}/{action}"
        return self.request("POST", path)

    def set_weight(self, pool: str, backend: str, weight: int) -> Any:
        path = f"/api/v1/pools/{_seg(pool)}/backends/{_seg(backend)}/weight"
        return self.request("PUT", path, {"weight": weight})

    def reload(self) -> Any:
        return self.request("POST", "/api/v1/reload")

    def listener_list(self, listener: str, kind: str) -> list[str]:
        """A listener's allow or deny list in force."""
        return list(self.request("GET", f"/api/v1/listeners/{_seg(listener)}/{kind}"))

    def set_listener_list(self, listener: str, kind: str, prefixes: list[str]) -> list[str]:
        """Replace a listener's allow or deny list; returns the list now in force."""
        return list(self.request("PUT", f"/api/v1/listeners/{_seg(listener)}/{kind}", prefixes))

    def node_action(self, action: str) -> Any:
        """drain or resume: withdraw or announce this node's VIPs."""
        return self.request("POST", f"/api/v1/node/{_seg(action)}")


def _seg(value: str) -> str:
    return urllib.parse.quote(value, safe="")


def token_from(token_file: str | None) -> str | None:
    path = token_file or os.environ.get("POINTSMAN_TOKEN_FILE")
    if path:
        with open(path) as f:
            return f.read().strip()
    return os.environ.get("POINTSMAN_TOKEN")


def client_tls(url: str, cacert: str | None, cert: str | None, key: str | None) -> ssl.SSLContext | None:
    """The TLS context for an https admin URL: trust `cacert` (else the system's CAs) and show
    `cert`/`key` when the server asks for a client certificate (mutual TLS). AdminError when
    the files cannot be used or the URL is not https."""
    if cacert is None and cert is None and key is None:
        return None
    if not url.lower().startswith("https://"):
        raise AdminError(f"--cacert, --cert and --key are for an https:// admin URL, got {url}")
    if key is not None and cert is None:
        raise AdminError("--key needs --cert (the client certificate it belongs to)")
    try:
        context = ssl.create_default_context(cafile=cacert)
        if cert is not None:
            context.load_cert_chain(cert, key)
    except OSError as exc:  # a missing file, or PEM that is not a certificate or key
        raise AdminError(f"cannot use the TLS files: {exc.strerror or exc}") from None
    return context
