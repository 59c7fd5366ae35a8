"""Closing one backend's connections on an operator's word or a drain's deadline.

A connection belongs to a backend of a pool: the same address can be a backend of two pools (or
of a pool and its `fallback_pool`), so the pool is matched as well as the backend id, across
every listener of the process (a TLS route or a fallback brings connections of one pool to
several listeners). UDP sessions end the same way; the kernel data plane cuts the backend's
conntrack entries (in the background: it counts nothing here).
"""

from __future__ import annotations

from collections.abc import Iterable

from pointsman.dataplane import DataPlane
from pointsman.kernel.listener import KernelListener
from pointsman.proxy.listener import TcpListener
from pointsman.proxy.udp import UdpListener
from pointsman.telemetry.flow import EndReason, UdpEndReason

_UDP_REASONS = {EndReason.DRAIN_TIMEOUT: UdpEndReason.DRAIN_TIMEOUT,
                EndReason.CLOSED_BY_OPERATOR: UdpEndReason.CLOSED_BY_OPERATOR}


def close_connections(listeners: Iterable[DataPlane], pool: str, backend: str,
                      reason: EndReason) -> int:
    """Close this process's connections and sessions to `backend` of `pool`; how many."""
    closed = 0
    for listener in list(listeners):
        if isinstance(listener, TcpListener):
            closed += listener.close_backend(backend, reason, pool)
        elif isinstance(listener, UdpListener):
            sessions = [s for s in list(listener.sessions.values())
                        if s.backend_id == backend and s.pool.name == pool]
            for session in sessions:
                listener.end_session(session, _UDP_REASONS.get(reason, UdpEndReason.SHUTDOWN))
            closed += len(sessions)
        elif isinstance(listener, KernelListener) and listener.pool.name == pool:
            closed += listener.close_backend(backend, reason)
    return closed
