"""What a reload changes, decided without touching anything: `reload_plan(old, new)`.

The node applies a plan in a fixed order (see `Node.apply`): bind the new addresses first (a
reload that cannot bind is refused whole), then pools, then listeners. A listener keeps its
sockets and connections when its address, protocol and data plane stay; anything else about it
(limits, pool, PROXY settings) is reconfigured in place. A listener that moves is retired (stops
accepting, its connections finish within `shutdown_grace`) and a new one starts; when the new one
wants an address an old listener holds, it binds after that listener has let go. A listener's
`bind` is compared whole: adding an address to its list, or widening its port range, restarts it
(the addresses it keeps are bound again once the old listener has let go of them).
"""

from __future__ import annotations

from dataclasses import dataclass

from pointsman.config.model import Config, ListenerConfig, PoolConfig


@dataclass(frozen=True, slots=True)
class PoolChange:
    name: str
    added_backends: tuple[str, ...] = ()
    removed_backends: tuple[str, ...] = ()
    algorithm: tuple[str, str] | None = None  # (old, new)

    def describe(self) -> str:
        parts = [f"+{len(self.added_backends)} backend" + ("s" if len(self.added_backends) > 1 else "")
                 if self.added_backends else "",
                 f"-{len(self.removed_backends)} backend" + ("s" if len(self.removed_backends) > 1 else "")
                 if self.removed_backends else "",
                 f"algorithm {self.algorithm[0]} -> {self.algorithm[1]}" if self.algorithm else ""]
        said = " ".join(p for p in parts if p) or "settings"
        return f"pool {self.name}: {said}"


@dataclass(frozen=True, slots=True)
class ReloadPlan:
    add_pools: tuple[PoolConfig, ...]
    change_pools: tuple[PoolConfig, ...]  # existing pools whose config differs
    remove_pools: tuple[str, ...]
    keep_listeners: tuple[ListenerConfig, ...]  # same socket; reconfigured in place
    retire_listeners: tuple[str, ...]
    start_listeners: tuple[ListenerConfig, ...]
    bind_first: tuple[str, ...]  # started listeners whose address no running listener holds
    pool_changes: tuple[PoolChange, ...]
    changed_listeners: tuple[str, ...]  # kept listeners whose settings differ

    def describe(self) -> str:
        """One line for the log: "+1 listener, pool web: +1 backend -1 backend"."""
        parts = []
        for count, what in ((len(self.start_listeners) - len(self.moved), "+{} listener{s}"),
                            (len(self.retire_listeners) - len(self.moved), "-{} listener{s}"),
                            (len(self.moved), "{} listener{s} moved"),
                            (len(self.add_pools), "+{} pool{s}"),
                            (len(self.remove_pools), "-{} pool{s}")):
            if count > 0:
                parts.append(what.format(count, s="s" if count > 1 else ""))
        parts += [f"listener {name}: settings" for name in self.changed_listeners]
        parts += [change.describe() for change in self.pool_changes]
        return ", ".join(parts) or "no change"

    @property
    def moved(self) -> tuple[str, ...]:
        """Listeners retired and started again under the same name (a new address)."""
        started = {listener.name for listener in self.start_listeners}
        return tuple(name for name in self.retire_listeners if name in started)


def same_socket(old: ListenerConfig, new: ListenerConfig) -> bool:
    """Whether a reloaded listener can keep its sockets (and its connections)."""
    return (old.bind, old.protocol, old.dataplane) == (new.bind, new.protocol, new.dataplane)


def reload_plan(old: Config, new: Config) -> ReloadPlan:
    old_pools = {pool.name: pool for pool in old.pools}
    new_names = {pool.name for pool in new.pools}
    add = tuple(pool for pool in new.pools if pool.name not in old_pools)
    change = tuple(pool for pool in new.pools
                   if pool.name in old_pools and old_pools[pool.name] != pool)
    remove = tuple(name for name in old_pools if name not in new_names)

    old_listeners = {listener.name: listener for listener in old.listeners}
    keep: list[ListenerConfig] = []
    start: list[ListenerConfig] = []
    for listener in new.listeners:
        current = old_listeners.get(listener.name)
        if current is not None and same_socket(current, listener):
            keep.append(listener)
        else:
            start.append(listener)
    kept = {listener.name for listener in keep}
    retire = tuple(name for name in old_listeners if name not in kept)
    held = {(address, lst.protocol) for lst in old.listeners for address in lst.addresses}
    bind_first = tuple(lst.name for lst in start
                       if not any((address, lst.protocol) in held for address in lst.addresses))
    changed = tuple(lst.name for lst in keep if old_listeners[lst.name] != lst)
    return ReloadPlan(add, change, remove, tuple(keep), retire, tuple(start), bind_first,
                      tuple(_pool_change(old_pools[p.name], p) for p in change), changed)


def _pool_change(old: PoolConfig, new: PoolConfig) -> PoolChange:
    before = [b.id for b in old.backends]
    after = [b.id for b in new.backends]
    return PoolChange(
        new.name,
        added_backends=tuple(b for b in after if b not in before),
        removed_backends=tuple(b for b in before if b not in after),
        algorithm=(old.algorithm, new.algorithm) if old.algorithm != new.algorithm else None,
    )
