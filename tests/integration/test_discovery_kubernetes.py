"""Kubernetes discovery against a small API server on loopback that speaks the EndpointSlice list
and watch protocol (discovery.k8s.io/v1, newline-delimited watch events, 410 Gone on an expired
resourceVersion). The slices are shaped like a real API server's output for a Deployment's pods;
the pods are `NamedBackend`s on 127.0.0.2-4, one port, so traffic shows which endpoint served.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from pointsman.node.runtime import Node
from tests.integration.peers import NamedBackend, ask_name
from tests.support import LOOPBACK, free_port, refused_port, running, wait_for

CHANGE_TIMEOUT = 5.0  # watch event -> pool runs it; milliseconds here
TOKEN = "test-service-account-token"


def endpoint_slice(name: str, port: int, endpoints: dict[str, bool | None], version: int) -> dict[str, Any]:
    """An EndpointSlice as the API returns it: address -> ready (None: condition absent)."""
    return {
        "kind": "EndpointSlice",
        "apiVersion": "discovery.k8s.io/v1",
        "metadata": {
            "name": name, "namespace": "shop", "resourceVersion": str(version),
            "labels": {"kubernetes.io/service-name": "web",
                       "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"},
            "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": "web"}],
        },
        "addressType": "IPv4",
        "endpoints": [
            {"addresses": [address],
             "conditions": {} if ready is None else {"ready": ready, "serving": ready,
                                                     "terminating": not ready},
             "nodeName": "worker-1", "targetRef": {"kind": "Pod", "name": f"web-{address}"}}
            for address, ready in endpoints.items()
        ],
        "ports": [{"name": "metrics", "port": 9100, "protocol": "TCP"},
                  {"name": "http", "port": port, "protocol": "TCP"}],
    }


class FakeApi:
    """Serves the slices in `items` on list; streams what the test queues on watch."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self.version = 100
        self.events: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self.requests: list[tuple[str, str]] = []  # (query string, authorization)
        self.watching = asyncio.Event()
        self.port = free_port()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.query_string, request.headers.get("Authorization", "")))
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return web.json_response({"kind": "Status", "code": 401}, status=401)
        assert request.query["labelSelector"] == "kubernetes.io/service-name=web"
        if request.query.get("watch") != "true":
            return web.json_response({"kind": "EndpointSliceList", "apiVersion": "discovery.k8s.io/v1",
                                      "metadata": {"resourceVersion": str(self.version)},
                                      "items": self.items})
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        self.watching.set()
        for _ in range(1000):  # bounded: a test sends a handful of events
            event = await asyncio.wait_for(self.events.get(), 30.0)
            if event is None:
                break
            await resp.write(json.dumps(event).encode() + b"\n")
            if event["type"] == "ERROR":
                break  # the API server ends a watch after an ERROR event
        self.watching.clear()
        return resp

    def send(self, kind: str, obj: dict[str, Any]) -> None:
        self.events.put_nowait({"type": kind, "object": obj})


@contextlib.asynccontextmanager
async def fake_api() -> AsyncIterator[FakeApi]:
    api = FakeApi()
    app = web.Application()
    app.router.add_get("/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices", api.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, LOOPBACK, api.port).start()
    try:
        yield api
    finally:
        api.events.put_nowait(None)
        await runner.cleanup()


def pool_ids(runtime: Node) -> set[str]:
    return {b.id for b in runtime.pools["p"].config.backends}


async def test_endpoint_slices_drive_the_pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    listen, port = f"{LOOPBACK}:{free_port()}", free_port()
    pods = {i: NamedBackend(f"pod{i}", host=f"127.0.0.{i}") for i in (2, 3, 4)}
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    monkeypatch.setenv("POINTSMAN_KUBERNETES_TOKEN_FILE", str(token))
    try:
        for pod in pods.values():
            pod.port = port
            pod.listen()
        async with fake_api() as api:
            monkeypatch.setenv("POINTSMAN_KUBERNETES_API", f"http://{LOOPBACK}:{api.port}")
            api.items = [endpoint_slice("web-abc12", port, {"127.0.0.2": True, "127.0.0.9": False}, 90)]
            with refused_port() as placeholder:
                config = yaml.safe_dump({
                    "listeners": [{"name": "lb", "bind": listen, "pool": "p"}],
                    "pools": [{"name": "p", "connect_timeout": "1s",
                               "backends": [{"address": f"{LOOPBACK}:{placeholder}"}],
                               "discovery": {"kubernetes": {"namespace": "shop", "service": "web",
                                                            "port_name": "http"}}}],
                })
                async with running(config) as runtime:
                    # Listed before serving: ready endpoints on the named port only.
                    assert pool_ids(runtime) == {f"127.0.0.2:{port}"}
                    assert await ask_name(listen) == "pod2"
                    await wait_for(api.watching.is_set, CHANGE_TIMEOUT, what="a watch")
                    assert "resourceVersion=100" in api.requests[-1][0]

                    api.send("MODIFIED", endpoint_slice(
                        "web-abc12", port, {"127.0.0.2": True, "127.0.0.3": None, "127.0.0.9": False}, 101))
                    await wait_for(lambda: pool_ids(runtime) == {f"127.0.0.2:{port}", f"127.0.0.3:{port}"},
                                   CHANGE_TIMEOUT, what="a pod became ready")
                    api.send("ADDED", endpoint_slice("web-def34", port, {"127.0.0.4": True}, 102))
                    await wait_for(lambda: len(pool_ids(runtime)) == 3, CHANGE_TIMEOUT,
                                   what="a second slice")
                    api.send("DELETED", endpoint_slice("web-abc12", port, {}, 103))
                    await wait_for(lambda: pool_ids(runtime) == {f"127.0.0.4:{port}"}, CHANGE_TIMEOUT,
                                   what="a slice deleted")
                    assert {await ask_name(listen) for _ in range(3)} == {"pod4"}

                    # Every endpoint gone: the pool keeps its last backends (it cannot be empty).
                    api.send("MODIFIED", endpoint_slice("web-def34", port, {"127.0.0.4": False}, 104))
                    api.send("BOOKMARK", {"kind": "EndpointSlice", "metadata": {"resourceVersion": "105"}})
                    await wait_for(lambda: api.events.empty(), CHANGE_TIMEOUT, what="events read")
                    assert pool_ids(runtime) == {f"127.0.0.4:{port}"}

                    # 410 Gone: the source lists again and follows the list.
                    lists = sum(1 for query, _ in api.requests if "watch=true" not in query)
                    api.items = [endpoint_slice("web-xyz99", port, {"127.0.0.3": True}, 200)]
                    api.version = 200
                    api.send("ERROR", {"kind": "Status", "code": 410, "message": "too old resource version"})
                    await wait_for(lambda: pool_ids(runtime) == {f"127.0.0.3:{port}"}, CHANGE_TIMEOUT,
                                   what="relisted after 410")
                    assert sum(1 for query, _ in api.requests if "watch=true" not in query) == lists + 1
                    assert await ask_name(listen) == "pod3"
    finally:
        for pod in pods.values():
            await pod.close()
