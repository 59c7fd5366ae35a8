"""The process's event log: every event goes into one bounded ring (served at /api/v1/events)
and out as one JSON line on the `pointsman.events` logger (admin actions: `pointsman.audit`).

Process-wide like the log it mirrors: a pointsman process runs one node, and the recorders are
called from places that share nothing else (a pool's transition listeners, the composer, the BGP
announcer, the admin server). The `record_*` functions are the hooks those places call, one line
at each call site.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from pointsman.telemetry.events import (
    RING_SIZE,
    AdminEvent,
    BackendEvent,
    BgpEvent,
    BgpSessionEvent,
    Entry,
    Event,
    EventRing,
    json_line,
    reload_event,
)

if TYPE_CHECKING:
    from pointsman.bgp.decision import Decision
    from pointsman.config.model import Config
    from pointsman.pool.state import Transition

events_log = logging.getLogger("pointsman.events")
audit_log = logging.getLogger("pointsman.audit")


class EventLog:
    def __init__(self, ring: EventRing, clock: Callable[[], float] = time.time) -> None:
        self.ring = ring
        self.clock = clock

    def record(self, event: Event) -> Entry:
        entry = self.ring.add(event)
        logger = audit_log if event.kind == "admin" else events_log
        logger.log(_level(event), "%s", json_line(entry))
        return entry


def _level(event: Event) -> int:
    if isinstance(event, BgpSessionEvent) and not event.up:
        return logging.WARNING
    if isinstance(event, AdminEvent) and event.status in (401, 403):
        return logging.WARNING
    if isinstance(event, BackendEvent) and event.new in ("down", "ejected"):
        return logging.WARNING
    if getattr(event, "accepted", True) is False:
        return logging.WARNING
    return logging.INFO


EVENTS = EventLog(EventRing(RING_SIZE))


def record_transition(pool: str, backend_id: str, transition: Transition) -> None:
    """A pool transition listener (`Pool.subscribe(record_transition)`)."""
    EVENTS.record(BackendEvent(EVENTS.clock(), pool, backend_id, transition.old.value,
                               transition.new.value, transition.event.value, transition.reason))


def record_reload(source: str, accepted: bool, old_config: Config | None,
                  new_config: Config | None, errors: Sequence[object]) -> None:
    """A config offered by `source` (file, etcd, discovery) and applied or refused; the diff is
    from `old_config` (running) to `new_config` (None when it did not even validate)."""
    EVENTS.record(reload_event(EVENTS.clock(), source, accepted, old_config, new_config,
                               [str(e) for e in errors]))


def record_bgp(decision: Decision) -> None:
    """A VIP's announcement decision changed (the announcer's `_note_changes`)."""
    vip = decision.vip
    route = decision.route
    EVENTS.record(BgpEvent(EVENTS.clock(), vip.prefix, route is not None, decision.reason.value,
                           decision.describe(), pool=vip.pool, listener=vip.listener,
                           next_hop=str(route.next_hop) if route is not None else None,
                           available=decision.available))


def record_bgp_session(peer: str, up: bool, reason: str = "") -> None:
    """A BGP session came up or went down (the announcer, from ExaBGP's messages)."""
    EVENTS.record(BgpSessionEvent(EVENTS.clock(), peer, up, reason))


def record_admin(event: AdminEvent) -> Entry:
    return EVENTS.record(event)
