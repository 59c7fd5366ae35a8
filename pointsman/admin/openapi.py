"""The admin API's OpenAPI 3 document (served at /openapi.json, fuzzed by schemathesis).

`OPENAPI` describes every route; `openapi_document` adapts its security to the running config
(reads need a token only when a read token is configured; nothing does when no token is).
"""

from __future__ import annotations

import copy
from typing import Any

_ERROR = {"description": "error", "content": {"application/json": {"schema": {
    "type": "object", "properties": {"error": {"type": "string"}}}}}}
_JSON = {"application/json": {"schema": {"type": "object"}}}
_PATH_PARAMS = [
    {"name": "pool", "in": "path", "required": True, "schema": {"type": "string"}},
    {"name": "backend", "in": "path", "required": True, "schema": {"type": "string"},
     "description": "the backend's name, else its address as written (host:port)"},
]
_AUTH: list[dict[str, list[str]]] = [{"bearer": []}]
_EVENT_FILTERS = [
    {"name": "pool", "in": "query", "schema": {"type": "string"}},
    {"name": "backend", "in": "query", "schema": {"type": "string"}},
    {"name": "kind", "in": "query", "schema": {"type": "string"},
     "description": "comma-separated: backend, admin, reload, bgp"},
    {"name": "since", "in": "query", "schema": {"type": "string"},
     "description": "unix seconds, or ISO 8601 such as 2026-01-01T00:00:00Z (no offset: UTC)"},
    {"name": "after", "in": "query", "schema": {"type": "integer", "minimum": 0},
     "description": "only events with a larger seq (poll without repeats)"},
    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 0},
     "description": "only the newest this many"},
]
_OPEN = ("/healthz", "/readyz")
_LISTENER_PARAM = [{"name": "listener", "in": "path", "required": True, "schema": {"type": "string"}}]
_BACKEND_ENTRY = {
    "type": "object", "required": ["address"], "additionalProperties": False,
    "properties": {
        "address": {"type": "string", "example": "10.0.1.12:443", "description": "host:port"},
        "name": {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,64}$"},
        "weight": {"type": "integer", "minimum": 0, "maximum": 1000},
        "backup": {"type": "boolean"},
        "health_check_address": {"type": "string", "description": "probe this host:port instead"},
    },
}
_PREFIXES = {"type": "array", "items": {"type": "string"},
             "description": 'addresses or prefixes, e.g. ["192.0.2.0/24", "2001:db8::/32"]'}


def _mutating(summary: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "security": _AUTH,
        "responses": {"200": {"description": "done", "content": _JSON}, "400": _ERROR,
                      "401": _ERROR, "403": _ERROR, "404": _ERROR, "409": _ERROR, "413": _ERROR},
    }
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    return op


def _with_200(op: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """`op` answering 200 with a body of `schema` (instead of an object)."""
    ok = {"description": "done", "content": {"application/json": {"schema": schema}}}
    return {**op, "responses": {**op["responses"], "200": ok}}


def _with_status(op: dict[str, Any], status: str) -> dict[str, Any]:
    """`op` that also answers `status` (201 created, 202 accepted) with a JSON object."""
    return {**op, "responses": {**op["responses"], status: {"description": "done",
                                                            "content": _JSON}}}


def _optional_body(op: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    return {**op, "requestBody": {"required": False,
                                  "content": {"application/json": {"schema": schema}}}}


def _read(summary: str, content_type: str = "application/json") -> dict[str, Any]:
    content = _JSON if content_type == "application/json" else {
        content_type: {"schema": {"type": "string"}}}
    return {"summary": summary, "responses": {"200": {"description": "ok", "content": content}}}


OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {"title": "pointsman admin API", "version": "1"},
    "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    "paths": {
        "/healthz": {"get": _read("the process is alive", "text/plain")},
        "/readyz": {"get": {"summary": "every listener accepts and every pool has a backend",
                            "responses": {"200": {"description": "ready", "content": _JSON},
                                          "503": {"description": "not ready", "content": _JSON}}}},
        "/metrics": {"get": _read("Prometheus metrics", "text/plain")},
        "/api/v1/status": {"get": _read("listeners, pools, backends and recent transitions")},
        "/api/v1/events": {"get": {
            "summary": "recent events (backend states, admin actions, reloads, BGP), oldest first",
            "parameters": _EVENT_FILTERS,
            "responses": {"200": {"description": "ok", "content": _JSON}, "400": _ERROR}}},
        "/api/v1/pools/{pool}/backends": {
            "parameters": _PATH_PARAMS[:1],
            "post": _with_status(_mutating("add a backend (kept across reloads; with state_file, "
                                           "restarts)", _BACKEND_ENTRY), "201")},
        "/api/v1/pools/{pool}/backends/{backend}": {
            "parameters": _PATH_PARAMS,
            "delete": _with_status(_mutating("drain the backend, remove it once its connections "
                                             "end (202 until then)"), "202")},
        "/api/v1/pools/{pool}/backends/{backend}/drain": {
            "parameters": _PATH_PARAMS,
            "post": _optional_body(_mutating(
                "no new connections; existing finish (or are closed after the timeout)"), {
                "type": "object", "additionalProperties": False, "properties": {"timeout": {
                    "oneOf": [{"type": "string", "example": "60s"},
                              {"type": "number", "minimum": 0}],
                    "description": "close what is left this long from now (60s, 5m); default "
                                   "the pool's drain_timeout"}}})},
        "/api/v1/pools/{pool}/backends/{backend}/enable": {
            "parameters": _PATH_PARAMS, "post": _mutating("back into service")},
        "/api/v1/pools/{pool}/backends/{backend}/maintenance": {
            "parameters": _PATH_PARAMS,
            "post": _optional_body(_mutating("no new connections (maintenance)"), {
                "type": "object", "additionalProperties": False, "properties": {"close": {
                    "type": "boolean", "description": "close its connections now"}}})},
        "/api/v1/pools/{pool}/backends/{backend}/weight": {
            "parameters": _PATH_PARAMS,
            "put": _mutating("set the weight (0-1000)", {
                "type": "object", "required": ["weight"],
                "properties": {"weight": {"type": "integer", "minimum": 0, "maximum": 1000}}}),
        },
        "/api/v1/node": {"get": _read("BGP announcement state: VIPs, reasons, sessions")},
        "/api/v1/node/drain": {"post": {**_mutating("withdraw every VIP from BGP (node drain)"),
                                        "responses": {"200": {"description": "withdrawn",
                                                              "content": _JSON},
                                                      "401": _ERROR, "409": _ERROR}}},
        "/api/v1/node/resume": {"post": {**_mutating("announce the VIPs again after a drain"),
                                         "responses": {"200": {"description": "resumed",
                                                               "content": _JSON},
                                                       "401": _ERROR, "409": _ERROR}}},
        **{f"/api/v1/listeners/{{listener}}/{kind}": {
            "parameters": _LISTENER_PARAM,
            "get": {"summary": f"the listener's {kind} list in force", "responses": {
                "200": {"description": "ok", "content": {"application/json": {"schema": _PREFIXES}}},
                "404": _ERROR, "409": _ERROR}},
            "put": _with_200(_mutating(f"replace the listener's {kind} list (new connections at "
                                       "once)", _PREFIXES), _PREFIXES),
        } for kind in ("deny", "allow")},
        "/api/v1/reload": {"post": {**_mutating("re-read the config file"),
                                    "responses": {"200": {"description": "applied",
                                                          "content": _JSON},
                                                  "401": _ERROR, "422": _ERROR}}},
    },
}


def openapi_document(*, read_auth: bool, write_auth: bool) -> dict[str, Any]:
    """`OPENAPI` with the security the running config enforces (see admin/auth.py)."""
    doc = copy.deepcopy(OPENAPI)
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method == "parameters":
                continue
            needs = write_auth if method not in ("get", "head") else (read_auth and path not in _OPEN)
            if needs:
                op["security"] = _AUTH
                op["responses"].setdefault("401", _ERROR)
                if method not in ("get", "head"):
                    op["responses"].setdefault("403", _ERROR)
            else:
                op.pop("security", None)
    return doc
