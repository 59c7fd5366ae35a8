"""A node of a fleet: its cluster config comes from etcd, it registers itself, it can be drained.

- Start: read `<prefix>config` until etcd answers with a valid config, saying why it waits every
  few seconds (etcd unreachable, no config pushed yet, the pushed one invalid).
- Run: watch the key; each new revision goes through the composer (same validation and apply as
  a file reload). Losing etcd changes nothing: the watch reconnects with backoff, and on return
  the current revision is read again, so a config pushed meanwhile is applied at once.
- Register `<prefix>nodes/<name>` (JSON: health, version, config revision, pools) on a lease, and
  follow `<prefix>drain/<name>` (`pointsman fleet drain`): while it exists the node reports
  itself draining and its BGP announcer withdraws its VIPs (open connections carry on).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from typing import TYPE_CHECKING

from pointsman import __version__
from pointsman.config.loader import ConfigError
from pointsman.config.model import Config
from pointsman.config.node import NodeFile
from pointsman.discovery.composer import Composer, EtcdScope
from pointsman.fleet import keys
from pointsman.fleet.backoff import Backoff
from pointsman.fleet.etcd import EtcdClient, EtcdError, EtcdSettings, EtcdUnavailable, KeyValue
from pointsman.fleet.lease import LeaseKeeper

if TYPE_CHECKING:
    from pointsman.node.tasks import Tasks
    from pointsman.node.view import NodeView

log = logging.getLogger("pointsman.fleet")

WAIT_LOG_INTERVAL = 3.0  # while waiting for a first config, say why this often


def drain_reason(value: bytes) -> str:
    """The operator's reason in a drain key's value (JSON {"reason": ...}, or plain text)."""
    try:
        data = json.loads(value)
    except (json.JSONDecodeError, UnicodeDecodeError):
        data = None
    if isinstance(data, dict):
        return str(data.get("reason") or "drained")
    return value.decode(errors="replace").strip() or "drained"


def settings_for(node: NodeFile) -> EtcdSettings:
    e = node.etcd
    return EtcdSettings(tuple(e.endpoints), e.token_file, e.ca_file, e.cert_file, e.key_file)


class NodeAgent:
    def __init__(self, node: NodeFile, client: EtcdClient | None = None) -> None:
        self.node = node
        self.client = client or EtcdClient(settings_for(node))
        self.prefix = keys.normalise_prefix(node.etcd.prefix)
        self.config_key = keys.config_key(self.prefix)
        self.composer = Composer(local=node.local, binds=node.binds,
                                 etcd=EtcdScope(self.client, self.prefix))
        self.revision = 0  # the etcd revision of the config running now
        self.connected = False
        self.draining: str | None = None  # the operator's reason while drained
        self.runtime: NodeView | None = None
        self.lease: LeaseKeeper | None = None
        self._offered = 0  # the last revision tried, applied or refused (counted once)
        self._tasks: Tasks | None = None
        self._said_at = -math.inf

    @property
    def name(self) -> str:
        return self.node.name

    # --- before the runtime exists --------------------------------------------------------------

    async def wait_first_config(self) -> Config:
        """Block until etcd serves a valid cluster config; log why not every few seconds."""
        backoff = Backoff(cap=2.0)
        while True:
            try:
                kv, revision = await self.client.get(self.config_key)
                self._set_connected(True)
                if kv is not None and (config := self._first(kv)) is not None:
                    return config
                self._say_waiting(f"no valid config at {self.config_key} yet (push one with "
                                  "`pointsman config push`)")
                config = await self._watch_for_first(revision)
                if config is not None:
                    return config
            except EtcdError as exc:  # unavailable, compacted, or refused (e.g. permission)
                self._set_connected(False)
                what = "unreachable" if isinstance(exc, EtcdUnavailable) else "refused the read"
                self._say_waiting(f"etcd {what} at {', '.join(self.client.endpoints)}: {exc}")
                await asyncio.sleep(backoff.next())

    async def _watch_for_first(self, revision: int) -> Config | None:
        """Watch for the next revision; None after WAIT_LOG_INTERVAL (the caller says so, reads)."""
        try:
            async with asyncio.timeout(WAIT_LOG_INTERVAL):
                async with self.client.watch(self.config_key, start_revision=revision + 1) as watch:
                    async for events in watch:
                        for event in reversed(events):  # the newest put of the batch
                            if event.type == "put":
                                return self._first(event.kv)
        except TimeoutError:
            return None
        return None

    def _first(self, kv: KeyValue) -> Config | None:
        if kv.mod_revision == self._offered:
            return None
        self._offered = kv.mod_revision
        try:
            config = self.composer.compose_text(kv.value.decode(errors="replace"), self._source(kv))
        except ConfigError as exc:
            self.composer.reject("etcd", exc.issues, f"config from {self._source(kv)}")
            return None
        self.revision = kv.mod_revision
        log.info("cluster config revision %d read from etcd %s", kv.mod_revision, self.client.endpoint)
        return config

    def _say_waiting(self, reason: str) -> None:
        now = asyncio.get_running_loop().time()
        if now - self._said_at >= WAIT_LOG_INTERVAL:
            log.warning("node %s waiting for its cluster config: %s", self.node.name, reason)
            self._said_at = now

    def _source(self, kv: KeyValue) -> str:
        return f"etcd:{kv.key}@{kv.mod_revision}"

    def _set_connected(self, connected: bool, reason: object = None) -> None:
        if connected and not self.connected and self.runtime is not None:
            log.info("etcd reachable again at %s", self.client.endpoint)
        elif not connected and self.connected and self.runtime is not None:
            log.warning("etcd lost (%s): the running config (revision %d) stays; reconnecting",
                        reason, self.revision)
        self.connected = connected

    # --- running ------------------------------------------------------------------------------

    async def start(self, runtime: NodeView, tasks: Tasks) -> None:
        """Watch the config and drain keys and keep the registration, as tasks of `tasks` (a
        crash is logged, counted and the watcher restarted)."""
        self.runtime = runtime
        self.lease = LeaseKeeper(self.client, self.node.lease_ttl, self._registration)
        self._tasks = tasks
        tasks.spawn("fleet:config", self._watch_config, kind="fleet")
        tasks.spawn("fleet:drain", self._watch_drain, kind="fleet")
        tasks.spawn("fleet:register", self.lease.run, kind="fleet")

    async def stop(self) -> None:
        """Leave the fleet: stop watching, revoke the registration (best effort), disconnect."""
        if self._tasks is not None:
            await self._tasks.stop("fleet:config", "fleet:drain", "fleet:register")
        if self.lease is not None:
            await self.lease.close()
        await self.client.close()

    async def _watch_config(self) -> None:
        backoff = Backoff()
        while True:
            try:
                kv, revision = await self.client.get(self.config_key)
                self._set_connected(True)
                if kv is not None:
                    await self._offer(kv)
                async with self.client.watch(self.config_key, start_revision=revision + 1) as watch:
                    backoff.reset()
                    async for events in watch:
                        for event in events:
                            if event.type == "put":
                                await self._offer(event.kv)
                            else:
                                log.warning("%s was deleted; the running config (revision %d) stays",
                                            self.config_key, self.revision)
            except EtcdError as exc:  # unavailable, compacted, or refused (e.g. permission)
                self._set_connected(False, exc)
                await asyncio.sleep(backoff.next())

    async def _offer(self, kv: KeyValue) -> None:
        """Apply a revision not seen before (a refused one is counted once, not per reconnect)."""
        if kv.mod_revision <= self._offered:
            return
        self._offered = kv.mod_revision
        errors = await self.composer.apply_text(kv.value.decode(errors="replace"), self._source(kv),
                                                "etcd")
        if not errors:
            self.revision = kv.mod_revision
            log.info("cluster config revision %d from etcd applied", kv.mod_revision)
            if self.lease is not None:
                self.lease.poke()

    async def _watch_drain(self) -> None:
        key = keys.drain_key(self.prefix, self.node.name)
        backoff = Backoff()
        while True:
            try:
                kv, revision = await self.client.get(key)
                await self._set_drain(kv)
                async with self.client.watch(key, start_revision=revision + 1) as watch:
                    backoff.reset()
                    async for events in watch:
                        await self._set_drain(events[-1].kv if events[-1].type == "put" else None)
            except EtcdError:
                await asyncio.sleep(backoff.next())  # the config watch logs the outage

    async def _set_drain(self, kv: KeyValue | None) -> None:
        """Follow the drain key: withdraw this node's VIPs (BGP) while it exists."""
        reason = None if kv is None else drain_reason(kv.value)
        if reason == self.draining:
            return
        was, self.draining = self.draining, reason
        if reason is not None:
            log.warning("node %s drained by an operator: %s", self.node.name, reason)
        elif was is not None:
            log.warning("node %s back in service", self.node.name)
        if self.lease is not None:
            self.lease.poke()
        bgp = self.runtime.bgp if self.runtime is not None else None
        if bgp is not None and (reason is not None) != bgp.drained:
            await (bgp.drain() if reason is not None else bgp.resume())

    # --- what the node tells the fleet ------------------------------------------------------------

    def health(self) -> str:
        """draining (operator), degraded (a pool has no backend to send to), or serving."""
        runtime = self.runtime
        if self.draining is not None or (runtime is not None and runtime.bgp is not None
                                         and runtime.bgp.drained):
            return "draining"
        if runtime is not None and any(p.snapshot.available == 0 for p in runtime.pools.values()):
            return "degraded"
        return "serving"

    def _registration(self) -> dict[str, str]:
        runtime = self.runtime
        doc: dict[str, object] = {
            "name": self.node.name,
            "health": self.health(),
            "version": __version__,
            "config_revision": self.revision,
        }
        if self.draining is not None:
            doc["drain_reason"] = self.draining
        if runtime is not None:
            doc["started_at"] = round(runtime.started_at, 3)
            doc["listeners"] = [f"{lst.config.protocol} {lst.config.bind}"
                                for lst in runtime.listeners.values()]
            doc["pools"] = {name: {"available": p.snapshot.available,
                                   "backends": len(p.snapshot.backends)}
                            for name, p in runtime.pools.items()}
            if runtime.config.admin is not None:
                doc["admin"] = str(runtime.config.admin.bind)
        return {keys.node_key(self.prefix, self.node.name): json.dumps(doc, sort_keys=True)}

    def statistics(self) -> dict[str, object]:
        return {"connected": self.connected, "revision": self.revision,
                "draining": self.draining is not None, "endpoint": self.client.endpoint}
