"""Engine targets for a pool's backends, aligned with its current snapshot.

An engine target is a backend's address parsed once, with the pool's timeouts and zero-copy
threshold (`engine.target(...)`); every connection to that backend reuses it. The targets of a
pool are rebuilt when its snapshot changes, keeping the ones whose backend, address and pool
settings did not change, so a slow-start ramp (a new snapshot every tick) makes no new targets.
Each target's engine id is unique in the process for as long as the process lives, so a record
or an operator cut never names a backend of an older snapshot by mistake.

A pool whose connect success needs nothing per connection from the policy (no affinity to
remember, no source-address turn read from the backend's total) gets *quiet* targets: the engine
does not call `connect_result` for a success through them, it counts the success on the target
and flags the connection's record, and hands the policy the wake-up's successes in one packed
batch (`connected`). The policy folds the rest of each success from it while the connection is
open (backend total, connect time: fold.py, from the connection's slot, so a slot this module
has since let go of is still counted) and hands the counted successes to passive health
(`Slot.successes`, connect.py).
"""

from __future__ import annotations

import itertools
import logging
import socket
from typing import TYPE_CHECKING, Any

from pointsman.proxy.engine.api import Keepalive

if TYPE_CHECKING:
    from pointsman.config.model import PoolConfig, TcpKeepaliveConfig
    from pointsman.pool.snapshot import PoolSnapshot
    from pointsman.proxy.engine import Engine
    from pointsman.telemetry.stats import BackendStats

log = logging.getLogger("pointsman.proxy")

_IDS = itertools.count(1)  # engine backend ids: process-wide, never reused


class Slot:
    """One backend of one snapshot: the engine target and the policy's view of it."""

    __slots__ = ("cap", "id", "seen", "stats", "target")

    def __init__(self, backend_id: str, stats: BackendStats, target: Any) -> None:
        self.id = backend_id
        self.stats = stats
        self.target = target
        self.cap = 0  # max_connections in this process (0: none): a slot freed here may serve the queue
        self.seen = 0  # the quiet target's successes already reported to passive health

    def successes(self) -> int:
        """Quiet successes through this slot since the last call (0 for a target that is not
        quiet: its successes came through connect_result)."""
        count: int = self.target.connected if self.target.quiet else 0
        new = count - self.seen
        self.seen = count
        return new


def settings(config: PoolConfig) -> dict[str, Any]:
    """The engine's per-target settings from a pool config (old path's semantics kept: after a
    FIN the shorter of idle_timeout and half_close_timeout applies)."""
    idle, half = config.idle_timeout, config.half_close_timeout
    if not (half > 0 and (idle <= 0 or half < idle)):
        half = 0.0  # the engine then keeps idle_timeout for half-closed connections too
    return {
        "transparent": config.source.mode == "transparent",
        "connect_timeout": config.connect_timeout,
        "idle_timeout": idle,
        "half_close_timeout": half,
        "splice_after": config.zero_copy_after if config.zero_copy == "auto" else None,
        "keepalive": engine_keepalive(config.tcp_keepalive),
        "quiet": quiet(config),
    }


def quiet(config: PoolConfig) -> bool:
    """Whether a connect success to this pool needs nothing per connection from the policy:
    no affinity to remember, and no source-address turn (it reads the backend's total, which
    quiet successes reach only at the end of the engine's wake-up)."""
    return config.affinity is None and not config.source.addresses


def engine_keepalive(config: TcpKeepaliveConfig | None) -> Keepalive | None:
    """The engine's keepalive for a `tcp_keepalive` config (None: off); the listener's goes to
    `add_listener`, a pool's into its targets."""
    if config is None:
        return None
    return Keepalive(config.idle, config.interval, config.count)


def numeric(host: str, port: int) -> str:
    """A numeric address for `host` (the config loader resolves names; this is the fallback
    for a name that reached the data path, resolved once when its target is made)."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
        except OSError:
            continue
        return host
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    if not infos:
        raise OSError(f"{host} does not resolve")
    address = str(infos[0][4][0])
    log.warning("backend %s:%d is not a numeric address; resolved once to %s", host, port, address)
    return address


class PoolTargets:
    """The slots of one pool's current snapshot (one per backend, by snapshot index)."""

    __slots__ = ("by_key", "config", "direct", "engine", "plain", "slots", "snapshot")

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.snapshot: PoolSnapshot | None = None
        self.config: PoolConfig | None = None
        self.by_key: dict[tuple[str, str, int], Slot] = {}
        self.slots: list[Slot | None] = []
        self.plain = False  # a pick needs no key, no affinity, no header, no source address
        self.direct = False  # the same but for the key (a hash policy's, which an engine makes)

    def of(self, snapshot: PoolSnapshot) -> list[Slot | None]:
        """The slots for `snapshot` (None where a backend's address cannot be used)."""
        if snapshot is self.snapshot:
            return self.slots
        if snapshot.config is not self.config:
            self.by_key = {}
            self.config = snapshot.config
        options = settings(snapshot.config)
        by_key: dict[tuple[str, str, int], Slot] = {}
        slots: list[Slot | None] = []
        caps = snapshot.caps
        for i, (backend, stats) in enumerate(zip(snapshot.backends, snapshot.stats, strict=True)):
            key = (backend.id, backend.host, backend.port)
            slot = self.by_key.get(key)
            if slot is None or slot.stats is not stats:
                slot = self._make(backend.id, backend.host, backend.port, stats, options)
            if slot is not None:
                by_key[key] = slot
                slot.cap = caps[i] if caps else 0
            slots.append(slot)
        self.by_key = by_key
        self.slots = slots
        self.snapshot = snapshot
        config = snapshot.config
        self.direct = (snapshot.affinity is None and config.proxy_protocol.send == "off"
                       and config.source.mode == "default" and not config.source.addresses)
        self.plain = self.direct and not snapshot.needs_key
        return slots

    def _make(self, backend_id: str, host: str, port: int, stats: BackendStats,
              options: dict[str, Any]) -> Slot | None:
        try:
            # Counted with every other target of this backend's stats (another listener's, or
            # one from before the pool's settings changed): an engine picking by load compares
            # what the picker compares, `stats.active` (docs/engine.md, "Fast admission").
            target = self.engine.target(next(_IDS), numeric(host, port), port, load=stats,
                                        **options)
        except (OSError, ValueError) as exc:
            log.error("backend %s: cannot connect to %s:%d: %s", backend_id, host, port, exc)
            return None
        return Slot(backend_id, stats, target)
