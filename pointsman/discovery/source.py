"""What every discovery source is: a loop that publishes a pool's whole backend set on change."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from pointsman.config.model import BackendConfig

# Called with the full set each time it changes (never a delta), so a missed call heals itself.
Publish = Callable[[Sequence[BackendConfig]], None]


class Source(Protocol):
    kind: str  # "dns", "kubernetes", "etcd_members": the label in logs and metrics
    describe: str  # what it watches, e.g. "SRV _pg._tcp.db.example via 127.0.0.1:53"

    async def run(self, publish: Publish) -> None:
        """Run until cancelled; publish the backend set after the first answer and every change.
        Errors are the source's own business: log, keep the last set, retry with backoff."""
        ...


def backend(host: str, port: int, weight: int = 1) -> BackendConfig:
    """A discovered backend (unnamed: its id is its address, the same on every node)."""
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return BackendConfig.model_validate({"address": address, "weight": weight})


def canonical(backends: Sequence[BackendConfig]) -> tuple[BackendConfig, ...]:
    """Sorted and de-duplicated by id: every node builds the same list from the same answer,
    whatever order the DNS server or the API returned."""
    by_id = {b.id: b for b in backends}
    return tuple(by_id[key] for key in sorted(by_id))
