"""HealthChecker scheduling and reload logic, with a scripted probe (no network)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager

import pytest

from pointsman.health.checker import HealthChecker, HealthTarget
from pointsman.health.probes import ProbeResult, ProbeSpec

SPEC = ProbeSpec(type="tcp", timeout=0.5)


class Recorder:
    """The on_result callback; tests wait on it for conditions, never for fixed times."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bool, bool | None]] = []
        self._changed = asyncio.Event()

    def __call__(self, backend_id: str, result: ProbeResult, verdict: bool | None) -> None:
        self.calls.append((backend_id, result.ok, verdict))
        self._changed.set()

    def of(self, backend_id: str) -> list[tuple[bool, bool | None]]:
        return [(ok, v) for b, ok, v in self.calls if b == backend_id]

    async def wait_until(self, condition: Callable[[], bool], timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while not condition():
                self._changed.clear()
                await self._changed.wait()


class Script:
    """A probe function answering from a per-backend script; True forever once it runs out."""

    def __init__(self, **scripts: list[bool]) -> None:
        self._scripts: dict[str, Iterator[bool]] = {k: iter(v) for k, v in scripts.items()}
        self.ports: list[int] = []

    async def __call__(self, spec: ProbeSpec, host: str, port: int) -> ProbeResult:
        await asyncio.sleep(0)
        self.ports.append(port)
        ok = next(self._scripts.get(host, iter(())), True)
        return ProbeResult(ok, 0.0, "ok" if ok else "refused")


def target(backend_id: str, **kw: object) -> HealthTarget:
    # host doubles as the script key in these tests
    fields: dict[str, object] = dict(
        backend_id=backend_id, host=backend_id, port=1, spec=SPEC, interval=0.01, rise=2, fall=2
    )
    fields.update(kw)
    return HealthTarget(**fields)  # type: ignore[arg-type]


@asynccontextmanager
async def running(checker: HealthChecker) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(checker.run())
    try:
        yield task
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_reports_every_result_and_flips_at_fall_and_rise() -> None:
    rec = Recorder()
    checker = HealthChecker(rec, probe_fn=Script(a=[False, False, True, True, False, True]))
    checker.set_targets([target("a")])
    async with running(checker):
        await rec.wait_until(lambda: len(rec.of("a")) >= 7)
    assert rec.of("a")[:7] == [
        (False, None), (False, False), (True, None), (True, True),
        (False, None), (True, None), (True, None),
    ]
    stats = checker.statistics()["a"]
    assert stats.healthy and stats.failures == 3 and stats.checks >= 7


async def test_first_probe_is_prompt() -> None:
    rec = Recorder()
    checker = HealthChecker(rec, probe_fn=Script(), rng=random.Random(1))
    checker.set_targets([target("a", interval=30.0, jitter=0.01)])
    loop = asyncio.get_running_loop()
    start = loop.time()
    async with running(checker):
        await rec.wait_until(lambda: len(rec.calls) >= 1, timeout=2.0)
    assert loop.time() - start < 0.3 + 0.5  # at most interval * jitter, plus slack


async def test_set_targets_keeps_unchanged_restarts_changed_and_stops_removed() -> None:
    rec = Recorder()
    script = Script(keep=[False, False], change=[False, False])
    checker = HealthChecker(rec, probe_fn=script)
    checker.set_targets([target("keep"), target("change"), target("gone")])
    async with running(checker):
        await rec.wait_until(
            lambda: all(len(rec.of(b)) >= 3 for b in ("keep", "change", "gone"))
        )
        before = checker.statistics()
        assert not before["keep"].healthy and not before["change"].healthy
        checker.set_targets([target("keep"), target("change", port=2, rise=5), target("new")])
        gone_calls = len(rec.of("gone"))
        await rec.wait_until(lambda: len(rec.of("new")) >= 3 and len(rec.of("change")) >= 8)
        after = checker.statistics()
    assert set(after) == {"keep", "change", "new"}
    assert len(rec.of("gone")) == gone_calls  # nothing after removal
    assert after["keep"].checks > before["keep"].checks  # counters carried on
    # The changed target restarted with its verdict (down) kept, then needed rise=5 to come up.
    assert after["change"].checks < len(rec.of("change"))
    changed_results = rec.of("change")[len(rec.of("change")) - after["change"].checks :]
    assert [v for _, v in changed_results[:5]] == [None, None, None, None, True]
    assert 2 in script.ports


async def test_set_targets_before_run_and_duplicates() -> None:
    checker = HealthChecker(Recorder(), probe_fn=Script())
    with pytest.raises(ValueError, match="duplicate"):
        checker.set_targets([target("a"), target("a")])
    checker.set_targets([target("a")])
    assert checker.statistics()["a"].checks == 0


async def test_run_twice_is_refused() -> None:
    checker = HealthChecker(Recorder(), probe_fn=Script())
    async with running(checker):
        await asyncio.sleep(0)
        with pytest.raises(RuntimeError):
            await checker.run()


async def test_callback_bug_stops_run_loudly() -> None:
    def broken(backend_id: str, result: ProbeResult, verdict: bool | None) -> None:
        raise KeyError(backend_id)

    checker = HealthChecker(broken, probe_fn=Script())
    checker.set_targets([target("a")])
    with pytest.raises(ExceptionGroup) as info:
        async with asyncio.timeout(5):
            await checker.run()
    assert info.group_contains(KeyError)


@pytest.mark.parametrize(
    "kw", [dict(interval=0.0), dict(jitter=1.0), dict(jitter=-0.1), dict(rise=0), dict(fall=0)]
)
def test_target_validation(kw: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        target("a", **kw)
