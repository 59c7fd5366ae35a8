"""Events for incident work: backend state changes, admin actions, config reloads, BGP changes.

One frozen dataclass per kind, a bounded ring that keeps the last `RING_SIZE`, the filter
`GET /api/v1/events` applies, and the one-line JSON form the log and the API share. Pure: no
logging, no clock (every event carries the wall time its recorder gave it), no I/O;
`telemetry/eventlog.py` records into the process's ring and writes the log lines.
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar

from pointsman.config.model import Config

RING_SIZE = 1000  # about an hour of a busy incident; each event is well under 1 KB held
MAX_NAMES = 100  # names listed per diff list; a reload that adds 5,000 backends says how many
MAX_ERRORS = 20  # errors kept per refused reload (the reload answer itself has them all)
MAX_TEXT = 500  # characters kept of any one free-text field (reasons, errors, paths)

KINDS = ("backend", "admin", "reload", "bgp")
FILTERS = ("pool", "backend", "kind", "since", "after", "limit")


def _cut(text: str) -> str:
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT] + "..."


# --- the event kinds ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BackendEvent:
    """A backend changed state (health, ejection, operator, slow start ends...)."""

    kind: ClassVar[str] = "backend"
    at: float
    pool: str
    backend: str
    old: str
    new: str
    event: str
    reason: str

    def subjects(self) -> tuple[frozenset[str], frozenset[str]]:
        return frozenset({self.pool}), frozenset({self.backend})

    def summary(self) -> str:
        return f"{self.pool}/{self.backend}: {self.old} -> {self.new} ({self.reason})"


@dataclass(frozen=True, slots=True)
class AdminEvent:
    """A mutating call to the admin API, refused or not: who, what, and what came of it."""

    kind: ClassVar[str] = "admin"
    at: float
    client: str  # address:port of the admin client
    token: str | None  # the name of the token it presented (None: none that matched)
    method: str
    path: str
    status: int
    result: str  # "ok", or the error the client was given
    pool: str | None = None
    backend: str | None = None
    client_cert: str | None = None  # the subject CN of a TLS client certificate
    detail: Mapping[str, Any] = field(default_factory=dict)  # e.g. {"weight": 3}

    def subjects(self) -> tuple[frozenset[str], frozenset[str]]:
        return _set(self.pool), _set(self.backend)

    def summary(self) -> str:
        who = f"token {self.token}" if self.token else "no token"
        return f"{self.method} {self.path} by {who} from {self.client}: {self.status} {self.result}"


@dataclass(frozen=True, slots=True)
class Changes:
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in ("added", "removed", "changed"):
            names: tuple[str, ...] = getattr(self, name)
            out[name] = list(names[:MAX_NAMES])
            if len(names) > MAX_NAMES:
                out[f"{name}_total"] = len(names)
        return out


@dataclass(frozen=True, slots=True)
class ConfigDiff:
    """What a new config changes. Backends are named `pool/backend`; a pool is `changed` when a
    setting other than its backend list changed; `settings` names changed top-level keys."""

    listeners: Changes = Changes()
    pools: Changes = Changes()
    backends: Changes = Changes()
    settings: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.listeners or self.pools or self.backends or self.settings)

    def describe(self) -> str:
        parts = []
        for what, changes in (("listeners", self.listeners), ("pools", self.pools),
                              ("backends", self.backends)):
            for how in ("added", "removed", "changed"):
                names: tuple[str, ...] = getattr(changes, how)
                if names:
                    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
                    parts.append(f"{what} {how}: {shown}")
        if self.settings:
            parts.append(f"settings changed: {', '.join(self.settings)}")
        return "; ".join(parts) or "no change"

    def as_dict(self) -> dict[str, Any]:
        return {"listeners": self.listeners.as_dict(), "pools": self.pools.as_dict(),
                "backends": self.backends.as_dict(), "settings": list(self.settings)}


@dataclass(frozen=True, slots=True)
class ReloadEvent:
    """A new config (file, etcd, discovery) applied or refused."""

    kind: ClassVar[str] = "reload"
    at: float
    source: str  # file, etcd, discovery
    accepted: bool
    diff: ConfigDiff | None  # None: refused before it was a config (it did not validate)
    errors: tuple[str, ...] = ()

    def subjects(self) -> tuple[frozenset[str], frozenset[str]]:
        if self.diff is None:
            return frozenset(), frozenset()
        pools = {*self.diff.pools.added, *self.diff.pools.removed, *self.diff.pools.changed}
        backends = set()
        for name in (*self.diff.backends.added, *self.diff.backends.removed,
                     *self.diff.backends.changed):
            pool, _, backend = name.partition("/")
            pools.add(pool)
            backends.add(backend)
        return frozenset(pools), frozenset(backends)

    def summary(self) -> str:
        if self.accepted:
            return f"config from {self.source} applied: {self.diff.describe() if self.diff else 'no change'}"
        more = f" (and {len(self.errors) - 1} more)" if len(self.errors) > 1 else ""
        first = self.errors[0] if self.errors else "no reason given"
        return f"config from {self.source} refused: {first}{more}"


@dataclass(frozen=True, slots=True)
class BgpEvent:
    """A VIP's announcement changed: announced, withdrawn, or withdrawn for another reason."""

    kind: ClassVar[str] = "bgp"
    at: float
    prefix: str
    announced: bool
    reason: str
    description: str  # the announcer's own line: what and why
    pool: str | None = None
    listener: str | None = None
    next_hop: str | None = None
    available: int = 0

    def subjects(self) -> tuple[frozenset[str], frozenset[str]]:
        return _set(self.pool), frozenset()

    def summary(self) -> str:
        return self.description


@dataclass(frozen=True, slots=True)
class BgpSessionEvent:
    """A BGP session with a peer came up or went down (kind "bgp", as VIP changes)."""

    kind: ClassVar[str] = "bgp"
    at: float
    peer: str
    up: bool
    reason: str  # why it went down: "peer", "exabgp stopped", ...

    def subjects(self) -> tuple[frozenset[str], frozenset[str]]:
        return frozenset(), frozenset()

    def summary(self) -> str:
        return f"bgp session with {self.peer} " + ("up" if self.up else f"down ({self.reason})")


Event = BackendEvent | AdminEvent | ReloadEvent | BgpEvent | BgpSessionEvent


def _set(value: str | None) -> frozenset[str]:
    return frozenset() if value is None else frozenset({value})


# --- building events ------------------------------------------------------------------------------


def config_diff(old: Config | None, new: Config | None) -> ConfigDiff:
    """What `new` changes relative to `old` (either may be None: everything added or removed)."""
    old_listeners = {lst.name: lst for lst in old.listeners} if old else {}
    new_listeners = {lst.name: lst for lst in new.listeners} if new else {}
    old_pools = {p.name: p for p in old.pools} if old else {}
    new_pools = {p.name: p for p in new.pools} if new else {}
    old_backends = {f"{p.name}/{b.id}": b for p in old_pools.values() for b in p.backends}
    new_backends = {f"{p.name}/{b.id}": b for p in new_pools.values() for b in p.backends}
    pool_settings = {name: p.model_dump(exclude={"backends"}) for name, p in old_pools.items()}
    settings: tuple[str, ...] = ()
    if old is not None and new is not None:
        settings = tuple(key for key in Config.model_fields if key not in ("listeners", "pools")
                         and getattr(old, key) != getattr(new, key))
    return ConfigDiff(
        listeners=_changes(old_listeners, new_listeners, lambda a, b: a != b),
        pools=_changes(old_pools, new_pools,
                       lambda a, b: pool_settings[a.name] != b.model_dump(exclude={"backends"})),
        backends=_changes(old_backends, new_backends, lambda a, b: a != b),
        settings=settings,
    )


def _changes(old: Mapping[str, Any], new: Mapping[str, Any], differs: Any) -> Changes:
    return Changes(
        added=tuple(sorted(set(new) - set(old))),
        removed=tuple(sorted(set(old) - set(new))),
        changed=tuple(sorted(name for name in set(old) & set(new) if differs(old[name], new[name]))),
    )


def reload_event(at: float, source: str, accepted: bool, old: Config | None, new: Config | None,
                 errors: Sequence[str]) -> ReloadEvent:
    """The diff is between the running config and the one offered: for a refused config that
    validated (it could not be applied), what it would have changed."""
    diff = config_diff(old, new) if new is not None else None
    return ReloadEvent(at, source, accepted, diff, tuple(_cut(str(e)) for e in errors[:MAX_ERRORS]))


# --- the ring and its filter -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Entry:
    seq: int  # 1, 2, 3... in recording order; the log line carries it too
    event: Event


@dataclass(frozen=True, slots=True)
class EventFilter:
    pool: str | None = None
    backend: str | None = None
    kinds: frozenset[str] | None = None
    since: float | None = None  # unix seconds: events at or after
    after: int | None = None  # seq: events after this one (for polling without repeats)
    limit: int | None = None  # the newest `limit` of those that match

    def matches(self, entry: Entry) -> bool:
        event = entry.event
        if self.kinds is not None and event.kind not in self.kinds:
            return False
        if self.since is not None and event.at < self.since:
            return False
        if self.after is not None and entry.seq <= self.after:
            return False
        if self.pool is not None or self.backend is not None:
            pools, backends = event.subjects()
            if self.pool is not None and self.pool not in pools:
                return False
            if self.backend is not None and self.backend not in backends:
                return False
        return True


class EventRing:
    """The last `capacity` events, oldest first; older ones are dropped and counted."""

    def __init__(self, capacity: int = RING_SIZE) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self._entries: deque[Entry] = deque(maxlen=capacity)
        self.capacity = capacity
        self.recorded = 0
        self.dropped = 0

    def add(self, event: Event) -> Entry:
        self.recorded += 1
        if len(self._entries) == self.capacity:
            self.dropped += 1
        entry = Entry(self.recorded, event)
        self._entries.append(entry)
        return entry

    def query(self, selection: EventFilter = EventFilter()) -> list[Entry]:
        found = [entry for entry in self._entries if selection.matches(entry)]
        if selection.limit is not None:
            found = found[-selection.limit:] if selection.limit else []
        return found

    def statistics(self) -> dict[str, int]:
        return {"capacity": self.capacity, "held": len(self._entries), "recorded": self.recorded,
                "dropped": self.dropped}


def parse_since(text: str) -> float:
    """Unix seconds ("1767225600", "1767225600.5") or ISO 8601 ("2026-01-01T00:00:00Z",
    "2026-01-01T01:00:00+01:00"; without an offset: UTC). ValueError otherwise."""
    value = text.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds):
            raise ValueError(f"since: expected unix seconds or ISO 8601, got {text!r}")
        return seconds
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"since: expected unix seconds or ISO 8601 such as "
                         f"2026-01-01T00:00:00Z, got {text!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def parse_filter(query: Mapping[str, str]) -> EventFilter:
    """The filter of a query string (`pool`, `backend`, `kind` (comma-separated), `since`,
    `after`, `limit`); ValueError naming what is wrong, including an unknown key."""
    unknown = sorted(set(query) - set(FILTERS))
    if unknown:
        raise ValueError(f"unknown filter {unknown[0]!r}; expected one of {', '.join(FILTERS)}")
    kinds = None
    if (kind := query.get("kind")) is not None:
        kinds = frozenset(k.strip() for k in kind.split(",") if k.strip())
        if not kinds or not kinds <= set(KINDS):
            raise ValueError(f"kind: expected one or more of {', '.join(KINDS)}, got {kind!r}")
    since = parse_since(query["since"]) if "since" in query else None
    return EventFilter(pool=query.get("pool"), backend=query.get("backend"), kinds=kinds,
                       since=since, after=_count(query, "after"), limit=_count(query, "limit"))


def _count(query: Mapping[str, str], key: str) -> int | None:
    if key not in query:
        return None
    text = query[key].strip()
    if not text.isascii() or not text.isdigit() or len(text) > 12:
        raise ValueError(f"{key}: expected a whole number, got {query[key]!r}")
    return int(text)


# --- the JSON form ------------------------------------------------------------------------------------


def iso_utc(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def as_dict(entry: Entry) -> dict[str, Any]:
    """One event as the API serves it and the log writes it: the common fields first."""
    event = entry.event
    out: dict[str, Any] = {"seq": entry.seq, "time": iso_utc(event.at), "ts": event.at,
                           "kind": event.kind, "summary": _cut(event.summary())}
    if isinstance(event, BackendEvent):
        out.update(pool=event.pool, backend=event.backend, old=event.old, new=event.new,
                   event=event.event, reason=_cut(event.reason))
    elif isinstance(event, AdminEvent):
        out.update(client=event.client, token=event.token, client_cert=event.client_cert,
                   method=event.method, path=_cut(event.path), pool=event.pool,
                   backend=event.backend, status=event.status, result=_cut(event.result),
                   detail=dict(event.detail))
    elif isinstance(event, ReloadEvent):
        out.update(source=event.source, accepted=event.accepted,
                   diff=event.diff.as_dict() if event.diff is not None else None,
                   errors=list(event.errors))
    elif isinstance(event, BgpSessionEvent):
        out.update(peer=event.peer, up=event.up, reason=event.reason)
    else:
        out.update(prefix=event.prefix, announced=event.announced, reason=event.reason,
                   pool=event.pool, listener=event.listener, next_hop=event.next_hop,
                   available=event.available)
    return out


def json_line(entry: Entry) -> str:
    """One line: JSON escapes every control character, so nothing a client sent can break it."""
    return json.dumps(as_dict(entry), separators=(",", ":"), ensure_ascii=True, default=str)


def dicts(entries: Iterable[Entry]) -> list[dict[str, Any]]:
    return [as_dict(entry) for entry in entries]
