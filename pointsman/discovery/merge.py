"""How discovered backends enter a config (pure: no I/O, no clock).

- DNS and Kubernetes *replace* a pool's configured backends once they have found any: the
  configured ones are the seed used until the first answer (a pool needs at least one backend).
- etcd members *join* the pool's backends (configured or DNS/Kubernetes-found), after them.
- A source that finds nothing does not empty a pool: the composer keeps its last set, because a
  pool cannot be empty and stale backends are caught by health checks, while an empty pool drops
  every connection.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pointsman.config.model import BackendConfig, Config, PoolConfig
from pointsman.discovery.source import canonical

REPLACING = ("dns", "kubernetes")
JOINING = ("etcd_members",)
Found = Mapping[str, Sequence[BackendConfig]]  # source kind -> its last non-empty backend set


def pool_backends(pool: PoolConfig, found: Found) -> tuple[BackendConfig, ...]:
    """The backends `pool` runs with, given what its sources found."""
    replaced = [b for kind in REPLACING for b in found.get(kind, ())]
    base = list(canonical(replaced)) if replaced else list(pool.backends)
    ids = {b.id for b in base}
    joined = [b for kind in JOINING for b in canonical(found.get(kind, ())) if b.id not in ids]
    return (*base, *joined)


def with_discovered(config: Config, found: Mapping[str, Found]) -> dict[str, Any] | None:
    """`config` as data with every discovering pool's backends replaced; None if none changes."""
    data = config.model_dump(mode="json", exclude_unset=True)  # as written: None is not "null"
    changed = False
    for pool, pool_data in zip(config.pools, data["pools"], strict=True):
        if pool.name not in found:
            continue
        backends = pool_backends(pool, found[pool.name])
        if list(backends) != list(pool.backends):
            pool_data["backends"] = [b.model_dump(mode="json", exclude_none=True) for b in backends]
            changed = True
    return data if changed else None


def change_summary(old: Sequence[BackendConfig], new: Sequence[BackendConfig]) -> str:
    """"+127.0.0.1:8081 -127.0.0.1:8080 (2 backends)" for the log line of a discovered change."""
    before, after = {b.id: b.weight for b in old}, {b.id: b.weight for b in new}
    parts = [f"+{i}" for i in after if i not in before]
    parts += [f"-{i}" for i in before if i not in after]
    parts += [f"~{i} weight {before[i]}->{after[i]}" for i in after if i in before and before[i] != after[i]]
    return f"{' '.join(parts) or 'no change'} ({len(after)} backend{'s' if len(after) != 1 else ''})"
