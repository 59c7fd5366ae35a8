from __future__ import annotations

import pytest

from pointsman.health.ejection import PassiveEjector


def eject(e: PassiveEjector, now: float) -> float:
    """Report failures at `now` until the ejector ejects; return the deadline."""
    for _ in range(e.threshold):
        deadline = e.record_failure(now)
    assert deadline is not None
    return deadline


def test_ejects_at_threshold_of_consecutive_failures() -> None:
    e = PassiveEjector(3, base_ejection=30.0, max_ejection=300.0)
    assert e.record_failure(1.0) is None
    assert e.record_failure(2.0) is None
    assert e.failures == 2
    assert e.record_failure(3.0) == 33.0
    assert e.ejected and e.deadline == 33.0


def test_success_resets_the_consecutive_count() -> None:
    e = PassiveEjector(3, 30.0, 300.0)
    e.record_failure(1.0)
    e.record_failure(2.0)
    e.record_success()
    assert e.failures == 0
    assert e.record_failure(3.0) is None
    assert e.record_failure(4.0) is None
    assert e.record_failure(5.0) == 35.0


def test_failures_during_an_ejection_are_ignored() -> None:
    e = PassiveEjector(2, 10.0, 100.0)
    assert eject(e, 0.0) == 10.0
    assert e.record_failure(1.0) is None
    assert e.record_failure(2.0) is None
    assert e.failures == 0 and e.deadline == 10.0


def test_expired_reports_the_end_exactly_once() -> None:
    e = PassiveEjector(1, 10.0, 100.0)
    assert not e.expired(5.0)  # nothing running
    eject(e, 0.0)
    assert not e.expired(9.999)
    assert e.expired(10.0)
    assert not e.ejected
    assert not e.expired(11.0)


def test_backoff_doubles_and_caps() -> None:
    e = PassiveEjector(1, base_ejection=30.0, max_ejection=200.0)
    durations = []
    now = 0.0
    for _ in range(6):
        deadline = eject(e, now)
        durations.append(deadline - now)
        assert e.expired(deadline)
        now = deadline + 1.0  # re-ejected one second after coming back
    assert durations == [30.0, 60.0, 120.0, 200.0, 200.0, 200.0]
    assert e.ejections == 6


def test_level_decays_after_a_healthy_stretch_of_max_ejection() -> None:
    e = PassiveEjector(1, base_ejection=10.0, max_ejection=100.0)
    d1 = eject(e, 0.0)
    e.expired(d1)
    d2 = eject(e, d1 + 5.0)
    assert d2 - (d1 + 5.0) == 20.0
    e.expired(d2)
    # Just short of max_ejection after the end of the last ejection: backoff continues.
    assert e.duration(d2 + 99.0) == 40.0
    # A full max_ejection after it: back to the base.
    assert e.duration(d2 + 100.0) == 10.0
    d3 = eject(e, d2 + 100.0)
    assert d3 - (d2 + 100.0) == 10.0
    assert e.level == 1


def test_decay_after_is_configurable() -> None:
    e = PassiveEjector(1, 10.0, 100.0, decay_after=15.0)
    d1 = eject(e, 0.0)
    e.expired(d1)
    assert e.duration(d1 + 14.0) == 20.0
    assert e.duration(d1 + 15.0) == 10.0


def test_huge_repeat_counts_stay_finite() -> None:
    e = PassiveEjector(1, 1.0, 1e9)
    now = 0.0
    for _ in range(200):
        deadline = eject(e, now)
        e.expired(deadline)
        now = deadline
    assert e.duration(now) == 1e9


def test_reconfigure_keeps_a_running_ejection() -> None:
    e = PassiveEjector(2, 10.0, 100.0)
    deadline = eject(e, 0.0)
    e.reconfigure(5, 20.0, 400.0)
    assert e.ejected and e.deadline == deadline and e.threshold == 5
    assert e.expired(deadline)
    assert e.duration(deadline) == 40.0  # level 1 kept, new base
    with pytest.raises(ValueError):
        e.reconfigure(-1, 20.0, 400.0)
    assert e.threshold == 5


@pytest.mark.parametrize(
    ("failures", "base", "maximum"), [(-1, 1.0, 2.0), (1, 0.0, 2.0), (1, 3.0, 2.0)]
)
def test_rejects_bad_settings(failures: int, base: float, maximum: float) -> None:
    with pytest.raises(ValueError):
        PassiveEjector(failures, base, maximum)


def test_zero_threshold_turns_ejection_off() -> None:
    e = PassiveEjector(0, 30.0, 300.0)
    assert all(e.record_failure(float(t)) is None for t in range(1000))
    assert not e.ejected and e.failures == 0
