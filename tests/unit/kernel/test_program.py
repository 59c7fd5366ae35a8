"""The transaction planner: from what the kernel holds and a snapshot to what to write."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from pointsman.kernel.plan import ListenerSpec, slot_targets, spec_for
from pointsman.kernel.program import Programmed, fallback, plan
from pointsman.pool.state import BackendState

from .helpers import listener, pool, view

CONNTRACK = spec_for(listener(), pool(hash_key="source_ip_port"))
STATELESS = spec_for(listener(kernel={"slots": 13, "nat": "stateless", "snat": "none"}),
                     pool(hash_key="source_ip_port"))


def element_names(commands: list[dict[str, Any]]) -> set[tuple[str, str]]:
    return {(verb, body["element"]["name"]) for c in commands for verb, body in c.items()
            if "element" in body}


def test_first_write_is_a_restructure_with_every_backend() -> None:
    backends = [view(0), view(1), view(2)]
    tx = plan(Programmed(), CONNTRACK, backends)
    assert tx.text is not None and "add chain inet pointsman l_web_dnat" in tx.text
    assert tx.elements == 13 and tx.slots_changed == 0
    assert dict(tx.after.counter_index) == {("10.99.11.2", 8080): 0, ("10.99.12.2", 8080): 1,
                                            ("10.99.13.2", 8080): 2}
    assert sum(tx.after.slot_counts.values()) == 13


def test_a_down_backend_is_a_diff_of_its_slots_only() -> None:
    first = plan(Programmed(), STATELESS, [view(0), view(1), view(2)]).after
    tx = plan(first, STATELESS, [view(0), view(1, state=BackendState.DOWN), view(2)])
    assert tx.text is None
    held = first.slot_counts[("10.99.12.2", 8080)]
    assert tx.slots_changed == held and tx.elements == 2 * held  # deleted and added
    assert element_names(tx.commands) == {("delete", "l_web_slot_to"), ("add", "l_web_slot_to")}
    # every moved slot jumps to the chain of the backend it moved to
    targets = {c["add"]["element"]["name"]: {e[1]["goto"]["target"] for e in c["add"]["element"]["elem"]}
               for c in tx.commands if "add" in c}
    assert targets == {"l_web_slot_to": {"l_web_b0_sin", "l_web_b2_sin"}}
    joining, replaced, leaving = fallback(tx)
    assert joining == leaving == []
    assert replaced[0] == {"flush": {"map": {"family": "inet", "table": "pointsman",
                                             "name": "l_web_slot_to"}}}


def test_a_backend_leaving_the_config_loses_its_counters_and_reply_entry() -> None:
    first = plan(Programmed(), STATELESS, [view(0), view(1), view(2)]).after
    tx = plan(first, STATELESS, [view(0), view(2)])
    assert {("delete", "stateless_replies4"), ("delete", "stateless_rev4")} <= set(element_names(tx.commands))
    assert ("10.99.12.2", 8080) not in tx.after.counter_index
    # its chains go after its slots moved and before its counters
    verbs = [(verb, kind, body[kind]["name"]) for c in tx.commands for verb, body in c.items()
             for kind in body if kind in ("chain", "counter")]
    assert [(v, name) for v, kind, name in verbs if kind == "chain" and v == "delete"] == [
        ("delete", "l_web_b1_sin"), ("delete", "l_web_b1_syn"), ("delete", "l_web_b1_rev")]
    assert verbs.index(("delete", "chain", "l_web_b1_rev")) < verbs.index(
        ("delete", "counter", "l_web_b1_out"))
    again = plan(tx.after, STATELESS, [view(0), view(1), view(2)]).after
    assert again.counter_index[("10.99.12.2", 8080)] == 3  # counter names are never reused


def test_a_new_spec_with_a_joining_backend_takes_out_only_the_held_entries() -> None:
    first = plan(Programmed(), STATELESS, [view(0), view(1)]).after
    tx = plan(first, replace(STATELESS, slots=7), [view(0), view(1), view(2)])
    assert tx.text is not None
    lines = tx.text.splitlines()
    created = lines.index("add chain inet pointsman l_web_b2_rev")
    # the held backends' entries are taken out first (added, then deleted); nothing names the
    # joining backend's chain before it exists
    assert "delete element inet pointsman stateless_rev4 { 10.99.12.2 . tcp . 8080 }" in lines[:created]
    assert not any("l_web_b2_rev" in line for line in lines[:created])
    assert created < lines.index(
        "add element inet pointsman stateless_rev4 { 10.99.13.2 . tcp . 8080 : goto l_web_b2_rev }")


def test_a_new_spec_restructures_from_the_old_mode() -> None:
    first = plan(Programmed(), CONNTRACK, [view(0), view(1)]).after
    tx = plan(first, STATELESS, [view(0), view(1)])
    assert tx.text is not None and "delete chain inet pointsman l_web_dnat\n" in tx.text
    assert tx.slots_changed == 0  # same slot map in both modes: flows stay where they were


@given(st.lists(st.sampled_from([BackendState.UP, BackendState.DOWN, BackendState.DRAINING]),
                min_size=3, max_size=3),
       st.lists(st.sampled_from([BackendState.UP, BackendState.DOWN, BackendState.DRAINING]),
                min_size=3, max_size=3))
def test_changed_slots_are_exactly_those_whose_backend_differs(
        before: list[BackendState], after: list[BackendState]) -> None:
    spec: ListenerSpec = STATELESS
    old = [view(i, state=s) for i, s in enumerate(before)]
    new = [view(i, state=s) for i, s in enumerate(after)]
    state = plan(Programmed(), spec, old).after
    tx = plan(state, spec, new)
    expected = sum(a != b for a, b in zip(slot_targets("maglev", old, 13), slot_targets("maglev", new, 13),
                                          strict=True))
    assert tx.slots_changed == expected
    assert tx.after.slots == tuple(slot_targets("maglev", new, 13))
