"""The contract between the data plane and every balancing algorithm.

A picker is built by the control plane from one immutable pool snapshot and then only read by the
data plane. Backends are addressed by their index in the snapshot's backend tuple; that index is
stable for the life of the snapshot. A backend with an effective weight of 0 (down, draining,
ejected, maintenance or configured weight 0) is never picked.
"""

from __future__ import annotations

from collections.abc import Set
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Candidate:
    """One backend as a balancing algorithm sees it.

    `id` is the backend's stable identity (its configured name, else its address as written): hash
    policies hash it, so two processes or two machines with the same backends agree. `weight` is
    the effective weight after health state and slow start; 0 means "do not pick".
    """

    id: str
    weight: float


class Loaded(Protocol):
    """Live load of one backend, owned and updated by the data plane; pickers only read it."""

    @property
    def active(self) -> int: ...


class Picker(Protocol):
    """Chooses one backend index for a new connection (or UDP session)."""

    def pick(self, key: bytes, exclude: Set[int] = frozenset()) -> int | None:
        """Return the index of the chosen candidate, or None when none is available.

        `key` is the hash key (source IP, or IP and port) for hash policies; other policies ignore
        it. `exclude` holds indices already tried for this connection (retries skip them).
        """
        ...
