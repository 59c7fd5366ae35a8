"""The backend state machine: every (state, event) pair, the operator memory, and a fuzz run."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pointsman.pool.state import (
    DEFAULT_INITIAL_STATE,
    HISTORY_SIZE,
    TRANSITIONS,
    BackendState,
    BackendStateMachine,
    Event,
    IllegalTransition,
    Transition,
)

S = BackendState
E = Event

# Written out by hand from the design (not derived from TRANSITIONS), for a machine whose memory
# is the natural one for the state: up/draining/maintenance healthy and not ejecting.
EXPECTED: dict[tuple[BackendState, Event], BackendState] = {
    (S.UP, E.HEALTH_DOWN): S.DOWN,
    (S.UP, E.EJECT): S.EJECTED,
    (S.UP, E.DRAIN): S.DRAINING,
    (S.UP, E.MAINTENANCE): S.MAINTENANCE,
    (S.UP, E.ENABLE): S.UP,
    (S.DOWN, E.HEALTH_UP): S.UP,
    (S.DOWN, E.EJECT): S.DOWN,
    (S.DOWN, E.EJECT_EXPIRED): S.DOWN,
    (S.DOWN, E.DRAIN): S.DRAINING,
    (S.DOWN, E.MAINTENANCE): S.MAINTENANCE,
    (S.DOWN, E.ENABLE): S.DOWN,
    (S.EJECTED, E.HEALTH_DOWN): S.DOWN,
    (S.EJECTED, E.EJECT_EXPIRED): S.UP,
    (S.EJECTED, E.DRAIN): S.DRAINING,
    (S.EJECTED, E.MAINTENANCE): S.MAINTENANCE,
    (S.EJECTED, E.ENABLE): S.EJECTED,
    (S.DRAINING, E.HEALTH_UP): S.DRAINING,
    (S.DRAINING, E.HEALTH_DOWN): S.DRAINING,
    (S.DRAINING, E.EJECT): S.DRAINING,
    (S.DRAINING, E.EJECT_EXPIRED): S.DRAINING,
    (S.DRAINING, E.DRAIN): S.DRAINING,
    (S.DRAINING, E.MAINTENANCE): S.MAINTENANCE,
    (S.DRAINING, E.ENABLE): S.UP,
    (S.MAINTENANCE, E.HEALTH_UP): S.MAINTENANCE,
    (S.MAINTENANCE, E.HEALTH_DOWN): S.MAINTENANCE,
    (S.MAINTENANCE, E.EJECT): S.MAINTENANCE,
    (S.MAINTENANCE, E.EJECT_EXPIRED): S.MAINTENANCE,
    (S.MAINTENANCE, E.DRAIN): S.DRAINING,
    (S.MAINTENANCE, E.MAINTENANCE): S.MAINTENANCE,
    (S.MAINTENANCE, E.ENABLE): S.UP,
}
ILLEGAL = {
    (S.UP, E.HEALTH_UP),
    (S.UP, E.EJECT_EXPIRED),
    (S.DOWN, E.HEALTH_DOWN),
    (S.EJECTED, E.HEALTH_UP),
    (S.EJECTED, E.EJECT),
}

# Shortest paths from a fresh `up` machine to each state, with the natural memory.
PATH_TO = {
    S.UP: [],
    S.DOWN: [E.HEALTH_DOWN],
    S.EJECTED: [E.EJECT],
    S.DRAINING: [E.DRAIN],
    S.MAINTENANCE: [E.MAINTENANCE],
}


def machine_in(state: BackendState, now: float = 0.0) -> BackendStateMachine:
    m = BackendStateMachine(BackendState.UP, now, backend="b1")
    for event in PATH_TO[state]:
        m.apply(event, "setup", now)
    assert m.state is state
    return m


def test_expectations_cover_every_pair() -> None:
    pairs = set(itertools.product(BackendState, Event))
    assert set(EXPECTED) | ILLEGAL == pairs
    assert not set(EXPECTED) & ILLEGAL
    assert set(TRANSITIONS) == set(EXPECTED)


@pytest.mark.parametrize(("state", "event"), sorted(EXPECTED, key=str))
def test_legal_pair(state: BackendState, event: Event) -> None:
    m = machine_in(state, now=1.0)
    transition = m.apply(event, "because", 2.0)
    expected = EXPECTED[(state, event)]
    assert m.state is expected
    if expected is state:
        assert transition is None
        assert m.since == 1.0
    else:
        assert transition == Transition("b1", state, expected, event, "because", 2.0)
        assert m.since == 2.0
        assert m.history[-1] == transition


@pytest.mark.parametrize(("state", "event"), sorted(ILLEGAL, key=str))
def test_illegal_pair_raises_and_changes_nothing(state: BackendState, event: Event) -> None:
    m = machine_in(state)
    before = (m.state, m.since, m.health_ok, m.ejecting, len(m.history))
    with pytest.raises(IllegalTransition) as info:
        m.apply(event, "bogus", 5.0)
    assert info.value.state is state and info.value.event is event
    assert "b1" in str(info.value) and str(event) in str(info.value)
    assert (m.state, m.since, m.health_ok, m.ejecting, len(m.history)) == before


@pytest.mark.parametrize("operator", [E.DRAIN, E.MAINTENANCE])
def test_enable_returns_to_down_when_checks_failed_meanwhile(operator: Event) -> None:
    m = BackendStateMachine(BackendState.UP, 0.0)
    m.apply(operator, "op", 1.0)
    assert m.apply(E.HEALTH_DOWN, "check failed", 2.0) is None
    assert not m.health_ok
    t = m.apply(E.ENABLE, "op enable", 3.0)
    assert t is not None and t.new is S.DOWN
    assert not m.available


@pytest.mark.parametrize("operator", [E.DRAIN, E.MAINTENANCE])
def test_enable_returns_to_up_when_checks_recovered_meanwhile(operator: Event) -> None:
    m = machine_in(S.DOWN)
    m.apply(operator, "op", 1.0)
    m.apply(E.HEALTH_UP, "check passed", 2.0)
    t = m.apply(E.ENABLE, "op enable", 3.0)
    assert t is not None and (t.old, t.new) == (operator_state(operator), S.UP)
    assert m.available


def operator_state(event: Event) -> BackendState:
    return S.DRAINING if event is E.DRAIN else S.MAINTENANCE


def test_enable_returns_to_ejected_while_ejection_runs() -> None:
    m = machine_in(S.EJECTED)
    m.apply(E.MAINTENANCE, "op", 1.0)
    assert m.ejecting
    expected = Transition("b1", S.MAINTENANCE, S.EJECTED, E.ENABLE, "op", 2.0)
    assert m.apply(E.ENABLE, "op", 2.0) == expected
    m.apply(E.EJECT_EXPIRED, "timer", 3.0)
    assert m.state is S.UP


def test_ejection_ended_during_maintenance_is_forgotten() -> None:
    m = machine_in(S.EJECTED)
    m.apply(E.MAINTENANCE, "op", 1.0)
    m.apply(E.EJECT_EXPIRED, "timer", 2.0)
    m.apply(E.ENABLE, "op", 3.0)
    assert m.state is S.UP


def test_health_up_from_down_lands_in_ejected_while_ejection_runs() -> None:
    m = machine_in(S.EJECTED)
    seen = []
    for at, event in enumerate([E.HEALTH_DOWN, E.HEALTH_UP, E.EJECT_EXPIRED], start=1):
        m.apply(event, "signal", float(at))
        seen.append((m.state, m.ejecting))
    assert seen == [(S.DOWN, True), (S.EJECTED, True), (S.UP, False)]


def test_eject_while_down_is_remembered_until_expired() -> None:
    m = machine_in(S.DOWN)
    assert m.apply(E.EJECT, "5 failures", 1.0) is None
    assert m.ejecting
    assert m.apply(E.EJECT_EXPIRED, "timer", 2.0) is None
    m.apply(E.HEALTH_UP, "check passed", 3.0)
    assert m.state is S.UP


def test_history_is_bounded_and_ordered() -> None:
    m = BackendStateMachine(BackendState.UP, 0.0, history_size=5)
    for i in range(20):
        m.apply(E.HEALTH_DOWN if i % 2 == 0 else E.HEALTH_UP, f"flip {i}", float(i))
    assert len(m.history) == 5
    assert [t.reason for t in m.history] == [f"flip {i}" for i in range(15, 20)]
    assert BackendStateMachine().history.maxlen == HISTORY_SIZE


def test_initial_state() -> None:
    assert DEFAULT_INITIAL_STATE is S.UP
    assert BackendStateMachine().state is S.UP
    down = BackendStateMachine(S.DOWN, 7.0)
    assert (down.state, down.since, down.health_ok) == (S.DOWN, 7.0, False)
    maint = BackendStateMachine(S.MAINTENANCE, health_ok=False)
    maint.apply(E.ENABLE, "op", 1.0)
    assert maint.state is S.DOWN
    with pytest.raises(ValueError):
        BackendStateMachine(S.EJECTED)
    with pytest.raises(ValueError):
        BackendStateMachine(S.UP, health_ok=False)
    with pytest.raises(ValueError):
        BackendStateMachine(S.DOWN, health_ok=True)


def test_enum_values_are_the_config_and_api_words() -> None:
    assert [s.value for s in S] == ["up", "down", "ejected", "draining", "maintenance"]
    assert str(S.DRAINING) == "draining" and f"{E.HEALTH_UP}" == "health_up"


@given(
    initial=st.sampled_from([S.UP, S.DOWN, S.DRAINING, S.MAINTENANCE]),
    events=st.lists(st.sampled_from(list(Event)), max_size=60),
)
def test_random_sequences(initial: BackendState, events: list[Event]) -> None:
    m = BackendStateMachine(initial, 0.0, history_size=10)
    for at, event in enumerate(events, start=1):
        before = m.state
        try:
            t = m.apply(event, "fuzz", float(at))
        except IllegalTransition:
            assert (before, event) not in TRANSITIONS
            assert m.state is before
            continue
        assert m.available == (m.state is S.UP)
        assert (t is None) == (m.state is before)
        # Outside operator states the displayed state is exactly what the memory says.
        if m.state is S.UP:
            assert m.health_ok and not m.ejecting
        elif m.state is S.DOWN:
            assert not m.health_ok
        elif m.state is S.EJECTED:
            assert m.health_ok and m.ejecting
    assert len(m.history) <= 10
    assert all(a.at <= b.at for a, b in itertools.pairwise(m.history))
    assert all(a.new is b.old for a, b in itertools.pairwise(m.history))
