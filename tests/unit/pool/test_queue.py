"""The pool queue (pointsman.pool.queue): arrival order, bound, deadlines, removal, against a
plain-list model driven by hypothesis."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pointsman.pool.queue import ConnectionQueue


def test_fifo_bound_and_timeout() -> None:
    queue: ConnectionQueue[str] = ConnectionQueue(max=2, timeout=5.0)
    first = queue.push(1, "a", 10.0)
    assert first is not None and first.deadline == 15.0 and first.owner == "a"
    assert queue.push(2, "b", 11.0) is not None
    assert queue.push(3, "a", 12.0) is None  # full: queue_full
    assert len(queue) == 2 and 1 in queue and 3 not in queue
    assert queue.head() is first and len(queue) == 2
    assert queue.next_deadline() == 15.0
    assert queue.expire(14.9) == []
    assert [e.key for e in queue.expire(15.0)] == [1]
    assert queue.next_deadline() == 16.0
    popped = queue.pop()
    assert popped is not None and popped.key == 2
    assert queue.pop() is None and queue.head() is None and queue.next_deadline() is None


def test_reconfigure_keeps_deadlines_and_refuses_only_newcomers() -> None:
    queue: ConnectionQueue[None] = ConnectionQueue(max=3, timeout=10.0)
    for key in (1, 2, 3):
        queue.push(key, None, 0.0)
    queue.configure(max=1, timeout=1.0)
    assert len(queue) == 3 and queue.push(4, None, 0.0) is None
    late = [queue.remove(k) for k in (2, 3)]
    assert all(e is not None for e in late)
    assert queue.push(5, None, 0.0) is None  # still at the new bound (1 queued)
    queue.remove(1)
    entry = queue.push(5, None, 2.0)
    assert entry is not None and entry.deadline == 3.0
    assert [e.key for e in queue.expire(3.0)] == [5]


def test_a_key_is_queued_once() -> None:
    queue: ConnectionQueue[None] = ConnectionQueue()
    queue.push(7, None, 0.0)
    with pytest.raises(ValueError, match="already queued"):
        queue.push(7, None, 1.0)
    assert queue.remove(7) is not None and queue.remove(7) is None
    assert queue.push(7, None, 1.0) is not None  # a key that left may come back


class QueueModel(RuleBasedStateMachine):
    """Every operation on the queue and on a list model agrees; time only moves forward."""

    def __init__(self) -> None:
        super().__init__()
        self.queue: ConnectionQueue[int] = ConnectionQueue(max=5, timeout=3.0)
        self.model: list[tuple[int, float]] = []  # (key, deadline), arrival order
        self.now = 0.0
        self.next_key = 0
        self.max = 5
        self.timeout = 3.0

    @rule(step=st.floats(0.0, 2.0))
    def tick(self, step: float) -> None:
        self.now += step

    @rule(owner=st.integers(0, 3))
    def push(self, owner: int) -> None:
        key = self.next_key
        self.next_key += 1
        entry = self.queue.push(key, owner, self.now)
        if len(self.model) >= self.max:
            assert entry is None
        else:
            assert entry is not None and entry.owner == owner and entry.since == self.now
            self.model.append((key, self.now + self.timeout))

    @rule()
    def pop(self) -> None:
        entry = self.queue.pop()
        if not self.model:
            assert entry is None
        else:
            key, deadline = self.model.pop(0)
            assert entry is not None and (entry.key, entry.deadline) == (key, deadline)

    @precondition(lambda self: bool(self.model))
    @rule(pick=st.integers(0, 100))
    def remove(self, pick: int) -> None:
        key, _ = self.model.pop(pick % len(self.model))
        entry = self.queue.remove(key)
        assert entry is not None and entry.key == key

    @rule(key=st.integers(-3, -1))
    def remove_unknown(self, key: int) -> None:
        assert self.queue.remove(key) is None

    @rule()
    def expire(self) -> None:
        due = sorted((d, k) for k, d in self.model if d <= self.now)
        got = self.queue.expire(self.now)
        assert [(e.deadline, e.key) for e in got] == due
        gone = {k for _, k in due}
        self.model = [(k, d) for k, d in self.model if k not in gone]

    @rule(max=st.integers(0, 6), timeout=st.floats(0.0, 5.0))
    def configure(self, max: int, timeout: float) -> None:
        self.queue.configure(max, timeout)
        self.max, self.timeout = max, timeout

    @invariant()
    def agrees(self) -> None:
        assert len(self.queue) == len(self.model)
        head = self.queue.head()
        assert (head.key if head is not None else None) == (self.model[0][0] if self.model else None)
        assert self.queue.next_deadline() == min((d for _, d in self.model), default=None)
        assert len(self.queue._deadlines) <= self.next_key  # pruned, never more than pushed


QueueModel.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
test_queue_model = QueueModel.TestCase


@given(st.lists(st.floats(0.0, 100.0), min_size=1, max_size=30))
def test_expire_everything_at_the_end_in_deadline_order(times: list[float]) -> None:
    queue: ConnectionQueue[None] = ConnectionQueue(max=100, timeout=1.0)
    now = 0.0
    for key, step in enumerate(times):
        now += step
        queue.push(key, None, now)
    got = queue.expire(now + 1.0)
    assert [e.key for e in got] == list(range(len(times)))
    assert len(queue) == 0 and queue.next_deadline() is None
