# Types of the compiled TCP policy hot path (_policy.pyx): fold is the same function as fold.fold.
from pointsman.pool.pool import Pool
from pointsman.proxy.fold import Folding

def fold(listener: Folding, records: bytes, head: str | None,
         lines: list[str] | None) -> tuple[int, set[Pool] | None]: ...
