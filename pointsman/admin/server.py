"""The admin listener (aiohttp): health, readiness, metrics, the status API and page, the event
log, and the operator calls (drain, enable, maintenance, weight, add and remove backends,
reload, node drain/resume). Calls on backends go to the node's `changes` (`node.changes`), which
keeps them across reloads and, with a state file, restarts.

One middleware guards every route, so routes added later inherit it: it decides from the method
and path alone whether a call is open, a read or a write (`auth.access_for`), checks the bearer
token as bytes (`auth.Tokens`), turns every client mistake into a 4xx with a JSON reason, and
writes an audit event for every mutating call, refused or not. HTTPS, and mutual TLS when a
client CA is configured, come from `admin.tls`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import sys
from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from pointsman.admin.acl import add_acl_routes
from pointsman.admin.auth import Access, Credential, Tokens, access_for, check_secret, token_sources
from pointsman.admin.body import MAX_BODY_BYTES, BodyError, decode_json
from pointsman.admin.metrics import registry_for
from pointsman.admin.openapi import openapi_document
from pointsman.admin.status import status
from pointsman.config.addresses import resolve
from pointsman.config.durations import parse_duration
from pointsman.config.model import MAX_DRAIN_TIMEOUT, AdminConfig, AdminTlsConfig, BackendConfig
from pointsman.node.changes import BackendExists
from pointsman.pool.pool import Member, UnknownBackend, UnknownPool
from pointsman.pool.state import IllegalTransition
from pointsman.proxy.sockets import listen_socket
from pointsman.telemetry.eventlog import EVENTS, record_admin
from pointsman.telemetry.events import AdminEvent, dicts, parse_filter

if TYPE_CHECKING:
    from pointsman.node.view import NodeView

log = logging.getLogger("pointsman.admin")

ACTIONS = ("drain", "enable", "maintenance")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
AUDITED_BODY_BYTES = 2048  # a successful call's answer up to this size goes into its audit event


class AdminSetupError(RuntimeError):
    """A token or TLS file the admin section names cannot be used (the message names the key)."""


class AdminServer:
    def __init__(self, runtime: NodeView, config: AdminConfig) -> None:
        self.runtime = runtime
        self.config = config
        self.tokens = load_tokens(config)
        self.tls = server_tls(config.tls) if config.tls is not None else None
        self.registry = registry_for(runtime)
        self._openapi = openapi_document(read_auth=self.tokens.reads_need_token,
                                         write_auth=self.tokens.writes_need_token)
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls is not None else 'http'}://{self.config.bind}/"

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard], client_max_size=MAX_BODY_BYTES)
        app.router.add_get("/", self.page)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/openapi.json", self.openapi)
        app.router.add_get("/api/v1/status", self.status)
        app.router.add_get("/api/v1/events", self.events)
        # The action is part of the route, so POST .../weight is a 405 that allows PUT only.
        app.router.add_post("/api/v1/pools/{pool}/backends/{backend}/{action:drain|enable|maintenance}",
                            self.action)
        app.router.add_put("/api/v1/pools/{pool}/backends/{backend}/weight", self.weight)
        app.router.add_post("/api/v1/pools/{pool}/backends", self.add_backend)
        app.router.add_delete("/api/v1/pools/{pool}/backends/{backend}", self.remove_backend)
        app.router.add_post("/api/v1/reload", self.reload)
        app.router.add_get("/api/v1/node", self.node)
        app.router.add_post("/api/v1/node/{action:drain|resume}", self.node_action)
        add_acl_routes(app, self.runtime)  # GET/PUT /api/v1/listeners/{listener}/{allow|deny}
        return app

    async def start(self) -> None:
        # aiohttp logs a request it cannot parse (a control byte in a header...) as an error with
        # a traceback; those are the client's mistakes and get one line (see _ServerLog).
        self._runner = web.AppRunner(self.app(), access_log=None,
                                     logger=cast(logging.Logger, _ServerLog(log, {})))
        await self._runner.setup()
        bind = self.config.bind
        site: web.BaseSite
        if bind.is_ip:  # bound here: no name lookup, no resolver threads (loop.PassingThreads)
            site = web.SockSite(self._runner, listen_socket(bind, backlog=128),
                                ssl_context=self.tls)
        else:  # a name binds every address it has, as before
            site = web.TCPSite(self._runner, bind.host, bind.port, reuse_address=True,
                               ssl_context=self.tls)
        await site.start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # --- the guard: access, errors, audit --------------------------------------------------------------

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        access = access_for(request.method, request.path)
        authorization = [value for name, value in request.raw_headers
                         if name.lower() == b"authorization"]
        verdict = self.tokens.check(access, authorization)
        if verdict.allowed:
            response = await self._answer(request, handler)
        else:
            response = _error(verdict.status, verdict.reason)
            if verdict.status == 401:
                response.headers["WWW-Authenticate"] = 'Bearer realm="pointsman"'
        if access is Access.WRITE:
            self._audit(request, verdict.token, response)
        return response

    async def _answer(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Client mistakes become 4xx with a JSON reason; only a bug of ours is a 500."""
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            headers = {k: v for k, v in exc.headers.items()
                       if k.lower() not in ("content-type", "content-length")}
            return _error(exc.status, exc.reason, headers)
        except BodyError as exc:
            return _error(exc.status, exc.reason)
        except (UnknownBackend, UnknownPool) as exc:
            return _error(404, str(exc))  # names the pool's backends (or the node's pools)
        except (IllegalTransition, BackendExists) as exc:
            return _error(409, str(exc))
        except ValueError as exc:
            return _error(400, str(exc))
        except Exception:  # a bug of ours: logged with its traceback, answered (and audited) as 500
            log.exception("admin %s %s failed", request.method, request.path)
            return _error(500, "internal error (logged)")

    def _audit(self, request: web.Request, token: str | None, response: web.StreamResponse) -> None:
        """Who (client address, token name, certificate), what (method, path), and the result:
        "ok" with the answer as detail, or the error the client was given."""
        match = request.match_info
        answer = _answer_json(response)
        ok = response.status < 400
        result = "ok" if ok else str(answer.get("error") or response.reason)
        record_admin(AdminEvent(
            at=EVENTS.clock(), client=_client_address(request), token=token,
            method=request.method, path=request.path, status=response.status, result=result,
            pool=match.get("pool"), backend=match.get("backend"),
            client_cert=_client_cert_name(request), detail=answer if ok else {}))

    # --- reads ---------------------------------------------------------------------------------------

    async def page(self, request: web.Request) -> web.Response:
        html = resources.files("pointsman.admin").joinpath("status.html").read_text()
        return web.Response(text=html, content_type="text/html")

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(self, request: web.Request) -> web.Response:
        """Ready when every listener is served (with workers: by at least one live worker),
        every pool has a backend to send to, no supervised task has failed, and the node is not
        drained (so a load balancer in front, or Kubernetes, stops sending to it too)."""
        readiness = self.runtime.readiness()
        return web.json_response(readiness.as_dict(), status=200 if readiness.ready else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        """Rendered in a thread: thousands of samples take prometheus_client a good fraction of
        a second, which on the loop would stall every connection (the collector reads copies
        of the node's tables and plain counters, so a concurrent change only shifts a figure)."""
        body = await asyncio.to_thread(generate_latest, self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(self._openapi)

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(await asyncio.to_thread(status, self.runtime))

    async def events(self, request: web.Request) -> web.Response:
        """The recent events, oldest first, filtered by pool, backend, kind, since, after, limit."""
        selection = parse_filter(request.query)  # ValueError: 400 with its reason
        entries = EVENTS.ring.query(selection)
        return web.json_response({"events": dicts(entries), **EVENTS.ring.statistics()})

    # --- operator calls ------------------------------------------------------------------------------

    async def action(self, request: web.Request) -> web.Response:
        """drain (body, optional: {"timeout": "60s"}: close what is left then), maintenance
        (optional: {"close": true}: close its connections now) and enable."""
        action = request.match_info["action"]
        if action not in ACTIONS:
            return _error(404, f"unknown action {action!r}; expected one of {ACTIONS}")
        pool, backend = request.match_info["pool"], request.match_info["backend"]
        options = await _options(request, _ACTION_OPTIONS[action])
        changes = self.runtime.changes
        answer: dict[str, Any] = {}
        if action == "drain":
            timeout = _duration(options.get("timeout"), "timeout")
            member = changes.drain(pool, backend, timeout)
            if timeout is not None:
                answer["timeout"] = timeout
        elif action == "maintenance":
            close = options.get("close", False)
            if not isinstance(close, bool):
                return _error(400, 'close must be true or false, e.g. {"close": true}')
            member, closed = changes.maintenance(pool, backend, close)
            if closed is not None:
                answer["closed"] = closed
        else:
            member = changes.enable(pool, backend)
        return web.json_response({**self._backend_answer(pool, member), **answer})

    def _backend_answer(self, pool_name: str, member: Member) -> dict[str, Any]:
        pool = self.runtime.pools[pool_name]
        stats = dict(zip((m.id for m in pool.members()), self.runtime.backend_stats(pool),
                         strict=True))
        found = stats.get(member.id)
        return {"pool": pool.name, "backend": member.id, "state": member.machine.state.value,
                "active": found.active if found is not None else 0}

    async def weight(self, request: web.Request) -> web.Response:
        try:
            body = await read_json(request)
        except BodyError as exc:
            if exc.status != 400:
                raise
            return _error(400, f'{exc.reason}: expected a JSON body such as {{"weight": 3}}')
        weight = body.get("weight") if isinstance(body, dict) else None
        if not isinstance(weight, int) or isinstance(weight, bool):
            return _error(400, 'expected a JSON body such as {"weight": 3}')
        member = self.runtime.changes.set_weight(request.match_info["pool"],
                                                 request.match_info["backend"], weight)
        return web.json_response({"pool": request.match_info["pool"], "backend": member.id,
                                  "weight": weight})

    async def add_backend(self, request: web.Request) -> web.Response:
        """{address, name, weight, backup, health_check_address}: validated as a config entry
        is, the address resolved once (as the loader does), then applied as config: with
        workers, they receive it as one."""
        pool = request.match_info["pool"]
        if pool not in self.runtime.pools:
            raise UnknownPool(pool, tuple(self.runtime.pools))
        body = await read_json(request)
        if not isinstance(body, dict):
            return _error(400, 'expected a JSON object such as {"address": "10.0.0.9:8080", '
                               '"name": "app-9", "weight": 1}')
        try:
            entry = BackendConfig.model_validate(body)
        except ValidationError as exc:
            return _error(400, "; ".join(_field_error(err) for err in exc.errors()))
        try:
            entry = await asyncio.to_thread(_resolved, entry)
        except ValueError as exc:
            return _error(400, f"address: {exc}")
        member, errors = await self.runtime.changes.add(pool, entry)
        answer = {**self._backend_answer(pool, member), "address": str(member.config.address),
                  "backup": member.config.backup}
        if errors:
            return web.json_response({**answer, "errors": errors,
                                      "error": f"added, but a worker did not apply it: {errors[0]}"},
                                     status=500)
        return web.json_response(answer, status=201)

    async def remove_backend(self, request: web.Request) -> web.Response:
        """Drain the backend, then remove it once its connections end (or its pool's
        drain_timeout closes them): 200 when it is gone, 202 while it drains."""
        pool = request.match_info["pool"]
        member, removed = await self.runtime.changes.remove(pool, request.match_info["backend"])
        if removed:
            return web.json_response({"pool": pool, "backend": member.id, "removed": True})
        answer = self._backend_answer(pool, member)
        return web.json_response({**answer, "removed": False}, status=202)

    async def reload(self, request: web.Request) -> web.Response:
        errors = await self.runtime.reload()
        if errors:
            return web.json_response({"reloaded": False, "errors": errors,
                                      "error": f"reload refused: {errors[0]}"}, status=422)
        return web.json_response({"reloaded": True})

    # --- the node as a whole (BGP announcement of its VIPs) -----------------------------------------

    async def node(self, request: web.Request) -> web.Response:
        bgp = self.runtime.bgp
        return web.json_response({"bgp": bgp.statistics() if bgp is not None else None})

    async def node_action(self, request: web.Request) -> web.Response:
        """drain: withdraw every VIP (connections already here go on); resume: announce again."""
        bgp = self.runtime.bgp
        if bgp is None:
            return _error(409, "bgp is not configured: this node announces no VIP to withdraw")
        action = request.match_info["action"]
        acknowledged = await (bgp.drain() if action == "drain" else bgp.resume())
        return web.json_response({"drained": bgp.drained, "acknowledged": acknowledged,
                                  "bgp": bgp.statistics()})


_ACTION_OPTIONS = {"drain": ("timeout",), "maintenance": ("close",), "enable": ()}


async def _options(request: web.Request, allowed: tuple[str, ...]) -> dict[str, Any]:
    """An action's optional JSON object body ({} without a body)."""
    if not request.can_read_body:
        return {}
    body = await read_json(request)
    if not isinstance(body, dict):
        raise BodyError(400, f"expected a JSON object with {' or '.join(allowed) or 'nothing'}")
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise BodyError(400, f"unknown key {unknown[0]!r}; this call takes "
                             f"{', '.join(allowed) or 'no keys'}")
    return body


def _duration(value: object, key: str) -> float | None:
    """A duration as the config writes it ("60s", "2m", 90), or None when absent."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f'{key}: expected a duration such as "60s"')
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        raise ValueError(f"{key}: {exc}") from None
    if not seconds <= MAX_DRAIN_TIMEOUT:  # NaN too
        raise ValueError(f"{key}: at most {MAX_DRAIN_TIMEOUT / 86400:g} days, got {value!r}")
    return seconds


def _resolved(entry: BackendConfig) -> BackendConfig:
    update: dict[str, Any] = {"address": resolve(entry.address)}
    if entry.health_check_address is not None:
        update["health_check_address"] = resolve(entry.health_check_address)
    return entry.model_copy(update=update)


def _field_error(err: Any) -> str:
    where = ".".join(str(part) for part in err["loc"])
    message = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        message = "unknown key"
    elif err["type"] == "missing":
        message = "required"
    return f"{where}: {message}" if where else message


# --- helpers -------------------------------------------------------------------------------------------


async def read_json(request: web.Request) -> Any:
    """The request's JSON body, within MAX_BODY_BYTES and MAX_JSON_DEPTH, or BodyError."""
    length = request.content_length
    if length is not None and length > MAX_BODY_BYTES:
        raise BodyError(413, f"the body is {length} bytes; the limit is {MAX_BODY_BYTES}")
    try:
        data = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise BodyError(413, f"the body is larger than {MAX_BODY_BYTES} bytes") from None
    except (HttpProcessingError, OSError) as exc:  # a broken chunked body, a reset mid-body
        raise BodyError(400, f"the body could not be read: {exc.__class__.__name__}") from None
    return decode_json(data)


def _error(status_code: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status_code, headers=headers)


def _answer_json(response: web.StreamResponse) -> dict[str, Any]:
    """The JSON object a (small) response carries, else {}."""
    body = getattr(response, "body", None)
    if not isinstance(body, bytes) or len(body) > AUDITED_BODY_BYTES:
        return {}
    try:
        value = json.loads(body)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _client_address(request: web.Request) -> str:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = str(peer[0]), peer[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return request.remote or "unknown"


def _client_cert_name(request: web.Request) -> str | None:
    """The subject common name of a verified TLS client certificate (mutual TLS), if any."""
    if request.transport is None:
        return None
    cert = request.transport.get_extra_info("peercert")
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


def load_tokens(config: AdminConfig) -> Tokens:
    """Read every token file now (at start), so a missing or bad one stops pointsman with a
    message naming its key, instead of refusing every call later."""
    credentials = []
    for name, role, path, key in token_sources(config):
        try:
            raw = Path(path).read_bytes()
            credentials.append(Credential.of(name, role, check_secret(raw, f"{key} {path}")))
        except OSError as exc:
            raise AdminSetupError(f"{key} {path}: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise AdminSetupError(str(exc)) from None
    return Tokens(credentials)


def server_tls(config: AdminTlsConfig) -> ssl.SSLContext:
    """HTTPS (TLS 1.2 or later); with a client CA, mutual TLS (a client certificate required)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(config.cert_file, config.key_file)
    except OSError as exc:  # ssl.SSLError is an OSError too
        raise AdminSetupError(f"admin.tls.cert_file {config.cert_file} with key_file "
                              f"{config.key_file}: {exc.strerror or exc}") from None
    if config.client_ca_file is not None:
        try:
            context.load_verify_locations(cafile=config.client_ca_file)
        except OSError as exc:
            raise AdminSetupError(f"admin.tls.client_ca_file {config.client_ca_file}: "
                                  f"{exc.strerror or exc}") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class _ServerLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """aiohttp's server logger, minus tracebacks for requests it could not parse: those are the
    client's fault (a control byte in a header, a bad method), not ours, and anyone who reaches
    the port could otherwise fill the log with them. Everything else passes unchanged."""

    def exception(self, msg: object, *args: object, exc_info: Any = True, **kwargs: Any) -> None:
        exc = exc_info if isinstance(exc_info, BaseException) else sys.exc_info()[1]
        if isinstance(exc, HttpProcessingError):
            # The first line only: the rest echoes the client's bytes (perhaps a token).
            reason = str(exc.message).split("\n", 1)[0].rstrip(": ")[:200]
            self.debug("bad request refused (%s %s): %s", exc.code, type(exc).__name__, reason)
            return
        self.error(msg, *args, exc_info=exc_info, **kwargs)

