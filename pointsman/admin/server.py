"""The admin listener (aiohttp): health, readiness, metrics, the status API and page, and the
operator calls (drain, enable, maintenance, weight, reload).

Reads are open; every mutating call needs `Authorization: Bearer <token>` when a token file is
configured (a non-loopback bind without one is refused by the config check).
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pointsman.admin.metrics import registry_for
from pointsman.admin.openapi import OPENAPI
from pointsman.admin.status import status
from pointsman.config.model import AdminConfig
from pointsman.pool.pool import UnknownBackend
from pointsman.pool.state import IllegalTransition

if TYPE_CHECKING:
    from pointsman.runtime import Runtime

log = logging.getLogger("pointsman.admin")

ACTIONS = ("drain", "enable", "maintenance")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class AdminServer:
    def __init__(self, runtime: Runtime, config: AdminConfig) -> None:
        self.runtime = runtime
        self.config = config
        self.token = _read_token(config.token_file)
        self.registry = registry_for(runtime)
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors])
        app.router.add_get("/", self.page)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/openapi.json", self.openapi)
        app.router.add_get("/api/v1/status", self.status)
        # The action is part of the route, so POST .../weight is a 405 that allows PUT only.
        app.router.add_post("/api/v1/pools/{pool}/backends/{backend}/{action:drain|enable|maintenance}",
                            self.action)
        app.router.add_put("/api/v1/pools/{pool}/backends/{backend}/weight", self.weight)
        app.router.add_post("/api/v1/reload", self.reload)
        app.router.add_get("/api/v1/node", self.node)
        app.router.add_post("/api/v1/node/{action:drain|resume}", self.node_action)
        return app

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        bind = self.config.bind
        site = web.TCPSite(self._runner, bind.host, bind.port, reuse_address=True)
        await site.start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # --- middleware and auth -----------------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Client mistakes become 4xx with a JSON reason; nothing becomes a 500 by accident."""
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except UnknownBackend as exc:
            return _error(404, str(exc))  # names the pool's backends
        except (IllegalTransition, ValueError) as exc:
            return _error(409 if isinstance(exc, IllegalTransition) else 400, str(exc))

    def _authorised(self, request: web.Request) -> bool:
        if self.token is None:
            return True
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip(), self.token)

    # --- reads ---------------------------------------------------------------------------------------

    async def page(self, request: web.Request) -> web.Response:
        html = resources.files("pointsman.admin").joinpath("status.html").read_text()
        return web.Response(text=html, content_type="text/html")

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(self, request: web.Request) -> web.Response:
        """Ready when every listener accepts, every pool has a backend to send to, and the node
        is not drained (so a load balancer in front, or Kubernetes, stops sending to it too)."""
        listeners = self.runtime.listeners.values()
        not_accepting = [lst.name for lst in listeners if not lst.accepting]
        empty = [p.name for p in self.runtime.pools.values() if p.snapshot.available == 0]
        fleet, bgp = self.runtime.fleet, self.runtime.bgp
        drained = (fleet is not None and fleet.draining is not None) or (
            bgp is not None and bgp.drained)
        if not_accepting or empty or drained:
            return web.json_response({"ready": False, "not_accepting": not_accepting,
                                      "pools_without_backends": empty, "drained": drained},
                                     status=503)
        return web.json_response({"ready": True})

    async def metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(OPENAPI)

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(status(self.runtime))

    # --- operator calls ------------------------------------------------------------------------------

    async def action(self, request: web.Request) -> web.Response:
        if not self._authorised(request):
            return _error(401, "a bearer token is required")
        action = request.match_info["action"]
        if action not in ACTIONS:
            return _error(404, f"unknown action {action!r}; expected one of {ACTIONS}")
        pool = self.runtime.pools.get(request.match_info["pool"])
        if pool is None:
            return _error(404, _no_pool(request.match_info["pool"], self.runtime.pools))
        backend = pool.find(request.match_info["backend"]).id  # a name or a host:port
        getattr(pool, action)(backend, f"operator {action} via admin api")
        member = pool.member(backend)
        return web.json_response({"pool": pool.name, "backend": backend,
                                  "state": member.machine.state.value,
                                  "active": member.stats.active})

    async def weight(self, request: web.Request) -> web.Response:
        if not self._authorised(request):
            return _error(401, "a bearer token is required")
        pool = self.runtime.pools.get(request.match_info["pool"])
        if pool is None:
            return _error(404, _no_pool(request.match_info["pool"], self.runtime.pools))
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, 'expected a JSON body such as {"weight": 3}')
        weight = body.get("weight") if isinstance(body, dict) else None
        if not isinstance(weight, int) or isinstance(weight, bool):
            return _error(400, 'expected a JSON body such as {"weight": 3}')
        backend = pool.find(request.match_info["backend"]).id
        pool.set_weight(backend, weight)
        return web.json_response({"pool": pool.name, "backend": backend, "weight": weight})

    async def reload(self, request: web.Request) -> web.Response:
        if not self._authorised(request):
            return _error(401, "a bearer token is required")
        errors = await self.runtime.reload()
        if errors:
            return web.json_response({"reloaded": False, "errors": errors}, status=422)
        return web.json_response({"reloaded": True})


    # --- the node as a whole (BGP announcement of its VIPs) -----------------------------------------

    async def node(self, request: web.Request) -> web.Response:
        bgp = self.runtime.bgp
        return web.json_response({"bgp": bgp.statistics() if bgp is not None else None})

    async def node_action(self, request: web.Request) -> web.Response:
        """drain: withdraw every VIP (connections already here go on); resume: announce again."""
        if not self._authorised(request):
            return _error(401, "a bearer token is required")
        bgp = self.runtime.bgp
        if bgp is None:
            return _error(409, "bgp is not configured: this node announces no VIP to withdraw")
        action = request.match_info["action"]
        acknowledged = await (bgp.drain() if action == "drain" else bgp.resume())
        return web.json_response({"drained": bgp.drained, "acknowledged": acknowledged,
                                  "bgp": bgp.statistics()})


def _no_pool(name: str, pools: Mapping[str, object]) -> str:
    return f"no pool {name!r}; pools: {', '.join(pools) or 'none'}"


def _error(status_code: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status_code)


def _read_token(path: str | None) -> str | None:
    if path is None:
        return None
    token = Path(path).read_text().strip()
    if not token:
        raise ValueError(f"admin token file {path} is empty")
    return token
