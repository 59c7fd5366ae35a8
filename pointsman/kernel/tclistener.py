"""`TcListener`: a `nat: stateless` kernel listener served by the tc BPF program (`datapath: tc`).

The same contract as `KernelListener` (docs/kernel.md "Stateless NAT"), the same slot table
(`plan.slot_targets`: pointsman's Maglev over the pool, indexed by the kernel's jhash of the
source), and the same duck interface for the runtime; only the data path differs: a BPF program
at clsact ingress of `kernel.interfaces` (bpf/stateless.c) instead of nftables chains, and BPF
maps instead of an nft verdict map. Every pool snapshot the control plane publishes becomes the
writes of the slots that changed (each slot's update is atomic in the kernel, so a packet sees
the old backend or the new one); the flows of a slot that changes backend move with it, as with
nftables stateless.

Ownership: this listener is the only writer of its entries in the shared maps (its `vips` entry,
its stretch of `slot_map`, its backends' `replies` entries and counters); `TcPath` hands out the
stretch and the counter indices. `_slots`, `_backends` and `_retired` are written only by the
writer task and read on the same loop. Counters are read every `REFRESH_SECONDS` (one map
lookup per backend: microseconds); `statistics()` builds from the latest reading.

Order of writes, so that no packet meets a half-made state: a backend's counters are zeroed and
its `replies` entry written before a slot names it; the `vips` entry (which makes the program
look at the VIP at all) is written after the slots and deleted first; a backend's `replies`
entry and counters go after the last slot moved away from it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace

from pointsman.config.model import ListenerConfig
from pointsman.kernel.mailbox import Mailbox
from pointsman.kernel.plan import KernelConfigError, ListenerSpec, Target, slot_targets, spec_for, target_of
from pointsman.kernel.stats import REFRESH_SECONDS, KernelBackendStats, KernelListenerStats, MapUpdates
from pointsman.kernel.tcbpf import TcProgram
from pointsman.kernel.tcmaps import (
    BACKEND_STATS,
    LISTENER_STATS,
    BackendCounters,
    backend_counters,
    endpoint_key,
    index_key,
    sum_per_cpu,
    vip_value,
)
from pointsman.kernel.tcpath import TcPath, shared_path
from pointsman.kernel.tcplan import Held, plan_writes
from pointsman.pool.pool import Pool
from pointsman.pool.snapshot import PoolSnapshot
from pointsman.telemetry.flow import EndReason

log = logging.getLogger("pointsman.kernel")

DRAIN_POLL_SECONDS = 0.25
DRAIN_QUIET_SECONDS = 1.0
"""As for nftables stateless: TCP flows count as ended once no packet crossed for this long."""
RETRY_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class _Reading:
    backends: dict[Target, BackendCounters]
    rejected: int
    at: float


class TcListener:
    """One `dataplane: kernel`, `kernel.datapath: tc` listener (see the module docstring)."""

    def __init__(self, config: ListenerConfig, pool: Pool, loop: asyncio.AbstractEventLoop,
                 path: TcPath | None = None) -> None:
        self.config = config
        self.name = config.name
        self.pool = pool
        self.loop = loop
        self.spec: ListenerSpec = spec_for(config, pool.config)
        self.accepting = False
        self.connections: dict[str, object] = {}  # the kernel holds none
        self.updates = MapUpdates()
        self._path = path if path is not None else shared_path()
        self._program: TcProgram | None = None
        self._held = Held()  # what the maps hold for this listener (tcplan.py)
        self._index = 0  # the listener's counter index
        self._slot_counts: dict[Target, int] = {}
        self._retired = BackendCounters()
        self._reading = _Reading({}, 0, 0.0)
        self._stopped = False
        self._mailbox = Mailbox(lambda pool: pool is self.pool and not self._stopped)
        self._writer: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._closing: asyncio.Task[None] | None = None
        self._interfaces_held = list(config.kernel.interfaces)
        self._ids: dict[Target, str] = {}

    # --- start ---------------------------------------------------------------------------------------

    async def start(self, sock: socket.socket | Sequence[socket.socket] | None = None,
                    reuse_port: bool = False) -> None:
        """Load (first listener) and attach the program, write the listener's maps."""
        del sock, reuse_port
        try:
            self._program = await self._path.acquire(self.name, self.config.kernel.interfaces)
        except OSError as exc:
            raise KernelConfigError(self.name, [f"cannot attach the tc program: {exc}"]) from exc
        self._index = self._path.listener_indices.take(self.name)
        self._program.write("listener_stats", index_key(self._index),
                            bytes(8 * self._program.cpus))
        try:
            self._write(self.spec, self.pool.snapshot)
        except (OSError, ValueError) as exc:
            await self._release()
            raise KernelConfigError(self.name, [f"cannot write the tc maps: {exc}"]) from exc
        self._mailbox.watch(self.pool)
        self._writer = self.loop.create_task(self._write_loop(), name=f"tc-writer:{self.name}")
        self._reader = self.loop.create_task(self._read_loop(), name=f"tc-reader:{self.name}")
        self.accepting = True

    # --- programming ---------------------------------------------------------------------------------

    async def _write_loop(self) -> None:
        while True:
            snapshot, since = await self._mailbox.take()
            if snapshot is None or self._stopped:
                continue
            try:
                if self.config.kernel.interfaces != self._interfaces_held:
                    await self._path.set_interfaces(self.name, self.config.kernel.interfaces)
                    self._interfaces_held = list(self.config.kernel.interfaces)
                self._write(self.spec, snapshot)
            except (OSError, ValueError) as exc:
                # Some of the writes may have landed: the next attempt rewrites every slot.
                self._held = replace(self._held, slots=())
                self.updates.failed += 1
                log.error("tc listener %s: programming pool %s v%d failed (retrying in %.0fs): %s",
                          self.name, snapshot.name, snapshot.version, RETRY_SECONDS, exc)
                self.loop.call_later(RETRY_SECONDS, self._mailbox.post, self.pool, self.pool.snapshot)
                continue
            self.updates.latency.observe(time.perf_counter() - since)

    def _write(self, spec: ListenerSpec, snapshot: PoolSnapshot) -> None:
        """Bring the maps to `snapshot` (and `spec`, after a reload): tcplan's operations, in
        order. System calls of a few microseconds each (the slots in one batch): on the loop,
        like the Maglev table that precedes them."""
        program = self._program
        assert program is not None
        targets = slot_targets(spec.algorithm, snapshot.backends, spec.slots)
        held = self._held
        index = {t: held.backends[t] if t in held.backends else
                 self._path.backend_indices.take(self._backend_name(t))  # the same again on a retry
                 for t in set(targets) if t is not None}
        base = self._path.slots.take(self.name, spec.slots)
        writes = plan_writes(held, spec, targets, base, index, self._index, program.cpus,
                             draining=self._stopped)
        for op in writes.ops:
            if op.action == "write":
                program.write(op.map, op.key, op.value)
            elif op.action == "delete":
                program.delete(op.map, op.key)
            else:
                program.write_many(op.map, op.key, op.value, op.count)
        self._held = writes.after
        self.updates.applied += 1
        self.updates.elements = writes.written
        self.updates.slots_changed += writes.slots_changed
        self._slot_counts = Counter(t for t in targets if t is not None)
        for target in writes.removed:
            self._retire(program, held.backends[target], target)
        self._ids = {target_of(b): b.id for b in snapshot.backends}

    def _backend_name(self, target: Target) -> str:
        return f"{self.name}/{target[0]}:{target[1]}"

    def _retire(self, program: TcProgram, index: int, target: Target) -> None:
        """A backend left: its last counts join the listener's totals, its index is free."""
        last = self._read_backend(program, index)
        r = self._retired
        self._retired = BackendCounters(r.packets_in + last.packets_in, r.bytes_in + last.bytes_in,
                                        r.packets_out + last.packets_out, r.bytes_out + last.bytes_out,
                                        r.new_flows + last.new_flows)
        self._path.backend_indices.release(self._backend_name(target))

    # --- reading -------------------------------------------------------------------------------------

    @staticmethod
    def _read_backend(program: TcProgram, index: int) -> BackendCounters:
        raw = program.read("backend_stats", index_key(index), BACKEND_STATS.size * program.cpus)
        return backend_counters(raw, program.cpus) if raw is not None else BackendCounters()

    def _read(self) -> None:
        program = self._program
        if program is None:
            return
        counters = {t: self._read_backend(program, i) for t, i in self._held.backends.items()}
        raw = program.read("listener_stats", index_key(self._index), LISTENER_STATS.size * program.cpus)
        rejected = sum_per_cpu(raw, program.cpus, LISTENER_STATS)[0] if raw is not None else 0
        self._reading = _Reading(counters, rejected, time.monotonic())

    async def _read_loop(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_SECONDS)
            try:
                self._read()
            except OSError as exc:
                log.warning("tc listener %s: reading counters failed: %s", self.name, exc)

    def statistics(self) -> KernelListenerStats:
        """The counters as of the last reading (at most about `REFRESH_SECONDS` old). No I/O."""
        reading = self._reading
        age = time.monotonic() - reading.at if reading.at else 0.0
        stats = KernelListenerStats(self.spec.slots, self.updates.copy(), None, "stateless", age)
        rows = []
        for target, c in reading.backends.items():
            rows.append(KernelBackendStats(self._ids.get(target, f"{target[0]}:{target[1]}"), target,
                                           self._slot_counts.get(target, 0), c.new_flows, c.packets_in,
                                           c.bytes_in, c.packets_out, c.bytes_out))
        stats.backends = tuple(rows)
        r = self._retired
        stats.rejected = reading.rejected
        stats.new_connections = reading.rejected + r.new_flows + sum(b.new_connections for b in rows)
        stats.packets_in = r.packets_in + sum(b.packets_in for b in rows)
        stats.bytes_in = r.bytes_in + sum(b.bytes_in for b in rows)
        stats.packets_out = r.packets_out + sum(b.packets_out for b in rows)
        stats.bytes_out = r.bytes_out + sum(b.bytes_out for b in rows)
        return stats

    @property
    def stats(self) -> KernelListenerStats:
        return self.statistics()

    # --- reload --------------------------------------------------------------------------------------

    def reconfigure(self, config: ListenerConfig, pool: Pool) -> None:
        """Reload: new slots, hash key, VIP, interfaces or pool; counters stay."""
        if config.dataplane != "kernel" or config.kernel.datapath != "tc":
            log.error("tc listener %s: switching the data plane or the data path needs a restart; "
                      "the tc program stays", self.name)
            return
        try:
            spec = spec_for(config, pool.config)
        except KernelConfigError as exc:
            log.error("reload: %s; the running tc maps stay", exc)
            return
        self.config, self.pool, self.spec = config, pool, spec
        self._mailbox.watch(pool)
        self._mailbox.post(pool, pool.snapshot)

    # --- stop ----------------------------------------------------------------------------------------

    def stop_accepting(self) -> None:
        """No new flows (the program refuses TCP SYNs, and UDP), established TCP flows go on."""
        if self._stopped:
            return
        self.accepting = False
        self._stopped = True
        if self._writer is not None:
            self._writer.cancel()
        held, program = self._held.spec, self._program
        if held is not None and program is not None:
            try:
                program.write("vips", endpoint_key(held.vip, held.port, held.protocol),
                              vip_value(self._held.base, held.slots, held.seed,
                                        held.hash_key == "source_ip_port", self._index, draining=True))
            except OSError as exc:
                log.error("tc listener %s: refusing new flows failed: %s", self.name, exc)

    async def wait_drained(self, timeout: float) -> bool:
        """Wait (at most `timeout` s) until no packet crossed for `DRAIN_QUIET_SECONDS` (TCP);
        then remove the listener's entries (what is still open ends with them)."""
        deadline = self.loop.time() + timeout
        drained = True
        if self._program is not None and self.spec.protocol == "tcp":
            drained = await self._wait_quiet(deadline)
        await self._release()
        return drained

    async def _wait_quiet(self, deadline: float) -> bool:
        last: tuple[int, int] | None = None
        quiet_since = self.loop.time()
        while True:  # bounded: the deadline ends it
            self._read()
            moved = (sum(c.packets_in for c in self._reading.backends.values()),
                     sum(c.packets_out for c in self._reading.backends.values()))
            now = self.loop.time()
            if moved != last:
                last, quiet_since = moved, now
            elif now - quiet_since >= DRAIN_QUIET_SECONDS:
                return True
            if now >= deadline:
                return False
            await asyncio.sleep(min(DRAIN_POLL_SECONDS, max(deadline - now, 0.0)))

    def close_all(self, reason: EndReason) -> int:
        """Stateless: no record of flows to count; the entries go in the background if
        `wait_drained` did not remove them."""
        del reason
        if self._program is not None and self._closing is None:
            self._closing = self.loop.create_task(self._release(), name=f"tc-close:{self.name}")
        return 0

    async def wait_closed(self) -> None:
        if self._closing is not None:
            await asyncio.gather(self._closing, return_exceptions=True)

    def close_backend(self, backend_id: str, reason: EndReason) -> int:
        """Nothing to cut: the slot change already sent the backend's flows elsewhere."""
        del backend_id, reason
        return 0

    async def _release(self) -> None:
        """Stop the tasks, take a last reading, delete the listener's entries, give back what it
        held (the last listener unloads the program)."""
        self._stopped = True
        self.accepting = False
        tasks = [t for t in (self._writer, self._reader) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        program, self._program = self._program, None
        if program is None:
            return
        try:
            self._read_with(program)
            held = self._held.spec
            if held is not None:
                program.delete("vips", endpoint_key(held.vip, held.port, held.protocol))
                for target in self._held.backends:
                    program.delete("replies", endpoint_key(*target, held.protocol))
        except OSError as exc:
            log.error("tc listener %s: removing its map entries failed: %s", self.name, exc)
        for target in self._held.backends:
            self._path.backend_indices.release(self._backend_name(target))
        self._path.slots.release(self.name)
        self._path.listener_indices.release(self.name)
        await self._path.release(self.name)

    def _read_with(self, program: TcProgram) -> None:
        self._program = program
        try:
            self._read()
        finally:
            self._program = None
