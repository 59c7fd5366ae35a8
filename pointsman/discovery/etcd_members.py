"""etcd members: backends that register themselves under `<prefix>members/<pool>/<host:port>`
with a lease (`pointsman member register`), and vanish when the lease expires.

The source lists the prefix, then watches it from the next revision; after any failure it lists
again (the set it publishes is always a full, current one) and watches on, with backoff.
The key names the address; the value may be JSON `{"weight": N}` (anything else: weight 1).
"""

from __future__ import annotations

import asyncio
import json
import logging

from pointsman.config.model import BackendConfig
from pointsman.discovery.source import Publish, backend, canonical
from pointsman.fleet import keys
from pointsman.fleet.backoff import Backoff
from pointsman.fleet.etcd import EtcdClient, EtcdError, KeyValue

log = logging.getLogger("pointsman.discovery")

MAX_WEIGHT = 1000  # the config's weight limit (model.BackendConfig.weight)


def member_backend(prefix: str, pool: str, kv: KeyValue) -> BackendConfig | None:
    """The backend a member key stands for; None for a key that is not a member address."""
    address = keys.member_address(prefix, pool, kv.key)
    if address is None:
        return None
    weight = 1
    try:
        value = json.loads(kv.value) if kv.value else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        value = {}
    if isinstance(value, dict) and isinstance(value.get("weight"), int):
        weight = min(max(value["weight"], 0), MAX_WEIGHT)
    return backend(address.host, address.port, weight)


class EtcdMembersSource:
    kind = "etcd_members"

    def __init__(self, client: EtcdClient, prefix: str, pool: str) -> None:
        self.client = client
        self.prefix = prefix
        self.pool = pool
        self.key_prefix = keys.members_prefix(prefix, pool)
        self.describe = f"etcd {self.key_prefix}"

    async def run(self, publish: Publish) -> None:
        backoff = Backoff()
        failing = False
        while True:
            try:
                kvs, revision = await self.client.get_prefix(self.key_prefix)
                members = {kv.key: b for kv in kvs if (b := self._backend(kv)) is not None}
                publish(canonical(list(members.values())))
                if failing:
                    log.info("%s: reading members again", self.describe)
                failing = False
                async with self.client.watch(self.key_prefix, prefix=True,
                                             start_revision=revision + 1) as watch:
                    backoff.reset()
                    async for events in watch:
                        for event in events:
                            b = self._backend(event.kv)
                            if event.type == "delete" or b is None:
                                members.pop(event.kv.key, None)
                            else:
                                members[event.kv.key] = b
                        publish(canonical(list(members.values())))
            except EtcdError as exc:  # unavailable, compacted, or refused (e.g. permission)
                if not failing:
                    log.warning("%s: %s; keeping the members known, retrying", self.describe, exc)
                failing = True
                await asyncio.sleep(backoff.next())

    def _backend(self, kv: KeyValue) -> BackendConfig | None:
        return member_backend(self.prefix, self.pool, kv)
