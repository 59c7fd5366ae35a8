"""What the TCP policy keeps per connection, from accept to its ended record.

A plain connection (no preamble, no retry, no per-source limit) carries only a `Flow`: its client
address, pool, accept time, the backend it holds load on and, once connected (when the policy
heard of it: see targets.py, quiet targets), that backend's id.
Everything the rarer paths need (the preamble reader, retries, source-address turns) lives in a
`Detour` made only when one of them is taken, so the common case costs one small object.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pointsman.pool.pool import Pool
    from pointsman.pool.snapshot import PoolSnapshot
    from pointsman.protocols.proxy_protocol import ProxyHeader
    from pointsman.proxy.preamble import Preamble
    from pointsman.proxy.targets import Slot


class Detour:
    """The state of a connection that reads a preamble, retries, or checks its source."""

    __slots__ = ("addr_step", "addr_turn", "attempts", "backend_failed", "consume", "header",
                 "preamble", "queued", "server_name", "source_checked", "tried")

    def __init__(self) -> None:
        self.preamble: Preamble | None = None  # while reading a PROXY header or ClientHello
        self.header: ProxyHeader | None = None  # the PROXY header it came with
        self.server_name: str | None = None
        self.consume = 0  # bytes of PROXY header the engine drops before forwarding
        self.source_checked = False  # per-source limits already applied (during the preamble)
        self.tried: set[int] = set()  # snapshot indices of backends that failed
        self.attempts = 0  # failed connect attempts so far
        self.backend_failed = False  # one of them was the backend's fault (not a shortage)
        self.addr_turn = 0  # source.addresses: where this connection's turn starts
        self.addr_step = 0  # ... and how many addresses it moved on from
        self.queued = False  # waiting in its pool's queue (held by the engine, unread)


class Flow:
    """One connection in the table."""

    __slots__ = ("backend_id", "detour", "peer", "pool", "slot", "snapshot", "source_key",
                 "started")

    def __init__(self, peer: tuple[str, int], pool: Pool, started: float) -> None:
        self.peer = peer  # the client: the TCP peer, or the one a PROXY header names
        self.pool = pool  # the pool it goes to (the listener's, a TLS route's, a fallback)
        self.started = started  # time.perf_counter() at accept: connection ages
        self.slot: Slot | None = None  # the backend it holds load on (BackendStats.active)
        self.snapshot: PoolSnapshot | None = None  # while connecting: retries pick from it
        # Once connected, when connect_result saw the success; after a quiet one (targets.py)
        # it stays None: the slot names the backend, the engine knows it connected.
        self.backend_id: str | None = None
        self.source_key: bytes | None = None  # per-source limits: given back at its end
        self.detour: Detour | None = None

    def more(self) -> Detour:
        detour = self.detour
        if detour is None:
            detour = self.detour = Detour()
        return detour
