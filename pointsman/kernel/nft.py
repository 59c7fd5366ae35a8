"""The libnftables binding and the one nftables table pointsman owns.

The binding is Debian's python3-nftables (ctypes over libnftables.so.1; not on PyPI). A virtualenv
does not see /usr/lib/python3/dist-packages, so `load_binding` appends that directory to sys.path
for this one import and removes it again: nothing else can be picked up from there.

`KernelTable` owns `inet pointsman` for this process: the first listener to start deletes a table
left behind by a process that died without cleaning up, the last to stop deletes the table, and an
atexit hook deletes it if the process exits with listeners still registered.

Nothing here blocks the event loop: a transaction (a 4093-slot rewrite takes tens of milliseconds
in libnftables) runs in a worker thread, and an asyncio lock queues transactions in the order the
loop asked for them. A threading lock guards the libnftables context itself, which the worker
threads and the exit hook share.
"""

from __future__ import annotations

import asyncio
import atexit
import importlib
import logging
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

from pointsman.kernel.ruleset import TABLE_REF, JsonCommand

log = logging.getLogger("pointsman.kernel")

BINDING_DIR = Path("/usr/lib/python3/dist-packages")
"""Where Debian installs python3-nftables (the package directory is `nftables/` under it)."""

CAP_NET_ADMIN = 12

T = TypeVar("T")


class KernelUnavailable(RuntimeError):
    """The kernel data plane cannot run here (privileges, binding, nf_tables); says what to do."""


class NftError(RuntimeError):
    """libnftables refused a command; the message is nft's own error text."""


def load_binding(directory: Path = BINDING_DIR) -> ModuleType:
    """Import the `nftables` binding, from sys.path or else from Debian's dist-packages."""
    try:
        return importlib.import_module("nftables")
    except ImportError:
        pass
    if not (directory / "nftables" / "__init__.py").is_file():
        raise KernelUnavailable(
            "the kernel data plane needs the libnftables Python binding: install the Debian "
            f"packages nftables and python3-nftables (not found in sys.path or {directory})")
    entry = str(directory)
    sys.path.append(entry)
    try:
        return importlib.import_module("nftables")
    except ImportError as exc:
        raise KernelUnavailable(f"cannot import the nftables binding from {directory}: {exc}") from exc
    finally:
        sys.path.remove(entry)


def has_net_admin(status: str | None = None) -> bool:
    """True if the effective capabilities include CAP_NET_ADMIN (`status`: /proc/self/status text)."""
    if status is None:
        try:
            status = Path("/proc/self/status").read_text()
        except OSError:
            return False
    for line in status.splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    return False


def check_privileges() -> None:
    if not has_net_admin():
        raise KernelUnavailable(
            "the kernel data plane programs nftables and needs root (CAP_NET_ADMIN); run pointsman "
            "as root or use dataplane: proxy")


class Nft:
    """One libnftables context: text commands for structure, JSON for elements."""

    def __init__(self, binding: ModuleType | None = None) -> None:
        module = binding if binding is not None else load_binding()
        try:
            self._ctx: Any = module.Nftables()
        except OSError as exc:
            raise KernelUnavailable(f"cannot load libnftables ({exc}): install the nftables package") from exc

    def text(self, commands: str) -> str:
        rc, out, err = self._ctx.cmd(commands)
        if rc != 0:
            raise NftError(_first_error(err))
        return str(out)

    def json(self, commands: list[JsonCommand]) -> None:
        if not commands:
            return
        rc, _out, err = self._ctx.json_cmd({"nftables": commands})
        if rc != 0:
            raise NftError(_first_error(err))


def _first_error(err: str) -> str:
    """nft repeats an error once per line of context; the first line says it."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else "nftables command failed"


class KernelTable:
    """The owner of `inet pointsman` in this process (see the module docstring)."""

    def __init__(self, nft_factory: type[Nft] = Nft) -> None:
        self._factory = nft_factory
        self._nft: Nft | None = None
        # The context is used by one thread at a time (libnftables contexts are not thread-safe).
        # Only worker threads and the exit hook take it, so the event loop never waits on it.
        self._thread_lock = threading.Lock()
        # Orders transactions on the loop: a writer holds it until its thread is done, so the
        # kernel sees transactions in the order the loop asked for them.
        self._order: asyncio.Lock | None = None
        self._order_loop: asyncio.AbstractEventLoop | None = None
        # Own threads, started once: the loop's default executor starts a thread on demand, and
        # Thread.start() waits until the OS has run it (milliseconds to tens of milliseconds on a
        # loaded machine), inside whichever callback asked. Transactions run one at a time anyway;
        # counter reads get their own thread so a long transaction never delays a reading.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pointsman-nft")
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pointsman-kernel-read")
        # Listener name -> the listener object that owns its objects now. A listener retired by a
        # reload can still be draining when a new one of the same name (new VIP) has started: the
        # objects are the new one's then, and the old one's release must leave them alone.
        self._owners: dict[str, object] = {}
        self._atexit = False

    @property
    def owners(self) -> frozenset[str]:
        return frozenset(self._owners)

    def _ordering(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        if self._order is None or self._order_loop is not loop:  # a lock belongs to one loop
            self._order, self._order_loop = asyncio.Lock(), loop
        return self._order

    async def run(self, work: Callable[[Nft], T]) -> T:
        """Run `work(nft)` in a worker thread, after every transaction asked for before it.

        If the caller is cancelled while the thread runs, the lock is held until the thread is
        done (a thread cannot be stopped), and the cancellation is passed on then.
        """
        async with self._ordering():
            future = asyncio.get_running_loop().run_in_executor(self._writer, self._in_thread, work)
            try:
                return await asyncio.shield(future)
            except asyncio.CancelledError:
                await asyncio.wait([future])
                raise

    async def read(self, work: Callable[[], T]) -> T:
        """Run a read (a netlink counter dump) in the table's reading thread."""
        return await asyncio.get_running_loop().run_in_executor(self._reader, work)

    def _in_thread(self, work: Callable[[Nft], T]) -> T:
        with self._thread_lock:
            return work(self._require())

    async def acquire(self, listener: str, owner: object) -> None:
        """Register `owner` as the listener of that name (replacing any earlier one); the first
        listener checks the kernel and clears a stale table."""
        async with self._ordering():
            await asyncio.get_running_loop().run_in_executor(self._writer, self._acquire, listener, owner)
        # Start the reading thread now, not in the first scrape's refresh.
        await asyncio.get_running_loop().run_in_executor(self._reader, lambda: None)

    def _acquire(self, listener: str, owner: object) -> None:
        with self._thread_lock:
            if self._nft is None:
                check_privileges()
                nft = self._factory()
                try:
                    # `add` then `delete` in one transaction: succeeds whether or not it existed.
                    nft.text(f"add table {TABLE_REF}\ndelete table {TABLE_REF}\n")
                except NftError as exc:
                    raise KernelUnavailable(f"nf_tables is not usable here ({exc}); the kernel data "
                                            "plane needs nf_tables with nat, numgen and jhash") from exc
                self._nft = nft
            if not self._atexit:
                atexit.register(self._at_exit)
                self._atexit = True
            self._owners[listener] = owner

    async def release(self, listener: str, owner: object, removal: str) -> None:
        """Remove a listener's objects; the last listener out removes the table. Nothing happens
        unless `owner` still owns the name."""
        async with self._ordering():
            await asyncio.get_running_loop().run_in_executor(self._writer, self._release, listener,
                                                             owner, removal)

    def _release(self, listener: str, owner: object, removal: str) -> None:
        with self._thread_lock:
            if self._owners.get(listener) is not owner:
                return
            del self._owners[listener]
            nft = self._require()
            try:
                if self._owners:
                    nft.text(removal)
                else:
                    nft.text(f"delete table {TABLE_REF}\n")
            except NftError as exc:
                log.error("kernel: cleaning up listener %s failed: %s", listener, exc)

    def _require(self) -> Nft:
        if self._nft is None:
            raise NftError("the pointsman table is not set up (no listener acquired it)")
        return self._nft

    def _at_exit(self) -> None:
        with self._thread_lock:
            if self._owners and self._nft is not None:
                try:
                    self._nft.text(f"delete table {TABLE_REF}\n")
                except NftError as exc:
                    log.error("kernel: deleting the pointsman table at exit failed: %s", exc)
                self._owners.clear()


_shared: KernelTable | None = None


def shared_table() -> KernelTable:
    """The process's one `KernelTable` (created on first use)."""
    global _shared
    if _shared is None:
        _shared = KernelTable()
    return _shared
