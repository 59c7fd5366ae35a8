"""Connection admission limits: a listener-wide rate, and per-source rates and connection caps.

Sources are grouped by prefix (e.g. /24 for IPv4) so one abusive network counts as one source.
The per-source table is bounded: least recently seen sources without open connections go first
(a source with open connections is bounded anyway by the listener's connection table).
"""

from __future__ import annotations

import enum
import ipaddress
from collections import OrderedDict
from dataclasses import dataclass

from pointsman.balance.hashing import client_ip


class LimitReason(enum.StrEnum):
    RATE = "rate_limited"
    SOURCE_RATE = "source_rate_limited"
    SOURCE_CONNECTIONS = "source_connection_limit"


class TokenBucket:
    """`rate` tokens per second, at most `burst` saved up; one token per new connection."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float | None = None, now: float = 0.0) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else max(rate, 1.0)
        self.tokens = self.burst
        self.stamp = now

    def take(self, now: float) -> bool:
        elapsed = now - self.stamp
        if elapsed > 0:
            self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
            self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


@dataclass(frozen=True, slots=True)
class Limits:
    max_connections_per_source: int | None = None
    new_connections_per_second: float | None = None
    new_connections_per_second_per_source: float | None = None
    source_prefix_v4: int = 32
    source_prefix_v6: int = 64
    max_sources: int = 100_000

    @property
    def per_source(self) -> bool:
        return (self.max_connections_per_source is not None
                or self.new_connections_per_second_per_source is not None)


class _Source:
    __slots__ = ("active", "bucket")

    def __init__(self, bucket: TokenBucket | None) -> None:
        self.active = 0
        self.bucket = bucket


class Admission:
    """Decides whether a new connection from `ip` may enter; tracks per-source open counts."""

    def __init__(self, limits: Limits, now: float = 0.0) -> None:
        self.limits = limits
        rate = limits.new_connections_per_second
        self.bucket = TokenBucket(rate, now=now) if rate is not None else None
        self.sources: OrderedDict[bytes, _Source] = OrderedDict()

    def source_key(self, ip: str) -> bytes:
        address = client_ip(ip)
        bits = self.limits.source_prefix_v4 if address.version == 4 else self.limits.source_prefix_v6
        network = ipaddress.ip_network(f"{address}/{bits}", strict=False)
        return network.network_address.packed + bytes((bits,))

    def admit(self, ip: str, now: float) -> tuple[LimitReason | None, bytes | None]:
        """Return (refusal reason or None, the source key to pass to `closed` later)."""
        limits = self.limits
        if not limits.per_source:
            if self.bucket is not None and not self.bucket.take(now):
                return LimitReason.RATE, None
            return None, None
        key = self.source_key(ip)
        source = self.sources.get(key)
        if source is None:
            rate = limits.new_connections_per_second_per_source
            source = _Source(TokenBucket(rate, now=now) if rate is not None else None)
            self._insert(key, source)
        else:
            self.sources.move_to_end(key)
        cap = limits.max_connections_per_source
        if cap is not None and source.active >= cap:
            return LimitReason.SOURCE_CONNECTIONS, None
        if source.bucket is not None and not source.bucket.take(now):
            return LimitReason.SOURCE_RATE, None
        if self.bucket is not None and not self.bucket.take(now):
            return LimitReason.RATE, None
        source.active += 1
        return None, key

    def closed(self, key: bytes) -> None:
        source = self.sources.get(key)
        if source is not None and source.active > 0:
            source.active -= 1

    def _insert(self, key: bytes, source: _Source) -> None:
        self.sources[key] = source
        if len(self.sources) <= self.limits.max_sources:
            return
        for old_key, old in self.sources.items():
            if old.active == 0 and old_key != key:
                del self.sources[old_key]
                return
