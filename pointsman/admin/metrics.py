"""Prometheus exposition: a collector that reads the data plane's counters at scrape time.

Every metric is declared here, named after the SLIs (connection success, time to first byte,
active connections, churn, table utilisation, drops, resets, backend health), and labelled by
listener, pool and backend only: no per-client labels.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from pointsman.pool.state import BackendState
from pointsman.proxy.listener import TcpListener
from pointsman.telemetry.flow import DropReason, EndReason, RejectReason
from pointsman.telemetry.histogram import Histogram

if TYPE_CHECKING:
    from pointsman.runtime import Runtime

P = "pointsman_"


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
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

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
        for listener in self.runtime.listeners.values():
            if not isinstance(listener, TcpListener):
                continue
            s = listener.stats
            v = [listener.name, listener.pool.name]
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
        from pointsman.proxy.udp import UdpListener

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
        for listener in self.runtime.listeners.values():
            if not isinstance(listener, UdpListener):
                continue
            s = listener.stats
            v = [listener.name, listener.pool.name]
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
        yield from (sessions, capacity, created, ended, datagrams, nbytes, drops, local)

    def _kernel(self) -> Iterator[Metric]:
        """The nftables fast path: kernel counters (read at scrape) and map programming."""
        from pointsman.kernel.listener import KernelListener

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
        ct_used = GaugeMetricFamily(P + "conntrack_entries", "Entries in the conntrack table")
        ct_max = GaugeMetricFamily(P + "conntrack_max", "Bound of the conntrack table "
                                   "(nf_conntrack_max)")
        seen = False
        for listener in self.runtime.listeners.values():
            if not isinstance(listener, KernelListener):
                continue
            s = listener.stats
            v = [listener.name, listener.pool.name]
            new.add_metric(v, s.new_connections)
            refused.add_metric([*v, "no_backend"], s.rejected)
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
            if not seen:
                ct_used.add_metric([], s.conntrack_entries)
                ct_max.add_metric([], s.conntrack_max)
                seen = True
        yield from (new, refused, packets, nbytes, b_new, b_packets, b_bytes, b_slots, slots,
                    updates, failures, latency, ct_used, ct_max)

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
        for pool in self.runtime.pools.values():
            snapshot = pool.snapshot
            healthy.add_metric([pool.name], snapshot.available)
            size.add_metric([pool.name], len(snapshot.backends))
            for m in pool.members():
                v = [pool.name, m.id]
                for st in BackendState:
                    state.add_metric([*v, st.value], float(m.machine.state is st))
                weight.add_metric(v, m.weight)
                active.add_metric(v, m.stats.active)
                total.add_metric(v, m.stats.total)
                failures.add_metric(v, m.stats.connect_failures)
                nbytes.add_metric([*v, "in"], m.stats.bytes_in)
                nbytes.add_metric([*v, "out"], m.stats.bytes_out)
                _add(connect, v, m.stats.connect_time)
                checks.add_metric([*v, "success"], m.checks - m.check_failures)
                checks.add_metric([*v, "failure"], m.check_failures)
                if m.last_check is not None:
                    probe.add_metric(v, m.last_check.latency)
        yield from (state, weight, active, total, failures, nbytes, connect, checks, probe,
                    healthy, size)

    def _process(self) -> Iterator[Metric]:
        lag = GaugeMetricFamily(P + "event_loop_lag_seconds",
                                "How late the last periodic tick ran (event-loop saturation)")
        lag.add_metric([], self.runtime.loop_lag)
        flows = CounterMetricFamily(P + "flow_log_dropped", "Flow records dropped (queue full)")
        flows.add_metric([], self.runtime.flow_log.dropped if self.runtime.flow_log else 0)
        yield from (lag, flows)

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
            for source in sorted({"file", "etcd", "discovery", *composer.applied, *composer.rejected}):
                applied.add_metric([source], composer.applied[source])
                rejected.add_metric([source], composer.rejected[source])
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


def registry_for(runtime: Runtime) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RuntimeCollector(runtime))
    ProcessCollector(registry=registry)
    return registry
