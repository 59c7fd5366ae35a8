"""Small shared builders for the balancing tests."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pointsman.balance import Candidate


@dataclass
class Load:
    """A mutable stand-in for the data plane's per-backend load."""

    active: int = 0


def candidates(*weights: float, prefix: str = "backend-") -> list[Candidate]:
    """Candidates named prefix0, prefix1, ... with the given weights."""
    return [Candidate(f"{prefix}{i}", float(w)) for i, w in enumerate(weights)]


def loads(*active: int) -> list[Load]:
    return [Load(a) for a in active]


def names(cands: Sequence[Candidate], picks: Sequence[int | None]) -> list[str | None]:
    return [None if p is None else cands[p].id for p in picks]
