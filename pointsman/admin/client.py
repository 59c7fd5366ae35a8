"""A tiny client of the admin API for the CLI (standard library only: no event loop needed)."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from typing import Any


class AdminError(Exception):
    """A call failed: `str()` is the one-line reason; `details` are the API's reason lines (every
    config error of a refused reload) and `hint` what to do about it, each shown on its own line."""

    def __init__(self, message: str, status: int | None = None, details: tuple[str, ...] = (),
                 hint: str = "") -> None:
        super().__init__(message)
        self.status, self.details, self.hint = status, details, hint

    def lines(self) -> list[str]:
        out = [f"error: {self}", *(f"  {line}" for line in self.details)]
        return [*out, f"hint: {self.hint}"] if self.hint else out


# Shown with a 401; `token_note` says why no token was sent when one was meant to be.
TOKEN_HINT = ("give the admin token: --token-file FILE, -c CONFIG (its admin.token_file), "
              "or POINTSMAN_TOKEN_FILE")


class AdminClient:
    def __init__(self, url: str, token: str | None = None, timeout: float = 5.0,
                 token_note: str | None = None, tls: ssl.SSLContext | None = None) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.token_note = token_note  # why no token could be read, if one was meant to be sent
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
            raise self._http_error(exc.code, str(exc.reason), exc.read()) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise AdminError(f"cannot reach the admin API at {self.url}: {reason}",
                             hint="is pointsman running there? --admin URL or -c CONFIG "
                                  "names another node") from None

    def _http_error(self, code: int, reason: str, body: bytes) -> AdminError:
        """The API's own words: its `error`, every line of its `errors`, and a hint for a 401."""
        try:
            doc = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            doc = None
        doc = doc if isinstance(doc, dict) else {}
        errors = doc.get("errors")
        details = tuple(str(e) for e in errors) if isinstance(errors, list) else ()
        said = doc.get("error")
        hint = ""
        if code == 401:
            sent = "the token sent was refused" if self.token else "no token was sent"
            if self.token_note:
                sent = self.token_note
            hint = f"{sent}; {TOKEN_HINT}"
        return AdminError(f"{code} {reason}" + (f": {said}" if said else ""), code, details, hint)

    def status(self) -> Any:
        return self.request("GET", "/api/v1/status")

    def backend_action(self, pool: str, backend: str, action: str,
                       options: dict[str, Any] | None = None) -> Any:
        """drain ({"timeout": "60s"}), maintenance ({"close": true}) or enable."""
        path = f"/api/v1/pools/{_seg(pool)}/backends/{_seg(backend)}/{action}"
        return self.request("POST", path, options or None)

    def add_backend(self, pool: str, entry: dict[str, Any]) -> Any:
        """Add a backend ({address, name, weight, backup}) to a running pool."""
        return self.request("POST", f"/api/v1/pools/{_seg(pool)}/backends", entry)

    def remove_backend(self, pool: str, backend: str) -> Any:
        """Drain a backend and remove it once its connections end ("removed": false until)."""
        return self.request("DELETE", f"/api/v1/pools/{_seg(pool)}/backends/{_seg(backend)}")

    def set_weight(self, pool: str, backend: str, weight: int) -> Any:
        path = f"/api/v1/pools/{_seg(pool)}/backends/{_seg(backend)}/weight"
        return self.request("PUT", path, {"weight": weight})

    def reload(self) -> Any:
        try:
            return self.request("POST", "/api/v1/reload")
        except AdminError as exc:
            if exc.status != 422:
                raise
            raise AdminError("reload refused, the running config stays (422)", 422,
                             exc.details) from None

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
