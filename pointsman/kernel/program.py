"""From "what the kernel holds" and a pool snapshot to the transaction that updates it (pure).

The listener's writer calls `plan` and then `apply` in a worker thread (a 4093-slot Maglev table
and its transaction take tens of milliseconds) and keeps the returned `Programmed` as its record
of the kernel. Nothing here touches the event loop or the listener.

A transaction is either a restructure (first write, reload with a new spec, slot count changed:
the listener's rules, its whole slot map and its allow/deny sets as text, then backend counters
as JSON) or a diff (only the slots that changed, counters for backends that joined or left, and
the allow/deny intervals that changed, in one JSON transaction). If the kernel refuses a diff
(someone edited our map or sets, or an earlier failure left them unknown) the map and the sets
are replaced whole.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from pointsman.kernel.acl import KernelAcl, kernel_acl
from pointsman.kernel.nft import Nft, NftError
from pointsman.kernel.plan import ListenerSpec, Target, slot_diff, slot_targets, target_of
from pointsman.kernel.ruleset import (
    JsonCommand,
    acl_commands,
    add_backend_commands,
    listener_text,
    open_acl,
    remove_backend_commands,
    replace_slots_commands,
    slot_commands,
)
from pointsman.kernel.stats import NO_RETIRED, Retired
from pointsman.pool.snapshot import BackendView
from pointsman.protect.acl import AclLists

log = logging.getLogger("pointsman.kernel")


@dataclass(frozen=True, slots=True)
class Programmed:
    """What the kernel holds for one listener, as far as pointsman wrote it."""

    spec: ListenerSpec | None = None  # the rules follow this spec (None: nothing written yet)
    slots: tuple[Target | None, ...] | None = None  # the slot map (None: unknown)
    counter_index: Mapping[Target, int] = field(default_factory=lambda: MappingProxyType({}))
    next_index: int = 0  # per-backend counter names are never reused while the listener lives
    slot_counts: Mapping[Target, int] = field(default_factory=lambda: MappingProxyType({}))
    acl: KernelAcl | None = None  # the allow/deny sets (None: unknown or not written)
    acl_lists: tuple[tuple[str, ...], tuple[str, ...]] | None = None  # what `acl` was made from
    # What the counters of backends already removed had counted (the listener's totals are sums
    # over its backends): the writer adds to it when a transaction removes counters.
    retired: Retired = NO_RETIRED

    def leaving(self, after: Programmed) -> list[int]:
        """Counter indices of backends that have counters here and none in `after`."""
        return [i for t, i in self.counter_index.items() if t not in after.counter_index]


@dataclass(frozen=True, slots=True)
class Transaction:
    text: str | None  # the listener's structure and slot map, for a restructure
    commands: list[JsonCommand]  # the diff (or, after `text`, the backend counters)
    counters: tuple[list[JsonCommand], list[JsonCommand]]  # backends joining, leaving (the fallback)
    after: Programmed  # what the kernel holds once this is committed
    elements: int  # element changes (the whole map for a restructure)
    slots_changed: int  # slots whose backend changed (0 for the first fill)


def plan(state: Programmed, spec: ListenerSpec, backends: Sequence[BackendView],
         lists: AclLists | None = None) -> Transaction:
    """The transaction that brings the kernel from `state` to `backends` and the allow/deny
    `lists` (None: none) under `spec`."""
    acl, acl_lists = _acl(state, spec, lists)
    targets = tuple(slot_targets(spec.algorithm, backends, spec.slots))
    wanted = {target_of(b) for b in backends}
    index = dict(state.counter_index)
    next_index = state.next_index
    joining: list[JsonCommand] = []
    for target in sorted(wanted - index.keys()):
        index[target] = next_index
        joining += add_backend_commands(spec, next_index, target)
        next_index += 1
    leaving: list[JsonCommand] = []
    for target in sorted(index.keys() - wanted):
        leaving += remove_backend_commands(spec, index.pop(target), target)
    after = Programmed(spec, targets, MappingProxyType(index), next_index,
                       MappingProxyType(Counter(t for t in targets if t is not None)), acl, acl_lists,
                       state.retired)
    old = state.slots
    comparable = old is not None and len(old) == len(targets)
    changed = sum(a != b for a, b in zip(old, targets, strict=True)) if comparable and old else 0
    if state.spec != spec or not comparable or old is None:
        previous = state.spec.nat if state.spec is not None else None
        # The text writes (stateless) the chains and reply entries of every backend the kernel
        # holds or the slots name; the leaving ones are then deleted with their counters.
        every = {**state.counter_index, **index}
        text = listener_text(spec, targets, previous, backends=every, acl=acl, was=state.spec,
                             held=state.counter_index)
        return Transaction(text, joining + leaving, (joining, leaving), after, len(targets), changed)
    diff = slot_diff(old, targets)
    sets = acl_commands(spec, state.acl, acl) if state.acl != acl else []
    return Transaction(None, joining + slot_commands(spec, diff, index) + leaving + sets,
                       (joining, leaving), after, len(diff), changed)


def _acl(state: Programmed, spec: ListenerSpec,
         lists: AclLists | None) -> tuple[KernelAcl, tuple[tuple[str, ...], tuple[str, ...]] | None]:
    """The sets for `lists`, reusing what `state` holds when the lists did not change (merging a
    100 000-prefix list costs a few hundred milliseconds of CPU: not on every pool snapshot)."""
    if lists is None:
        return open_acl(spec), None
    key = (lists.allow, lists.deny)
    version = 6 if spec.family == "ip6" else 4
    if state.acl is not None and state.acl_lists == key and state.acl.version == version:
        return state.acl, key
    return kernel_acl(lists, version), key


def fallback(transaction: Transaction) -> list[list[JsonCommand]]:
    """If the kernel refuses a diff: the joining backends' counters (and stateless chains, which
    the slots jump to), then the whole map and the allow/deny sets replaced, then the leaving
    backends' objects. Built only when needed: a 4093-slot map's commands cost as much CPU as
    the Maglev table."""
    after = transaction.after
    assert after.spec is not None and after.slots is not None and after.acl is not None
    joining, leaving = transaction.counters
    return [joining,
            replace_slots_commands(after.spec, after.slots, after.counter_index)
            + acl_commands(after.spec, None, after.acl),
            leaving]


def apply(nft: Nft, transaction: Transaction, listener: str) -> None:
    """Commit `transaction` (blocking: call it from a worker thread). Raises NftError."""
    if transaction.text is not None:
        nft.text(transaction.text)
        nft.json(transaction.commands)
        return
    try:
        nft.json(transaction.commands)
    except NftError as exc:
        log.warning("kernel listener %s: slot diff refused (%s); replacing the map", listener, exc)
        for commands in fallback(transaction):
            nft.json(commands)
