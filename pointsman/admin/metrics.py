"""Prometheus exposition: a collector that reads the data plane's counters at scrape time.

Every metric is declared here, named after the SLIs (connection success, time to first byte,
active connections, churn, table utilisation, drops, resets, backend health), and labelled by
listener, pool and backend only: no per-client labels.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import platform
import socket
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

import pointsman
from pointsman.kernel.stats import KernelListenerStats
from pointsman.pool.state import BackendState
from pointsman.proxy.engine import engine_name
from pointsman.telemetry import netstat, sockdiag
from pointsman.telemetry.flow import DropReason, EndReason, RejectReason
from pointsman.telemetry.histogram import Histogram
from pointsman.telemetry.stats import ListenerStats
from pointsman.telemetry.udp_stats import UdpListenerStats

if TYPE_CHECKING:
    from pointsman.node.view import NodeView

P = "pointsman_"
T = TypeVar("T")
log = logging.getLogger("pointsman.metrics")


def _histogram(name: str, doc: str, labels: list[str]) -> HistogramMetricFamily:
    return HistogramMetricFamily(P + name, doc, labels=labels)


def _add(family: HistogramMetricFamily, values: list[str], hist: Histogram) -> None:
    family.add_metric(values, hist.cumulative(), hist.sum)


def _local(family: CounterMetricFamily, values: list[str], counts: dict[str, int]) -> None:
    """Counts keyed "op:ERRNO" as op and errno labels."""
    for key, n in sorted(counts.items()):
        op, _, name = key.partition(":")
        family.add_metric([*values, op, name], n)


class RuntimeCollector(Collector):
    def __init__(self, runtime: NodeView) -> None:
        self.runtime = runtime
        self.uvloop = _uvloop_version()  # made in the loop's thread; scrapes run in another

    def _listeners(self, kind: type[T]) -> Iterator[tuple[list[str], T]]:
        """(listener, pool) labels and statistics of every listener whose statistics are `kind`."""
        for listener in list(self.runtime.listeners.values()):  # a copy: reloads may change it
            stats = listener.statistics()
            if isinstance(stats, kind):
                yield [listener.name, listener.pool.name], stats

    def collect(self) -> Iterator[Metric]:
        local = CounterMetricFamily(P + "local_resource_errors", "Our own shortages: descriptors, "
                                    "buffers, memory, source ports (never a backend failure)",
                                    labels=["listener", "pool", "op", "errno"])
        yield from self._tcp(local)
        yield from self._udp(local)
        yield local
        yield from self._kernel()
        yield from self._backends()
        yield from self._process()
        yield from self._config_sources()
        yield from self._build_info()
        yield from self._reloads()
        yield from self._accept_queues()
        yield from self._syn_counters()
        yield from self._tls()
        yield from self._connection_ages()
        yield from self._pool_limits()
        yield from self._health_durations()
        yield from self._queues()
        yield from self._bgp()

    def _tcp(self, local: CounterMetricFamily) -> Iterator[Metric]:
        lbl = ["listener", "pool"]
        accepted = CounterMetricFamily(P + "connections_accepted", "Connections accepted", labels=lbl)
        rejected = CounterMetricFamily(
            P + "connections_rejected", "Connections refused before any backend was tried",
            labels=[*lbl, "reason"])
        ended = CounterMetricFamily(
            P + "connections_ended", "Finished connections by how they ended (resets by side)",
            labels=[*lbl, "reason"])
        failed = CounterMetricFamily(
            P + "connections_connect_failed", "Connections closed because every backend try failed",
            labels=lbl)
        retried = CounterMetricFamily(P + "connect_retries", "Connect retries on another backend",
                                      labels=lbl)
        active = GaugeMetricFamily(P + "active_connections", "Open connections", labels=lbl)
        used = GaugeMetricFamily(P + "connection_table_used", "Connection table entries in use",
                                 labels=lbl)
        pending = GaugeMetricFamily(P + "preamble_pending", "Connections still reading a PROXY "
                                    "header or ClientHello (outside the table)", labels=lbl)
        accept_errors = CounterMetricFamily(P + "accept_errors", "accept() failures of the "
                                            "listening socket", labels=[*lbl, "errno"])
        capacity = GaugeMetricFamily(P + "connection_table_capacity", "Connection table size",
                                     labels=lbl)
        nbytes = CounterMetricFamily(P + "bytes", "Bytes proxied (in: client to backend)",
                                     labels=[*lbl, "direction"])
        spliced = CounterMetricFamily(P + "connections_spliced", "Connections moved to the zero-copy "
                                      "(splice) path", labels=lbl)
        no_port = CounterMetricFamily(P + "source_port_failures", "Backend connects that found no "
                                      "free source address or port", labels=lbl)
        ttfb = _histogram("time_to_first_byte_seconds",
                          "Accept to first byte from the backend", lbl)
        duration = _histogram("connection_duration_seconds", "Connection lifetime", lbl)
        for v, s in self._listeners(ListenerStats):
            accepted.add_metric(v, s.accepted)
            for reason in RejectReason:
                rejected.add_metric([*v, reason.value], s.rejected[reason])
            for end in EndReason:
                ended.add_metric([*v, end.value], s.ended[end])
            failed.add_metric(v, s.connect_failed)
            retried.add_metric(v, s.retried)
            active.add_metric(v, s.active)
            used.add_metric(v, s.active - s.pending)
            pending.add_metric(v, s.pending)
            _local(local, v, s.local_resource)
            for name, n in sorted(s.accept_errors.items()):
                accept_errors.add_metric([*v, name], n)
            capacity.add_metric(v, s.capacity)
            nbytes.add_metric([*v, "in"], s.bytes_in)
            nbytes.add_metric([*v, "out"], s.bytes_out)
            spliced.add_metric(v, s.spliced)
            no_port.add_metric(v, s.source_port_failures)
            _add(ttfb, v, s.ttfb)
            _add(duration, v, s.duration)
        yield from (accepted, rejected, ended, failed, retried, active, used, capacity, nbytes,
                    spliced, no_port, ttfb, duration, pending, accept_errors)

    def _udp(self, local: CounterMetricFamily) -> Iterator[Metric]:
        lbl = ["listener", "pool"]
        sessions = GaugeMetricFamily(P + "udp_sessions", "Live UDP sessions (table use)",
                                     labels=lbl)
        capacity = GaugeMetricFamily(P + "udp_session_table_capacity", "UDP session table size",
                                     labels=lbl)
        created = CounterMetricFamily(P + "udp_sessions_created", "UDP sessions created",
                                      labels=lbl)
        ended = CounterMetricFamily(P + "udp_sessions_ended", "UDP sessions ended, by reason",
                                    labels=[*lbl, "reason"])
        datagrams = CounterMetricFamily(P + "udp_datagrams", "UDP datagrams forwarded",
                                        labels=[*lbl, "direction"])
        nbytes = CounterMetricFamily(P + "udp_bytes", "UDP payload bytes forwarded",
                                     labels=[*lbl, "direction"])
        drops = CounterMetricFamily(P + "udp_drops", "UDP datagrams dropped, by reason",
                                    labels=[*lbl, "reason"])
        for v, s in self._listeners(UdpListenerStats):
            sessions.add_metric(v, s.sessions)
            capacity.add_metric(v, s.capacity)
            created.add_metric(v, s.sessions_created)
            for reason, n in sorted(s.sessions_ended.items()):
                ended.add_metric([*v, reason], n)
            datagrams.add_metric([*v, "in"], s.datagrams_in)
            datagrams.add_metric([*v, "out"], s.datagrams_out)
            nbytes.add_metric([*v, "in"], s.bytes_in)
            nbytes.add_metric([*v, "out"], s.bytes_out)
            for drop in DropReason:
                drops.add_metric([*v, drop.value], s.drops[drop])
            _local(local, v, s.local_resource)
        yield from (sessions, capacity, created, ended, datagrams, nbytes, drops)

    def _kernel(self) -> Iterator[Metric]:
        """The nftables fast path: kernel counters (read at scrape) and map programming."""
        lbl = ["listener", "pool"]
        blbl = [*lbl, "backend"]
        new = CounterMetricFamily(P + "kernel_new_connections", "New flows seen by the kernel data "
                                  "plane (first packets DNATed or refused)", labels=lbl)
        refused = CounterMetricFamily(P + "kernel_connections_rejected", "New flows refused by the "
                                      "kernel data plane", labels=[*lbl, "reason"])
        packets = CounterMetricFamily(P + "kernel_packets", "Forwarded packets (in: client to "
                                      "backend)", labels=[*lbl, "direction"])
        nbytes = CounterMetricFamily(P + "kernel_bytes", "Forwarded bytes, IP headers included (in: "
                                     "client to backend)", labels=[*lbl, "direction"])
        b_new = CounterMetricFamily(P + "kernel_backend_new_connections", "New flows DNATed to the "
                                    "backend", labels=blbl)
        b_packets = CounterMetricFamily(P + "kernel_backend_packets", "Forwarded packets (in: client "
                                        "to backend)", labels=[*blbl, "direction"])
        b_bytes = CounterMetricFamily(P + "kernel_backend_bytes", "Forwarded bytes, IP headers "
                                      "included (in: client to backend)", labels=[*blbl, "direction"])
        b_slots = GaugeMetricFamily(P + "kernel_backend_slots", "Slots of the kernel table sending "
                                    "new flows to the backend", labels=blbl)
        slots = GaugeMetricFamily(P + "kernel_slots", "Size of the kernel slot table", labels=lbl)
        updates = CounterMetricFamily(P + "kernel_map_updates", "Slot map transactions committed",
                                      labels=lbl)
        failures = CounterMetricFamily(P + "kernel_map_update_failures", "Slot map transactions the "
                                       "kernel refused (retried)", labels=lbl)
        latency = _histogram("kernel_map_update_seconds", "Pool snapshot published to its slot map "
                             "transaction committed", lbl)
        changed = CounterMetricFamily(P + "kernel_slots_changed", "Slots that moved to another "
                                      "backend (nat: stateless: their established flows were reset)",
                                      labels=lbl)
        age = GaugeMetricFamily(P + "kernel_counters_age_seconds", "How old the kernel counters "
                                "in this scrape are (read in the background, about every second)",
                                labels=lbl)
        nat = GaugeMetricFamily(P + "kernel_nat_info", "Always 1: the listener's NAT mode",
                                labels=[*lbl, "nat"])
        ct_used = GaugeMetricFamily(P + "conntrack_entries", "Entries in the conntrack table")
        ct_max = GaugeMetricFamily(P + "conntrack_max", "Bound of the conntrack table "
                                   "(nf_conntrack_max)")
        seen = False
        for v, s in self._listeners(KernelListenerStats):
            new.add_metric(v, s.new_connections)
            refused.add_metric([*v, "no_backend"], s.rejected)
            refused.add_metric([*v, "denied"], s.denied)
            packets.add_metric([*v, "in"], s.packets_in)
            packets.add_metric([*v, "out"], s.packets_out)
            nbytes.add_metric([*v, "in"], s.bytes_in)
            nbytes.add_metric([*v, "out"], s.bytes_out)
            slots.add_metric(v, s.slots)
            for b in s.backends:
                bv = [*v, b.backend]
                b_new.add_metric(bv, b.new_connections)
                b_packets.add_metric([*bv, "in"], b.packets_in)
                b_packets.add_metric([*bv, "out"], b.packets_out)
                b_bytes.add_metric([*bv, "in"], b.bytes_in)
                b_bytes.add_metric([*bv, "out"], b.bytes_out)
                b_slots.add_metric(bv, b.slots)
            updates.add_metric(v, s.map_updates.applied)
            failures.add_metric(v, s.map_updates.failed)
            _add(latency, v, s.map_updates.latency)
            changed.add_metric(v, s.map_updates.slots_changed)
            age.add_metric(v, s.age)
            nat.add_metric([*v, s.nat], 1)
            if not seen:
                ct_used.add_metric([], s.conntrack_entries)
                ct_max.add_metric([], s.conntrack_max)
                seen = True
        yield from (new, refused, packets, nbytes, b_new, b_packets, b_bytes, b_slots, slots,
                    updates, failures, latency, changed, age, nat, ct_used, ct_max)

    def _backends(self) -> Iterator[Metric]:
        lbl = ["pool", "backend"]
        state = GaugeMetricFamily(P + "backend_state", "1 for the backend's current state",
                                  labels=[*lbl, "state"])
        weight = GaugeMetricFamily(P + "backend_weight", "Configured (operator) weight", labels=lbl)
        active = GaugeMetricFamily(P + "backend_active_connections", "Open connections or UDP "
                                   "sessions", labels=lbl)
        total = CounterMetricFamily(P + "backend_connections", "Connections established",
                                    labels=lbl)
        failures = CounterMetricFamily(P + "backend_connect_failures", "Failed connects",
                                       labels=lbl)
        nbytes = CounterMetricFamily(P + "backend_bytes", "Bytes (in: client to backend)",
                                     labels=[*lbl, "direction"])
        connect = _histogram("backend_connect_seconds", "Time to connect to the backend", lbl)
        checks = CounterMetricFamily(P + "health_checks", "Health check probes by result",
                                     labels=[*lbl, "result"])
        probe = GaugeMetricFamily(P + "health_check_latency_seconds", "Latency of the last probe",
                                  labels=lbl)
        healthy = GaugeMetricFamily(P + "pool_available_backends", "Backends taking new "
                                    "connections", labels=["pool"])
        size = GaugeMetricFamily(P + "pool_backends", "Backends configured", labels=["pool"])
        for pool in list(self.runtime.pools.values()):
            snapshot = pool.snapshot
            healthy.add_metric([pool.name], snapshot.available)
            size.add_metric([pool.name], len(snapshot.backends))
            for m, bs in zip(pool.members(), self.runtime.backend_stats(pool), strict=True):
                v = [pool.name, m.id]
                for st in BackendState:
                    state.add_metric([*v, st.value], float(m.machine.state is st))
                weight.add_metric(v, m.weight)
                active.add_metric(v, bs.active)
                total.add_metric(v, bs.total)
                failures.add_metric(v, bs.connect_failures)
                nbytes.add_metric([*v, "in"], bs.bytes_in)
                nbytes.add_metric([*v, "out"], bs.bytes_out)
                _add(connect, v, bs.connect_time)
                checks.add_metric([*v, "success"], m.checks - m.check_failures)
                checks.add_metric([*v, "failure"], m.check_failures)
                if m.last_check is not None:
                    probe.add_metric(v, m.last_check.latency)
        yield from (state, weight, active, total, failures, nbytes, connect, checks, probe,
                    healthy, size)

    def _process(self) -> Iterator[Metric]:
        """Every process of the node (control and workers), labelled `process`."""
        lbl = ["process"]
        lag = GaugeMetricFamily(P + "event_loop_lag_seconds",
                                "How late the last periodic tick ran (event-loop saturation)",
                                labels=lbl)
        cpu = CounterMetricFamily(P + "process_cpu_seconds", "User and system CPU time",
                                  labels=lbl)
        rss = GaugeMetricFamily(P + "process_resident_memory_bytes", "Resident memory",
                                labels=lbl)
        fds = GaugeMetricFamily(P + "process_open_fds", "Open file descriptors", labels=lbl)
        max_fds = GaugeMetricFamily(P + "process_max_fds", "Limit on open file descriptors",
                                    labels=lbl)
        started = GaugeMetricFamily(P + "process_start_time_seconds", "Start time (unix)",
                                    labels=lbl)
        for p in self.runtime.processes():
            v = [p.process]
            lag.add_metric(v, p.loop_lag)
            cpu.add_metric(v, p.cpu_seconds)
            rss.add_metric(v, p.resident_bytes)
            fds.add_metric(v, p.open_fds)
            max_fds.add_metric(v, p.max_fds)
            started.add_metric(v, p.started_at)
        flows = CounterMetricFamily(P + "flow_log_dropped", "Flow records dropped (queue full)")
        flows.add_metric([], self.runtime.flow_log_dropped())
        crashes = CounterMetricFamily(P + "task_crashes", "Crashes of long-lived tasks (bugs), by "
                                      "task kind; each was logged with its traceback",
                                      labels=["task"])
        for kind, n in sorted(self.runtime.task_crashes().items()):
            crashes.add_metric([kind], n)
        workers = GaugeMetricFamily(P + "worker_up", "1 while the worker process serves",
                                    labels=["worker"])
        restarts = CounterMetricFamily(P + "worker_restarts", "Restarts of crashed workers",
                                       labels=["worker"])
        for w in self.runtime.workers():
            workers.add_metric([str(w.index)], float(w.state == "running"))
            restarts.add_metric([str(w.index)], w.restarts)
        ready = GaugeMetricFamily(P + "ready", "1 while /readyz answers 200")
        ready.add_metric([], float(self.runtime.readiness().ready))
        yield from (lag, cpu, rss, fds, max_fds, started, flows, crashes, workers, restarts, ready)

    def _config_sources(self) -> Iterator[Metric]:
        """Config changes by source (file, etcd, discovery), discovery answers, the etcd link."""
        applied = CounterMetricFamily(P + "config_applied", "Configs applied, by source",
                                      labels=["source"])
        rejected = CounterMetricFamily(P + "config_rejected", "Configs refused (the running one "
                                       "stays), by source", labels=["source"])
        updates = CounterMetricFamily(P + "discovery_updates", "Changed backend sets found by "
                                      "discovery", labels=["pool", "source"])
        found = GaugeMetricFamily(P + "discovery_backends", "Backends in the last answer of each "
                                  "discovery source", labels=["pool", "source"])
        composer = self.runtime.composer
        if composer is not None:
            # File reloads are refused before the composer sees them too: their own count.
            refused = {**composer.rejected, "file": self.runtime.reload_history.refused}
            for source in sorted({"file", "etcd", "discovery", *composer.applied, *refused}):
                applied.add_metric([source], composer.applied[source])
                rejected.add_metric([source], refused.get(source, 0))
            for (pool, kind), n in sorted(composer.updates.items()):
                updates.add_metric([pool, kind], n)
            for pool, kinds in sorted(composer.statistics()["discovered"].items()):
                for kind, n in sorted(kinds.items()):
                    found.add_metric([pool, kind], n)
        yield from (applied, rejected, updates, found)
        fleet = self.runtime.fleet
        if fleet is not None:
            connected = GaugeMetricFamily(P + "etcd_connected", "1 while the etcd config watch "
                                          "is connected")
            connected.add_metric([], float(fleet.connected))
            revision = GaugeMetricFamily(P + "config_revision", "etcd revision of the running "
                                         "cluster config", labels=["source"])
            revision.add_metric(["etcd"], fleet.revision)
            draining = GaugeMetricFamily(P + "node_draining", "1 while an operator has drained "
                                         "this node (fleet drain)")
            draining.add_metric([], float(fleet.draining is not None))
            yield from (connected, revision, draining)


    # --- issue 16: SYN and accept-queue pressure, state leaks, TLS routing, BGP, build ---------

    def _build_info(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(P + "build_info", "Always 1: the pointsman version, the Python "
                                 "and the uvloop running it (none: plain asyncio), the connection "
                                 "engine (cython: compiled; python: the pure-Python one)",
                                 labels=["version", "python", "uvloop", "engine"])
        info.add_metric([pointsman.__version__, platform.python_version(), self.uvloop,
                         _running_engine()], 1)
        yield info

    def _reloads(self) -> Iterator[Metric]:
        """The last config file reload (SIGHUP, API, CLI); the config loaded at start counts."""
        history = self.runtime.reload_history
        ok = GaugeMetricFamily(P + "config_last_reload_success", "1 if the last config file "
                               "reload was applied, 0 if it was refused (the old config runs)")
        ok.add_metric([], float(history.last_ok))
        at = GaugeMetricFamily(P + "config_last_reload_timestamp_seconds", "Wall time of the "
                               "last config file reload (the start time before any)")
        at.add_metric([], history.last_at if history.last_at is not None
                      else self.runtime.started_at)
        yield from (ok, at)

    def _accept_queues(self) -> Iterator[Metric]:
        """Per TCP listener: its accept queue now and the queue's bound, from sock_diag, so the
        control process sees the workers' sockets too. With several sockets (workers, with
        SO_REUSEPORT; several addresses or a port range) the fullest one is shown: that is the
        one that overflows first."""
        lbl = ["listener", "pool"]
        depth = GaugeMetricFamily(P + "accept_queue_depth", "Handshaken connections waiting for "
                                  "accept() (the fullest listening socket)", labels=lbl)
        bound = GaugeMetricFamily(P + "accept_queue_limit", "Bound of that accept queue: "
                                  "min(backlog, net.core.somaxconn); it holds limit + 1",
                                  labels=lbl)
        sockets = GaugeMetricFamily(P + "accept_queue_sockets", "Listening sockets found for "
                                    "the listener (one per worker)", labels=lbl)
        wanted = {}
        for listener in list(self.runtime.listeners.values()):
            if listener.config.protocol == "tcp" and listener.config.dataplane == "proxy":
                for bind in listener.config.addresses:  # each its own socket (lists, ranges)
                    try:
                        wanted[(ipaddress.ip_address(bind.host), bind.port)] = listener
                    except ValueError:
                        continue
        if wanted:
            try:
                found = sockdiag.listen_sockets(sorted({_family(a) for a, _ in wanted}))
            except OSError as exc:
                log.debug("metrics: cannot read accept queues: %s", exc)
                found = []
            by_address: dict[tuple[Any, int], list[sockdiag.ListenSocket]] = {}
            for sock in found:
                by_address.setdefault((sock.address, sock.port), []).append(sock)
            per_listener: dict[str, list[sockdiag.ListenSocket]] = {}
            for key, listener in wanted.items():  # a listener with several addresses: all of them
                per_listener.setdefault(listener.name, []).extend(by_address.get(key, []))
            for listener in {lst.name: lst for lst in wanted.values()}.values():
                socks = per_listener.get(listener.name)
                if not socks:
                    continue
                fullest = max(socks, key=lambda s: (s.queued / max(s.bound, 1), s.queued))
                v = [listener.name, listener.pool.name]
                depth.add_metric(v, fullest.queued)
                bound.add_metric(v, fullest.bound)
                sockets.add_metric(v, len(socks))
        yield from (depth, bound, sockets)

    def _syn_counters(self) -> Iterator[Metric]:
        """Node-wide (this network namespace) TcpExt counters: every listener on the host."""
        names = (
            ("listen_overflows", "tcp_listen_overflows", "Handshakes dropped because a listener's "
             "accept queue was full (TcpExt ListenOverflows, node-wide)"),
            ("listen_drops", "tcp_listen_drops", "SYNs and ACKs dropped by listeners, overflows "
             "included (TcpExt ListenDrops, node-wide)"),
            ("syn_retrans", "tcp_syn_retransmits", "SYNs and SYN-ACKs retransmitted "
             "(TcpExt TCPSynRetrans, node-wide: backend connects and client handshakes)"),
            ("syncookies_sent", "tcp_syncookies_sent", "SYN cookies sent because a SYN queue "
             "was full (TcpExt SyncookiesSent, node-wide)"),
            ("syncookies_recv", "tcp_syncookies_received", "Valid SYN cookies received back "
             "(TcpExt SyncookiesRecv, node-wide)"),
            ("syncookies_failed", "tcp_syncookies_failed", "Invalid SYN cookies received "
             "(TcpExt SyncookiesFailed, node-wide)"),
        )
        counters = netstat.read()
        for field, name, doc in names:
            family = CounterMetricFamily(P + name, doc)
            if counters is not None:
                family.add_metric([], getattr(counters, field))
            yield family

    def _tls(self) -> Iterator[Metric]:
        unrouted = CounterMetricFamily(P + "tls_unrouted", "TLS connections whose ClientHello "
                                       "matched no tls_routes entry (sent to the default pool)",
                                       labels=["listener", "pool"])
        for v, s in self._listeners(ListenerStats):
            unrouted.add_metric(v, s.tls_unrouted)
        yield unrouted

    def _connection_ages(self) -> Iterator[Metric]:
        """Age of the oldest open connection per (listener, pool it went to); with workers, the
        oldest any worker holds (measured when it last reported)."""
        age = GaugeMetricFamily(P + "oldest_connection_age_seconds", "Age of the oldest open "
                                "connection (0: none open)", labels=["listener", "pool"])
        for (listener, pool), seconds in sorted(self.runtime.connection_ages().items()):
            age.add_metric([listener, pool], seconds)
        yield age

    def _pool_limits(self) -> Iterator[Metric]:
        """What the state-leak and TLS alerts compare against: the pools' limits, check types
        and how long each backend has been in its state."""
        max_age = GaugeMetricFamily(P + "pool_max_connection_duration_seconds", "The pool's "
                                    "max_connection_duration (absent: unlimited)", labels=["pool"])
        drain = GaugeMetricFamily(P + "pool_drain_timeout_seconds", "The pool's drain_timeout "
                                  "(absent: a drain waits for connections to end)", labels=["pool"])
        check = GaugeMetricFamily(P + "health_check_info", "Always 1: the pool's active health "
                                  "check type", labels=["pool", "type"])
        since = GaugeMetricFamily(P + "backend_state_seconds", "Seconds since the backend "
                                  "entered its current state", labels=["pool", "backend"])
        now = time.monotonic()  # the clock the pools' state machines stamp transitions with
        for pool in list(self.runtime.pools.values()):
            config = pool.config
            if (limit := getattr(config, "max_connection_duration", None)) is not None:
                max_age.add_metric([pool.name], float(limit))
            if (timeout := getattr(config, "drain_timeout", None)) is not None:
                drain.add_metric([pool.name], float(timeout))
            if config.health_check is not None:
                check.add_metric([pool.name, config.health_check.type], 1)
            for m in pool.members():
                since.add_metric([pool.name, m.id], max(now - m.machine.since, 0.0))
        yield from (max_age, drain, check, since)

    def _health_durations(self) -> Iterator[Metric]:
        duration = _histogram("health_check_duration_seconds", "Active health probe latency, "
                              "start to verdict", ["pool"])
        for pool in list(self.runtime.pools.values()):
            _add(duration, [pool.name], pool.check_duration)
        yield duration

    def _queues(self) -> Iterator[Metric]:
        """Per-backend caps and each pool's queue (with workers: summed over them; the caps are
        the node's, as configured). Refusals are the listeners' `queue_full`/`queue_timeout`."""
        length = GaugeMetricFamily(P + "pool_queue_length", "Connections waiting in the pool's "
                                   "queue for a backend slot", labels=["pool"])
        queued = CounterMetricFamily(P + "pool_queued_connections", "Connections that entered "
                                     "the pool's queue", labels=["pool"])
        wait = _histogram("pool_queue_wait_seconds", "Time connections waited in the pool's "
                          "queue (served, timed out or left)", ["pool"])
        cap = GaugeMetricFamily(P + "backend_max_connections", "The backend's max_connections "
                                "(absent: no cap)", labels=["pool", "backend"])
        for pool in list(self.runtime.pools.values()):
            stats = self.runtime.pool_stats(pool)
            length.add_metric([pool.name], stats.queued)
            queued.add_metric([pool.name], stats.queued_total)
            _add(wait, [pool.name], stats.queue_wait)
            config = pool.config
            for backend in config.backends:
                if (limit := config.backend_cap(backend)) is not None:
                    cap.add_metric([pool.name, backend.id], limit)
        yield from (length, queued, wait, cap)

    def _bgp(self) -> Iterator[Metric]:
        """Sessions, VIP announcements and ExaBGP restarts, from the announcer's statistics."""
        up = GaugeMetricFamily(P + "bgp_session_up", "1 while the BGP session with the peer is "
                               "established", labels=["peer"])
        flaps = CounterMetricFamily(P + "bgp_session_flaps", "Established sessions that went "
                                    "down (peer, network, or ExaBGP dying)", labels=["peer"])
        announced = GaugeMetricFamily(P + "bgp_vip_announced", "1 while pointsman asks its "
                                      "peers to route the VIP here", labels=["vip", "pool", "listener"])
        reason = GaugeMetricFamily(P + "bgp_vip_reason", "1 for why the VIP is (not) announced",
                                   labels=["vip", "reason"])
        available = GaugeMetricFamily(P + "bgp_vip_available_backends", "Backends the VIP's "
                                      "decision counted", labels=["vip"])
        running = GaugeMetricFamily(P + "bgp_speaker_running", "1 while ExaBGP runs and its "
                                    "API is connected")
        restarts = CounterMetricFamily(P + "bgp_exabgp_restarts", "ExaBGP processes restarted "
                                       "after one died")
        bgp = self.runtime.bgp
        if bgp is not None:
            from pointsman.bgp.decision import Reason

            stats = bgp.statistics()
            for peer, is_up in stats["sessions"].items():
                up.add_metric([peer], float(is_up))
                flaps.add_metric([peer], stats["session_flaps"][peer])
            for vip in stats["vips"]:
                pool = vip["pool"] or self._listener_pool(vip["listener"])
                announced.add_metric([vip["prefix"], pool, vip["listener"] or ""],
                                     float(vip["announced"]))
                for r in Reason:
                    reason.add_metric([vip["prefix"], r.value], float(vip["reason"] == r.value))
                available.add_metric([vip["prefix"]], vip["available"])
            speaker = stats["speaker"]
            running.add_metric([], float(speaker is not None and speaker["state"] == "running"))
            restarts.add_metric([], stats["restarts"])
        yield from (up, flaps, announced, reason, available, running, restarts)

    def _listener_pool(self, name: str | None) -> str:
        listener = self.runtime.listeners.get(name or "")
        return listener.config.fallback_pool if listener is not None else ""


def _uvloop_version() -> str:
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return "none"
    if "uvloop" not in type(loop).__module__:
        return "none"
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("uvloop")
    except PackageNotFoundError:
        return "unknown"


def _family(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> socket.AddressFamily:
    return socket.AF_INET6 if address.version == 6 else socket.AF_INET


def registry_for(runtime: NodeView) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RuntimeCollector(runtime))
    return registry


def _running_engine() -> str:
    """The engine this process's listeners run on; "unknown" when POINTSMAN_ENGINE is wrong (the
    start refused it already, so this is only a scrape of a process that never served)."""
    try:
        return engine_name()
    except (ValueError, RuntimeError):
        return "unknown"
