"""The status document: what /api/v1/status, the status page and `pointsman status` show."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pointsman import __version__
from pointsman.proxy.listener import TcpListener

if TYPE_CHECKING:
    from pointsman.pool.pool import Member, Pool
    from pointsman.runtime import Listener, Runtime


def status(runtime: Runtime) -> dict[str, Any]:
    return {
        "version": __version__,
        "started_at": runtime.started_at,
        "loop_lag_seconds": runtime.loop_lag,
        "listeners": [_listener(listener) for listener in runtime.listeners.values()],
        "pools": [_pool(pool, runtime) for pool in runtime.pools.values()],
        "transitions": [
            {"at": at, "pool": pool, "backend": t.backend, "old": t.old.value,
             "new": t.new.value, "event": t.event.value, "reason": t.reason}
            for at, pool, t in reversed(runtime.transitions)
        ],
    }


def _listener(listener: Listener) -> dict[str, Any]:
    config = listener.config
    out: dict[str, Any] = {
        "name": listener.name,
        "protocol": config.protocol,
        "bind": str(config.bind),
        "pool": listener.pool.name,
        "accepting": listener.accepting,
    }
    if isinstance(listener, TcpListener):
        s = listener.stats
        out.update(active=s.active, capacity=s.capacity, accepted=s.accepted,
                   connect_failed=s.connect_failed, retried=s.retried,
                   bytes_in=s.bytes_in, bytes_out=s.bytes_out,
                   rejected={str(k): v for k, v in s.rejected.items()},
                   ended={str(k): v for k, v in s.ended.items()})
    else:
        u = listener.stats
        out.update(active=u.sessions, capacity=u.capacity, accepted=u.sessions_created,
                   datagrams_in=u.datagrams_in, datagrams_out=u.datagrams_out,
                   bytes_in=u.bytes_in, bytes_out=u.bytes_out,
                   drops={str(k): v for k, v in u.drops.items()},
                   ended=dict(u.sessions_ended))
    return out


def _pool(pool: Pool, runtime: Runtime) -> dict[str, Any]:
    snapshot = pool.snapshot
    return {
        "name": pool.name,
        "algorithm": pool.config.algorithm,
        "available": snapshot.available,
        "backends": [_backend(m, view.effective_weight, runtime)
                     for m, view in zip(pool.members(), snapshot.backends, strict=True)],
    }


def _backend(member: Member, effective_weight: float, runtime: Runtime) -> dict[str, Any]:
    last = member.last_check
    since = member.machine.since
    return {
        "id": member.id,
        "address": str(member.config.address),
        "state": member.machine.state.value,
        "since_seconds": max(runtime.loop.time() - since, 0.0),
        "weight": member.weight,
        "effective_weight": effective_weight,
        "active": member.stats.active,
        "total": member.stats.total,
        "connect_failures": member.stats.connect_failures,
        "bytes_in": member.stats.bytes_in,
        "bytes_out": member.stats.bytes_out,
        "last_check": None if last is None else
        {"ok": last.ok, "detail": last.detail, "latency": last.latency},
    }
