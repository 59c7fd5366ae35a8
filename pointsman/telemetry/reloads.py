"""Outcomes of config file reloads (SIGHUP, `POST /api/v1/reload`, `pointsman reload`).

A reload can be refused at three places: the file does not parse or validate (before the
composer sees it), the composer refuses the file merged with discovered backends, or a new
listener cannot be bound. The node records every outcome of its `reload` here, whatever refused
it, and /metrics reads it (`pointsman_config_rejected_total{source="file"}`,
`pointsman_config_last_reload_success`, `pointsman_config_last_reload_timestamp_seconds`).
"""

from __future__ import annotations

from dataclasses import dataclass


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
