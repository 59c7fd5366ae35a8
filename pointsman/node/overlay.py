"""What operators changed at run time, kept over the config file: the `Overlay`. Pure.

The admin API changes a running node without touching its config file: a backend's weight,
drain or maintenance, backends added or removed, a listener's allow/deny lists. The node applies
`effective(config)` (the file's config with those changes) instead of the file's config, at
start, on every reload and after every such change, so runtime changes survive reloads and, with
`state_file`, restarts; and because it is a config, worker processes receive it as one.

Which wins when the file and a runtime change disagree, field by field (the file wins whenever it
changed what the runtime change is about; otherwise the runtime change stays):

- weight: the weight set at run time stays while the file's weight for that backend is still the
  one it was when the weight was set; a file whose weight changed wins (and the override goes).
- drain / maintenance: stays while the file has a backend of that id (name, else address as
  written); a backend the file no longer has takes its state with it.
- a backend added at run time: stays until the file has a backend of that id (the file's entry
  then wins) or the file no longer has its pool.
- a backend removed at run time: stays removed while the file's entry for it is unchanged (same
  address, name, weight, backup, health-check address); a file that changed the entry, or
  dropped it, ends the removal (a changed entry serves again).
- allow/deny lists: kept while the file's list is the one it was when the list was set (as
  `protect.acl.AclLists` does for reloads); this module only carries them across restarts.

Addresses always come from the file: a state file never moves a backend (HAProxy's state file
restores addresses, a known way to send traffic to an old address after a config change).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pointsman.config.model import BackendConfig, Config, Name, PoolConfig

STATE_VERSION = 1
AdminState = Literal["draining", "maintenance"]
AclKind = Literal["allow", "deny"]
Key = tuple[str, str]  # (pool, backend id)


@dataclass(frozen=True, slots=True)
class WeightOverride:
    weight: int
    file_weight: int  # the file's weight when it was set: a file that changed it wins


@dataclass(frozen=True, slots=True)
class AclOverride:
    prefixes: tuple[str, ...]
    file_prefixes: tuple[str, ...]  # the file's list when it was set


@dataclass
class Overlay:
    weights: dict[Key, WeightOverride] = field(default_factory=dict)
    states: dict[Key, AdminState] = field(default_factory=dict)
    added: dict[str, dict[str, BackendConfig]] = field(default_factory=dict)  # pool -> id -> entry
    removed: dict[Key, BackendConfig] = field(default_factory=dict)  # the file's entry when removed
    acls: dict[tuple[str, AclKind], AclOverride] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.weights or self.states or self.added or self.removed or self.acls)

    def copy(self) -> Overlay:
        """An independent copy (the entries are immutable): a change is tried on a copy and kept
        only once the config it makes is applied."""
        return Overlay(dict(self.weights), dict(self.states),
                       {pool: dict(entries) for pool, entries in self.added.items()},
                       dict(self.removed), dict(self.acls))

    # --- changes ------------------------------------------------------------------------------

    def set_weight(self, pool: str, backend: str, weight: int, file_weight: int | None) -> None:
        """`file_weight` None: a backend added at run time (its entry takes the weight)."""
        added = self.added.get(pool, {}).get(backend)
        if added is not None:
            self.added[pool][backend] = added.model_copy(update={"weight": weight})
        elif file_weight is None or weight == file_weight:
            self.weights.pop((pool, backend), None)
        else:
            self.weights[pool, backend] = WeightOverride(weight, file_weight)

    def set_state(self, pool: str, backend: str, state: AdminState | None) -> None:
        if state is None:
            self.states.pop((pool, backend), None)
        else:
            self.states[pool, backend] = state

    def add(self, pool: str, backend: BackendConfig) -> None:
        self.added.setdefault(pool, {})[backend.id] = backend
        self.removed.pop((pool, backend.id), None)

    def remove(self, pool: str, backend: str, file_entry: BackendConfig | None) -> None:
        """Forget everything about `backend`; `file_entry` (the file's, if it has one) stays out."""
        if backend in self.added.get(pool, {}):
            del self.added[pool][backend]
            if not self.added[pool]:
                del self.added[pool]
        self.weights.pop((pool, backend), None)
        self.states.pop((pool, backend), None)
        if file_entry is not None:
            self.removed[pool, backend] = file_entry

    def set_acl(self, listener: str, kind: AclKind, prefixes: tuple[str, ...] | None,
                file_prefixes: tuple[str, ...] = ()) -> None:
        if prefixes is None:
            self.acls.pop((listener, kind), None)
        else:
            self.acls[listener, kind] = AclOverride(prefixes, file_prefixes)

    # --- the effective config ----------------------------------------------------------------

    def effective(self, config: Config) -> tuple[Config, list[str]]:
        """`config` with the runtime changes that still hold, and a note for each one the file
        now overrides (those are forgotten). Entries about pools and backends the file no longer
        has are forgotten silently."""
        notes: list[str] = []
        pools = [self._pool(pool, notes) for pool in config.pools]
        known = {pool.name: {b.id for b in pool.backends} for pool in pools}
        for pool in list(self.added):
            if pool not in known:
                notes.append(f"pool {pool}: gone from the config, with the backends added at run "
                             f"time ({', '.join(self.added.pop(pool))})")
        for key in [k for k in self.states if k[1] not in known.get(k[0], ())]:
            del self.states[key]
        for key in [k for k in self.weights if k[1] not in known.get(k[0], ())]:
            del self.weights[key]
        listeners = {lst.name for lst in config.listeners}
        for acl_key in [k for k in self.acls if k[0] not in listeners]:
            del self.acls[acl_key]
        changed = any(new is not old for new, old in zip(pools, config.pools, strict=True))
        return (config.model_copy(update={"pools": pools}) if changed else config), notes

    def _pool(self, pool: PoolConfig, notes: list[str]) -> PoolConfig:
        backends: list[BackendConfig] = []
        file_ids = set()
        for entry in pool.backends:
            file_ids.add(entry.id)
            kept = self._file_entry(pool.name, entry, notes)
            if kept is not None:
                backends.append(kept)
        for key in [k for k in self.removed if k[0] == pool.name and k[1] not in file_ids]:
            del self.removed[key]  # the file dropped it too
        added = self.added.get(pool.name, {})
        for backend_id in list(added):
            if backend_id in file_ids:
                notes.append(f"pool {pool.name}: backend {backend_id}, added at run time, is now "
                             "in the config file: the file's entry wins")
                del added[backend_id]
            else:
                backends.append(added[backend_id])
        if not added:
            self.added.pop(pool.name, None)
        if backends == pool.backends:
            return pool
        return pool.model_copy(update={"backends": backends})

    def _file_entry(self, pool: str, entry: BackendConfig, notes: list[str]) -> BackendConfig | None:
        """The file's `entry` as the runtime changes leave it (None: removed at run time)."""
        key = (pool, entry.id)
        removed = self.removed.get(key)
        if removed is not None:
            if removed == entry:
                return None
            del self.removed[key]
            notes.append(f"pool {pool}: backend {entry.id}, removed at run time, is back: the "
                         "config file changed it")
        override = self.weights.get(key)
        if override is None:
            return entry
        if override.file_weight != entry.weight:
            del self.weights[key]
            notes.append(f"pool {pool}: backend {entry.id}: weight {override.weight} (set at run "
                         f"time) gives way to the config file's, changed from "
                         f"{override.file_weight} to {entry.weight}")
            return entry
        return entry.model_copy(update={"weight": override.weight})

    # --- the state file's document ---------------------------------------------------------------

    def document(self) -> dict[str, Any]:
        """The JSON document a state file holds (see `from_document`)."""
        pools: dict[str, dict[str, Any]] = {}

        def backend(pool: str, name: str) -> dict[str, Any]:
            entry = pools.setdefault(pool, {"backends": {}, "removed": {}})
            found: dict[str, Any] = entry["backends"].setdefault(name, {})
            return found

        for (pool, name), override in sorted(self.weights.items()):
            backend(pool, name).update(weight=override.weight, file_weight=override.file_weight)
        for (pool, name), state in sorted(self.states.items()):
            backend(pool, name)["state"] = state
        for pool, entries in sorted(self.added.items()):
            for name, config in entries.items():
                backend(pool, name)["added"] = _entry(config)
        for (pool, name), config in sorted(self.removed.items()):
            pools.setdefault(pool, {"backends": {}, "removed": {}})["removed"][name] = _entry(config)
        listeners: dict[str, dict[str, Any]] = {}
        for (listener, kind), acl in sorted(self.acls.items()):
            listeners.setdefault(listener, {})[kind] = {"prefixes": list(acl.prefixes),
                                                       "file": list(acl.file_prefixes)}
        return {"version": STATE_VERSION, "pools": pools, "listeners": listeners}

    @classmethod
    def from_document(cls, data: object) -> Overlay:
        """Read a state file's document back; ValueError naming what is wrong."""
        if isinstance(data, dict) and data.get("version") != STATE_VERSION:
            raise ValueError(f"state file version {data.get('version')!r}; this pointsman reads "
                             f"version {STATE_VERSION}")
        try:
            doc = _Document.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise ValueError(f"{where}: {first['msg']}") from None
        overlay = cls()
        for pool, entry in doc.pools.items():
            for name, saved in entry.backends.items():
                if saved.added is not None:
                    overlay.added.setdefault(pool, {})[name] = saved.added
                if saved.weight is not None and saved.file_weight is not None:
                    overlay.weights[pool, name] = WeightOverride(saved.weight, saved.file_weight)
                if saved.state is not None:
                    overlay.states[pool, name] = saved.state
            for name, removed in entry.removed.items():
                overlay.removed[pool, name] = removed
        for listener, lists in doc.listeners.items():
            pairs: tuple[tuple[AclKind, _Acl | None], ...] = (("allow", lists.allow),
                                                             ("deny", lists.deny))
            for kind, acl in pairs:
                if acl is not None:
                    overlay.acls[listener, kind] = AclOverride(tuple(acl.prefixes), tuple(acl.file))
        return overlay


def _entry(config: BackendConfig) -> dict[str, Any]:
    return config.model_dump(mode="json", exclude_none=True)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Backend(_Strict):
    weight: int | None = Field(default=None, ge=0, le=1000)
    file_weight: int | None = Field(default=None, ge=0, le=1000)
    state: AdminState | None = None
    added: BackendConfig | None = None


class _Pool(_Strict):
    backends: dict[str, _Backend] = Field(default_factory=dict)
    removed: dict[str, BackendConfig] = Field(default_factory=dict)


class _Acl(_Strict):
    prefixes: list[str]
    file: list[str] = Field(default_factory=list)


class _Lists(_Strict):
    allow: _Acl | None = None
    deny: _Acl | None = None


class _Document(BaseModel):
    model_config = ConfigDict(extra="ignore")  # written_at, and keys of a later minor change

    version: int
    pools: dict[Name, _Pool] = Field(default_factory=dict)
    listeners: dict[Name, _Lists] = Field(default_factory=dict)
