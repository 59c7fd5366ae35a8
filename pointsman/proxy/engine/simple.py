"""A minimal policy: round robin over fixed targets, retry on backend failure, tallies kept.

What the benchmarks load the engines with (the cost of a policy that only picks), and what the
engine tests drive them with. The listener's real policy (admission, preamble parsers, pools,
telemetry) is TcpListener's once it moves onto an engine; see docs/engine.md.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

from pointsman.proxy.engine.api import (
    RECORD,
    Connect,
    Decision,
    Ended,
    ReadPreamble,
    Refuse,
    Status,
    Target,
    iter_records,
)

NO_BACKEND = 1  # refusal code: every target failed or none is left


class RoundRobinPolicy:
    """Pick targets in turn; after a failed connect try the next one, at most `retries` times.

    `preamble`: when set, a function (conn_id, bytes) -> Decision | None that the engine's
    preamble calls go to (tests use it for PROXY-header style flows), with `read_preamble`
    the ReadPreamble decision returned at accept.
    """

    def __init__(self, targets: Sequence[Target], retries: int = 1, keep_records: bool = True,
                 read_preamble: ReadPreamble | None = None,
                 on_preamble: Callable[[int, bytes], Decision | None] | None = None) -> None:
        self.targets = list(targets)
        self.retries = retries
        self.keep_records = keep_records
        self.read_preamble = read_preamble
        self.on_preamble = on_preamble
        self.turn = 0
        self.tries: dict[int, int] = {}
        self.outcomes: Counter[tuple[int, int, int]] = Counter()  # (backend, status, errno)
        self.connect_times: list[float] = []
        self.records: list[Ended] = []
        self.ended_count = 0
        self.refuse_all: int | None = None  # a refusal code to answer every accept with
        # Tests: answer accepts with this instead (e.g. Hold, to resume later).
        self.on_accept: Callable[[int, str, int], Decision] | None = None

    def _next(self) -> Target:
        target = self.targets[self.turn % len(self.targets)]
        self.turn += 1
        return target

    def accepted(self, conn_id: int, host: str, port: int) -> Decision:
        if self.on_accept is not None:
            return self.on_accept(conn_id, host, port)
        if self.refuse_all is not None:
            return Refuse(self.refuse_all)
        if self.read_preamble is not None:
            return self.read_preamble
        if not self.targets:
            return Refuse(NO_BACKEND)
        return self._next()

    def preamble(self, conn_id: int, data: bytes) -> Decision | None:
        if self.on_preamble is None:
            return self._next()
        return self.on_preamble(conn_id, data)

    def connect_result(self, conn_id: int, backend: int, status: int, err: int,
                       elapsed: float) -> Decision | None:
        self.outcomes[(backend, status, err)] += 1
        if status == Status.OK:
            self.tries.pop(conn_id, None)
            if self.keep_records:
                self.connect_times.append(elapsed)
            return None
        tries = self.tries.get(conn_id, 0) + 1
        if tries > self.retries or status == Status.LOCAL:
            self.tries.pop(conn_id, None)
            return None
        self.tries[conn_id] = tries
        return self._next()

    def ended(self, records: bytes) -> None:
        self.ended_count += len(records) // RECORD.size
        if self.keep_records:
            self.records.extend(iter_records(records))


__all__ = ["NO_BACKEND", "Connect", "RoundRobinPolicy"]
