"""The loop's default executor, PassingThreads: the work done, its results and errors, at most
`most` threads at once, and no thread left once nothing is queued (what keeps a data-path
process at one thread: see pointsman/loop.py). Threads are counted as the kernel sees them."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable

import pytest

from pointsman.loop import PassingThreads, run


def threads() -> int:
    return len(os.listdir("/proc/self/task"))


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `predicate` (the threads under test run on their own) until true or `timeout`."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


def test_results_errors_and_no_thread_left() -> None:
    before = threads()
    executor = PassingThreads()
    futures = [executor.submit(pow, n, 2) for n in range(20)]
    failed = executor.submit(int, "not a number")
    assert [f.result(5) for f in futures] == [n * n for n in range(20)]
    with pytest.raises(ValueError):
        failed.result(5)
    wait_for(lambda: threads() == before, 5.0, what="the threads gone")
    assert executor.submit(str, 7).result(5) == "7"  # a new burst starts a thread again
    executor.shutdown(wait=True)
    wait_for(lambda: threads() == before, 5.0, what="the threads gone")


def test_at_most_most_threads_at_once() -> None:
    before = threads()
    executor = PassingThreads(most=2)
    gate = threading.Event()
    running: list[int] = []
    peak: list[int] = []
    lock = threading.Lock()

    def held(n: int) -> int:
        with lock:
            running.append(n)
            peak.append(len(running))
        gate.wait(5)
        with lock:
            running.remove(n)
        return n

    futures = [executor.submit(held, n) for n in range(6)]
    wait_for(lambda: len(running) == 2, 5.0, what="two running")
    assert threads() == before + 2
    gate.set()
    assert sorted(f.result(5) for f in futures) == list(range(6))
    assert max(peak) == 2
    executor.shutdown(wait=True)
    wait_for(lambda: threads() == before, 5.0, what="the threads gone")


def test_shutdown_cancels_what_waits_waits_for_the_rest_and_refuses_more() -> None:
    before = threads()
    executor = PassingThreads(most=1)
    gate = threading.Event()
    first = executor.submit(gate.wait, 5)
    wait_for(lambda: first.running(), 5.0, what="the first running")
    queued = executor.submit(str, 1)
    done = threading.Thread(target=executor.shutdown, kwargs={"cancel_futures": True})
    done.start()
    wait_for(lambda: queued.cancelled(), 5.0, what="the queued one cancelled")
    assert done.is_alive()  # waiting for the running one
    gate.set()
    done.join(5)
    assert not done.is_alive() and first.result(0) is True
    with pytest.raises(RuntimeError):
        executor.submit(str, 2)
    wait_for(lambda: threads() == before, 5.0, what="the thread gone")


@pytest.mark.parametrize("use_uvloop", [True, False], ids=["uvloop", "asyncio"])
def test_run_makes_it_the_default_executor(use_uvloop: bool) -> None:
    async def main() -> tuple[int, int, int]:
        before = threads()
        ident = await asyncio.to_thread(threading.get_ident)
        deadline = time.monotonic() + 5.0
        while threads() != before and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
        return ident, before, threads()

    ident, before, after = run(main(), use_uvloop=use_uvloop)
    assert ident != threading.get_ident()
    assert after == before  # a ThreadPoolExecutor's thread would still be there
