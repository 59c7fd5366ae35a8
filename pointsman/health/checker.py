"""The active health checker: one task per target, owned by one TaskGroup.

`HealthChecker.run()` runs until cancelled; its owner runs it inside its own TaskGroup and cancels
it on shutdown, and the checker's TaskGroup cancels and awaits every per-target task. Each task
probes on a schedule, feeds the result to the target's `Hysteresis` and reports every result to
`on_result(backend_id, result, verdict)`, where `verdict` is the new verdict when it flipped, else
None. The checker keeps no backend state of its own beyond the hysteresis: the pool owns that.

Schedule: the first probe runs after a random delay in [0, interval * jitter], so a backend dead
at start is found within `fall` short intervals, and checks of many backends do not all fire at
once. After that, probes *start* every interval * (1 +/- jitter); a slow probe does not stretch
the period, and one running past the interval is followed by the next at once (the probe timeout
should stay below the interval).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from pointsman.health.hysteresis import Hysteresis
from pointsman.health.probes import ProbeResult, ProbeSpec, probe

__all__ = ["HealthChecker", "HealthTarget", "OnResult", "ProbeFn", "TargetStats"]

OnResult = Callable[[str, ProbeResult, bool | None], None]
ProbeFn = Callable[[ProbeSpec, str, int], Awaitable[ProbeResult]]


@dataclass(frozen=True, slots=True)
class HealthTarget:
    """What to check for one backend. `healthy` is the starting verdict: it must agree with the
    pool's state machine (`health_ok`), e.g. True for `initial_state: up`."""

    backend_id: str
    host: str
    port: int
    spec: ProbeSpec
    interval: float
    jitter: float = 0.0  # fraction of the interval, 0 <= jitter < 1
    rise: int = 2
    fall: int = 3
    healthy: bool = True

    def __post_init__(self) -> None:
        if not self.interval > 0:
            raise ValueError(f"health check interval must be positive, got {self.interval}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"health check jitter must be in [0, 1), got {self.jitter}")
        if self.rise < 1 or self.fall < 1:
            raise ValueError("rise and fall must be at least 1")


@dataclass(frozen=True, slots=True)
class TargetStats:
    """A snapshot of one target's checking, for the status page and metrics."""

    backend_id: str
    healthy: bool
    checks: int
    failures: int
    last: ProbeResult | None


class _Watch:
    """The checker's mutable record of one target; only its own task and `set_targets` touch it."""

    __slots__ = ("checks", "failures", "hysteresis", "last", "target", "task")

    def __init__(self, target: HealthTarget, healthy: bool) -> None:
        self.target = target
        self.hysteresis = Hysteresis(target.rise, target.fall, healthy)
        self.task: asyncio.Task[None] | None = None
        self.checks = 0
        self.failures = 0
        self.last: ProbeResult | None = None


class HealthChecker:
    def __init__(
        self,
        on_result: OnResult,
        *,
        probe_fn: ProbeFn = probe,
        rng: random.Random | None = None,
    ) -> None:
        self._on_result = on_result
        self._probe = probe_fn
        self._rng = rng or random.Random()
        self._watches: dict[str, _Watch] = {}
        self._group: asyncio.TaskGroup | None = None

    def set_targets(self, targets: Iterable[HealthTarget]) -> None:
        """Replace the set of targets (on start and on every reload).

        Unchanged targets keep running with their counters. A changed target is restarted but
        keeps its current verdict, so it stays in step with the pool's state machine. Removed
        targets are cancelled; no result of theirs is reported after this returns.
        """
        wanted: dict[str, HealthTarget] = {}
        for target in targets:
            if target.backend_id in wanted:
                raise ValueError(f"duplicate health check target {target.backend_id!r}")
            wanted[target.backend_id] = target
        for backend_id in self._watches.keys() - wanted.keys():
            self._stop(self._watches.pop(backend_id))
        for backend_id, target in wanted.items():
            old = self._watches.get(backend_id)
            if old is not None and old.target == target:
                continue
            if old is not None:
                self._stop(old)
            watch = _Watch(target, target.healthy if old is None else old.hysteresis.healthy)
            self._watches[backend_id] = watch
            self._start(watch)

    async def run(self) -> None:
        """Check every target until cancelled; then cancel and await every check task.

        An exception from `on_result` is a bug: it stops every check and ends `run` with an
        ExceptionGroup, rather than leaving one backend silently unchecked.
        """
        if self._group is not None:
            raise RuntimeError("HealthChecker is already running")
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                for watch in self._watches.values():
                    self._start(watch)
                await asyncio.get_running_loop().create_future()  # until cancelled
        finally:
            self._group = None
            for watch in self._watches.values():
                watch.task = None

    def statistics(self) -> dict[str, TargetStats]:
        return {
            backend_id: TargetStats(
                backend_id, w.hysteresis.healthy, w.checks, w.failures, w.last
            )
            for backend_id, w in self._watches.items()
        }

    def _start(self, watch: _Watch) -> None:
        if self._group is not None and watch.task is None:
            name = f"health-check:{watch.target.backend_id}"
            watch.task = self._group.create_task(self._check_forever(watch), name=name)

    @staticmethod
    def _stop(watch: _Watch) -> None:
        # The TaskGroup awaits the cancelled task; a cancelled child does not abort the group.
        if watch.task is not None:
            watch.task.cancel()
            watch.task = None

    async def _check_forever(self, watch: _Watch) -> None:
        target = watch.target
        loop = asyncio.get_running_loop()
        next_start = loop.time() + self._rng.uniform(0.0, target.interval * target.jitter)
        low = target.interval * (1.0 - target.jitter)
        high = target.interval * (1.0 + target.jitter)
        while True:
            await asyncio.sleep(max(0.0, next_start - loop.time()))
            started = loop.time()
            result = await self._probe(target.spec, target.host, target.port)
            # An agent reply without "up"/"down" ("drain", "75%") is no vote on health.
            verdict = watch.hysteresis.record(result.ok) if result.counts else None
            watch.checks += 1
            watch.failures += not result.ok
            watch.last = result
            self._on_result(target.backend_id, result, verdict)
            next_start = started + self._rng.uniform(low, high)
