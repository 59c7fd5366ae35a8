"""The one owner of a pool's backend state: state machines, passive ejection, slow start, weights.

Health checks, the data plane's passive signals and operator calls all come here as events; the
pool applies them to each backend's state machine and publishes a new immutable `PoolSnapshot`
whenever what the data plane must see changes. Nothing else mutates backend state.

Which backends serve (primaries, backups, panic) is decided by `serving.serving` at publication;
an agent check's reply (`record_check`) moves a backend like the operator calls do and scales its
weight. `route` is the data plane's one question about fallback pools.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Mapping, Set
from dataclasses import dataclass, field
from typing import Any

from pointsman.balance import build_picker
from pointsman.balance.affinity import AffinityTable
from pointsman.balance.base import Candidate, Picker
from pointsman.balance.slow_start import effective_weight
from pointsman.config.addresses import parse_host_port
from pointsman.config.model import BackendConfig, PoolConfig
from pointsman.health.dialects import AgentReply
from pointsman.health.ejection import PassiveEjector
from pointsman.health.probes import ProbeResult
from pointsman.pool.events import (
    AgentScale,
    BackendDecisions,
    BackendEvent,
    PassiveSignal,
    PoolSink,
    PoolState,
    WeightChange,
)
from pointsman.pool.serving import serving
from pointsman.pool.snapshot import BackendView, PoolSnapshot
from pointsman.pool.state import (
    BackendState,
    BackendStateMachine,
    Event,
    IllegalTransition,
    Transition,
)
from pointsman.telemetry.histogram import Histogram
from pointsman.telemetry.stats import BackendStats, PoolStats

log = logging.getLogger("pointsman.pool")

# Slow start ramps weights only for the dynamic algorithms; hash policies keep the configured
# weight, because ramping would move keys between backends at every step (HAProxy does the same).
_DYNAMIC = frozenset({"round_robin", "weighted_round_robin", "least_connections", "power_of_two"})

TransitionListener = Callable[[str, str, Transition], None]

# What an agent's administrative word asks of the state machine: the operator's events.
_AGENT_EVENTS = {"drain": Event.DRAIN, "maint": Event.MAINTENANCE, "ready": Event.ENABLE}


@dataclass(slots=True)
class Member:
    """One backend as the pool owns it."""

    config: BackendConfig
    machine: BackendStateMachine
    ejector: PassiveEjector | None
    stats: BackendStats = field(default_factory=BackendStats)
    weight: int = 1
    available_since: float | None = None
    last_check: ProbeResult | None = None
    checks: int = 0
    check_failures: int = 0
    failing: bool = False  # mirror: a failure was forwarded and no success since
    agent_scale: float = 1.0  # an agent's weight percentage, as a factor of `weight`
    # The agent's last administrative word. It starts as "ready" so that only a change the agent
    # makes (to drain or maint, and back) moves the backend: an agent steadily answering "ready"
    # never undoes an operator's drain.
    agent_admin: str = "ready"

    @property
    def id(self) -> str:
        return self.config.id


class LazyPicker:
    """A picker built at its first pick: a process that never picks from a pool (the control
    process, whose workers pick; a pool only a kernel listener serves) never pays for it, and a
    Maglev table (tens of milliseconds at 65537 slots) is not rebuilt on the loop for nothing."""

    __slots__ = ("_build", "_picker")

    def __init__(self, build: Callable[[], Picker]) -> None:
        self._build = build
        self._picker: Picker | None = None

    @property
    def built(self) -> Picker | None:
        """The picker, once a pick has built it."""
        return self._picker

    def pick(self, key: bytes, exclude: Set[int] = frozenset()) -> int | None:
        picker = self._picker
        if picker is None:
            picker = self._picker = self._build()
        return picker.pick(key, exclude)


class UnknownBackend(KeyError):
    """No backend answers to that name or address; the message lists the pool's backends."""

    def __init__(self, query: str, pool: str = "", known: tuple[str, ...] = (),
                 ambiguous: bool = False) -> None:
        super().__init__(query)
        self.query, self.pool, self.known, self.ambiguous = query, pool, known, ambiguous

    def __str__(self) -> str:
        names = ", ".join(self.known) or "none"
        if self.ambiguous:
            return f"{self.query} is the address of several backends of pool {self.pool!r}: {names}"
        return f"no backend {self.query!r} in pool {self.pool!r}; its backends: {names}"


class UnknownPool(KeyError):
    """No pool of that name; the message lists the node's pools."""

    def __init__(self, query: str, known: tuple[str, ...] = ()) -> None:
        super().__init__(query)
        self.query, self.known = query, known

    def __str__(self) -> str:
        return f"no pool {self.query!r}; pools: {', '.join(self.known) or 'none'}"


class Pool:
    def __init__(
        self,
        config: PoolConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        mirror: bool = False,
        sink: PoolSink | None = None,
    ) -> None:
        self.name = config.name
        # A mirror (in a worker process) owns no decisions: it applies the events the control
        # process broadcasts, in the same order, and forwards its passive signals instead.
        self.mirror = mirror
        # Set before the first reconfigure: the decisions a new pool's config implies at once
        # (an `initial_state: down` backend without a health check comes up) reach the mirrors.
        self.sink: PoolSink | None = sink
        self.config = config
        self._clock = clock
        self._rng = rng or random.Random()
        self._members: dict[str, Member] = {}
        self._listeners: list[TransitionListener] = []
        self._watchers: list[Callable[[PoolSnapshot], None]] = []
        self._version = 0
        self._maglev_key: tuple[tuple[str, float, float], ...] | None = None
        self._picker_cache: Picker | None = None
        self.affinity: AffinityTable | None = None
        self.check_duration = Histogram()  # probe latencies, for /metrics (health_check_duration)
        self.fallbacks = 0  # new connections this pool handed to its fallback_pool (`route`)
        self.queue_stats = PoolStats()  # its queue in this process (the data plane counts)
        # The data plane's waiting line for this pool in this process (proxy/waiting.py), made
        # at the first queued connection; the pool only carries it.
        self.waiting: Any = None
        self.snapshot: PoolSnapshot
        self.reconfigure(config)

    # --- configuration -------------------------------------------------------------------------

    def reconfigure(self, config: PoolConfig) -> None:
        """Apply a (re)loaded config: backends that remain keep their state, stats and sessions."""
        now = self._clock()
        self.config = config
        members: dict[str, Member] = {}
        for backend in config.backends:
            member = self._members.get(backend.id)
            if member is None:
                member = self._new_member(backend, now)
            else:
                member.config = backend
                self._reconfigure_ejector(member)
            member.weight = backend.weight
            members[backend.id] = member
        self._members = members
        checked = config.health_check is not None and config.health_check.type != "none"
        agent = config.health_check is not None and config.health_check.type == "agent"
        for member in members.values():
            if not checked and not member.machine.health_ok and not self.mirror:
                self._apply(member, Event.HEALTH_UP, "health check removed")
            if not agent:  # the agent is gone: its weight goes; a state it set stays (as an operator's)
                member.agent_scale, member.agent_admin = 1.0, "ready"
        if config.affinity is None:
            self.affinity = None
        elif self.affinity is None or self.affinity.max_entries != config.affinity.max_entries:
            self.affinity = AffinityTable(config.affinity.timeout, config.affinity.max_entries)
        self._maglev_key = None
        self._publish(now)

    def _ejector(self) -> PassiveEjector | None:
        """consecutive_failures: 0 turns passive ejection off."""
        p = self.config.passive
        if p.consecutive_failures == 0 or self.mirror:
            return None
        return PassiveEjector(*self._ejection_settings())

    def _ejection_settings(self) -> tuple[int, float, float]:
        """(threshold, base, max) with the durations kept positive and max >= base."""
        p = self.config.passive
        base = max(p.base_ejection, 0.001)
        return p.consecutive_failures, base, max(p.max_ejection, base)

    def _reconfigure_ejector(self, member: Member) -> None:
        """Keep a running ejection across reloads; switching ejection off ends it."""
        p = self.config.passive
        if self.mirror:
            return
        if member.ejector is None or p.consecutive_failures == 0:
            if member.ejector is not None and member.machine.ejecting:
                self._apply(member, Event.EJECT_EXPIRED, "passive ejection turned off")
            member.ejector = self._ejector()
            return
        member.ejector.reconfigure(*self._ejection_settings())

    def _new_member(self, backend: BackendConfig, now: float) -> Member:
        initial = BackendState.UP if self.config.initial_state == "up" else BackendState.DOWN
        machine = BackendStateMachine(initial, now, backend=backend.id)
        member = Member(backend, machine, self._ejector())
        if initial is BackendState.UP:
            member.available_since = now - self.config.slow_start  # a fresh start is not a ramp
        return member

    def watch(self, callback: Callable[[PoolSnapshot], None]) -> None:
        """Call `callback(snapshot)` after every publication (the kernel data plane's trigger)."""
        self._watchers.append(callback)

    def subscribe(self, listener: TransitionListener) -> None:
        """Call `listener(pool, backend_id, transition)` on every state change."""
        self._listeners.append(listener)

    # --- events ----------------------------------------------------------------------------------

    def member(self, backend_id: str) -> Member:
        try:
            return self._members[backend_id]
        except KeyError:
            raise UnknownBackend(backend_id, self.name, tuple(self._members)) from None

    def find(self, name_or_address: str) -> Member:
        """The backend an operator means: its id (name, else address as written), else the one
        backend at that host:port (as written or resolved). The admin API looks backends up here."""
        if (member := self._members.get(name_or_address)) is not None:
            return member
        try:
            wanted = parse_host_port(name_or_address)
        except ValueError:
            wanted = None
        matches = [m for m in self._members.values()
                   if wanted == m.config.address or name_or_address == str(m.config.address)]
        if len(matches) == 1:
            return matches[0]
        if matches:  # several named backends share the address: only a name is unambiguous
            raise UnknownBackend(name_or_address, self.name, tuple(m.id for m in matches), True)
        raise UnknownBackend(name_or_address, self.name, tuple(self._members))

    def members(self) -> list[Member]:
        return list(self._members.values())

    def drain(self, backend_id: str, reason: str = "operator drain") -> None:
        self._apply(self.member(backend_id), Event.DRAIN, reason)

    def maintenance(self, backend_id: str, reason: str = "operator maintenance") -> None:
        self._apply(self.member(backend_id), Event.MAINTENANCE, reason)

    def enable(self, backend_id: str, reason: str = "operator enable") -> None:
        self._apply(self.member(backend_id), Event.ENABLE, reason)

    def set_weight(self, backend_id: str, weight: int) -> None:
        if not 0 <= weight <= 1000:
            raise ValueError("weight must be between 0 and 1000")
        member = self.member(backend_id)
        if member.weight != weight:
            member.weight = weight
            log.log(logging.DEBUG if self.mirror else logging.INFO,
                    "backend %s/%s: weight -> %d (operator)", self.name, backend_id, weight)
            self._publish(self._clock())
        if self.sink is not None and not self.mirror:
            self.sink(WeightChange(self.name, backend_id, weight))

    def apply_event(self, backend_id: str, event: Event, reason: str) -> None:
        """Mirror side: apply an event the control process applied (unknown backends: ignored)."""
        member = self._members.get(backend_id)
        if member is None:
            return
        try:
            self._apply(member, event, reason)
        except IllegalTransition as exc:
            log.warning("pool %s: mirror out of step: %s", self.name, exc)

    def decisions(self) -> PoolState:
        """Owner side: every backend's state, for a mirror that starts now."""
        now = self._clock()
        return PoolState(self.name, tuple(
            BackendDecisions(m.id, m.machine.state, m.machine.health_ok, m.machine.ejecting,
                             m.weight, None if m.available_since is None else now - m.available_since)
            for m in self._members.values()))

    def restore(self, state: PoolState) -> None:
        """Mirror side: take the owner's decisions (a worker started after they were made)."""
        now = self._clock()
        for decided in state.backends:
            member = self._members.get(decided.backend)
            if member is None:
                continue
            member.machine.restore(decided.state, decided.health_ok, decided.ejecting, now)
            member.weight = decided.weight
            up_for = self.config.slow_start if decided.up_for is None else decided.up_for
            member.available_since = now - up_for if member.machine.available else None
        self._publish(now)

    def is_drained(self, backend_id: str) -> bool:
        """True once a draining (or maintenance) backend holds no connection."""
        member = self.member(backend_id)
        return member.machine.state is not BackendState.UP and member.stats.active == 0

    def health_verdict(self, backend_id: str, healthy: bool, detail: str) -> None:
        member = self._members.get(backend_id)
        if member is None:
            return
        event = Event.HEALTH_UP if healthy else Event.HEALTH_DOWN
        self._apply(member, event, f"health check {'passed' if healthy else 'failed'}: {detail}")

    def record_check(self, backend_id: str, result: ProbeResult) -> None:
        """Keep the last probe result for the status page and metrics; apply an agent's reply."""
        if (member := self._members.get(backend_id)) is not None:
            member.last_check = result
            self.check_duration.observe(result.latency)
            member.checks += 1
            member.check_failures += not result.ok
            if result.agent is not None and not self.mirror:
                self._apply_agent(member, result.agent)

    def _apply_agent(self, member: Member, reply: AgentReply) -> None:
        """HAProxy agent semantics: a percentage scales the configured weight; drain, maint and
        ready move the backend as the operator calls do, when the agent changes its word. Up and
        down are the checker's business (rise/fall)."""
        if reply.percent is not None:
            self.set_agent_scale(member.id, reply.percent / 100.0)
        if reply.admin is not None and reply.admin != member.agent_admin:
            member.agent_admin = reply.admin
            self._apply(member, _AGENT_EVENTS[reply.admin], f"agent: {reply.admin}")

    def set_agent_scale(self, backend_id: str, scale: float) -> None:
        """Scale a backend's weight (an agent's percentage; a mirror receives the owner's)."""
        member = self._members.get(backend_id)
        if member is None or member.agent_scale == scale:
            return
        member.agent_scale = scale
        log.log(logging.DEBUG if self.mirror else logging.INFO,
                "backend %s/%s: agent weight -> %g%%", self.name, backend_id, scale * 100)
        self._publish(self._clock())
        if self.sink is not None and not self.mirror:
            self.sink(AgentScale(self.name, backend_id, scale))

    def route(self, pools: Mapping[str, Pool]) -> Pool | None:
        """The pool a new connection goes to: this one while it has a backend to offer, else the
        first pool down its `fallback_pool` chain that has one (counted here in `fallbacks`), else
        None (refuse). The data plane asks this once per new connection or UDP session."""
        if self.snapshot.available:
            return self
        pool = self
        for _ in range(len(pools)):  # the loader refuses cycles; the bound guards a bug
            name = pool.config.fallback_pool
            nxt = pools.get(name) if name is not None else None
            if nxt is None or nxt is self:
                return None
            if nxt.snapshot.available:
                self.fallbacks += 1
                return nxt
            pool = nxt
        return None

    def report_connect_failure(self, backend_id: str) -> None:
        """Passive signal from the data plane: a connect to this backend failed."""
        member = self._members.get(backend_id)
        if member is None:
            return
        member.stats.connect_failures += 1
        if self.mirror:
            member.failing = True
            if self.sink is not None:
                self.sink(PassiveSignal(self.name, backend_id, ok=False))
            return
        if member.ejector is None or member.machine.ejecting:
            return
        now = self._clock()
        deadline = member.ejector.record_failure(now)
        if deadline is not None:
            self._apply(member, Event.EJECT, f"{member.ejector.threshold} consecutive connect "
                        f"failures; ejected for {deadline - now:.0f}s")

    def report_connect_success(self, backend_id: str) -> None:
        member = self._members.get(backend_id)
        if member is None:
            return
        if self.mirror:
            if member.failing and self.sink is not None:
                member.failing = False
                self.sink(PassiveSignal(self.name, backend_id, ok=True))
            return
        if member.ejector is not None:
            member.ejector.record_success()

    def tick(self) -> None:
        """Periodic: end expired ejections and advance slow-start ramps."""
        now = self._clock()
        for member in self._members.values():
            ejector = member.ejector
            if member.machine.ejecting and ejector is not None and ejector.expired(now):
                self._apply(member, Event.EJECT_EXPIRED, "ejection time over")
        if self.config.slow_start > 0 and any(self._ramping(m, now) for m in self._members.values()):
            self._publish(now)

    def _ramping(self, member: Member, now: float) -> bool:
        since = member.available_since
        return since is not None and now - since < self.config.slow_start + 1.0

    def _apply(self, member: Member, event: Event, reason: str) -> None:
        now = self._clock()
        transition = member.machine.apply(event, reason, now)
        if self.sink is not None and not self.mirror:
            self.sink(BackendEvent(self.name, member.id, event, reason))
        if transition is None:
            return
        # The control process logs each transition once; mirrors only at debug level.
        log.log(logging.DEBUG if self.mirror else logging.INFO, "backend %s/%s: %s -> %s (%s)",
                self.name, member.id, transition.old.value, transition.new.value, reason)
        if transition.new is BackendState.UP:
            member.available_since = now
        elif transition.old is BackendState.UP:
            member.available_since = None
            if self.affinity is not None:
                self.affinity.forget_backend(member.id)
        self._publish(now)
        for listener in list(self._listeners):
            listener(self.name, member.id, transition)

    # --- publication -------------------------------------------------------------------------------

    @staticmethod
    def _base_weight(member: Member) -> float:
        """The weight in service: the operator's (or configured) weight times the agent's scale."""
        return member.weight * member.agent_scale

    def _weight_now(self, member: Member, now: float) -> float:
        base = self._base_weight(member)
        if member.machine.state is not BackendState.UP or base == 0:
            return 0.0
        if self.config.algorithm not in _DYNAMIC or self.config.slow_start <= 0:
            return base
        return effective_weight(base, member.available_since, now, self.config.slow_start)

    def _publish(self, now: float) -> None:
        members = list(self._members.values())
        plan = serving(
            [m.machine.state for m in members],
            [self._weight_now(m, now) for m in members],
            [self._base_weight(m) for m in members],
            [m.config.backup for m in members],
            self.config.panic_threshold,
        )
        weights = plan.weights
        candidates = [Candidate(m.id, w) for m, w in zip(members, weights, strict=True)]
        stats = tuple(m.stats for m in members)
        picker = self._picker(candidates, stats, list(plan.home))
        self._version += 1
        self.snapshot = PoolSnapshot(
            name=self.name,
            version=self._version,
            config=self.config,
            backends=tuple(
                BackendView(m.id, m.config.address.host, m.config.address.port, m.weight, w,
                            m.machine.state, m.config.backup)
                for m, w in zip(members, weights, strict=True)
            ),
            stats=stats,
            picker=picker,
            affinity=self.affinity,
            needs_key=self.affinity is not None
            or self.config.algorithm in ("source_hash", "maglev"),
            available=sum(1 for w in weights if w > 0),
            mode=plan.mode,
            caps=self._caps(members),
        )
        for callback in list(self._watchers):
            callback(self.snapshot)

    def _caps(self, members: list[Member]) -> tuple[int, ...]:
        caps = tuple(self.config.backend_cap(m.config) or 0 for m in members)
        return caps if any(caps) else ()

    def _picker(self, candidates: list[Candidate], stats: tuple[BackendStats, ...],
                homes: list[float]) -> Picker:
        """Build the picker; the Maglev table is rebuilt only when the backend set or weights change.
        `homes`: each backend's weight in service (backups: 0, they are nobody's home)."""
        if self.config.algorithm == "maglev":
            key = tuple((c.id, c.weight, h) for c, h in zip(candidates, homes, strict=True))
            if key == self._maglev_key and self._picker_cache is not None:
                return self._picker_cache
            self._maglev_key = key
        algorithm, size, rng = self.config.algorithm, self.config.maglev_table_size, self._rng
        picker = LazyPicker(lambda: build_picker(algorithm, candidates, load=stats,
                                                 table_size=size, rng=rng, home_weights=homes))
        self._picker_cache = picker
        return picker
