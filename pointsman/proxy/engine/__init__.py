"""Connection engines: the compiled one (`_engine`, Cython, Linux) and the pure-Python reference.

    engine = new_engine(loop)          # the compiled engine when built, else the Python one
    engine_name()                      # "cython" or "python": the runtime prints it at start

`POINTSMAN_ENGINE=python` forces the pure-Python engine; `POINTSMAN_ENGINE=cython` insists on the
compiled one (an error when it is not built). The API both share is in api.py; docs/engine.md
describes the design.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from pointsman.proxy.engine.api import (
    Connect,
    Decision,
    End,
    Ended,
    EngineStatistics,
    Flag,
    Hold,
    Keepalive,
    ListenerCounters,
    Op,
    Policy,
    ReadPreamble,
    Refuse,
    Status,
    Target,
    iter_records,
)
from pointsman.proxy.engine.pybatch import Address, Sock

ENV = "POINTSMAN_ENGINE"


class Engine(Protocol):
    """What both engines offer (see api.py for the policy side)."""

    name: str

    @property
    def waits_for_loop(self) -> bool:
        """True when the engine blocks in its own epoll for uvloop too (docs/engine.md, "The
        engine waits for uvloop"); False: one add_reader on the loop."""
        ...

    def target(self, backend: int, host: str, port: int, *, source: str | None = None,
               transparent: bool = False, connect_timeout: float = 5.0, idle_timeout: float = 300.0,
               half_close_timeout: float = 30.0, splice_after: int | None = None,
               nodelay: bool = True, keepalive: Keepalive | None = None,
               quiet: bool = False, load: object = None) -> Any: ...

    def add_listener(self, sock: Any, policy: Policy, *, nodelay: bool = True,
                     keepalive: Keepalive | None = None) -> int: ...

    def set_listener_keepalive(self, lid: int, keepalive: Keepalive | None) -> None: ...

    def stop_listener(self, lid: int) -> None: ...

    def set_fast(self, lid: int, targets: Sequence[Any] | None = None, start: int = 0,
                 credit: int = 0, watch: Any = None, snapshot: Any = None,
                 weights: Sequence[float] | None = None, lookup: Sequence[int] | None = None,
                 key_port: bool = False, names: Sequence[bytes] | None = None,
                 sampled: bool = False) -> None: ...

    def set_credit(self, lid: int, credit: int) -> int: ...

    def pause_listener(self, lid: int) -> None: ...

    def close(self, conn_id: int, code: int) -> bool: ...

    def resume(self, conn_id: int, decision: Decision) -> bool: ...

    def close_backend(self, backend: int, code: int) -> int: ...

    def close_all(self, code: int, listener: int | None = None) -> int: ...

    def active(self, listener: int | None = None) -> int: ...

    def sockname(self, conn_id: int) -> tuple[str, int] | None: ...

    def buffered(self, conn_id: int) -> tuple[int, int] | None: ...

    def is_connected(self, conn_id: int) -> bool: ...

    def connections(self) -> list[int]: ...

    def listener_stats(self, lid: int) -> ListenerCounters: ...

    def statistics(self) -> EngineStatistics: ...

    def shutdown(self, code: int) -> int: ...


def compiled_available() -> bool:
    try:
        from pointsman.proxy.engine import _engine  # noqa: F401
    except ImportError:
        return False
    return True


def engine_name() -> str:
    """Which engine `new_engine` makes in this process: "cython" or "python"."""
    wanted = os.environ.get(ENV, "").strip().lower()
    if wanted not in ("", "auto", "python", "cython"):
        raise ValueError(f"{ENV} must be 'python', 'cython' or 'auto', got {wanted!r}")
    if wanted == "python":
        return "python"
    if compiled_available():
        return "cython"
    if wanted == "cython":
        raise RuntimeError(f"{ENV}=cython but the compiled engine is not built "
                           "(pip install -e . with a C compiler and Python headers)")
    return "python"


def new_engine(loop: asyncio.AbstractEventLoop, name: str | None = None) -> Engine:
    """An engine on `loop`: `name` "cython"/"python", or None for `engine_name()`."""
    name = name or engine_name()
    if name == "cython":
        from pointsman.proxy.engine._engine import CEngine
        engine: Engine = CEngine(loop)
        return engine
    if name == "python":
        from pointsman.proxy.engine.pyengine import PyEngine
        return PyEngine(loop)
    raise ValueError(f"no engine named {name!r}")


def batch_functions(name: str | None = None) -> tuple[
        Callable[[Sock, int], list[tuple[bytes, Address]]],
        Callable[[Sock, Sequence[tuple[bytes, Address | None]]], int]]:
    """(recv_batch, send_batch) for UDP: recvmmsg/sendmmsg when compiled, else a loop."""
    if (name or engine_name()) == "cython":
        from pointsman.proxy.engine._engine import recv_batch, send_batch
        return recv_batch, send_batch
    from pointsman.proxy.engine.pybatch import recv_batch as py_recv
    from pointsman.proxy.engine.pybatch import send_batch as py_send
    return py_recv, py_send


__all__ = ["ENV", "Connect", "Decision", "End", "Ended", "Engine", "EngineStatistics", "Flag",
           "Hold", "Keepalive", "ListenerCounters", "Op", "Policy", "ReadPreamble", "Refuse",
           "Status", "Target", "batch_functions", "compiled_available", "engine_name",
           "iter_records", "new_engine"]
