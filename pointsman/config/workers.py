"""How many worker processes a config runs: the one rule `pointsman run`, the descriptor budget
and the process model share."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pointsman.config.model import Config

ENV = "POINTSMAN_WORKERS"


def worker_count(config: Config) -> int:
    """`workers` from the config, else POINTSMAN_WORKERS (unset or empty: not given), else one
    per CPU. A POINTSMAN_WORKERS that is not a positive integer is a ValueError naming it."""
    if config.workers:
        return config.workers
    raw = os.environ.get(ENV, "").strip()
    if raw:
        try:
            count = int(raw)
        except ValueError:
            count = 0
        if count < 1:
            raise ValueError(f"{ENV} must be a positive integer (or unset: one worker per CPU), "
                             f"got {raw!r}")
        return count
    return os.cpu_count() or 1
