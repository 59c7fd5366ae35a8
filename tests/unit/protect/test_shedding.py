"""The shedder's bounds with credits lent to connection engines (fast admission): the bound
holds across borrowers, a connection decided in Python calls the others' unused credit back
before it is shed, and a lagging loop or new bounds call every loan back."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pointsman.protect.shedding import Loan, Shedder


class Engine:
    """What a borrowing listener's engine holds: its credit; `recall` zeroes it."""

    def __init__(self) -> None:
        self.credit = 0
        self.loan = Loan(self.recall)

    def recall(self) -> int:
        left, self.credit = self.credit, 0
        return left

    def borrow(self, shedder: Shedder, wanted: int, unit: int = 1) -> None:
        self.credit = shedder.lend(self.loan, wanted, unit) // unit * unit

    def admit(self, shedder: Shedder) -> None:
        """One admission on the credit, then heard of (active counts it)."""
        assert self.credit > 0
        self.credit -= 1
        shedder.active += 1
        shedder.used(self.loan, 1)


def test_without_bounds_every_credit_is_lent_and_nothing_is_shed() -> None:
    shedder = Shedder()
    a = Engine()
    a.borrow(shedder, 64)
    assert a.credit == 64 and shedder.lent == 64
    assert shedder.reason() is None


def test_a_loan_is_bounded_by_the_room_the_others_leave() -> None:
    shedder = Shedder(max_connections=10)
    shedder.active = 3
    a, b = Engine(), Engine()
    a.borrow(shedder, 64)
    assert a.credit == 7
    b.borrow(shedder, 64)
    assert b.credit == 0
    a.admit(shedder)
    a.borrow(shedder, 64)  # renewed: the same room, now partly open
    assert (a.credit, shedder.active, shedder.lent) == (6, 4, 6)


def test_a_listener_deciding_in_python_calls_the_unused_credit_back() -> None:
    shedder = Shedder(max_connections=3)
    a = Engine()
    a.borrow(shedder, 64)
    assert a.credit == 3
    a.admit(shedder)
    assert shedder.reason() is None  # another listener: a's 2 unused come back
    assert (a.credit, shedder.lent) == (0, 0)
    shedder.active += 2  # that listener's connection, then one more
    assert shedder.reason() == "shed_connections"


def test_the_caller_s_own_credit_does_not_count_against_it() -> None:
    shedder = Shedder(max_connections=2)
    a = Engine()
    a.borrow(shedder, 64)
    shedder.active += 1  # a's table changed: its own accept decides in Python
    assert shedder.reason(a.loan) is None
    assert a.credit == 2  # not called back: the caller renews its own


def test_credit_is_a_whole_share_per_socket() -> None:
    shedder = Shedder(max_connections=7)
    a = Engine()
    a.borrow(shedder, 64, unit=2)
    assert (a.credit, shedder.lent) == (6, 6)


def test_a_lagging_loop_and_new_bounds_call_every_loan_back() -> None:
    shedder = Shedder(max_loop_lag=0.2)
    a = Engine()
    a.borrow(shedder, 64)
    shedder.measured(0.1)
    assert a.credit == 64
    shedder.measured(0.5)
    assert (a.credit, shedder.lent) == (0, 0)
    a.borrow(shedder, 64)
    assert a.credit == 0  # nothing lent while it lags
    assert shedder.reason() == "shed_loop_lag"
    shedder.measured(0.0)
    a.borrow(shedder, 64)
    shedder.configure(5, None)
    assert (a.credit, shedder.lent) == (0, 0)
    a.borrow(shedder, 64)
    assert a.credit == 5


def test_repay_forgets_the_loan() -> None:
    shedder = Shedder(max_connections=4)
    a = Engine()
    a.borrow(shedder, 64)
    shedder.repay(a.loan)
    assert shedder.lent == 0 and not shedder.loans


@given(st.integers(1, 20), st.lists(st.tuples(st.integers(0, 2), st.sampled_from(
    ["borrow", "admit", "python", "close"])), max_size=60))
def test_open_connections_never_pass_the_bound(bound: int,
                                               steps: list[tuple[int, str]]) -> None:
    """Three borrowers and connections decided in Python, in any order: what is open never
    passes the bound, a connection decided in Python is shed only when active + every unused
    credit leaves no room, and `lent` is always the sum of the loans."""
    shedder = Shedder(max_connections=bound)
    engines = [Engine() for _ in range(3)]
    for who, step in steps:
        engine = engines[who]
        if step == "borrow":
            engine.borrow(shedder, 64)
        elif step == "admit" and engine.credit:
            engine.admit(shedder)
        elif step == "python":
            refused = shedder.reason() is not None
            assert refused == (shedder.active + sum(e.credit for e in engines) >= bound)
            if not refused:
                shedder.active += 1
        elif step == "close" and shedder.active:
            shedder.active -= 1
        assert shedder.active <= bound
        assert shedder.active + shedder.lent <= bound or not any(e.credit for e in engines)
        assert shedder.lent == sum(e.loan.amount for e in engines)
        assert all(e.credit == e.loan.amount for e in engines)
