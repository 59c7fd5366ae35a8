"""Outcomes of config file reloads (SIGHUP, `POST /api/v1/reload`, `pointsman reload`).

A reload can be refused at three places: the file does not parse or validate (before the
composer sees it), the composer refuses the file merged with discovered backends, or a new
listener cannot be bound. Counting at the composer misses the first, so the reload method itself
is wrapped: `@tracked` records every outcome, whatever refused it, into the owner's
`ReloadHistory`, which /metrics reads (`pointsman_config_rejected_total{source="file"}`,
`pointsman_config_last_reload_success`, `pointsman_config_last_reload_timestamp_seconds`).
"""

from __future__ import annotations

import functools
import time
import weakref
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar


@dataclass(slots=True)
class ReloadHistory:
    accepted: int = 0
    refused: int = 0
    last_ok: bool = True  # the config loaded at start counts as a good reload, as in Prometheus
    last_at: float | None = None  # wall time of the last reload; None: none since start

    def record(self, ok: bool, at: float) -> None:
        if ok:
            self.accepted += 1
        else:
            self.refused += 1
        self.last_ok = ok
        self.last_at = at


# One history per owner (the runtime), kept outside it so the owner needs no new attribute; weak,
# so a finished runtime (tests make many) takes its history with it.
_HISTORIES: weakref.WeakKeyDictionary[object, ReloadHistory] = weakref.WeakKeyDictionary()

S = TypeVar("S")


def history(owner: object) -> ReloadHistory:
    """The reload history of `owner` (empty until its first reload)."""
    found = _HISTORIES.get(owner)
    if found is None:
        found = _HISTORIES[owner] = ReloadHistory()
    return found


Reload = Callable[[S], Coroutine[Any, Any, list[str]]]


def tracked(reload: Reload[S]) -> Reload[S]:
    """Wrap `async def reload(self) -> list[str]` (the config's errors, empty when applied) so
    each call is recorded in `history(self)`. An exception out of reload counts as refused."""

    @functools.wraps(reload)
    async def wrapper(owner: S) -> list[str]:
        try:
            errors = await reload(owner)
        except Exception:
            history(owner).record(False, time.time())
            raise
        history(owner).record(not errors, time.time())
        return errors

    return wrapper
