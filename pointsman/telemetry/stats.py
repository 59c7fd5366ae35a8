"""Cheap counters the data plane increments (an integer add); exporters read them.

One instance per listener and per backend, kept across config reloads by name so totals survive.
"""

from __future__ import annotations

from collections import Counter

from pointsman.telemetry.flow import EndReason, RejectReason
from pointsman.telemetry.histogram import DURATION_BUCKETS, QUEUE_BUCKETS, Histogram


class ListenerStats:
    """`accepted` counts every connection the listener took from the kernel; each one is then
    either refused (`rejected`, once, with one reason), or still open (`active`, which includes
    the `pending` ones still reading a preamble), or ended (`ended`, once, with one reason):
    accepted = sum(rejected) + sum(ended) + active, at every moment."""

    GAUGES = frozenset({"active", "capacity", "pending"})  # the rest are counters (aggregate.py)
    __slots__ = (
        "accept_errors",
        "accepted",
        "active",
        "bytes_in",
        "bytes_out",
        "capacity",
        "connect_failed",
        "duration",
        "ended",
        "local_resource",
        "pending",
        "rejected",
        "retried",
        "source_port_failures",
        "spliced",
        "tls_unrouted",
        "ttfb",
    )

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.accepted = 0
        self.active = 0
        self.pending = 0  # of `active`: still reading a PROXY header or ClientHello
        self.connect_failed = 0
        self.retried = 0
        self.spliced = 0  # connections moved to the zero-copy path
        self.source_port_failures = 0  # connects that found no free source address/port
        self.tls_unrouted = 0  # ClientHellos that matched no TLS route (sent to the default pool)
        self.bytes_in = 0  # client -> backend
        self.bytes_out = 0  # backend -> client
        self.rejected: Counter[RejectReason] = Counter()
        self.ended: Counter[EndReason] = Counter()
        self.local_resource: Counter[str] = Counter()  # "op:ERRNO" (op: accept, socket, ...)
        self.accept_errors: Counter[str] = Counter()  # by errno name
        self.ttfb = Histogram()  # accept -> first byte from the backend
        self.duration = Histogram(DURATION_BUCKETS)


class PoolStats:
    """A pool's queue in one process: how many wait now (`queued`, a gauge) and how long the
    ones that left waited (served, timed out or gone). Refusals (queue_full, queue_timeout)
    are the listeners' `rejected` counts."""

    GAUGES = frozenset({"queued"})
    __slots__ = ("queue_wait", "queued", "queued_total")

    def __init__(self) -> None:
        self.queued = 0
        self.queued_total = 0  # connections that entered the queue
        self.queue_wait = Histogram(QUEUE_BUCKETS)


class BackendStats:
    """Live load and totals of one backend; `active` is what least-connections reads."""

    GAUGES = frozenset({"active"})
    __slots__ = ("active", "bytes_in", "bytes_out", "connect_failures", "connect_time", "total")

    def __init__(self) -> None:
        self.active = 0
        self.total = 0
        self.connect_failures = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.connect_time = Histogram()
