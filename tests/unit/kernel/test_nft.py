"""Finding the binding, privileges, and the table's ownership rules (with a fake libnftables)."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import pytest

from pointsman.kernel import nft as nft_module
from pointsman.kernel.nft import KernelTable, KernelUnavailable, Nft, NftError, has_net_admin, load_binding

CHECK_PRIVILEGES = nft_module.check_privileges  # before the fixture stubs it


class FakeNft(Nft):
    """Records text commands; fails those containing `fail_on`."""

    log: ClassVar[list[str]] = []
    fail_on: ClassVar[str | None] = None

    def __init__(self) -> None:  # no libnftables
        pass

    def text(self, commands: str) -> str:
        if self.fail_on is not None and self.fail_on in commands:
            raise NftError("Error: Could not process rule: Operation not supported")
        self.log.append(commands)
        return ""


@pytest.fixture(autouse=True)
def fresh_fake(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeNft.log = []
    FakeNft.fail_on = None
    monkeypatch.setattr(nft_module, "check_privileges", lambda: None)


def test_net_admin_from_status() -> None:
    assert has_net_admin("Name:\tx\nCapEff:\t000001ffffffffff\n")
    assert not has_net_admin("Name:\tx\nCapEff:\t0000000000000000\n")
    assert not has_net_admin("Name:\tx\n")


def test_binding_missing_says_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "nftables", None)  # import fails
    with pytest.raises(KernelUnavailable, match="python3-nftables"):
        load_binding(tmp_path)


def test_privileges_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nft_module, "has_net_admin", lambda: False)
    with pytest.raises(KernelUnavailable, match="needs root"):
        CHECK_PRIVILEGES()


async def test_first_acquire_clears_a_stale_table_and_last_release_deletes_it() -> None:
    table = KernelTable(FakeNft)
    a, b = object(), object()
    await table.acquire("a", a)
    await table.acquire("b", b)
    assert FakeNft.log == ["add table inet pointsman\ndelete table inet pointsman\n"]
    await table.release("a", a, "REMOVE a\n")
    await table.release("a", a, "REMOVE a\n")  # twice: ignored
    await table.release("b", b, "REMOVE b\n")
    assert FakeNft.log[1:] == ["REMOVE a\n", "delete table inet pointsman\n"]
    assert table.owners == frozenset()


async def test_a_retired_listener_leaves_its_successors_objects_alone() -> None:
    table = KernelTable(FakeNft)
    old, new, other = object(), object(), object()
    await table.acquire("web", old)
    await table.acquire("other", other)
    await table.acquire("web", new)  # a reload moved web to a new VIP; old web still drains
    await table.release("web", old, "REMOVE web\n")
    assert "REMOVE web\n" not in FakeNft.log
    assert table.owners == frozenset({"web", "other"})
    await table.release("web", new, "REMOVE web\n")
    assert FakeNft.log[-1] == "REMOVE web\n"


async def test_missing_nf_tables_is_a_clear_refusal() -> None:
    FakeNft.fail_on = "add table"
    with pytest.raises(KernelUnavailable, match="nf_tables is not usable"):
        await KernelTable(FakeNft).acquire("a", object())


async def test_a_transaction_needs_an_owner() -> None:
    with pytest.raises(NftError, match="not set up"):
        await KernelTable(FakeNft).run(lambda nft: nft.text("x"))


async def test_transactions_run_off_the_loop_in_the_order_asked() -> None:
    table = KernelTable(FakeNft)
    await table.acquire("a", object())
    loop_thread = threading.get_ident()
    threads: list[int] = []

    def work(name: str) -> Callable[[Nft], str]:
        def run(nft: Nft) -> str:
            threads.append(threading.get_ident())
            time.sleep(0.01 if name == "first" else 0)  # the first is slow: order must still hold
            return nft.text(name)
        return run

    await asyncio.gather(*(table.run(work(name)) for name in ("first", "second", "third")))
    assert FakeNft.log[1:] == ["first", "second", "third"]
    assert loop_thread not in threads


async def test_a_cancelled_caller_keeps_the_order_until_its_thread_is_done() -> None:
    table = KernelTable(FakeNft)
    await table.acquire("a", object())
    started = threading.Event()
    release = threading.Event()

    def slow(nft: Nft) -> str:
        started.set()
        release.wait(5)
        return nft.text("slow")

    first = asyncio.create_task(table.run(slow))
    await asyncio.to_thread(started.wait, 5)
    second = asyncio.create_task(table.run(lambda nft: nft.text("after")))
    first.cancel()
    await asyncio.sleep(0.02)
    assert FakeNft.log[1:] == []  # "after" waits for the cancelled caller's thread
    release.set()
    await second
    with pytest.raises(asyncio.CancelledError):
        await first
    assert FakeNft.log[1:] == ["slow", "after"]


async def test_at_exit_deletes_a_table_still_owned() -> None:
    table = KernelTable(FakeNft)
    await table.acquire("a", object())
    table._at_exit()
    assert FakeNft.log[-1] == "delete table inet pointsman\n"
