"""Kubernetes discovery: the ready endpoints of a Service's EndpointSlices (discovery.k8s.io/v1).

List the slices labelled `kubernetes.io/service-name=<service>`, then watch from the list's
resourceVersion; on a 410 Gone (the version is too old) or any broken stream, list again. The
API is plain HTTP+JSON, so this uses aiohttp rather than the kubernetes-asyncio client: two
endpoints, no generated models, nothing more to install.

In a pod the API, token and CA come from the service account (the token file is read again at
each connect: projected tokens rotate). Outside a cluster, `POINTSMAN_KUBERNETES_API` (and
optionally `POINTSMAN_KUBERNETES_TOKEN_FILE`, `POINTSMAN_KUBERNETES_CA_FILE`) point elsewhere,
e.g. at `kubectl proxy` on loopback.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp

from pointsman.config.model import BackendConfig, KubernetesDiscoveryConfig
from pointsman.discovery.source import Publish, backend, canonical
from pointsman.fleet.backoff import Backoff
from pointsman.fleet.jsonlines import JsonLines, StreamEnded

log = logging.getLogger("pointsman.discovery")

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
WATCH_SECONDS = 300  # the API server ends each watch after this; we list-free resume from it
MAX_EVENT_BYTES = 4 * 1024 * 1024  # an EndpointSlice holds at most 1000 endpoints (~200 KiB)
CONNECT_TIMEOUT = 5.0
ERROR_RETRY_CAP = 30.0


class KubernetesProblem(Exception):
    """The API could not be reached, refused us, or sent something unexpected."""


class ResourceGone(KubernetesProblem):
    """410 Gone: the watch's resourceVersion is too old; list again."""


@dataclass(frozen=True, slots=True)
class KubernetesApi:
    url: str
    token_file: str | None = None
    ca_file: str | None = None

    @classmethod
    def from_environment(cls, env: Mapping[str, str] = os.environ) -> KubernetesApi | None:
        if url := env.get("POINTSMAN_KUBERNETES_API"):
            return cls(url.rstrip("/"), env.get("POINTSMAN_KUBERNETES_TOKEN_FILE"),
                       env.get("POINTSMAN_KUBERNETES_CA_FILE"))
        host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
        if host and port:
            host = f"[{host}]" if ":" in host else host
            return cls(f"https://{host}:{port}", str(SERVICE_ACCOUNT / "token"),
                       str(SERVICE_ACCOUNT / "ca.crt"))
        return None

    def headers(self) -> dict[str, str]:
        if self.token_file is None:
            return {"Accept": "application/json"}
        token = Path(self.token_file).read_text().strip()
        return {"Accept": "application/json", "Authorization": f"Bearer {token}"}

    def ssl_context(self) -> ssl.SSLContext | bool:
        return ssl.create_default_context(cafile=self.ca_file) if self.ca_file else True


def _chosen_port(ports: Sequence[Mapping[str, Any]], port_name: str | None) -> int | None:
    """The slice port to use: the one named `port_name`, else the unnamed or only one."""
    if port_name is not None:
        wanted = [p for p in ports if p.get("name") == port_name]
    else:
        wanted = [p for p in ports if not p.get("name")] or (list(ports) if len(ports) == 1 else [])
    port = wanted[0].get("port") if len(wanted) == 1 else None
    return port if isinstance(port, int) and 0 < port < 65536 else None


def slice_backends(endpoint_slice: Mapping[str, Any], port_name: str | None) -> list[BackendConfig]:
    """The ready endpoints of one EndpointSlice as backends (pure).

    `conditions.ready` absent means ready (the API's documented default); terminating and
    not-ready endpoints are left out; FQDN slices are skipped (we balance on addresses)."""
    if endpoint_slice.get("addressType") not in ("IPv4", "IPv6"):
        return []
    port = _chosen_port(endpoint_slice.get("ports") or [], port_name)
    if port is None:
        return []
    found = []
    for endpoint in endpoint_slice.get("endpoints") or []:
        if (endpoint.get("conditions") or {}).get("ready") is False:
            continue
        addresses = endpoint.get("addresses") or []
        if addresses:  # all of an endpoint's addresses are the same pod: use the first
            found.append(backend(str(addresses[0]), port))
    return found


def _name(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("name", ""))


class KubernetesSource:
    kind = "kubernetes"

    def __init__(self, config: KubernetesDiscoveryConfig, api: KubernetesApi | None = None) -> None:
        self.config = config
        self.api = api
        self.describe = (f"kubernetes service {config.namespace}/{config.service}"
                         + (f" port {config.port_name}" if config.port_name else ""))
        selector = quote(f"kubernetes.io/service-name={config.service}", safe="")
        self.path = (f"/apis/discovery.k8s.io/v1/namespaces/{quote(config.namespace, safe='')}"
                     f"/endpointslices?labelSelector={selector}")

    async def run(self, publish: Publish) -> None:
        backoff = Backoff(first=1.0, cap=ERROR_RETRY_CAP)
        failing = False
        while True:
            api = self.api or KubernetesApi.from_environment()
            try:
                if api is None:
                    raise KubernetesProblem("not in a cluster (no KUBERNETES_SERVICE_HOST) and "
                                            "POINTSMAN_KUBERNETES_API is not set")
                async with aiohttp.ClientSession(
                        connector=aiohttp.TCPConnector(ssl=api.ssl_context())) as http:
                    await self._list_and_watch(api, http, publish, backoff)
            except (KubernetesProblem, aiohttp.ClientError, OSError, TimeoutError) as exc:
                if not failing:
                    log.warning("%s: %s; keeping the endpoints known, retrying", self.describe, exc)
                failing = True
                await asyncio.sleep(backoff.next())
                continue
            failing = False

    async def _list_and_watch(self, api: KubernetesApi, http: aiohttp.ClientSession,
                              publish: Publish, backoff: Backoff) -> None:
        """List, publish, watch until the stream ends; return to be called again (410 lists)."""
        slices, version = await self._list(api, http)
        publish(self._backends(slices))
        backoff.reset()
        while True:
            try:
                version = await self._watch(api, http, slices, version, publish)
            except ResourceGone:
                return

    async def _list(self, api: KubernetesApi,
                    http: aiohttp.ClientSession) -> tuple[dict[str, list[BackendConfig]], str]:
        timeout = aiohttp.ClientTimeout(total=30, sock_connect=CONNECT_TIMEOUT)
        async with http.get(api.url + self.path, headers=api.headers(), timeout=timeout) as resp:
            if resp.status != 200:
                raise KubernetesProblem(f"list: HTTP {resp.status}: {(await resp.text())[:200]}")
            body = await resp.json()
        slices = {_name(item): slice_backends(item, self.config.port_name)
                  for item in body.get("items") or []}
        return slices, str((body.get("metadata") or {}).get("resourceVersion", ""))

    async def _watch(self, api: KubernetesApi, http: aiohttp.ClientSession,
                     slices: dict[str, list[BackendConfig]], version: str, publish: Publish) -> str:
        """One watch request; apply its events; return the last resourceVersion seen."""
        url = (f"{api.url}{self.path}&watch=true&allowWatchBookmarks=true"
               f"&timeoutSeconds={WATCH_SECONDS}&resourceVersion={quote(version, safe='')}")
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT,
                                        sock_read=WATCH_SECONDS + 30)
        async with http.get(url, headers=api.headers(), timeout=timeout) as resp:
            if resp.status == 410:
                raise ResourceGone("410 Gone")
            if resp.status != 200:
                raise KubernetesProblem(f"watch: HTTP {resp.status}: {(await resp.text())[:200]}")
            lines = JsonLines(resp.content, MAX_EVENT_BYTES)
            while True:
                try:
                    event = await lines.next()
                except StreamEnded:
                    return version  # the server's timeoutSeconds, or a cut: resume from here
                version = self._apply(event, slices, version)
                if event.get("type") in ("ADDED", "MODIFIED", "DELETED"):
                    publish(self._backends(slices))

    def _apply(self, event: Mapping[str, Any], slices: dict[str, list[BackendConfig]],
               version: str) -> str:
        kind, obj = event.get("type"), event.get("object") or {}
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise ResourceGone(str(obj.get("message", "410 Gone")))
            raise KubernetesProblem(f"watch error: {obj.get('message', obj)}")
        if kind == "DELETED":
            slices.pop(_name(obj), None)
        elif kind in ("ADDED", "MODIFIED"):
            slices[_name(obj)] = slice_backends(obj, self.config.port_name)
        return str((obj.get("metadata") or {}).get("resourceVersion", version)) or version

    @staticmethod
    def _backends(slices: Mapping[str, list[BackendConfig]]) -> tuple[BackendConfig, ...]:
        return canonical([b for found in slices.values() for b in found])
