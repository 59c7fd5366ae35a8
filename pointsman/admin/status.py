"""The status document: what /api/v1/status, the status page and `pointsman status` show.

Every figure comes through the node view, so a control process shows its workers' totals.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from pointsman import __version__
from pointsman.kernel.stats import KernelListenerStats
from pointsman.telemetry.stats import BackendStats, ListenerStats
from pointsman.telemetry.udp_stats import UdpListenerStats

if TYPE_CHECKING:
    from pointsman.dataplane import DataPlane, Statistics
    from pointsman.node.view import NodeView
    from pointsman.pool.pool import Member, Pool


def status(node: NodeView) -> dict[str, Any]:
    return {
        "version": __version__,
        "node": node.name,
        "role": node.role,
        "started_at": node.started_at,
        "generated_at": time.time(),
        "loop_lag_seconds": max((p.loop_lag for p in node.processes()), default=0.0),
        "readiness": node.readiness().as_dict(),
        "processes": [asdict(p) for p in node.processes()],
        "workers": [asdict(w) for w in node.workers()],
        # Copies of the tables: the document may be built in a thread while a reload runs.
        "listeners": [_listener(listener) for listener in list(node.listeners.values())],
        "pools": [_pool(pool, node) for pool in list(node.pools.values())],
        # Runtime changes (API weights, drains, added/removed backends) and the state file.
        "runtime": node.changes.statistics(),
        "passed_sockets": node.passed_sockets(),
        "transitions": [
            {"at": at, "pool": pool, "backend": t.backend, "old": t.old.value,
             "new": t.new.value, "event": t.event.value, "reason": t.reason}
            for at, pool, t in reversed(list(node.transitions))
        ],
    }


def _listener(listener: DataPlane) -> dict[str, Any]:
    config = listener.config
    out: dict[str, Any] = {
        "name": listener.name,
        "protocol": config.protocol,
        "dataplane": config.dataplane,
        "bind": str(config.bind),
        "binds": [str(entry) for entry in config.bind],  # each entry: host:port or host:first-last
        "pool": listener.pool.name,
        "accepting": listener.accepting,
    }
    out.update(_counters(listener.statistics()))
    return out


def _counters(s: Statistics) -> dict[str, Any]:
    if isinstance(s, ListenerStats):
        return {"active": s.active, "capacity": s.capacity, "accepted": s.accepted,
                "connect_failed": s.connect_failed, "retried": s.retried,
                "bytes_in": s.bytes_in, "bytes_out": s.bytes_out,
                "rejected": {str(k): v for k, v in s.rejected.items()},
                "ended": {str(k): v for k, v in s.ended.items()}}
    if isinstance(s, UdpListenerStats):
        return {"active": s.sessions, "capacity": s.capacity, "accepted": s.sessions_created,
                "datagrams_in": s.datagrams_in, "datagrams_out": s.datagrams_out,
                "bytes_in": s.bytes_in, "bytes_out": s.bytes_out,
                "drops": {str(k): v for k, v in s.drops.items()},
                "ended": {str(k): v for k, v in s.sessions_ended.items()}}
    if isinstance(s, KernelListenerStats):
        return {"accepted": s.new_connections, "rejected": {"no_backend": s.rejected, "denied": s.denied},
                "bytes_in": s.bytes_in, "bytes_out": s.bytes_out}
    return {}


def _pool(pool: Pool, node: NodeView) -> dict[str, Any]:
    snapshot = pool.snapshot
    members = pool.members()
    config = pool.config
    queue = node.pool_stats(pool)
    return {
        "name": pool.name,
        "algorithm": config.algorithm,
        "available": snapshot.available,
        "total": len(snapshot.backends),
        # Connections waiting for a slot (every worker's), and the queue's settings.
        "queue": {"length": queue.queued, "max": config.queue.max,
                  "timeout": config.queue.timeout, "queued_total": queue.queued_total},
        "backends": [{**_backend(m, view.effective_weight, stats),
                      "max_connections": config.backend_cap(m.config),
                      **node.changes.backend_status(pool.name, m.id)}
                     for m, view, stats in zip(members, snapshot.backends, node.backend_stats(pool),
                                               strict=True)],
        **_lifetime(pool, node),
    }


def _lifetime(pool: Pool, node: NodeView) -> dict[str, Any]:
    """With max_connection_duration: the bound and the oldest open connection through the pool
    (seconds; with workers, as of their last report), so one can see how close it runs."""
    bound = pool.config.max_connection_duration
    if bound is None:
        return {}
    ages = [age for (_, name), age in node.connection_ages().items() if name == pool.name]
    return {"max_connection_duration": bound, "oldest_connection_seconds": max(ages, default=0.0)}


def _backend(member: Member, effective_weight: float, stats: BackendStats) -> dict[str, Any]:
    last = member.last_check
    return {
        "id": member.id,
        "address": str(member.config.address),
        "state": member.machine.state.value,
        "since_seconds": max(time.monotonic() - member.machine.since, 0.0),
        "weight": member.weight,
        "effective_weight": effective_weight,
        "available": effective_weight > 0,  # up, with a weight: takes new connections
        "active": stats.active,
        "total": stats.total,
        "connect_failures": stats.connect_failures,
        "bytes_in": stats.bytes_in,
        "bytes_out": stats.bytes_out,
        "last_check": None if last is None else
        {"ok": last.ok, "detail": last.detail, "latency": last.latency},
    }
