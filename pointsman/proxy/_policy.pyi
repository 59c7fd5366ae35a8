# Types of the compiled TCP policy hot path (_policy.pyx): fold, connected and admit are the same
# functions as fold.fold, fold.connected and fold.admit.
from pointsman.pool.pool import Pool
from pointsman.pool.snapshot import PoolSnapshot
from pointsman.proxy.flows import Flow
from pointsman.proxy.fold import Folding
from pointsman.proxy.targets import Slot

def fold(listener: Folding, records: bytes, head: str | None,
         lines: list[str] | None) -> tuple[int, set[Pool] | None]: ...
def connected(connections: dict[int, Flow], entries: bytes) -> None: ...
def admit(connections: dict[int, Flow], batch: list[tuple[int, int, int, str, int]],
          pool: Pool, snapshot: PoolSnapshot, slots: dict[int, Slot]) -> None: ...
