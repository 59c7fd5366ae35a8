"""Load shedding: refuse new connections early when the process is over its bounds, rather than
let every connection degrade. One instance per process, shared by all listeners.

A listener whose connection engine admits on its own (docs/engine.md, "Fast admission") borrows
its credit of admissions from the shedder (a `Loan`): `lend` bounds it by the room under
max_connections that the other loans leave, and `reason` counts what is lent as open. When a
connection decided in Python finds the room lent out, the other loans are called back first
(what their engines have not used yet), so the bound is exact across listeners whichever path
admits; a lagging loop (`measured`) or new bounds (`configure`) call every loan back.
"""

from __future__ import annotations

from collections.abc import Callable


class Loan:
    """One listener's credit: `amount` lent (used by its engine or not, until the listener
    hears of the admissions), `recall` takes the unused part back from the engine and returns
    it."""

    __slots__ = ("amount", "recall")

    def __init__(self, recall: Callable[[], int]) -> None:
        self.amount = 0
        self.recall = recall


class Shedder:
    __slots__ = ("active", "lag", "lent", "loans", "max_connections", "max_loop_lag")

    def __init__(self, max_connections: int | None = None, max_loop_lag: float | None = None) -> None:
        self.max_connections = max_connections
        self.max_loop_lag = max_loop_lag
        self.active = 0  # connections open across every listener of the process
        self.lag = 0.0  # last measured event-loop lag, seconds
        self.lent = 0  # the sum of the loans' amounts
        self.loans: set[Loan] = set()  # the loans with an amount, or a table that may use one

    def reason(self, own: Loan | None = None) -> str | None:
        """"shed_connections" or "shed_loop_lag" when a new connection should be refused.
        `own`: the caller's loan (not counted against it); the others' are called back first
        when only they stand in the way."""
        bound = self.max_connections
        if bound is not None:
            mine = own.amount if own is not None else 0
            if self.active + self.lent - mine >= bound > self.active and self.lent > mine:
                self.recall(keep=own)  # the others' loans leave no room: what is unused first
            if self.active + self.lent - mine >= bound:
                return "shed_connections"
        if self.max_loop_lag is not None and self.lag > self.max_loop_lag:
            return "shed_loop_lag"
        return None

    def lend(self, loan: Loan, wanted: int, unit: int = 1) -> int:
        """Set `loan` to as much of `wanted` as the bounds allow now, a multiple of `unit` (a
        listener's sockets get one share each): the room under max_connections that the other
        loans leave; nothing while the loop lags. Returns the new amount."""
        room = wanted
        if self.max_loop_lag is not None and self.lag > self.max_loop_lag:
            room = 0
        elif self.max_connections is not None:
            room = min(room, self.max_connections - self.active - (self.lent - loan.amount))
        room = max(0, room) // unit * unit
        self.lent += room - loan.amount
        loan.amount = room
        self.loans.add(loan)
        return room

    def used(self, loan: Loan, count: int) -> None:
        """`count` admissions of `loan` were made (they are now in `active`)."""
        loan.amount -= count
        self.lent -= count

    def repay(self, loan: Loan) -> None:
        """The loan's table is gone (what it admitted was counted first): nothing is lent."""
        self.lent -= loan.amount
        loan.amount = 0
        self.loans.discard(loan)

    def recall(self, keep: Loan | None = None) -> None:
        """Every loan but `keep` gives back what its engine has not used."""
        for loan in list(self.loans):
            if loan is not keep:
                unused = loan.recall()
                loan.amount -= unused
                self.lent -= unused

    def measured(self, lag: float) -> None:
        """The loop's lag, from the node's tick: past max_loop_lag, every loan comes back, so
        the next connections meet `reason` in Python and are shed."""
        self.lag = lag
        if self.max_loop_lag is not None and lag > self.max_loop_lag:
            self.recall()

    def configure(self, max_connections: int | None, max_loop_lag: float | None) -> None:
        """New bounds (a reload): what was lent under the old ones comes back."""
        self.max_connections, self.max_loop_lag = max_connections, max_loop_lag
        self.recall()
