"""Admin API for a listener's allow/deny lists: GET and PUT /api/v1/listeners/{listener}/{deny|allow}.

PUT takes a JSON list of prefixes and replaces that list; new connections see it at once. A list
set here survives a reload that does not change that list in the config file (a file that changes
it wins), so an operator who blocked a range under attack does not lose the block to an unrelated
reload. With worker processes the control process's view of the listener sends the change to
every worker (`ipc.ListenerAcl`), and to workers that start later.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Literal, Protocol, cast

from aiohttp import web

from pointsman.protect.acl import AclLists

if TYPE_CHECKING:
    from pointsman.node.view import NodeView

Kind = Literal["allow", "deny"]
ROUTE = "/api/v1/listeners/{listener}/{kind:allow|deny}"


class HasAcl(Protocol):
    acl_lists: AclLists

    def set_acl(self, lists: AclLists) -> None: ...


def add_acl_routes(app: web.Application, node: NodeView) -> None:
    """Register the routes (called from AdminServer.app)."""

    def listener_of(request: web.Request) -> HasAcl:
        name = request.match_info["listener"]
        listener = node.listeners.get(name)
        if listener is None:
            raise _http(web.HTTPNotFound, f"no listener {name!r}")
        if not hasattr(listener, "set_acl"):
            raise _http(web.HTTPConflict, f"listener {name!r} takes no allow/deny lists")
        return cast(HasAcl, listener)

    async def get(request: web.Request) -> web.Response:
        listener = listener_of(request)
        kind = cast(Kind, request.match_info["kind"])
        return web.json_response(list(listener.acl_lists.get(kind)))

    async def put(request: web.Request) -> web.Response:
        listener = listener_of(request)  # the server's guard has checked the write token
        kind = cast(Kind, request.match_info["kind"])
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = None
        if not isinstance(body, list):
            raise _http(web.HTTPBadRequest, 'expected a JSON list of prefixes, e.g. ["192.0.2.0/24"]')
        lists = listener.acl_lists.replaced(kind, body)  # ValueError: 400 naming the prefix
        listener.set_acl(lists)  # with workers: the control's view sends it to every worker
        node.changes.changed()  # the state file (if any) keeps it across restarts
        return web.json_response(list(lists.get(kind)))

    app.router.add_get(ROUTE, get)
    app.router.add_put(ROUTE, put)


def _http(kind: type[web.HTTPException], message: str) -> web.HTTPException:
    """An HTTP error with the admin API's JSON body ({"error": ...})."""
    return kind(text=json.dumps({"error": message}), content_type="application/json")
