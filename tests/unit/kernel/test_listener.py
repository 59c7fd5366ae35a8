"""KernelListener's programming logic against a recording stand-in for libnftables.

The real kernel path (rules loaded, packets forwarded) is tests/netns/test_kernel_dataplane.py;
here the question is which transactions the listener writes, and when.
"""

from __future__ import annotations

import asyncio
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
    assert texts()[-1] == ("flush chain inet pointsman l_web_dnat\n"
                           "flush chain inet pointsman l_web_dnat_local\n")
    before = len(Recorder.calls)
    backends.set_weight("b1", 5)
    await asyncio.sleep(0.05)
    assert len(Recorder.calls) == before

    async def no_flows(spec: object) -> int:
        return 0

    monkeypatch.setattr(conntrack, "live_flows", no_flows)
    assert await kernel.wait_drained(1.0)
    assert texts()[-1] == "delete table inet pointsman\n"  # the last listener out


async def test_close_all_cuts_flows_then_removes(table: KernelTable, monkeypatch: pytest.MonkeyPatch) -> None:
    kernel, _ = await started(table)
    monkeypatch.setattr(conntrack, "delete_flows_now", lambda spec, backend=None: 4)
    kernel.stop_accepting()
    assert kernel.close_all(EndReason.SHUTDOWN) == 4
    assert table.owners == frozenset()


async def test_close_backend_deletes_its_flows(table: KernelTable, monkeypatch: pytest.MonkeyPatch) -> None:
    kernel, _ = await started(table)
    cut: list[object] = []

    async def delete_flows(spec: object, backend: object = None) -> int:
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
    kernel, _ = await started(table)
    counters = {"l_web_new": CounterValue(5, 300), "l_web_in": CounterValue(50, 5000),
                "l_web_b1_new": CounterValue(2, 120), "l_web_b1_out": CounterValue(7, 9000)}
    monkeypatch.setattr(listener_module, "read_counters", lambda table: counters)
    stats = kernel.stats
    assert (stats.new_connections, stats.packets_in, stats.bytes_in) == (5, 50, 5000)
    by_id = {b.backend: b for b in stats.backends}
    assert (by_id["b2"].new_connections, by_id["b2"].bytes_out) == (2, 9000)
    assert sum(b.slots for b in stats.backends) == 13
    assert stats.sessions_created == 5 and stats.capacity == stats.conntrack_max


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
