"""The operator's runtime changes to a state-owning node: `RuntimeChanges`.

The admin API's commands on backends (drain with a deadline, maintenance that closes sessions,
enable, weight, add, remove) come here. Each one acts on the pools at once (the pools broadcast
the decision to the workers as before) and is recorded in the `Overlay`, which the node applies
over every config it is given (`effective`): a reload keeps what the file did not change, and a
backend added or removed reaches the workers as a config (`ApplyConfig`), since it is config for
their mirror pools. With `state_file` the overlay is written on every change and read back at
start.

Also here: the drain deadlines (`DrainTimers`; a timer that fires closes the backend's remaining
connections, through the role: with workers a `CloseConnections` message) and removals that wait
for a drained backend's connections to end.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Literal, Protocol

from pointsman.config.model import BackendConfig, Config
from pointsman.config.semantics import model_problems
from pointsman.dataplane import DataPlane
from pointsman.node.draining import DrainTimers
from pointsman.node.overlay import AdminState, Key, Overlay
from pointsman.node.statefile import StateFile, read_state
from pointsman.node.tasks import Tasks
from pointsman.pool.pool import Member, Pool, UnknownPool
from pointsman.pool.state import OPERATOR_STATES, BackendState, Transition
from pointsman.protect.acl import AclLists
from pointsman.telemetry.flow import EndReason
from pointsman.telemetry.stats import BackendStats

log = logging.getLogger("pointsman.changes")

Kind = Literal["allow", "deny"]
Change = Callable[[Overlay], None]  # a runtime change, tried on a copy before it is kept


class Host(Protocol):
    """What the changes need of their node (`node.runtime.Node`)."""

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...

    @property
    def pools(self) -> Mapping[str, Pool]: ...

    @property
    def listeners(self) -> Mapping[str, DataPlane]: ...

    @property
    def file_config(self) -> Config: ...

    @property
    def tasks(self) -> Tasks: ...

    def backend_stats(self, pool: Pool) -> Sequence[BackendStats]: ...

    def close_connections(self, pool: str, backend: str, reason: EndReason) -> int: ...

    def apply_overlay(self, change: Change,
                      check: Callable[[Config], None] | None = None) -> Awaitable[list[str]]: ...


class RuntimeChanges:
    def __init__(self, node: Host, *, owner: bool, stats_lag: float = 0.0) -> None:
        """`owner`: a state-owning node (workers take the owner's effective config as it is);
        `stats_lag`: how old the backends' counters may be (with workers, their reports)."""
        self.node = node
        self.owner = owner
        self.stats_lag = stats_lag
        self.overlay = Overlay()
        self.state_file: StateFile | None = None
        self.timers = DrainTimers(node.loop, self._drain_expired)
        self.removing: dict[Key, float] = {}  # backend -> when its removal was asked (monotonic)
        self._finishing: set[Key] = set()
        self._expired: set[Key] = set()  # drains whose deadline passed (not armed again)

    # --- the effective config ---------------------------------------------------------------------

    def effective(self, config: Config, change: Change | None = None) -> Config:
        """`config` (the file's, with discovered backends) with the runtime changes that still
        hold, and `change` (not kept yet: see `commit`)."""
        if not self.owner:
            return config
        candidate = self.overlay.copy()
        if change is not None:
            change(candidate)
        effective, notes = candidate.effective(config)
        for note in notes:
            log.info("runtime change: %s", note)
        return effective

    def commit(self, config: Config, effective: Config, change: Change | None = None) -> None:
        """`effective` (from `config`) is applied: keep `change`, forget what the file overrode
        (commands that ran meanwhile stay: they changed the overlay in place), follow the
        config's state_file and drain_timeout, forget drains and removals of backends gone."""
        if self.owner:
            before = self.overlay.document()
            if change is not None:
                change(self.overlay)
            self.overlay.effective(config)
            if self.overlay.document() != before:
                self.changed()
        pools = self.node.pools
        self.timers.keep_only(lambda p, b: p in pools and _has(pools[p], b))
        self._expired = {k for k in self._expired if k[0] in pools and _has(pools[k[0]], k[1])}
        for key in [k for k in self.removing if k[0] not in pools or not _has(pools[k[0]], k[1])]:
            del self.removing[key]
        for pool in pools.values():
            self.timers.pool_changed(pool.name, pool.config.drain_timeout)
            self._arm_missing(pool)
        if self.owner and effective.state_file != (self.state_file.path if self.state_file else None):
            self._move_state_file(effective.state_file)

    def _arm_missing(self, pool: Pool) -> None:
        """Drains that began before the pool had a drain_timeout get one from their start."""
        timeout = pool.config.drain_timeout
        if timeout is None or not self.owner:
            return
        for member in pool.members():
            if member.machine.state is BackendState.DRAINING and \
                    (pool.name, member.id) not in self._expired and \
                    self.timers.remaining(pool.name, member.id) is None:
                began = self.node.loop.time() - (time.monotonic() - member.machine.since)
                self.timers.arm(pool.name, member.id, timeout, started=began)

    def _move_state_file(self, path: str | None) -> None:
        old, self.state_file = self.state_file, None
        if old is not None:
            self.node.tasks.spawn("state-file:flush", old.flush, kind="state-file", restart=False)
        if path is not None:
            self.state_file = StateFile(path, self.document)
            self.state_file.changed()

    # --- start --------------------------------------------------------------------------------------

    async def load(self, config: Config) -> Config:
        """The config to start with: `config` and the state file's changes (state owners)."""
        if not self.owner:
            return config
        if config.state_file is not None:
            self.state_file = StateFile(config.state_file, self.document)
            overlay, problem = await asyncio.to_thread(read_state, config.state_file)
            if problem is not None:
                log.warning("%s", problem)
            elif overlay:
                log.info("state file %s: %s", config.state_file, summary(overlay))
            self.overlay = overlay
        effective, notes = self.overlay.effective(config)
        for note in notes:
            log.info("runtime change: %s", note)
        if notes:
            self.changed()  # the file holds what the config file has overridden since: rewrite
        return effective

    def restore_pools(self) -> None:
        """Put drains and maintenance back (before the workers start: they get them in Start)."""
        for (pool_name, backend), state in list(self.overlay.states.items()):
            pool = self.node.pools.get(pool_name)
            if pool is None or not _has(pool, backend):
                continue
            if state == "draining":
                pool.drain(backend, "restored from the state file")
            else:
                pool.maintenance(backend, "restored from the state file")

    def restore_acls(self) -> None:
        """Put allow/deny lists set through the API back, where the file's list is unchanged."""
        for (name, kind), acl in list(self.overlay.acls.items()):
            listener = self.node.listeners.get(name)
            lists: AclLists | None = getattr(listener, "acl_lists", None)
            if listener is None or lists is None:
                continue
            file_list = lists.file_allow if kind == "allow" else lists.file_deny
            if file_list != acl.file_prefixes:
                log.info("runtime change: listener %s: the %s list set at run time gives way to "
                         "the config file's, which changed", name, kind)
                self.changed()
                continue
            listener.set_acl(lists.replaced(kind, acl.prefixes))  # type: ignore[attr-defined]

    # --- the state file ---------------------------------------------------------------------------

    def changed(self) -> None:
        """A runtime change happened (or went): write the state file soon."""
        if self.state_file is not None:
            self.state_file.changed()

    def document(self) -> dict[str, Any]:
        """What the state file holds: the overlay, with the allow/deny lists now in force."""
        self.overlay.acls.clear()
        for listener in list(self.node.listeners.values()):
            lists: AclLists | None = getattr(listener, "acl_lists", None)
            if lists is None:
                continue
            pairs: tuple[tuple[Kind, tuple[str, ...]], ...] = (("allow", lists.file_allow),
                                                               ("deny", lists.file_deny))
            for kind, file_list in pairs:
                if lists.get(kind) != file_list:
                    self.overlay.set_acl(listener.name, kind, lists.get(kind), file_list)
        return self.overlay.document()

    async def close(self) -> None:
        self.timers.close()
        if self.state_file is not None:
            await self.state_file.flush()

    # --- transitions and ticks ------------------------------------------------------------------

    def on_transition(self, pool_name: str, backend: str, transition: Transition) -> None:
        """A drain starts its deadline, a drain that ends cancels it; an operator state that
        something else ended (an agent's "ready") is no longer the operator's to restore."""
        if not self.owner:
            return
        pool = self.node.pools.get(pool_name)
        if transition.new is BackendState.DRAINING and pool is not None:
            self.timers.arm(pool_name, backend, pool.config.drain_timeout)
        elif transition.old is BackendState.DRAINING:
            self.timers.cancel(pool_name, backend)
            self._expired.discard((pool_name, backend))
        if transition.old in OPERATOR_STATES and transition.new not in OPERATOR_STATES and \
                (pool_name, backend) in self.overlay.states:
            self.overlay.set_state(pool_name, backend, None)
            self.changed()

    def tick(self) -> None:
        """Removals whose backend has no connection left finish (with workers, counts come
        every half second: a removal waits for a report taken after it began)."""
        now = time.monotonic()
        lag = self.stats_lag
        for key, asked in list(self.removing.items()):
            if key in self._finishing or now - asked < lag:
                continue
            pool = self.node.pools.get(key[0])
            if pool is None or not _has(pool, key[1]):
                del self.removing[key]
            elif self._active(pool, key[1]) == 0:
                self._finish_later(key)

    def _drain_expired(self, pool_name: str, backend: str) -> None:
        self._expired.add((pool_name, backend))
        pool = self.node.pools.get(pool_name)
        if pool is None or not _has(pool, backend) or \
                pool.member(backend).machine.state is not BackendState.DRAINING:
            return
        active = self._active(pool, backend)
        closed = self.node.close_connections(pool_name, backend, EndReason.DRAIN_TIMEOUT)
        log.info("backend %s/%s: drain timeout: closing its %d remaining connections",
                 pool_name, backend, max(active, closed))

    def _active(self, pool: Pool, backend: str) -> int:
        stats = self.node.backend_stats(pool)
        return next((s.active for m, s in zip(pool.members(), stats, strict=True) if m.id == backend), 0)

    # --- commands -----------------------------------------------------------------------------

    def pool(self, name: str) -> Pool:
        pool = self.node.pools.get(name)
        if pool is None:
            raise UnknownPool(name, tuple(self.node.pools))
        return pool

    def drain(self, pool_name: str, backend: str, timeout: float | None = None) -> Member:
        """Drain (no new connections); its remaining connections are closed `timeout` seconds
        from now (None: after the pool's drain_timeout from when the drain began, if any)."""
        if timeout is not None and timeout < 0:
            raise ValueError("timeout must not be negative")
        pool = self.pool(pool_name)
        member = pool.find(backend)
        said = "" if timeout is None else f" (drain timeout {timeout:g}s)"
        pool.drain(member.id, f"operator drain via admin api{said}")
        if timeout is not None:
            self.timers.arm(pool.name, member.id, timeout, override=True)
            self._expired.discard((pool.name, member.id))
        self._set_state(pool.name, member.id, "draining")
        return member

    def maintenance(self, pool_name: str, backend: str, close: bool = False) -> tuple[Member, int | None]:
        """Maintenance (no new connections); with `close`, its connections are closed now (how
        many: a worker's are counted from its last report)."""
        pool = self.pool(pool_name)
        member = pool.find(backend)
        pool.maintenance(member.id, "operator maintenance via admin api"
                         + (" (sessions closed)" if close else ""))
        self._set_state(pool.name, member.id, "maintenance")
        if not close:
            return member, None
        active = self._active(pool, member.id)
        closed = self.node.close_connections(pool.name, member.id, EndReason.CLOSED_BY_OPERATOR)
        return member, max(active, closed)

    def enable(self, pool_name: str, backend: str) -> Member:
        pool = self.pool(pool_name)
        member = pool.find(backend)
        pool.enable(member.id, "operator enable via admin api")
        if self.removing.pop((pool.name, member.id), None) is not None:
            log.info("backend %s/%s: enabled: its removal is cancelled", pool.name, member.id)
        self._set_state(pool.name, member.id, None)
        return member

    def set_weight(self, pool_name: str, backend: str, weight: int) -> Member:
        pool = self.pool(pool_name)
        member = pool.find(backend)
        pool.set_weight(member.id, weight)
        file_entry = self._file_entry(pool.name, member.id)
        self.overlay.set_weight(pool.name, member.id, weight,
                                None if file_entry is None else file_entry.weight)
        self.changed()
        return member

    def _set_state(self, pool: str, backend: str, state: AdminState | None) -> None:
        if self.overlay.states.get((pool, backend)) != state:
            self.overlay.set_state(pool, backend, state)
            self.changed()

    def _file_entry(self, pool: str, backend: str) -> BackendConfig | None:
        """The config file's entry for a backend (None: added at run time)."""
        file_pool = next((p for p in self.node.file_config.pools if p.name == pool), None)
        if file_pool is None:
            return None
        return next((b for b in file_pool.backends if b.id == backend), None)

    async def add(self, pool_name: str, entry: BackendConfig) -> tuple[Member, list[str]]:
        """Add a backend (its address already resolved). ValueError when the pool already has a
        backend of that id or the result is not a valid config; returns the workers' problems."""
        pool = self.pool(pool_name)
        if any(member.id == entry.id for member in pool.members()):
            raise BackendExists(f"pool {pool.name!r} already has a backend {entry.id!r}")
        def check(config: Config) -> None:
            where = ("pools", _index(config, pool.name))
            problems = [message for loc, message in model_problems(config) if loc[:2] == where]
            if problems:
                raise ValueError(f"cannot add backend {entry.id!r} to pool {pool.name!r}: "
                                 + "; ".join(problems))

        errors = await self.node.apply_overlay(lambda overlay: overlay.add(pool.name, entry), check)
        log.info("backend %s/%s added at run time (%s, weight %d%s)", pool.name, entry.id,
                 entry.address, entry.weight, ", backup" if entry.backup else "")
        return self.pool(pool_name).member(entry.id), errors

    async def remove(self, pool_name: str, backend: str) -> tuple[Member, bool]:
        """Drain the backend and remove it once its connections have ended (or its drain timed
        out and they were closed). Returns the member and whether it is removed already."""
        pool = self.pool(pool_name)
        member = pool.find(backend)
        if len(pool.members()) == 1:
            raise BackendExists(f"{member.id!r} is the last backend of pool {pool.name!r}: a pool "
                                "keeps at least one (remove the pool from the config file)")
        key = (pool.name, member.id)
        if member.machine.state is not BackendState.DRAINING:  # maintenance too: drain_timeout applies
            pool.drain(member.id, "removal via admin api")
        self._set_state(pool.name, member.id, "draining")  # a restart meanwhile finds it drained
        self.removing.setdefault(key, time.monotonic())
        if self.stats_lag == 0 and self._active(pool, member.id) == 0:
            await self._finish(key)
            return member, True
        log.info("backend %s/%s: removal asked: draining, removed once its %d connections end",
                 pool.name, member.id, self._active(pool, member.id))
        return member, False

    def _finish_later(self, key: Key) -> None:
        self._finishing.add(key)
        self.node.tasks.spawn(f"remove:{key[0]}/{key[1]}", lambda: self._finish(key),
                              kind="removal", restart=False)

    async def _finish(self, key: Key) -> None:
        self._finishing.add(key)
        try:
            if key not in self.removing:
                return  # enabled meanwhile, or a reload removed it
            file_entry = self._file_entry(*key)
            await self.node.apply_overlay(lambda overlay: overlay.remove(*key, file_entry))
            self.removing.pop(key, None)
            log.info("backend %s/%s removed at run time", *key)
        finally:
            self._finishing.discard(key)

    # --- what the status document shows ---------------------------------------------------------

    def backend_status(self, pool: str, backend: str) -> dict[str, Any]:
        key = (pool, backend)
        return {
            "drain_closes_in": self.timers.remaining(pool, backend),
            "removing": key in self.removing,
            "added_at_runtime": backend in self.overlay.added.get(pool, {}),
            "weight_set_at_runtime": key in self.overlay.weights,
        }

    def statistics(self) -> dict[str, Any]:
        return {
            "state_file": self.state_file.statistics() if self.state_file is not None else None,
            "changes": summary(self.overlay),
            "removing": [f"{p}/{b}" for p, b in self.removing],
        }


class BackendExists(ValueError):
    """The command conflicts with the pool as it is (a 409 in the admin API)."""


def summary(overlay: Overlay) -> dict[str, int]:
    return {"weights": len(overlay.weights), "drained_or_maintenance": len(overlay.states),
            "added": sum(len(v) for v in overlay.added.values()), "removed": len(overlay.removed),
            "lists": len(overlay.acls)}


def _has(pool: Pool, backend: str) -> bool:
    return any(member.id == backend for member in pool.members())


def _index(config: Config, pool: str) -> int:
    return next(i for i, p in enumerate(config.pools) if p.name == pool)
