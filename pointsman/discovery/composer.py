"""The one path every config change takes to the runtime, and the owner of what it runs.

Three inputs make the running config: the *base* (a config file, or the cluster config in etcd
with the node-local keys of the node file over it), and the backends each pool's discovery
sources found. Any change to any input rebuilds the whole config and sends it through the same
validation as a file (`load_text`, in a thread) and the same `Node.apply`, one change at a time (a lock):
a config that does not validate is refused, logged and counted by source, and the last good one
keeps running.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from pointsman.config.loader import ConfigError, load_text
from pointsman.config.model import BackendConfig, Config, DiscoveryConfig
from pointsman.config.node import overlay_local
from pointsman.discovery.dns import DnsSource
from pointsman.discovery.etcd_members import EtcdMembersSource
from pointsman.discovery.kubernetes import KubernetesApi, KubernetesSource
from pointsman.discovery.merge import REPLACING, change_summary, pool_backends, with_discovered
from pointsman.discovery.source import Source
from pointsman.fleet.backoff import Backoff
from pointsman.fleet.etcd import EtcdClient
from pointsman.node.tasks import Tasks
from pointsman.telemetry.eventlog import record_reload

log = logging.getLogger("pointsman.discovery")

START_WAIT = 3.0  # at start, wait this long for each source's first answer before serving
Apply = Callable[[Config], Awaitable[list[str]]]
MakeSource = Callable[[str, str, DiscoveryConfig], Source | None]


@dataclass(frozen=True, slots=True)
class EtcdScope:
    client: EtcdClient
    prefix: str


@dataclass
class _Runner:
    source: Source
    config: DiscoveryConfig  # what it was started for: a changed pool config restarts it
    name: str  # its task's name in the node's task supervisor
    answered: asyncio.Event = field(default_factory=asyncio.Event)


class Composer:
    def __init__(self, *, local: Mapping[str, Any] | None = None,
                 binds: Mapping[str, str | list[str]] | None = None, etcd: EtcdScope | None = None,
                 kubernetes_api: KubernetesApi | None = None,
                 make_source: MakeSource | None = None) -> None:
        self.local = dict(local or {})  # node-local keys over every cluster config
        self.binds = dict(binds or {})  # this node's listener addresses, by listener name
        self.etcd = etcd
        self.kubernetes_api = kubernetes_api
        self.make_source = make_source or self._source  # (pool, kind, discovery) -> Source
        self.base: Config | None = None
        self.current: Config | None = None  # what the runtime runs
        self.applied: Counter[str] = Counter()  # by source label: file, etcd, discovery
        self.rejected: Counter[str] = Counter()
        self.updates: Counter[tuple[str, str]] = Counter()  # (pool, source kind)
        self._apply: Apply | None = None
        self._found: dict[str, dict[str, tuple[BackendConfig, ...]]] = {}
        self._runners: dict[tuple[str, str], _Runner] = {}
        self._tasks = Tasks()  # replaced by the node's at start
        self._lock = asyncio.Lock()
        self._dirty = asyncio.Event()

    # --- the base config ----------------------------------------------------------------------------

    def compose_text(self, text: str, source: str) -> Config:
        """Cluster config text (checked on its own, so errors name its lines) with the node-local
        keys over it; ConfigError when either is invalid."""
        cluster = load_text(text, source)
        if not self.local and not self.binds:
            return cluster
        data = overlay_local(yaml.safe_load(text), self.local, self.binds)
        return load_text(yaml.safe_dump(data, sort_keys=False), f"{source} with node-local keys")

    def reject(self, label: str, issues: Sequence[object], what: str) -> list[str]:
        self.rejected[label] += 1
        lines = [str(i) for i in issues]
        record_reload(label, False, self.current, None, lines)
        log.error("%s refused, the running config stays:\n%s", what, "\n".join(lines))
        return lines

    async def apply_text(self, text: str, source: str, label: str) -> list[str]:
        """Apply a cluster config document; return its problems (empty when applied)."""
        try:
            # Off the loop: parsing, validation and name resolution take milliseconds to seconds.
            config = await asyncio.to_thread(self.compose_text, text, source)
        except ConfigError as exc:
            return self.reject(label, exc.issues, f"config from {source}")
        try:
            return await self.apply_base(config, label)
        except OSError as exc:
            return self.reject(label, [f"cannot apply: {exc}"], f"config from {source}")

    async def apply_base(self, config: Config, label: str) -> list[str]:
        """A new base config (file reload, etcd revision): discovered backends merge into it.
        Returns validation problems; OSError (a port that cannot be bound) propagates."""
        async with self._lock:
            previous = self.base
            self.base = config
            self._sync_sources(config)
            try:
                errors = await self._apply_current(label)
            except OSError:
                self.base = previous
                raise
            if errors:
                self.base = previous
            return errors

    # --- start and stop -------------------------------------------------------------------------------

    async def start(self, base: Config, apply: Apply, tasks: Tasks | None = None,
                    wait: float = START_WAIT) -> None:
        """Start the discovery sources of `base` (as tasks of `tasks`: a crash is logged, counted
        and the source restarted); wait up to `wait` seconds for their first answers and apply
        what they found, then keep applying their changes until `stop()`."""
        self._apply = apply
        if tasks is not None:
            self._tasks = tasks
        self.base = self.current = base
        self._sync_sources(base)
        waits = [runner.answered.wait() for runner in self._runners.values()]
        if waits:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await asyncio.gather(*waits)
            async with self._lock:
                await self._apply_current("discovery")
        self._tasks.spawn("discovery:apply", self._apply_changes, kind="discovery")

    async def stop(self) -> None:
        names = [runner.name for runner in self._runners.values()]
        self._runners.clear()
        await self._tasks.stop(*names, "discovery:apply")

    # --- discovery ----------------------------------------------------------------------------------

    def _sync_sources(self, config: Config) -> None:
        """One runner per (pool, kind) the config asks for; changed or removed ones stop."""
        wanted: dict[tuple[str, str], DiscoveryConfig] = {}
        for pool in config.pools:
            d = pool.discovery
            if d is None:
                continue
            kinds = [k for k, on in (("dns", d.dns is not None),
                                     ("kubernetes", d.kubernetes is not None),
                                     ("etcd_members", d.etcd_members)) if on]
            for kind in kinds:
                wanted[pool.name, kind] = d
        for key, runner in list(self._runners.items()):
            if wanted.get(key) != runner.config:
                self._tasks.cancel(runner.name)
                del self._runners[key]
                self._found.get(key[0], {}).pop(key[1], None)
        for pool_name in set(self._found) - {p.name for p in config.pools}:
            del self._found[pool_name]
        for key, discovery in wanted.items():
            if key not in self._runners and (source := self.make_source(*key, discovery)) is not None:
                self._start(key, source, discovery)

    def _source(self, pool: str, kind: str, d: DiscoveryConfig) -> Source | None:
        try:
            if kind == "dns" and d.dns is not None:
                return DnsSource(d.dns)
            if kind == "kubernetes" and d.kubernetes is not None:
                return KubernetesSource(d.kubernetes, self.kubernetes_api)
            if kind == "etcd_members":
                if self.etcd is None:
                    log.error("pool %s: discovery.etcd_members needs a node file with "
                              "config_source.etcd; ignored", pool)
                    return None
                return EtcdMembersSource(self.etcd.client, self.etcd.prefix, pool)
        except Exception as exc:  # a source that cannot start must not stop the config applying
            log.error("pool %s: discovery.%s cannot start: %s; ignored", pool, kind, exc)
        return None

    def _start(self, key: tuple[str, str], source: Source, discovery: DiscoveryConfig) -> None:
        pool, kind = key
        runner = self._runners[key] = _Runner(source, discovery, f"discovery:{pool}:{kind}")

        def publish(backends: Sequence[BackendConfig]) -> None:
            if self._runners.get(key) is runner:  # a stopped runner's last words are ignored
                self._on_found(pool, kind, source.describe, tuple(backends))
                runner.answered.set()

        async def run() -> None:
            """A source handles its own network errors: a crash is a bug, which the task
            supervisor logs and counts before running the source again."""
            await source.run(publish)
            raise RuntimeError(f"{source.describe} returned")  # sources run until cancelled

        self._tasks.spawn(runner.name, run, kind="discovery", backoff=Backoff(first=1.0, cap=30.0))
        log.info("pool %s: discovering backends from %s", pool, source.describe)

    def _on_found(self, pool: str, kind: str, describe: str, backends: tuple[BackendConfig, ...]) -> None:
        found = self._found.setdefault(pool, {})
        old = found.get(kind, ())
        if not backends and kind in REPLACING:
            return  # nothing found: keep the last set (see merge.py); the source logged why
        if backends == old:
            return
        found[kind] = backends
        self.updates[pool, kind] += 1
        log.info("pool %s: %s found %s", pool, describe, change_summary(old, backends))
        self._dirty.set()

    async def _apply_changes(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            async with self._lock:
                try:
                    await self._apply_current("discovery")
                except OSError as exc:
                    self.reject("discovery", [f"cannot apply: {exc}"], "config with discovered backends")

    async def _apply_current(self, label: str) -> list[str]:
        """Build base + discovered, validate as a file is, and apply it (lock held). A discovered
        change that changes nothing is not applied; a new base always is (an operator asked)."""
        assert self.base is not None
        data = with_discovered(self.base, self._found)
        config = self.base
        if data is not None:
            try:
                # Off the loop (parsing and validation take time); expanded once already.
                config = await asyncio.to_thread(
                    load_text, yaml.safe_dump(data, sort_keys=False),
                    f"{label}: config with discovered backends", environ=None)
            except ConfigError as exc:
                return self.reject(label, exc.issues, "config with discovered backends")
        if config == self.current and label == "discovery":
            return []
        if self._apply is None:  # not started yet: the runtime starts with this one
            self.current = config
            return []
        problems = await self._apply(config)
        record_reload(label, not problems, self.current, config, problems)
        self._log_pool_changes(self.current, config)
        self.current = config
        self.applied[label] += 1
        return problems

    @staticmethod
    def _log_pool_changes(old: Config | None, new: Config) -> None:
        before = {p.name: p.backends for p in old.pools} if old is not None else {}
        for pool in new.pools:
            if pool.discovery is not None and pool.name in before and before[pool.name] != pool.backends:
                log.info("pool %s now runs %s", pool.name, change_summary(before[pool.name], pool.backends))

    def statistics(self) -> dict[str, Any]:
        return {
            "applied": dict(self.applied),
            "rejected": dict(self.rejected),
            "updates": {f"{p}/{k}": n for (p, k), n in self.updates.items()},
            "discovered": {p: {k: len(b) for k, b in kinds.items()} for p, kinds in self._found.items()},
            "backends": {p.name: len(pool_backends(p, self._found.get(p.name, {})))
                         for p in (self.base.pools if self.base is not None else [])},
        }
