"""`KernelListener`: a listener whose connections nftables DNAT forwards, pointsman only steering.

It has the duck interface the runtime uses for its proxy listeners (start, stop_accepting,
wait_drained, close_all, close_backend, reconfigure, stats, connections), but no socket: `start`
writes the listener's rules and slot map into `inet pointsman`, and every pool snapshot the
control plane publishes (health, drain, weight, reload) becomes one atomic transaction on the map.

Ownership: the pool owns backend state; this listener is the only writer of its nftables objects.
Snapshots arrive on the event loop; a single writer task takes the latest one (a burst of changes
collapses into one transaction: only the newest state matters) and runs the transaction in a
worker thread, so a 4093-slot rewrite (tens of milliseconds in libnftables) never stalls the loop.

Shutdown order (the runtime's): `stop_accepting` removes the DNAT rules (new flows are refused by
the guard chain, established ones keep their NAT in conntrack); `wait_drained` waits for the
listener's live conntrack entries to end; `close_all` deletes the rest; either then removes the
listener's objects, and the last listener removes the table.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from pointsman.config.model import ListenerConfig
from pointsman.kernel import conntrack
from pointsman.kernel.netlink import read_counters
from pointsman.kernel.nft import KernelTable, NftError, shared_table
from pointsman.kernel.plan import (
    KernelConfigError,
    ListenerSpec,
    Target,
    slot_diff,
    slot_targets,
    spec_for,
    target_of,
)
from pointsman.kernel.ruleset import (
    BACKEND_COUNTER_KINDS,
    TABLE,
    JsonCommand,
    Names,
    add_backend_commands,
    listener_text,
    remove_backend_commands,
    remove_listener_text,
    replace_slots_commands,
    slot_commands,
    stop_dnat_text,
)
from pointsman.kernel.stats import KernelListenerStats, MapUpdates
from pointsman.pool.pool import Pool
from pointsman.pool.snapshot import PoolSnapshot
from pointsman.telemetry.flow import EndReason

log = logging.getLogger("pointsman.kernel")

RETRY_SECONDS = 1.0
"""After a failed transaction, program the latest snapshot again this much later."""

DRAIN_POLL_SECONDS = 0.25
"""How often `wait_drained` lists the listener's conntrack entries (the kernel has no event we
could wait on without a ctnetlink event socket)."""


class KernelListener:
    """One `dataplane: kernel` listener (see the module docstring)."""

    def __init__(
        self,
        config: ListenerConfig,
        pool: Pool,
        loop: asyncio.AbstractEventLoop,
        table: KernelTable | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self.pool = pool
        self.loop = loop
        self.spec: ListenerSpec = spec_for(config, pool.config)
        self.accepting = False
        self.connections: dict[str, object] = {}  # the kernel holds them (conntrack)
        self.updates = MapUpdates()
        self._table = table if table is not None else shared_table()
        self._names = Names(config.name)
        self._acquired = False
        self._stopped = False
        # What the kernel holds: the slot map (None: unknown, replace it whole next time) and the
        # per-backend counter index of each backend address. Written only by the writer.
        self._slots: list[Target | None] | None = None
        self._counter_index: dict[Target, int] = {}
        self._next_index = 0
        self._slot_counts: Counter[Target] = Counter()
        self._pending: PoolSnapshot | None = None
        self._pending_since = 0.0
        self._restructure = False
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._retry: asyncio.TimerHandle | None = None
        self._watched: list[Pool] = []
        self._cuts: set[asyncio.Task[None]] = set()

    # --- start ---------------------------------------------------------------------------------------

    async def start(self, sock: socket.socket | Sequence[socket.socket] | None = None,
                    reuse_port: bool = False) -> None:
        """Write the listener's rules and slot map (no socket: `sock` and `reuse_port` are unused)."""
        del sock, reuse_port
        self._table.acquire(self.name)
        self._acquired = True
        self._warn_if_not_forwarding()
        snapshot = self.pool.snapshot
        try:
            await asyncio.to_thread(self._program, snapshot, True)
        except NftError as exc:
            self._release()
            raise KernelConfigError(self.name, [f"nftables refused the listener's rules: {exc}"]) from exc
        except BaseException:
            self._release()
            raise
        self._watch(self.pool)
        self._writer = self.loop.create_task(self._write_loop(), name=f"kernel-writer:{self.name}")
        if self.pool.snapshot is not snapshot:  # published while we wrote the first one
            self._on_snapshot(self.pool, self.pool.snapshot)
        self.accepting = True

    def _warn_if_not_forwarding(self) -> None:
        path = (Path("/proc/sys/net/ipv6/conf/all/forwarding") if self.spec.family == "ip6"
                else Path("/proc/sys/net/ipv4/ip_forward"))
        try:
            enabled = path.read_text().strip() != "0"
        except OSError:
            return
        if not enabled:
            log.warning("kernel listener %s: IP forwarding is off (%s = 0): only clients on this "
                        "host reach the backends; enable it for remote clients", self.name, path)

    def _watch(self, pool: Pool) -> None:
        if any(p is pool for p in self._watched):
            return
        self._watched.append(pool)
        pool.watch(lambda snapshot: self._on_snapshot(pool, snapshot))

    def _on_snapshot(self, source: Pool, snapshot: PoolSnapshot) -> None:
        """Pool publication (on the loop): note the newest snapshot and wake the writer."""
        if source is not self.pool or self._stopped:
            return
        if self._pending is None:
            self._pending_since = time.perf_counter()
        self._pending = snapshot
        self._wake.set()

    # --- programming ---------------------------------------------------------------------------------

    async def _write_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            snapshot, since, restructure = self._pending, self._pending_since, self._restructure
            self._pending = None
            self._restructure = False
            if snapshot is None:
                continue
            try:
                await asyncio.to_thread(self._program, snapshot, restructure)
            except NftError as exc:
                self._failed(snapshot, since, restructure, str(exc))
                continue
            except Exception as exc:  # a bug must not end the only writer: log it, count it, retry
                log.exception("kernel listener %s: programming failed", self.name)
                self._failed(snapshot, since, restructure, repr(exc))
                continue
            self.updates.latency.observe(time.perf_counter() - since)

    def _failed(self, snapshot: PoolSnapshot, since: float, restructure: bool, error: str) -> None:
        self.updates.failed += 1
        log.error("kernel listener %s: programming pool %s v%d failed (retrying in %.0fs): %s",
                  self.name, snapshot.name, snapshot.version, RETRY_SECONDS, error)
        self._retry_later(snapshot, since, restructure)

    def _retry_later(self, snapshot: PoolSnapshot, since: float, restructure: bool) -> None:
        def retry() -> None:
            self._retry = None
            if self._pending is None and not self._stopped:
                self._pending, self._pending_since = snapshot, since
            self._restructure = self._restructure or restructure
            self._wake.set()

        if self._retry is not None:
            self._retry.cancel()
        self._retry = self.loop.call_later(RETRY_SECONDS, retry)

    def _program(self, snapshot: PoolSnapshot, restructure: bool) -> None:
        """Bring the kernel to `snapshot` (runs in a worker thread; the only writer)."""
        spec = self.spec
        targets = slot_targets(spec.algorithm, snapshot.backends, spec.slots)
        wanted = {target_of(b) for b in snapshot.backends}
        index = dict(self._counter_index)
        joining: list[JsonCommand] = []
        for target in sorted(wanted - index.keys()):
            index[target] = self._next_index
            joining += add_backend_commands(self.name, self._next_index, target)
            self._next_index += 1
        leaving: list[JsonCommand] = []
        for target in sorted(index.keys() - wanted):
            leaving += remove_backend_commands(self.name, index.pop(target), target)
        with self._table.transaction() as nft:
            if self._stopped:
                return
            if restructure or self._slots is None or len(self._slots) != len(targets):
                nft.text(listener_text(spec, targets))
                nft.json(joining + leaving)
                changed = len(targets)
            else:
                diff = slot_diff(self._slots, targets)
                try:
                    nft.json(joining + slot_commands(self.name, diff) + leaving)
                except NftError as exc:
                    # Someone else touched our map, or an earlier failure left it unknown.
                    log.warning("kernel listener %s: slot diff refused (%s); replacing the map",
                                self.name, exc)
                    nft.json(replace_slots_commands(self.name, targets))
                    nft.json(joining + leaving)
                changed = len(diff)
        self._slots = targets
        self._counter_index = index
        self._slot_counts = Counter(t for t in targets if t is not None)
        self.updates.applied += 1
        self.updates.elements = changed

    # --- reading -------------------------------------------------------------------------------------

    @property
    def stats(self) -> KernelListenerStats:
        """A fresh reading of the kernel's counters (see `pointsman.kernel.stats`)."""
        ids = {target_of(b): b.id for b in self.pool.snapshot.backends}
        counts = self._slot_counts
        backends = {target: (ids.get(target, f"{target[0]}:{target[1]}"), index, counts[target])
                    for target, index in self._counter_index.items()}
        try:
            counters = read_counters(TABLE) if self._acquired else {}
        except OSError as exc:
            log.warning("kernel listener %s: reading counters failed: %s", self.name, exc)
            counters = {}
        return KernelListenerStats.read(self.name, counters, backends, self.spec.slots,
                                        self.updates.copy(), conntrack.usage())

    def statistics(self) -> KernelListenerStats:
        return self.stats

    def backend_counter_names(self) -> list[str]:
        return [self._names.backend_counter(i, kind)
                for i in self._counter_index.values() for kind in BACKEND_COUNTER_KINDS]

    # --- reload --------------------------------------------------------------------------------------

    def reconfigure(self, config: ListenerConfig, pool: Pool) -> None:
        """Reload: new slots, hash key, SNAT or pool; the counters and established flows stay."""
        if config.dataplane != "kernel":
            log.error("kernel listener %s: switching the data plane needs a restart; the kernel "
                      "rules stay", self.name)
            return
        try:
            spec = spec_for(config, pool.config)
        except KernelConfigError as exc:
            log.error("reload: %s; the running kernel rules stay", exc)
            return
        self.config = config
        self.pool = pool
        self._watch(pool)
        if spec != self.spec:
            self.spec = spec
            self._restructure = True
        self._on_snapshot(pool, pool.snapshot)

    # --- stop ----------------------------------------------------------------------------------------

    def stop_accepting(self) -> None:
        """No new flows (the guard refuses them); established flows keep going."""
        if self._stopped:
            return
        self.accepting = False
        self._stopped = True
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._writer is not None:
            self._writer.cancel()
        if not self._acquired:
            return
        try:
            with self._table.transaction() as nft:
                nft.text(stop_dnat_text(self.name))
        except NftError as exc:
            log.error("kernel listener %s: removing the DNAT rules failed: %s", self.name, exc)

    async def wait_drained(self, timeout: float) -> bool:
        """Wait (at most `timeout` s) until no live conntrack entry is left; True if none is.

        Either way the listener's objects are removed afterwards unless flows remain, in which
        case `close_all` (which the runtime calls next) cuts them and removes the objects.
        """
        if self._writer is not None:
            await asyncio.gather(self._writer, return_exceptions=True)
        if not self._acquired:
            return True
        deadline = self.loop.time() + timeout
        try:
            while True:  # bounded: the deadline ends it
                try:
                    live = await conntrack.live_flows(self.spec)
                except (OSError, TimeoutError) as exc:
                    log.warning("kernel listener %s: cannot list conntrack entries (%s); not "
                                "waiting for flows to end", self.name, exc)
                    live = 0
                if live == 0:
                    self._release()
                    return True
                remaining = deadline - self.loop.time()
                if remaining <= 0:
                    return False
                await asyncio.sleep(min(DRAIN_POLL_SECONDS, remaining))
        except asyncio.CancelledError:
            self._release()  # the flows keep their NAT in conntrack; only our objects go
            raise

    def close_all(self, reason: EndReason) -> int:
        """Cut every flow of the listener (delete its conntrack entries); returns how many."""
        del reason
        cut = conntrack.delete_flows_now(self.spec) if self._acquired else 0
        self._release()
        return cut

    def close_backend(self, backend_id: str, reason: EndReason) -> int:
        """Cut the flows to one backend (on_down: close_sessions). The conntrack tool runs in the
        background; the count is logged when it is done, so this returns 0."""
        target = next((target_of(b) for b in self.pool.snapshot.backends if b.id == backend_id), None)
        if target is None or not self._acquired:
            return 0
        task = self.loop.create_task(self._cut(target, backend_id, reason))
        self._cuts.add(task)
        task.add_done_callback(self._cuts.discard)
        return 0

    async def _cut(self, target: Target, backend_id: str, reason: EndReason) -> None:
        try:
            count = await conntrack.delete_flows(self.spec, target)
        except (OSError, TimeoutError) as exc:
            log.error("kernel listener %s: cutting flows to %s failed: %s", self.name, backend_id, exc)
            return
        log.info("kernel listener %s: cut %d flows to %s (%s)", self.name, count, backend_id, reason.value)

    def _release(self) -> None:
        for task in self._cuts:
            task.cancel()
        if not self._acquired:
            return
        self._acquired = False
        self._stopped = True
        self._table.release(self.name, remove_listener_text(self.name, self.backend_counter_names()))
