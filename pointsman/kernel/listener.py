"""`KernelListener`: a listener whose connections nftables forwards, pointsman only steering.

It has the duck interface the runtime uses for its proxy listeners (start, stop_accepting,
wait_drained, close_all, close_backend, reconfigure, statistics / stats, connections), but no
socket: `start` writes the listener's rules and slot map into `inet pointsman`, and every pool
snapshot the control plane publishes (health, drain, weight, reload) becomes one atomic
transaction on the map. `kernel.nat` picks conntrack DNAT or stateless rewriting (ruleset.py).
The listener's allow/deny lists (config, reload, admin API: `set_acl`, as the proxy listeners
have it) are two nftables interval sets its rules drop refused sources with (kernel/acl.py); a
change is written by the same writer, in one transaction with whatever else is pending.

Nothing here blocks the event loop (all of it runs on the loop that serves the proxy listeners,
the admin API and the health checks):

- transactions run in a worker thread, queued in order by `KernelTable.run`; snapshots arrive on
  the loop and a single writer task takes the latest one (a burst of changes collapses into one
  transaction: only the newest state matters);
- the conntrack tool runs as an asyncio subprocess;
- counters are read by a background task every `REFRESH_SECONDS` (a netlink dump and /proc, in a
  worker thread); `statistics()` builds a snapshot from the latest reading without any I/O.

Ownership: the pool owns backend state; this listener is the only writer of its nftables objects;
`_state` (what the kernel holds) is written only by the programming thread, under the table's
order, and read by the loop as one immutable value.

Shutdown order (the runtime's): `stop_accepting` makes the guard refuse new flows while
established ones go on; `wait_drained` waits for them to end (conntrack: no live entry left;
stateless TCP: no packet for `DRAIN_QUIET_SECONDS`), cuts what is left at the deadline, and
removes the listener's objects (the last listener removes the table); `close_all` then only
reports how many flows were cut.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

from pointsman.config.model import ListenerConfig
from pointsman.kernel import conntrack
from pointsman.kernel.mailbox import Mailbox
from pointsman.kernel.netlink import CounterValue, read_counters
from pointsman.kernel.nft import KernelTable, Nft, NftError, shared_table
from pointsman.kernel.plan import KernelConfigError, ListenerSpec, Target, spec_for, target_of
from pointsman.kernel.program import Programmed, Transaction, apply, plan
from pointsman.kernel.ruleset import (
    BACKEND_COUNTER_KINDS,
    TABLE,
    Names,
    remove_listener_text,
    stop_new_flows_text,
)
from pointsman.kernel.stats import (
    EMPTY_READING,
    REFRESH_SECONDS,
    KernelListenerStats,
    KernelReading,
    MapUpdates,
)
from pointsman.pool.pool import Pool
from pointsman.pool.snapshot import PoolSnapshot
from pointsman.protect.acl import AclLists
from pointsman.telemetry.flow import EndReason

if TYPE_CHECKING:
    from pointsman.kernel.tclistener import TcListener

log = logging.getLogger("pointsman.kernel")

RETRY_SECONDS = 1.0
"""After a failed transaction, program the latest snapshot again this much later."""

PLAN_ON_LOOP_SLOTS = 8191
"""Slot tables up to this size are planned on the loop, larger ones in the table's thread (see
`KernelListener._programming`). 8191 slots plan in about 25 ms on the 2-core test VM."""

PLAN_ON_LOOP_PREFIXES = 5000
"""Changed allow/deny lists up to this many prefixes (both lists) are merged on the loop, longer
ones in the table's thread: 100 000 prefixes take 0.3-0.6 s of CPU to merge and diff on the
2-core test VM, 5000 about 20 ms, the slot table's own budget."""

DRAIN_POLL_SECONDS = 0.25
"""How often `wait_drained` looks at the listener's flows (conntrack entries, or counters when
stateless): the kernel has no event we could wait on without a ctnetlink event socket."""

DRAIN_QUIET_SECONDS = 1.0
"""Stateless TCP: the listener counts as drained once no packet crossed it for this long. The
kernel keeps no record of stateless flows, so silence is the only sign that they ended; an idle
connection still open then is cut with the rules."""


def read_kernel() -> KernelReading:
    """Every counter of our table and the conntrack table's use (blocking: a worker thread's job)."""
    counters = read_counters(TABLE)
    return KernelReading(MappingProxyType(counters), conntrack.usage(), time.monotonic())


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
        self.connections: dict[str, object] = {}  # the kernel holds them (conntrack or none)
        self.updates = MapUpdates()
        self._table = table if table is not None else shared_table()
        self._names = Names(config.name)
        self._acquired = False
        self._stopped = False
        self._state = Programmed()
        self._reading = EMPTY_READING
        self._mailbox = Mailbox(lambda pool: pool is self.pool and not self._stopped)
        self._writer: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._stopping: asyncio.Task[None] | None = None
        self._closing: asyncio.Task[None] | None = None
        self._retry: asyncio.TimerHandle | None = None
        self._cuts: set[asyncio.Task[None]] = set()
        self._cut = 0  # flows cut at the drain deadline, reported by close_all
        self.acl_lists = AclLists.from_file(config.allow, config.deny, config.acl_on)

    # --- start ---------------------------------------------------------------------------------------

    async def start(self, sock: socket.socket | Sequence[socket.socket] | None = None,
                    reuse_port: bool = False) -> None:
        """Write the listener's rules and slot map (no socket: `sock` and `reuse_port` are unused)."""
        del sock, reuse_port
        await self._table.acquire(self.name, self)
        self._acquired = True
        self._warn_if_not_forwarding()
        snapshot = self.pool.snapshot
        try:
            done = await self._table.run(self._programming(self.spec, snapshot))
        except NftError as exc:
            await self._release()
            raise KernelConfigError(self.name, [f"nftables refused the listener's rules: {exc}"]) from exc
        except BaseException:
            await self._release()
            raise
        self._record(done)
        await self._refresh()
        self._mailbox.watch(self.pool)
        self._writer = self.loop.create_task(self._write_loop(), name=f"kernel-writer:{self.name}")
        self._reader = self.loop.create_task(self._read_loop(), name=f"kernel-reader:{self.name}")
        if self.pool.snapshot is not snapshot:  # published while we wrote the first one
            self._mailbox.post(self.pool, self.pool.snapshot)
        self.accepting = True

    def _warn_if_not_forwarding(self) -> None:
        path = (Path("/proc/sys/net/ipv6/conf/all/forwarding") if self.spec.family == "ip6"
                else Path("/proc/sys/net/ipv4/ip_forward"))
        try:
            enabled = path.read_text().strip() != "0"  # a /proc read: microseconds, once
        except OSError:
            return
        if not enabled:
            log.warning("kernel listener %s: IP forwarding is off (%s = 0): only clients on this "
                        "host reach the backends; enable it for remote clients", self.name, path)

    # --- programming ---------------------------------------------------------------------------------

    async def _write_loop(self) -> None:
        while True:
            snapshot, since = await self._mailbox.take()
            if snapshot is None:
                continue
            try:
                done = await self._table.run(self._programming(self.spec, snapshot))
            except NftError as exc:
                self._failed(snapshot, since, str(exc))
                continue
            except Exception as exc:  # a bug must not end the only writer: log it, count it, retry
                log.exception("kernel listener %s: programming failed", self.name)
                self._failed(snapshot, since, repr(exc))
                continue
            if self._record(done):
                self.updates.latency.observe(time.perf_counter() - since)

    def set_acl(self, lists: AclLists) -> None:
        """Put allow/deny lists in force (config load, reload, admin API): the writer puts them
        into the kernel's sets in its next transaction; established flows are not touched."""
        self.acl_lists = lists
        if self._writer is not None:
            self._mailbox.post(self.pool, self.pool.snapshot)

    def _programming(self, spec: ListenerSpec,
                     snapshot: PoolSnapshot) -> Callable[[Nft], Transaction | None]:
        """The work that brings the kernel to `snapshot`, for the table's thread.

        Planning (the Maglev table, the diff, the commands) is Python CPU work; where it runs is a
        choice measured in docs/kernel.md: a small table is planned here on the loop (4093 slots:
        about 10-20 ms), since a thread doing pure-Python work holds the GIL and the loop waits a
        switch interval (5 ms) every time it gives the GIL up; a larger one is planned in the
        thread, where the loop at least keeps half the GIL instead of stalling for the whole
        build. The transaction itself is C (libnftables through ctypes, which releases the GIL).
        """
        lists = self.acl_lists
        unchanged = self._state.acl_lists == (lists.allow, lists.deny)
        if spec.slots <= PLAN_ON_LOOP_SLOTS and (
                unchanged or len(lists.allow) + len(lists.deny) <= PLAN_ON_LOOP_PREFIXES):
            ready = plan(self._state, spec, snapshot.backends, lists)  # the writer's turn: state is current
            return functools.partial(self._program, None, ready)
        return functools.partial(self._program, (spec, snapshot, lists), None)

    def _program(self, todo: tuple[ListenerSpec, PoolSnapshot, AclLists] | None,
                 ready: Transaction | None, nft: Nft) -> Transaction | None:
        """Plan (unless `ready`) and commit (a worker thread, in the table's order; the only
        writer of `_state`). None if the listener stopped meanwhile: nothing is written then."""
        if self._stopped:
            return None
        if ready is None:
            assert todo is not None
            ready = plan(self._state, todo[0], todo[1].backends, todo[2])
        after, leaving = ready.after, self._state.leaving(ready.after)
        if leaving:  # their counts stay in the listener's totals (read just before they go)
            after = replace(after, retired=after.retired.plus(self.name, self._counters_now(), leaving))
        apply(nft, ready, self.name)
        self._state = after
        return ready

    def _counters_now(self) -> Mapping[str, CounterValue]:
        """The table's counters read now (the table's thread), else the last reading."""
        try:
            return read_counters(TABLE)
        except OSError as exc:
            log.warning("kernel listener %s: reading counters failed: %s", self.name, exc)
            return self._reading.counters

    def _record(self, done: Transaction | None) -> bool:
        if done is None:
            return False
        self.updates.applied += 1
        self.updates.elements = done.elements
        self.updates.slots_changed += done.slots_changed
        return True

    def _failed(self, snapshot: PoolSnapshot, since: float, error: str) -> None:
        self.updates.failed += 1
        log.error("kernel listener %s: programming pool %s v%d failed (retrying in %.0fs): %s",
                  self.name, snapshot.name, snapshot.version, RETRY_SECONDS, error)
        self._retry_later(snapshot, since)

    def _retry_later(self, snapshot: PoolSnapshot, since: float) -> None:
        def retry() -> None:
            self._retry = None
            if not self._stopped:
                self._mailbox.again(snapshot, since)

        if self._retry is not None:
            self._retry.cancel()
        self._retry = self.loop.call_later(RETRY_SECONDS, retry)

    # --- reading -------------------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_SECONDS)
            await self._refresh()

    async def _refresh(self) -> None:
        try:
            self._reading = await self._table.read(read_kernel)
        except OSError as exc:  # keep the last reading: its `age` shows that it is getting old
            log.warning("kernel listener %s: reading counters failed: %s", self.name, exc)

    def statistics(self) -> KernelListenerStats:
        """The counters as of the last reading (at most about `REFRESH_SECONDS` old), this
        listener's map updates as of now. No I/O: safe to call from a scrape on the loop."""
        state, reading = self._state, self._reading
        ids = {target_of(b): b.id for b in self.pool.snapshot.backends}
        counts = state.slot_counts
        backends = {target: (ids.get(target, f"{target[0]}:{target[1]}"), index, counts.get(target, 0))
                    for target, index in state.counter_index.items()}
        age = time.monotonic() - reading.at if reading.at else 0.0
        return KernelListenerStats.read(self.name, reading.counters, backends, self.spec.slots,
                                        self.updates.copy(), reading.conntrack, self.spec.nat, age,
                                        state.retired)

    @property
    def stats(self) -> KernelListenerStats:
        """`statistics()`, under the name the proxy listeners' stats objects have."""
        return self.statistics()

    def backend_counter_names(self) -> list[str]:
        return [self._names.backend_counter(i, kind)
                for i in self._state.counter_index.values() for kind in BACKEND_COUNTER_KINDS]

    # --- reload --------------------------------------------------------------------------------------

    def reconfigure(self, config: ListenerConfig, pool: Pool) -> None:
        """Reload: new slots, hash key, SNAT, NAT mode or pool; counters stay, and so do flows
        whose slot keeps its backend (conntrack flows keep theirs in any case)."""
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
        self._mailbox.watch(pool)
        self.spec = spec  # the writer restructures when it differs from what the kernel holds
        # A list the file changed takes the file's value; one it left keeps the API's.
        self.set_acl(AclLists.from_file(config.allow, config.deny, config.acl_on, self.acl_lists))
        self._mailbox.post(pool, pool.snapshot)

    # --- stop ----------------------------------------------------------------------------------------

    def stop_accepting(self) -> None:
        """No new flows (the guard refuses them); established flows keep going. The rule change
        is a transaction like any other: `wait_drained` waits for it."""
        if self._stopped:
            return
        self.accepting = False
        self._stopped = True
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._writer is not None:
            self._writer.cancel()
        if self._acquired:
            self._stopping = self.loop.create_task(self._stop_new_flows(),
                                                   name=f"kernel-stop:{self.name}")

    async def _stop_new_flows(self) -> None:
        def work(nft: Nft) -> None:
            spec = self._state.spec  # in the table's order: the last transaction is done
            if spec is not None:
                nft.text(stop_new_flows_text(spec))

        try:
            await self._table.run(work)
        except NftError as exc:
            log.error("kernel listener %s: refusing new flows failed: %s", self.name, exc)

    async def wait_drained(self, timeout: float) -> bool:
        """Wait (at most `timeout` s) until the listener's flows have ended; True if they have.

        Either way the listener's objects are removed before this returns; at the deadline the
        flows still open are cut first (conntrack entries deleted; stateless flows end with the
        rules), and `close_all` reports how many.
        """
        deadline = self.loop.time() + timeout
        for task in (self._writer, self._stopping):
            if task is not None:
                await asyncio.gather(task, return_exceptions=True)
        if not self._acquired:
            return True
        try:
            drained = await self._wait_flows(deadline)
            if not drained:
                self._cut += await self._cut_all()
        except asyncio.CancelledError:
            self._close_soon(cut=False)  # the objects go; conntrack flows keep their NAT
            raise
        await self._release()
        return drained

    async def _wait_flows(self, deadline: float) -> bool:
        spec = self._state.spec or self.spec
        if spec.stateless and spec.protocol == "udp":
            return True  # stop_accepting ended them: nothing tells a UDP flow from a new one
        last: tuple[int, int] | None = None
        quiet_since = self.loop.time()
        while True:  # bounded: the deadline ends it
            if spec.stateless:
                moved = await self._packets()
                now = self.loop.time()
                if moved != last:
                    last, quiet_since = moved, now
                elif now - quiet_since >= DRAIN_QUIET_SECONDS:
                    return True
            elif await self._live_flows(spec) == 0:
                return True
            remaining = deadline - self.loop.time()
            if remaining <= 0:
                return False
            await asyncio.sleep(min(DRAIN_POLL_SECONDS, remaining))

    async def _live_flows(self, spec: ListenerSpec) -> int:
        try:
            return await conntrack.live_flows(spec)
        except (OSError, TimeoutError) as exc:
            log.warning("kernel listener %s: cannot list conntrack entries (%s); not waiting for "
                        "flows to end", self.name, exc)
            return 0

    async def _packets(self) -> tuple[int, int]:
        """The listener's forwarded packets in and out, read now (a worker thread)."""
        try:
            counters = await self._table.read(functools.partial(read_counters, TABLE))
        except OSError:
            return (-1, -1)
        zero = CounterValue(0, 0)
        indices = self._state.counter_index.values()
        packets_in, packets_out = (
            sum(counters.get(self._names.backend_counter(i, kind), zero).packets for i in indices)
            for kind in ("in", "out"))
        return packets_in, packets_out

    async def _cut_all(self) -> int:
        spec = self._state.spec or self.spec
        if spec.stateless:
            return 0  # no record of its flows: they end when the rules go
        try:
            return await conntrack.delete_flows(spec, backends=tuple(self._state.counter_index))
        except (OSError, TimeoutError) as exc:
            log.error("kernel listener %s: cutting its flows failed: %s", self.name, exc)
            return 0

    def close_all(self, reason: EndReason) -> int:
        """Flows cut at the drain deadline (`wait_drained` cut them without blocking the loop).

        Called without a drain first, the cut and the removal of the objects happen in the
        background; this returns 0 and `wait_closed` waits for them.
        """
        del reason
        cut, self._cut = self._cut, 0
        if self._acquired:
            self._close_soon(cut=True)
        return cut

    def _close_soon(self, cut: bool) -> None:
        if self._closing is None:
            self._closing = self.loop.create_task(self._close(cut), name=f"kernel-close:{self.name}")

    async def _close(self, cut: bool) -> None:
        if cut:
            count = await self._cut_all()
            if count:
                log.warning("kernel listener %s: cut %d flows", self.name, count)
        await self._release()

    async def wait_closed(self) -> None:
        """Wait until a background close (`close_all` without a drain) is done."""
        if self._closing is not None:
            await asyncio.gather(self._closing, return_exceptions=True)

    def close_backend(self, backend_id: str, reason: EndReason) -> int:
        """Cut the flows to one backend (on_down: close_sessions). The conntrack tool runs in the
        background; the count is logged when it is done, so this returns 0. Stateless: nothing to
        do, the slot map change already sent the backend's flows elsewhere (reset there)."""
        target = next((target_of(b) for b in self.pool.snapshot.backends if b.id == backend_id), None)
        if target is None or not self._acquired or self.spec.stateless:
            return 0
        task = self.loop.create_task(self._cut_backend(target, backend_id, reason))
        self._cuts.add(task)
        task.add_done_callback(self._cuts.discard)
        return 0

    async def _cut_backend(self, target: Target, backend_id: str, reason: EndReason) -> None:
        try:
            count = await conntrack.delete_flows(self.spec, target)
        except (OSError, TimeoutError) as exc:
            log.error("kernel listener %s: cutting flows to %s failed: %s", self.name, backend_id, exc)
            return
        log.info("kernel listener %s: cut %d flows to %s (%s)", self.name, count, backend_id, reason.value)

    async def _release(self) -> None:
        """Stop the tasks, take a last reading, remove the listener's objects."""
        self._stopped = True
        self.accepting = False
        tasks = [t for t in (self._writer, self._reader, *self._cuts) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if not self._acquired:
            return
        self._acquired = False
        await self._refresh()  # the final counts stay readable after the objects are gone
        spec = self._state.spec or self.spec
        await self._table.release(self.name, self,
                                  remove_listener_text(spec, self.backend_counter_names(),
                                                       self._state.counter_index))


def kernel_listener(config: ListenerConfig, pool: Pool,
                    loop: asyncio.AbstractEventLoop) -> KernelListener | TcListener:
    """The listener for a `dataplane: kernel` config: nftables, or the tc program (imported
    only then: its ctypes and libbpf adapter are no start-up cost for anyone else)."""
    if config.kernel.datapath == "tc":
        from pointsman.kernel.tclistener import TcListener

        return TcListener(config, pool, loop)
    return KernelListener(config, pool, loop)
