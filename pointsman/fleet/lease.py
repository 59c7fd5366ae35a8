"""Keys that live as long as their owner: one etcd lease, kept alive, with its keys re-written.

A node registers `<prefix>nodes/<name>`; a backend registers `<prefix>members/<pool>/<addr>`.
If the owner dies, it stops refreshing and etcd deletes the keys when the TTL runs out. If etcd
is away longer than the TTL, the lease is gone when it returns: the keeper grants a new one and
writes the keys again, so registrations heal without anyone's help.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping

from pointsman.fleet.backoff import Backoff
from pointsman.fleet.etcd import EtcdClient, EtcdError, EtcdUnavailable

log = logging.getLogger("pointsman.fleet")

REVOKE_TIMEOUT = 2.0  # at shutdown, a dead etcd must not hold the process up


class LeaseKeeper:
    """Owns one lease and the keys written with it; `run()` until cancelled, then `close()`."""

    def __init__(self, client: EtcdClient, ttl: float,
                 values: Callable[[], Mapping[str, str]]) -> None:
        self.client = client
        self.ttl = max(2, round(ttl))
        self.values = values  # the keys and values to hold now (re-read at every refresh)
        self.lease = 0
        self.registered = asyncio.Event()  # set while the keys are known to be written
        self._written: dict[str, str] = {}
        self._poked = asyncio.Event()

    @property
    def refresh_interval(self) -> float:
        return self.ttl / 3  # two refreshes may fail before the lease expires

    async def run(self) -> None:
        backoff = Backoff(cap=self.refresh_interval)
        while True:
            try:
                await self._hold()
            except EtcdError as exc:  # EtcdUnavailable included
                if self.registered.is_set():
                    log.warning("etcd lease %x: %s; retrying", self.lease, exc)
                self.registered.clear()
                await asyncio.sleep(backoff.next())
            else:
                backoff.reset()

    def poke(self) -> None:
        """The values changed: write them now rather than at the next refresh."""
        self._poked.set()

    async def _hold(self) -> None:
        """Grant (or keep) the lease, write the keys, refresh until the lease is lost."""
        if self.lease == 0 or await self.client.keepalive(self.lease) == 0:
            self.lease = await self.client.grant(self.ttl)
            self._written = {}
        loop = asyncio.get_running_loop()
        refresh_at = loop.time() + self.refresh_interval
        while True:
            await self._write()
            self.registered.set()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(refresh_at):
                    await self._poked.wait()
            self._poked.clear()
            if loop.time() < refresh_at:
                continue  # poked: write the new values, refresh later
            if await self.client.keepalive(self.lease) == 0:
                log.warning("etcd lease %x expired; registering again", self.lease)
                self.lease = 0
                self.registered.clear()
                return
            refresh_at = loop.time() + self.refresh_interval

    async def _write(self) -> None:
        wanted = dict(self.values())
        for key, value in wanted.items():
            if self._written.get(key) != value:
                await self.client.put(key, value, lease=self.lease)
                self._written[key] = value
        for key in set(self._written) - set(wanted):
            await self.client.delete(key)
            del self._written[key]

    async def close(self) -> None:
        """Revoke the lease so the keys go now, not after the TTL (best effort)."""
        self.registered.clear()
        if self.lease:
            with contextlib.suppress(EtcdError, EtcdUnavailable, TimeoutError):
                async with asyncio.timeout(REVOKE_TIMEOUT):
                    await self.client.revoke(self.lease)
            self.lease = 0
