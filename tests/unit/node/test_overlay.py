"""`Overlay`: which wins when the config file and a runtime change disagree, field by field, and
the state file's document (round trip, refusal of what is not one)."""

from __future__ import annotations

import functools
import json

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from pointsman.config.loader import load_text
from pointsman.config.model import BackendConfig, Config
from pointsman.node.overlay import STATE_VERSION, AclOverride, Overlay, WeightOverride


@functools.cache
def config(weight_a: int = 1, address_b: str = "127.0.0.1:9002", with_c: bool = True,
           second_pool: bool = True) -> Config:
    p = [{"address": "127.0.0.1:9001", "name": "a", "weight": weight_a},
         {"address": address_b, "name": "b"}]
    if with_c:
        p.append({"address": "127.0.0.1:9003", "name": "c"})
    pools: list[dict[str, object]] = [{"name": "p", "backends": p}]
    if second_pool:
        pools.append({"name": "q", "backends": [{"address": "127.0.0.1:9100"}]})
    return load_text(yaml.safe_dump({
        "listeners": [{"name": "lb", "bind": "127.0.0.1:8000", "pool": "p"}],
        "pools": pools}), "overlay.yaml")


def backends(cfg: Config, pool: str = "p") -> dict[str, int]:
    return {b.id: b.weight for b in cfg.pool(pool).backends}


def entry(name: str, address: str, weight: int = 1) -> BackendConfig:
    return BackendConfig.model_validate({"address": address, "name": name, "weight": weight})


def test_nothing_changed_is_the_file_itself() -> None:
    effective, notes = Overlay().effective(config())
    assert effective is config() and notes == []


def test_a_weight_set_at_run_time_stays_while_the_file_keeps_its_weight() -> None:
    overlay = Overlay()
    overlay.set_weight("p", "a", 7, file_weight=1)
    effective, notes = overlay.effective(config())
    assert backends(effective) == {"a": 7, "b": 1, "c": 1} and notes == []
    # The file's weight changed since: the file wins, and the override is forgotten.
    effective, notes = overlay.effective(config(weight_a=3))
    assert backends(effective) == {"a": 3, "b": 1, "c": 1}
    assert notes == ["pool p: backend a: weight 7 (set at run time) gives way to the config "
                     "file's, changed from 1 to 3"]
    assert overlay.weights == {}


def test_setting_the_files_weight_again_is_no_override() -> None:
    overlay = Overlay()
    overlay.set_weight("p", "a", 7, file_weight=1)
    overlay.set_weight("p", "a", 1, file_weight=1)
    assert overlay.weights == {} and not overlay


def test_a_backend_added_at_run_time_stays_until_the_file_has_it() -> None:
    overlay = Overlay()
    overlay.add("p", entry("d", "127.0.0.1:9004", 4))
    overlay.set_weight("p", "d", 5, file_weight=None)  # its own entry takes the weight
    effective, _ = overlay.effective(config())
    assert backends(effective) == {"a": 1, "b": 1, "c": 1, "d": 5}
    # The file now has a backend named d: the file's entry wins.
    with_d = config().model_copy(update={"pools": [
        config().pool("p").model_copy(update={"backends": [
            *config().pool("p").backends, entry("d", "127.0.0.1:9999", 2)]}),
        config().pool("q")]})
    effective, notes = overlay.effective(with_d)
    assert backends(effective) == {"a": 1, "b": 1, "c": 1, "d": 2}
    assert notes == ["pool p: backend d, added at run time, is now in the config file: the "
                     "file's entry wins"]
    assert overlay.added == {}


def test_backends_added_to_a_pool_the_file_drops_go_with_it() -> None:
    overlay = Overlay()
    overlay.add("q", entry("x", "127.0.0.1:9200"))
    effective, notes = overlay.effective(config(second_pool=False))
    assert [p.name for p in effective.pools] == ["p"]
    assert notes == ["pool q: gone from the config, with the backends added at run time (x)"]
    assert overlay.added == {}


def test_a_removed_backend_stays_removed_while_the_file_entry_is_unchanged() -> None:
    overlay = Overlay()
    overlay.remove("p", "b", config().pool("p").backends[1])
    effective, notes = overlay.effective(config())
    assert backends(effective) == {"a": 1, "c": 1} and notes == []
    # A reload of a file that changed it (here its address): it serves again.
    effective, notes = overlay.effective(config(address_b="127.0.0.1:9012"))
    assert backends(effective) == {"a": 1, "b": 1, "c": 1}
    assert notes == ["pool p: backend b, removed at run time, is back: the config file changed it"]
    assert overlay.removed == {}


def test_a_removal_the_file_agrees_with_is_forgotten() -> None:
    overlay = Overlay()
    overlay.remove("p", "c", config().pool("p").backends[2])
    effective, notes = overlay.effective(config(with_c=False))
    assert backends(effective) == {"a": 1, "b": 1} and notes == []
    assert overlay.removed == {}
    # ... so putting c back in the file later serves it.
    effective, _ = overlay.effective(config())
    assert "c" in backends(effective)


def test_removing_a_backend_added_at_run_time_forgets_it() -> None:
    overlay = Overlay()
    overlay.add("p", entry("d", "127.0.0.1:9004"))
    overlay.set_state("p", "d", "draining")
    overlay.remove("p", "d", None)
    assert not overlay
    assert overlay.effective(config())[0] is config()


def test_drain_and_maintenance_stay_while_the_backend_is_in_the_file() -> None:
    overlay = Overlay()
    overlay.set_state("p", "a", "draining")
    overlay.set_state("p", "c", "maintenance")
    overlay.effective(config(weight_a=4))  # other changes to the file: kept
    assert overlay.states == {("p", "a"): "draining", ("p", "c"): "maintenance"}
    overlay.effective(config(with_c=False))  # c left the file: its state goes with it
    assert overlay.states == {("p", "a"): "draining"}


def test_a_refused_change_is_tried_on_a_copy() -> None:
    overlay = Overlay()
    overlay.set_weight("p", "a", 7, file_weight=1)
    copy = overlay.copy()
    copy.add("p", entry("d", "127.0.0.1:9004"))
    copy.effective(config(weight_a=2))
    assert overlay.weights == {("p", "a"): WeightOverride(7, 1)} and overlay.added == {}


def test_lists_of_listeners_the_file_dropped_are_forgotten() -> None:
    overlay = Overlay()
    overlay.set_acl("lb", "deny", ("192.0.2.0/24",), ())
    overlay.set_acl("gone", "allow", ("10.0.0.0/8",), ())
    overlay.effective(config())
    assert list(overlay.acls) == [("lb", "deny")]


def test_the_document_round_trips() -> None:
    overlay = Overlay()
    overlay.set_weight("p", "a", 7, file_weight=1)
    overlay.set_state("p", "a", "draining")
    overlay.set_state("p", "b", "maintenance")
    overlay.add("p", entry("d", "127.0.0.1:9004", 3))
    overlay.remove("p", "c", config().pool("p").backends[2])
    overlay.set_acl("lb", "deny", ("192.0.2.0/24", "2001:db8::/32"), ("10.0.0.0/8",))
    document = json.loads(json.dumps(overlay.document()))
    assert document["version"] == STATE_VERSION
    assert document["pools"]["p"]["backends"]["a"] == {"weight": 7, "file_weight": 1,
                                                       "state": "draining"}
    assert document["pools"]["p"]["removed"]["c"] == {"address": "127.0.0.1:9003", "name": "c",
                                                      "weight": 1, "backup": False}
    again = Overlay.from_document(document)
    assert again.document() == overlay.document()
    assert again.acls[("lb", "deny")] == AclOverride(("192.0.2.0/24", "2001:db8::/32"),
                                                      ("10.0.0.0/8",))
    assert again.effective(config())[0] == overlay.copy().effective(config())[0]


@pytest.mark.parametrize(("document", "message"), [
    ({"version": 99}, "state file version 99; this pointsman reads version 1"),
    ([], "Input should be a valid dictionary"),
    ({"version": 1, "pools": {"p": {"backends": {"a": {"weight": 5000}}}}},
     "pools.p.backends.a.weight: Input should be less than or equal to 1000"),
    ({"version": 1, "pools": {"p": {"backends": {"a": {"state": "up"}}}}},
     "pools.p.backends.a.state: Input should be 'draining' or 'maintenance'"),
    ({"version": 1, "pools": {"p": {"removed": {"c": {"address": "nope"}}}}},
     "pools.p.removed.c.address: Value error, expected host:port, got 'nope'"),
])
def test_what_is_not_a_state_document_is_refused(document: object, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        Overlay.from_document(document)
    assert message in str(caught.value)


# --- property: the rules, over random runtime changes and random file edits -------------------

WEIGHTS = st.integers(0, 1000)
changes = st.lists(st.one_of(
    st.tuples(st.just("weight"), st.sampled_from("abc"), WEIGHTS),
    st.tuples(st.just("state"), st.sampled_from("abc"), st.sampled_from(["draining",
                                                                          "maintenance", None])),
    st.tuples(st.just("remove"), st.sampled_from("bc"), st.none()),
), max_size=8)


@given(changes, st.integers(1, 3), st.booleans())
def test_runtime_changes_hold_exactly_where_the_file_did_not_change(
        steps: list[tuple[str, str, object]], new_weight_a: int, keep_c: bool) -> None:
    old = config()
    overlay = Overlay()
    for kind, name, value in steps:
        file_entry = next(b for b in old.pool("p").backends if b.id == name)
        if kind == "weight":
            assert isinstance(value, int)
            overlay.set_weight("p", name, value, file_entry.weight)
        elif kind == "state":
            overlay.set_state("p", name, value)  # type: ignore[arg-type]
        else:
            overlay.remove("p", name, file_entry)
    before = overlay.copy()
    new = config(weight_a=new_weight_a, with_c=keep_c)
    effective, _ = overlay.effective(new)
    got = backends(effective)
    for b in new.pool("p").backends:
        removed = ("p", b.id) in before.removed  # every file entry of b is unchanged here
        assert (b.id in got) == (not removed)
        if removed:
            continue
        override = before.weights.get(("p", b.id))
        if override is not None and override.file_weight == b.weight:
            assert got[b.id] == override.weight  # the file kept its weight: the runtime's stays
        else:
            assert got[b.id] == b.weight  # no override, or the file changed it: the file's
    assert "c" in got or not keep_c or ("p", "c") in before.removed
    assert set(overlay.states) <= {("p", b) for b in got}
