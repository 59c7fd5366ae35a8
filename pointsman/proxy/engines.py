"""One connection engine per event loop, shared by every TCP listener served on it.

The engine owns a private epoll descriptor read through one `add_reader` on the node's loop, so
admin, health checks and the rest of the node keep running on the same loop. Listeners take it
with `acquire` when they start and give it back with `release` once they stopped accepting and
their last connection ended; the last one out shuts it down (on the next turn of the loop: a
release can come from inside one of the engine's own callbacks).

Which engine: `POINTSMAN_ENGINE` (see pointsman.proxy.engine): the compiled one when it is
built, else the pure-Python one; `engine_in_use()` names it for the start-up line.
"""

from __future__ import annotations

import asyncio

from pointsman.proxy.engine import Engine, engine_name, new_engine

_SHUTDOWN_CODE = 0  # nothing is left to cut when the last listener lets go


class _Shared:
    __slots__ = ("engine", "users")

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.users = 0


_BY_LOOP: dict[asyncio.AbstractEventLoop, _Shared] = {}


def engine_in_use() -> str:
    """The engine this process runs ("cython" or "python"); raises on a bad POINTSMAN_ENGINE."""
    return engine_name()


def acquire(loop: asyncio.AbstractEventLoop) -> Engine:
    shared = _BY_LOOP.get(loop)
    if shared is None:
        shared = _BY_LOOP[loop] = _Shared(new_engine(loop))
    shared.users += 1
    return shared.engine


def release(loop: asyncio.AbstractEventLoop, engine: Engine) -> None:
    shared = _BY_LOOP.get(loop)
    if shared is None or shared.engine is not engine:
        return
    shared.users -= 1
    if shared.users <= 0 and not loop.is_closed():
        loop.call_soon(_shut_if_unused, loop, shared)


def _shut_if_unused(loop: asyncio.AbstractEventLoop, shared: _Shared) -> None:
    if shared.users > 0 or _BY_LOOP.get(loop) is not shared:
        return
    del _BY_LOOP[loop]
    shared.engine.shutdown(_SHUTDOWN_CODE)


def shared_engine(loop: asyncio.AbstractEventLoop) -> Engine | None:
    """The engine serving `loop` now, if any (tests and the admin use it to look inside)."""
    shared = _BY_LOOP.get(loop)
    return shared.engine if shared is not None else None
