"""KernelListener's programming logic against a recording stand-in for libnftables.

The real kernel path (rules loaded, packets forwarded) is tests/netns/test_kernel_dataplane.py;
here the question is which transactions the listener writes, and when.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest

from pointsman.kernel import conntrack
from pointsman.kernel import listener as listener_module
from pointsman.kernel import nft as nft_module
from pointsman.kernel.listener import KernelListener
from pointsman.kernel.netlink import CounterValue
from pointsman.kernel.nft import KernelTable, Nft, NftError
from pointsman.kernel.plan import KernelConfigError
from pointsman.pool.pool import Pool
from pointsman.telemetry.flow import EndReason
from tests.support import scheduled_first

from .helpers import listener, pool


class Recorder(Nft):
    calls: list[tuple[str, Any]] = []

    def __init__(self) -> None:
        pass

    def text(self, commands: str) -> str:
        Recorder.calls.append(("text", commands))
        return ""

    def json(self, commands: list[dict[str, Any]]) -> None:
        if commands:
            Recorder.calls.append(("json", commands))


@pytest.fixture
def table(monkeypatch: pytest.MonkeyPatch) -> Iterator[KernelTable]:
    Recorder.calls = []
    monkeypatch.setattr(nft_module, "check_privileges", lambda: None)
    yield KernelTable(Recorder)


def texts() -> list[str]:
    return [c for kind, c in Recorder.calls if kind == "text"]


def jsons() -> list[list[dict[str, Any]]]:
    return [c for kind, c in Recorder.calls if kind == "json"]


async def settle(kernel: KernelListener, applied: int) -> None:
    async with asyncio.timeout(5):
        while kernel.updates.applied < applied:
            await asyncio.sleep(0.01)


async def started(table: KernelTable, **pool_overrides: Any) -> tuple[KernelListener, Pool]:
    backends = Pool(pool(**pool_overrides))
    kernel = KernelListener(listener(), backends, asyncio.get_running_loop(), table=table)
    await kernel.start()
    return kernel, backends


async def test_start_writes_structure_then_backend_counters(table: KernelTable) -> None:
    kernel, _ = await started(table)
    assert kernel.accepting
    stale, structure = texts()[:2]
    assert stale.startswith("add table inet pointsman\ndelete table")
    assert "add element inet pointsman l_web_slots { 0 : " in structure
    counters = [c["add"]["counter"]["name"] for c in jsons()[0] if "counter" in c.get("add", {})]
    assert counters == [f"l_web_b{i}_{k}" for i in range(3) for k in ("new", "in", "out")]
    assert kernel.updates.applied == 1


async def test_backend_down_is_one_diff_transaction(table: KernelTable) -> None:
    kernel, backends = await started(table)
    before = len(Recorder.calls)
    backends.health_verdict("b2", False, "test")  # the checker's verdict (after its `fall`)
    await settle(kernel, 2)
    new_calls = Recorder.calls[before:]
    assert [kind for kind, _ in new_calls] == ["json"]
    commands = new_calls[0][1]
    deleted = commands[0]["delete"]["element"]["elem"]
    added = commands[1]["add"]["element"]["elem"]
    assert sorted(deleted) == sorted(slot for slot, _ in added)  # only b2's slots change hands
    assert all(target["concat"][0] != "10.99.12.2" for _, target in added)
    assert kernel.updates.elements == len(deleted) + len(added)


async def test_a_burst_of_changes_collapses(table: KernelTable) -> None:
    kernel, backends = await started(table)
    for weight in (2, 3, 4, 5):
        backends.set_weight("b1", weight)
    await settle(kernel, 2)
    await asyncio.sleep(0.05)
    assert kernel.updates.applied <= 3  # four publications, at most two transactions after start


async def test_reload_with_new_slots_rewrites_the_rules(table: KernelTable) -> None:
    kernel, backends = await started(table)
    kernel.reconfigure(listener(kernel={"slots": 7}), backends)
    await settle(kernel, 2)
    assert "mod 7 seed" in texts()[-1]
    assert kernel.spec.slots == 7


async def test_set_acl_is_one_json_transaction_of_the_changed_intervals(table: KernelTable) -> None:
    kernel, _ = await started(table)
    before = len(Recorder.calls)
    kernel.set_acl(kernel.acl_lists.replaced("deny", ["192.0.2.0/24"]))
    await settle(kernel, 2)
    assert Recorder.calls[before:] == [("json", [{"add": {"element": {
        "family": "inet", "table": "pointsman", "name": "l_web_deny",
        "elem": [{"prefix": {"addr": "192.0.2.0", "len": 24}}]}}}])]
    assert kernel.acl_lists.deny == ("192.0.2.0/24",)


async def test_a_long_list_is_planned_in_the_tables_thread(table: KernelTable,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(listener_module, "PLAN_ON_LOOP_PREFIXES", 1)
    kernel, _ = await started(table)
    kernel.set_acl(kernel.acl_lists.replaced("deny", ["192.0.2.0/24", "198.51.100.0/24"]))
    await settle(kernel, 2)
    assert [c["add"]["element"]["name"] for c in jsons()[-1]] == ["l_web_deny"]
    assert kernel._state.acl_lists == ((), ("192.0.2.0/24", "198.51.100.0/24"))


async def test_reload_keeps_an_api_list_the_file_did_not_change(table: KernelTable) -> None:
    kernel, backends = await started(table)
    kernel.set_acl(kernel.acl_lists.replaced("deny", ["192.0.2.0/24"]))
    await settle(kernel, 2)
    kernel.reconfigure(listener(allow=["10.0.0.0/8"]), backends)  # allow changed, deny did not
    await settle(kernel, 3)
    assert (kernel.acl_lists.allow, kernel.acl_lists.deny) == (("10.0.0.0/8",), ("192.0.2.0/24",))
    kernel.reconfigure(listener(allow=["10.0.0.0/8"], deny=["198.51.100.0/24"]), backends)
    await settle(kernel, 4)
    assert kernel.acl_lists.deny == ("198.51.100.0/24",)  # the file changed it: the file wins
    elements = [c["add"]["element"] for c in jsons()[-1] if "element" in c.get("add", {})]
    assert {"prefix": {"addr": "198.51.100.0", "len": 24}} in elements[-1]["elem"]


async def test_lists_from_the_file_are_in_the_first_transaction(table: KernelTable) -> None:
    backends = Pool(pool())
    kernel = KernelListener(listener(deny=["192.0.2.7"]), backends, asyncio.get_running_loop(),
                            table=table)
    await kernel.start()
    assert "add element inet pointsman l_web_deny { 192.0.2.7 }" in texts()[1]


async def test_reload_the_kernel_cannot_serve_keeps_the_rules(
        table: KernelTable, caplog: pytest.LogCaptureFixture) -> None:
    kernel, _ = await started(table)
    kernel.reconfigure(listener(), Pool(pool(algorithm="least_connections")))
    assert kernel.spec.algorithm == "maglev"
    assert "the running kernel rules stay" in caplog.text


async def test_refused_at_construction(table: KernelTable) -> None:
    with pytest.raises(KernelConfigError, match="not available in the kernel"):
        KernelListener(listener(), Pool(pool(algorithm="power_of_two")), asyncio.get_running_loop(),
                       table=table)


async def test_stop_accepting_removes_dnat_and_ignores_later_snapshots(
        table: KernelTable, monkeypatch: pytest.MonkeyPatch) -> None:
    kernel, backends = await started(table)
    kernel.stop_accepting()
    assert not kernel.accepting
    backends.set_weight("b1", 5)

    async def no_flows(spec: object) -> int:
        return 0

    monkeypatch.setattr(conntrack, "live_flows", no_flows)
    assert await kernel.wait_drained(1.0)
    assert texts()[-2:] == ["flush chain inet pointsman l_web_dnat\n"
                            "flush chain inet pointsman l_web_dnat_local\n",
                            "delete table inet pointsman\n"]  # the last listener out
    assert not jsons()[1:]  # the weight change after the stop was never written
    assert kernel.close_all(EndReason.SHUTDOWN) == 0


async def test_drain_deadline_cuts_flows_then_close_all_reports_them(
        table: KernelTable, monkeypatch: pytest.MonkeyPatch) -> None:
    kernel, _ = await started(table)
    cut: list[object] = []

    async def live(spec: object) -> int:
        return 3

    async def delete_flows(spec: object, backend: object = None, backends: object = ()) -> int:
        cut.append(backend)
        return 4

    monkeypatch.setattr(conntrack, "live_flows", live)
    monkeypatch.setattr(conntrack, "delete_flows", delete_flows)
    kernel.stop_accepting()
    assert not await kernel.wait_drained(0.05)
    assert cut == [None]  # the whole listener
    assert table.owners == frozenset()
    assert kernel.close_all(EndReason.SHUTDOWN) == 4
    assert kernel.close_all(EndReason.SHUTDOWN) == 0


async def test_close_all_without_a_drain_cuts_in_the_background(
        table: KernelTable, monkeypatch: pytest.MonkeyPatch) -> None:
    kernel, _ = await started(table)

    async def delete_flows(spec: object, backend: object = None, backends: object = ()) -> int:
        return 2

    monkeypatch.setattr(conntrack, "delete_flows", delete_flows)
    kernel.stop_accepting()
    assert kernel.close_all(EndReason.SHUTDOWN) == 0
    await kernel.wait_closed()
    assert table.owners == frozenset()


async def test_close_backend_deletes_its_flows(table: KernelTable, monkeypatch: pytest.MonkeyPatch) -> None:
    kernel, _ = await started(table)
    cut: list[object] = []

    async def delete_flows(spec: object, backend: object = None, backends: object = ()) -> int:
        cut.append(backend)
        return 2

    monkeypatch.setattr(conntrack, "delete_flows", delete_flows)
    assert kernel.close_backend("b3", EndReason.CLOSED_BY_OPERATOR) == 0
    assert kernel.close_backend("nope", EndReason.CLOSED_BY_OPERATOR) == 0
    async with asyncio.timeout(2):
        while not cut:
            await asyncio.sleep(0.01)
    assert cut == [("10.99.13.2", 8080)]


async def test_stats_map_counters_to_backends(table: KernelTable, monkeypatch: pytest.MonkeyPatch) -> None:
    # The listener's totals are its backends' sums; its own `new` holds the refused first packets.
    counters = {"l_web_new": CounterValue(5, 300), "l_web_in": CounterValue(999, 99999),
                "l_web_b0_in": CounterValue(20, 2000), "l_web_b1_in": CounterValue(30, 3000),
                "l_web_b1_new": CounterValue(2, 120), "l_web_b1_out": CounterValue(7, 9000)}
    monkeypatch.setattr(listener_module, "read_counters", lambda table: counters)
    kernel, _ = await started(table)  # start takes the first reading
    stats = kernel.statistics()
    assert (stats.new_connections, stats.packets_in, stats.bytes_in) == (7, 50, 5000)
    assert (stats.packets_out, stats.bytes_out) == (7, 9000)
    by_id = {b.backend: b for b in stats.backends}
    assert (by_id["b2"].new_connections, by_id["b2"].bytes_out) == (2, 9000)
    assert sum(b.slots for b in stats.backends) == 13
    assert stats.sessions_created == 7 and stats.capacity == stats.conntrack_max
    assert stats.nat == "conntrack" and 0 <= stats.age < 5
    # each call is a new object: zeroing one (the supervisor's aggregation does) loses nothing
    stats.new_connections = 0
    assert kernel.stats.new_connections == 7


async def test_a_removed_backends_counts_stay_in_the_totals(table: KernelTable,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    counters = {"l_web_b0_in": CounterValue(1, 100), "l_web_b2_in": CounterValue(40, 4000),
                "l_web_b2_new": CounterValue(4, 240), "l_web_b2_out": CounterValue(30, 9000)}
    monkeypatch.setattr(listener_module, "read_counters", lambda table: counters)
    kernel, _ = await started(table)
    before = kernel.statistics()
    assert (before.new_connections, before.packets_in, before.packets_out) == (4, 41, 30)
    smaller = pool(backends=[{"address": f"10.99.{11 + i}.2:8080", "name": f"b{i + 1}"} for i in range(2)])
    kernel.reconfigure(listener(), Pool(smaller))
    await settle(kernel, 2)
    removed = [c["delete"]["counter"]["name"] for c in jsons()[-1] if "counter" in c.get("delete", {})]
    assert removed == ["l_web_b2_new", "l_web_b2_in", "l_web_b2_out"]
    del counters["l_web_b2_in"], counters["l_web_b2_new"], counters["l_web_b2_out"]
    await kernel._refresh()  # a reading without the removed counters
    after = kernel.statistics()
    assert [b.backend for b in after.backends] == ["b1", "b2"]
    assert (after.new_connections, after.packets_in, after.bytes_in, after.packets_out,
            after.bytes_out) == (4, 41, 4100, 30, 9000)


async def test_a_refused_transaction_is_counted_and_retried(table: KernelTable,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    kernel, backends = await started(table)
    monkeypatch.setattr(listener_module, "RETRY_SECONDS", 0.05)
    refusals = [NftError("Error: Could not process rule: No such file or directory")] * 2
    real_json = Recorder.json

    def flaky(self: Recorder, commands: list[dict[str, Any]]) -> None:
        if refusals:
            raise refusals.pop()
        real_json(self, commands)

    monkeypatch.setattr(Recorder, "json", flaky)
    backends.set_weight("b1", 4)
    await settle(kernel, 2)
    # the diff was refused, then the whole-map fallback too: one failure; nothing changed in the
    # kernel (a transaction is all or nothing), so the retry's diff applies
    assert kernel.updates.failed == 1
    assert any(c.get("delete", {}).get("element", {}).get("name") == "l_web_slots" for c in jsons()[-1])


# --- nat: stateless ----------------------------------------------------------------------------------

STATELESS = {"slots": 13, "nat": "stateless", "snat": "none"}


async def started_stateless(table: KernelTable, protocol: str = "tcp") -> tuple[KernelListener, Pool]:
    backends = Pool(pool(hash_key="source_ip_port"))
    kernel = KernelListener(listener(kernel=STATELESS, protocol=protocol), backends,
                            asyncio.get_running_loop(), table=table)
    await kernel.start()
    return kernel, backends


async def test_stateless_start_writes_the_stateless_objects(table: KernelTable) -> None:
    kernel, backends = await started_stateless(table)
    structure = texts()[1]
    assert "add chain inet pointsman l_web_sin" in structure and "dnat" not in structure
    vip = "add element inet pointsman stateless_vips4 { 10.99.100.1 . tcp . 80 : goto l_web_sin }"
    assert vip in structure
    for name in ("stateless_replies4", "stateless_rev4"):
        members = [c["add"]["element"]["elem"] for c in jsons()[0]
                   if c.get("add", {}).get("element", {}).get("name") == name]
        assert len(members) == 3
    backends.health_verdict("b2", False, "test")
    await settle(kernel, 2)
    names = {c[verb]["element"]["name"] for c in jsons()[-1] for verb in c}
    assert names == {"l_web_slot_to"}
    assert kernel.updates.slots_changed == sum(1 for c in jsons()[-1] if "delete" in c
                                               for _ in c["delete"]["element"]["elem"])


async def test_stateless_close_backend_has_nothing_to_cut(table: KernelTable,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    kernel, _ = await started_stateless(table)

    async def delete_flows(spec: object, backend: object = None, backends: object = ()) -> int:
        raise AssertionError("no conntrack entries to delete in stateless mode")

    monkeypatch.setattr(conntrack, "delete_flows", delete_flows)
    assert kernel.close_backend("b1", EndReason.BACKEND_DOWN) == 0
    assert kernel.statistics().sessions == 0  # no conntrack entries of its own


async def test_stateless_tcp_drains_when_quiet(table: KernelTable, monkeypatch: pytest.MonkeyPatch) -> None:
    kernel, _ = await started_stateless(table)
    packets = iter(range(1, 4))  # moving for three reads, then still
    monkeypatch.setattr(listener_module, "DRAIN_POLL_SECONDS", 0.01)
    monkeypatch.setattr(listener_module, "DRAIN_QUIET_SECONDS", 0.05)

    def read(table_name: str) -> dict[str, CounterValue]:
        return {"l_web_b0_in": CounterValue(next(packets, 3), 0)}

    monkeypatch.setattr(listener_module, "read_counters", read)
    kernel.stop_accepting()
    assert await kernel.wait_drained(5.0)
    assert "tcp flags & (syn | ack) == syn counter name" in texts()[-2]
    assert next(packets, None) is None  # it waited for the counter to stop moving


async def test_stateless_udp_stops_at_once(table: KernelTable) -> None:
    kernel, _ = await started_stateless(table, protocol="udp")
    kernel.stop_accepting()
    assert await kernel.wait_drained(5.0)
    assert texts()[-2].startswith("flush chain inet pointsman l_web_sin\nadd rule inet pointsman l_web_sin ")


async def test_reload_switches_the_nat_mode(table: KernelTable) -> None:
    kernel, _ = await started(table)
    kernel.reconfigure(listener(kernel=STATELESS), Pool(pool(hash_key="source_ip_port")))
    await settle(kernel, 2)
    assert kernel.spec.nat == "stateless"
    switched = texts()[-1]
    assert switched.index("delete chain inet pointsman l_web_dnat\n") < switched.index(
        "add chain inet pointsman l_web_sin")
    for k, i in enumerate((11, 12, 13)):
        rev = (f"add element inet pointsman stateless_rev4 "
               f"{{ 10.99.{i}.2 . tcp . 8080 : goto l_web_b{k}_rev }}")
        assert rev in switched
        assert switched.index(f"add chain inet pointsman l_web_b{k}_sin\n") < switched.index(
            "add element inet pointsman l_web_slot_to")
    # and back: the shared dispatch's entries go before the chains they name
    kernel.reconfigure(listener(), Pool(pool(hash_key="source_ip_port")))
    await settle(kernel, 3)
    back = texts()[-1]
    assert back.index("delete element inet pointsman stateless_vips4 { 10.99.100.1 . tcp . 80 }") < \
        back.index("delete chain inet pointsman l_web_sin")
    assert "delete element inet pointsman stateless_rev4 { 10.99.13.2 . tcp . 8080 }" in back
    assert "stateless_in" not in back.split("delete chain inet pointsman l_web_sin")[1]
    # the backends' chains after the slot maps that jump to them
    assert back.index("delete map inet pointsman l_web_slot_to") < back.index(
        "delete chain inet pointsman l_web_b0_sin")


# --- nothing blocks the loop -------------------------------------------------------------------------


class SlowRecorder(Recorder):
    """libnftables taking as long as a large transaction does on a busy machine."""

    def text(self, commands: str) -> str:
        time.sleep(0.15)
        return super().text(commands)

    def json(self, commands: list[dict[str, Any]]) -> None:
        time.sleep(0.15)
        super().json(commands)


async def test_slow_transactions_and_scrapes_never_block_the_loop(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    Recorder.calls = []
    monkeypatch.setattr(nft_module, "check_privileges", lambda: None)
    monkeypatch.setattr(listener_module, "REFRESH_SECONDS", 0.01)

    def slow_read(table_name: str) -> dict[str, CounterValue]:
        time.sleep(0.15)  # a netlink dump stuck behind a busy kernel
        return {}

    monkeypatch.setattr(listener_module, "read_counters", slow_read)
    loop = asyncio.get_running_loop()
    loop.set_debug(True)
    loop.slow_callback_duration = 0.05
    caplog.set_level(logging.WARNING, logger="asyncio")
    # The test process's heap (pytest, every test before this one) makes a full collection take
    # ~50 ms whenever the planner's garbage triggers one; freezing it keeps that pause, which is
    # the heap's and not the kernel listener's, out of the measurement.
    gc.collect()
    gc.freeze()
    try:
        with scheduled_first():
            await drive_slow_kernel(loop)
    finally:
        gc.unfreeze()
    slow = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Executing")]
    assert not slow, slow


async def drive_slow_kernel(loop: asyncio.AbstractEventLoop) -> None:
    """Start, 6 map updates with 20 scrapes each, then the shutdown order, all with a slow kernel."""
    try:
        table = KernelTable(SlowRecorder)
        # The pool's own (userspace) Maglev table is built on the loop at every weight change:
        # keep it small here, the question is what the kernel listener does.
        backends = Pool(pool(hash_key="source_ip_port", maglev_table_size=13))
        kernel = KernelListener(listener(kernel={"slots": 4093}), backends, loop, table=table)
        await kernel.start()
        for k in range(6):
            backends.set_weight("b1", 2 + k)
            for _ in range(20):
                assert kernel.statistics().slots == 4093  # a scrape
                await asyncio.sleep(0.005)
        await settle(kernel, 3)
        kernel.stop_accepting()
        assert await kernel.wait_drained(0.0) in (True, False)
        kernel.close_all(EndReason.SHUTDOWN)
    finally:
        loop.set_debug(False)
