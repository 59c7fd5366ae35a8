"""The process's one tc program, shared by every `datapath: tc` listener.

`TcPath` owns the loaded `TcProgram`, which interfaces it is attached to and for whom, and the
layout of its shared maps (each listener's stretch of `slot_map`, the indices of the listener
and backend counters): a listener asks for what it needs and gives it back; the program is
built and loaded for the first listener and unloaded (detached from every interface) after the
last. Loading and attaching block (clang at first use, the verifier, netlink): `acquire` runs
them in a worker thread. Map writes are single system calls, made on the loop by the listeners.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
from collections.abc import Sequence

from pointsman.kernel.tcbpf import TcProgram, build_object
from pointsman.kernel.tcmaps import MAX_BACKENDS, MAX_LISTENERS, Indices, SlotSpace

log = logging.getLogger("pointsman.kernel")


class TcPath:
    """See the module docstring. One per process (`shared_path`); used on the event loop."""

    def __init__(self) -> None:
        self.program: TcProgram | None = None
        self.slots = SlotSpace()
        self.listener_indices = Indices(MAX_LISTENERS)
        self.backend_indices = Indices(MAX_BACKENDS)
        self._interfaces: dict[str, tuple[str, ...]] = {}  # listener -> its interfaces
        self._lock = asyncio.Lock()

    async def acquire(self, listener: str, interfaces: Sequence[str]) -> TcProgram:
        """The program, loaded and attached to `interfaces` (besides other listeners')."""
        async with self._lock:
            loop = asyncio.get_running_loop()
            if self.program is None:
                path = await loop.run_in_executor(None, build_object)
                self.program = await loop.run_in_executor(None, TcProgram, path)
                atexit.register(self.close)  # tc filters outlive the process: take them off
            program = self.program
            attached = {i for held in self._interfaces.values() for i in held}
            mine = (*self._interfaces.get(listener, ()), *interfaces)
            try:
                for interface in interfaces:
                    if interface not in attached:
                        await loop.run_in_executor(None, program.attach, interface)
            except OSError:
                self._interfaces[listener] = mine
                self._drop_locked(listener, None)
                raise
            self._interfaces[listener] = mine
            return program

    async def set_interfaces(self, listener: str, interfaces: Sequence[str]) -> None:
        """A reload changed the listener's interfaces: attach the new ones, detach the unused."""
        await self.acquire(listener, interfaces)
        await self._drop_unused(listener, tuple(interfaces))

    async def release(self, listener: str) -> None:
        """The listener is gone: detach what only it used; unload after the last listener."""
        await self._drop_unused(listener, None)

    async def _drop_unused(self, listener: str, keep: tuple[str, ...] | None) -> None:
        async with self._lock:
            self._drop_locked(listener, keep)

    def _drop_locked(self, listener: str, keep: tuple[str, ...] | None) -> None:
        """Netlink requests of a few hundred microseconds each: made on the loop."""
        held = self._interfaces.pop(listener, ())
        if keep is not None:
            self._interfaces[listener] = keep
        program = self.program
        if program is None:
            return
        used = {i for still in self._interfaces.values() for i in still}
        for interface in set(held) - used:
            program.detach(interface)
        if not self._interfaces:
            self.close()

    def close(self) -> None:
        """Detach and unload now (the last listener went, or the process exits)."""
        if self.program is not None:
            self.program.close()
            self.program = None
            log.info("tc data path: program detached and unloaded")


_shared: TcPath | None = None


def shared_path() -> TcPath:
    """The process's one `TcPath` (created on first use)."""
    global _shared
    if _shared is None:
        _shared = TcPath()
    return _shared
