"""Retry delays for reconnecting to etcd, DNS servers and the Kubernetes API (pure).

Exponential with full jitter below the cap, as in the AWS architecture blog's "Exponential
Backoff and Jitter" (2015): many nodes that lost etcd at the same moment do not come back in step.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    first: float = 0.2  # seconds before the first retry (median half of it, with jitter)
    cap: float = 5.0  # never wait longer: an operator expects a returning etcd to be seen soon
    factor: float = 2.0
    rng: random.Random = field(default_factory=random.Random)
    failures: int = 0

    def next(self) -> float:
        """The delay before the next try; each call counts one more failure."""
        ceiling = min(self.cap, self.first * self.factor ** min(self.failures, 32))
        self.failures += 1
        return ceiling / 2 + self.rng.uniform(0.0, ceiling / 2)

    def reset(self) -> None:
        self.failures = 0
