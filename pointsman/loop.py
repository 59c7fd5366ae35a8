"""Event loop choice: uvloop on Linux when installed (measured ~1.4-2x plain asyncio here), with
`PassingThreads` as its default executor."""

from __future__ import annotations

import _thread
import asyncio
import threading
from collections import deque
from collections.abc import Callable, Coroutine
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")
Work = tuple["Future[Any]", Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class PassingThreads(ThreadPoolExecutor):
    """The loop's default executor (`asyncio.to_thread`, `run_in_executor(None, ...)`), whose
    threads leave as soon as nothing is queued.

    ThreadPoolExecutor's threads stay for good once started, and in a process of more than one
    thread the kernel takes and drops a reference on a descriptor's file at every system call
    (a process of one thread skips that): every recv and send of the data path pays, about 1 %
    of the CPU per keep-alive request (paired, 7 of 7 rounds). What runs here is rare (a metrics
    scrape, a status, a reload, a slow flow-log write), so a thread per burst costs nothing that
    shows. Its threads are started with `_thread.start_new_thread`, which returns at once:
    `Thread.start()` waits until the OS has run the new thread, on the loop (measured while the
    test suite loaded this machine: 0.12 ms median, 3.4 ms at the 99th percentile). A subclass,
    since asyncio takes only a ThreadPoolExecutor; none of its own machinery is used."""

    def __init__(self, most: int = 4) -> None:
        super().__init__(max_workers=most)
        self._most = most
        self._guard = threading.Lock()
        self._idle = threading.Condition(self._guard)  # notified when the last thread leaves
        self._queued: deque[Work] = deque()
        self._passing = 0  # threads running _drain
        self._closed = False

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        future: Future[T] = Future()
        with self._guard:
            if self._closed:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._queued.append((future, fn, args, kwargs))
            if self._passing < self._most:
                _thread.start_new_thread(self._drain, ())  # raises before counting, if at all
                self._passing += 1
        return future

    def _drain(self) -> None:
        while True:
            with self._guard:
                if not self._queued:
                    self._passing -= 1
                    if not self._passing:
                        self._idle.notify_all()
                    return
                future, fn, args, kwargs = self._queued.popleft()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:  # the caller's, through its future
                future.set_exception(exc)
            else:
                future.set_result(result)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._guard:
            self._closed = True
            if cancel_futures:
                for future, *_ in self._queued:
                    future.cancel()
                self._queued.clear()
            while wait and self._passing:
                self._idle.wait()


async def _with_passing_threads(main: Coroutine[Any, Any, T]) -> T:
    asyncio.get_running_loop().set_default_executor(PassingThreads())
    return await main


def run(main: Coroutine[Any, Any, T], use_uvloop: bool = True) -> T:
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            result: T = uvloop.run(_with_passing_threads(main))
            return result
    return asyncio.run(_with_passing_threads(main))
