"""`reload_plan(old, new)`: what a reload keeps, retires, starts and binds first; and its log line."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pointsman.config.loader import load_text
from pointsman.config.model import Config
from pointsman.node.reload import PoolChange, ReloadPlan, reload_plan, same_socket


def pool(name: str, *ports: int, algorithm: str = "round_robin", **extra: Any) -> dict[str, Any]:
    return {"name": name, "algorithm": algorithm,
            "backends": [{"address": f"127.0.0.1:{port}", "name": f"{name}-{port}"} for port in ports],
            **extra}


def listener(name: str, port: int, pool_name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "bind": f"127.0.0.1:{port}", "pool": pool_name, **extra}


def build(listeners: list[dict[str, Any]], pools: list[dict[str, Any]], **extra: Any) -> Config:
    return _load(yaml.safe_dump({"listeners": listeners, "pools": pools, **extra}))


@functools.lru_cache(maxsize=512)
def _load(text: str) -> Config:
    """load_text, once per text (the loader takes ~20 ms a config; configs are immutable)."""
    return load_text(text, "plan.yaml")


BASE_LISTENERS = [listener("web", 8080, "web"), listener("db", 6432, "db")]
BASE_POOLS = [pool("web", 9001, 9002, algorithm="maglev"), pool("db", 5432)]


def base() -> Config:
    return build(BASE_LISTENERS, BASE_POOLS)


def names(plan_part: tuple[Any, ...]) -> list[str]:
    return [item if isinstance(item, str) else item.name for item in plan_part]


def assert_nothing_to_do(plan: ReloadPlan) -> None:
    assert not (plan.add_pools or plan.change_pools or plan.remove_pools)
    assert not (plan.retire_listeners or plan.start_listeners or plan.bind_first)
    assert not (plan.pool_changes or plan.changed_listeners or plan.moved)
    assert plan.describe() == "no change"


def test_unchanged_config_has_nothing_to_do() -> None:
    plan = reload_plan(base(), base())
    assert_nothing_to_do(plan)
    assert names(plan.keep_listeners) == ["web", "db"]


def test_the_same_config_object_has_nothing_to_do() -> None:
    config = base()
    assert_nothing_to_do(reload_plan(config, config))


def test_added_pool_and_listener() -> None:
    new = build([*BASE_LISTENERS, listener("cache", 6380, "cache")],
                [*BASE_POOLS, pool("cache", 6379)])
    plan = reload_plan(base(), new)
    assert names(plan.add_pools) == ["cache"]
    assert not (plan.change_pools or plan.remove_pools)
    assert names(plan.start_listeners) == ["cache"]
    assert plan.bind_first == ("cache",)
    assert plan.retire_listeners == ()
    assert names(plan.keep_listeners) == ["web", "db"]
    assert plan.describe() == "+1 listener, +1 pool"


def test_removed_pool_and_listener() -> None:
    new = build([listener("web", 8080, "web")], [pool("web", 9001, 9002, algorithm="maglev")])
    plan = reload_plan(base(), new)
    assert plan.remove_pools == ("db",)
    assert plan.retire_listeners == ("db",)
    assert not (plan.start_listeners or plan.bind_first or plan.add_pools or plan.change_pools)
    assert plan.describe() == "-1 listener, -1 pool"


def test_changed_pool_backends_and_algorithm() -> None:
    new = build(BASE_LISTENERS, [pool("web", 9002, 9003), pool("db", 5432)])
    plan = reload_plan(base(), new)
    assert names(plan.change_pools) == ["web"]
    assert not (plan.add_pools or plan.remove_pools)
    (change,) = plan.pool_changes
    assert change == PoolChange("web", added_backends=("web-9003",), removed_backends=("web-9001",),
                                algorithm=("maglev", "round_robin"))
    assert plan.describe() == "pool web: +1 backend -1 backend algorithm maglev -> round_robin"
    # The listeners keep their sockets; their own settings did not change.
    assert names(plan.keep_listeners) == ["web", "db"] and plan.changed_listeners == ()


def test_pool_settings_only() -> None:
    new = build(BASE_LISTENERS, [pool("web", 9001, 9002, algorithm="maglev", connect_timeout="5s"),
                                 pool("db", 5432)])
    plan = reload_plan(base(), new)
    assert plan.pool_changes == (PoolChange("web"),)
    assert plan.describe() == "pool web: settings"


def test_several_backends_are_plural() -> None:
    new = build(BASE_LISTENERS, [pool("web", 9001, 9002, algorithm="maglev"),
                                 pool("db", 5433, 5434, 5435)])
    plan = reload_plan(base(), new)
    assert plan.describe() == "pool db: +3 backends -1 backend"


@pytest.mark.parametrize("change", [
    {"bind": "127.0.0.1:8081"},
    {"protocol": "udp"},
    {"dataplane": "kernel"},
    {"bind": "127.0.0.2:8080", "protocol": "udp"},
])
def test_a_listener_whose_socket_changes_is_retired_and_started(change: dict[str, str]) -> None:
    new = build([{**listener("web", 8080, "web"), **change}, listener("db", 6432, "db")], BASE_POOLS)
    old = base()
    assert not same_socket(old.listeners[0], new.listeners[0])
    plan = reload_plan(old, new)
    assert plan.retire_listeners == ("web",)
    assert names(plan.start_listeners) == ["web"]
    assert names(plan.keep_listeners) == ["db"]
    assert plan.moved == ("web",)
    assert plan.changed_listeners == ()
    assert plan.describe() == "1 listener moved"
    # A new address (or the same address with another protocol) binds before anything changes;
    # the same address and protocol (only the data plane changes) binds after the old one lets go.
    held = change.get("bind", "127.0.0.1:8080") == "127.0.0.1:8080" and "protocol" not in change
    assert plan.bind_first == (() if held else ("web",))


def test_a_new_listener_on_a_held_address_is_not_bound_first() -> None:
    """The new listener wants web's address; web leaves, so it binds after web let go."""
    new = build([listener("www", 8080, "web"), listener("db", 6432, "db")], BASE_POOLS)
    plan = reload_plan(base(), new)
    assert plan.retire_listeners == ("web",)
    assert names(plan.start_listeners) == ["www"]
    assert plan.bind_first == ()
    assert plan.moved == ()
    assert plan.describe() == "+1 listener, -1 listener"


def test_two_listeners_swapping_addresses_bind_after_the_retirement() -> None:
    new = build([listener("web", 6432, "web"), listener("db", 8080, "db")], BASE_POOLS)
    plan = reload_plan(base(), new)
    assert sorted(plan.retire_listeners) == ["db", "web"]
    assert sorted(names(plan.start_listeners)) == ["db", "web"]
    assert plan.keep_listeners == ()
    assert plan.bind_first == ()
    assert sorted(plan.moved) == ["db", "web"]


def test_two_moved_listeners_read_well() -> None:
    new = build([listener("web", 6432, "web"), listener("db", 8080, "db")], BASE_POOLS)
    assert reload_plan(base(), new).describe() == "2 listeners moved"


def test_kept_listener_with_changed_settings() -> None:
    new = build([listener("web", 8080, "web", max_connections=50),
                 listener("db", 6432, "web", limits={"max_connections_per_source": 4})],
                BASE_POOLS)
    plan = reload_plan(base(), new)
    assert names(plan.keep_listeners) == ["web", "db"]
    assert plan.changed_listeners == ("web", "db")
    assert not (plan.retire_listeners or plan.start_listeners)
    assert plan.describe() == "listener web: settings, listener db: settings"


def test_a_describe_with_everything() -> None:
    new = build([listener("web", 8080, "web"), listener("db", 6433, "web"),
                 listener("cache", 6380, "cache"), listener("api", 8000, "web")],
                [pool("web", 9002, 9003), pool("cache", 6379)])
    plan = reload_plan(base(), new)
    assert plan.describe() == ("+2 listeners, 1 listener moved, +1 pool, -1 pool, "
                               "pool web: +1 backend -1 backend algorithm maglev -> round_robin")
    assert plan.bind_first == ("db", "cache", "api")


# --- a property over random pairs of configs -------------------------------------------------------

LISTENER_NAMES = ("l1", "l2", "l3", "l4")
POOL_NAMES = ("p1", "p2", "p3")
PORTS = (7001, 7002, 7003)


Spec = tuple[list[dict[str, Any]], list[dict[str, Any]]]  # (listeners, pools) as the YAML says


def _pool_spec(draw: st.DrawFn, name: str) -> dict[str, Any]:
    ports = draw(st.lists(st.sampled_from((9001, 9002, 9003)), min_size=1, max_size=3, unique=True))
    return {"name": name, "backends": [{"address": f"127.0.0.1:{port}"} for port in ports],
            **draw(st.sampled_from([{}, {"algorithm": "maglev"}, {"retries": 1}]))}


def _listener_spec(draw: st.DrawFn, name: str, pool_names: list[str]) -> dict[str, Any]:
    spec = listener(name, draw(st.sampled_from(PORTS)), draw(st.sampled_from(pool_names)))
    if draw(st.booleans()):
        spec["protocol"] = "udp"
    spec.update(draw(st.sampled_from([{}, {"dataplane": "kernel"}, {"max_connections": 100}])))
    return spec


@st.composite
def specs(draw: st.DrawFn) -> Spec:
    """A config from small alphabets (few keys: the loader's cost grows with the YAML nodes)."""
    pool_names = draw(st.lists(st.sampled_from(POOL_NAMES), min_size=1, max_size=3, unique=True))
    names = draw(st.lists(st.sampled_from(LISTENER_NAMES), min_size=1, max_size=4, unique=True))
    return ([_listener_spec(draw, name, pool_names) for name in names],
            [_pool_spec(draw, name) for name in pool_names])


@st.composite
def changed(draw: st.DrawFn, old: Spec) -> Spec:
    """A reload of `old`: each listener and pool kept, changed, dropped; some added."""
    pools = [p if draw(st.integers(0, 3)) else _pool_spec(draw, p["name"]) for p in old[1]]
    pools = [p for p in pools if draw(st.integers(0, 5))] or pools[:1]
    spare = [n for n in POOL_NAMES if n not in {p["name"] for p in pools}]
    add_pool: bool = draw(st.booleans())
    if spare and add_pool:
        pools.append(_pool_spec(draw, spare[0]))
    pool_names = [p["name"] for p in pools]
    listeners = []
    for spec in old[0]:
        choice = draw(st.integers(0, 5))
        if choice == 0:
            continue  # dropped
        if choice == 1:
            spec = _listener_spec(draw, spec["name"], pool_names)  # anything may change
        elif choice == 2:
            spec = {**spec, "max_connections": draw(st.sampled_from((50, 100, 200)))}
        if spec["pool"] not in pool_names:
            spec = {**spec, "pool": pool_names[0]}
        listeners.append(spec)
    taken = {s["name"] for s in listeners}
    for name in LISTENER_NAMES:
        if name not in taken and draw(st.integers(0, 3)) == 0:
            listeners.append(_listener_spec(draw, name, pool_names))
    return listeners, pools


def _config(spec: Spec) -> Config:
    listeners, pools = spec
    binds = [(s["bind"], s.get("protocol", "tcp")) for s in listeners]
    assume(listeners and len(set(binds)) == len(binds))  # the loader refuses one address twice
    return build(listeners, pools)


@st.composite
def config_pairs(draw: st.DrawFn) -> tuple[Config, Config]:
    """Two unrelated configs, or a config and a reload of it (where most of the plan's cases are)."""
    old = draw(specs())
    new = draw(st.one_of(specs(), changed(old)))
    return _config(old), _config(new)


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(config_pairs())
def test_plan_partitions_listeners_and_pools(pair: tuple[Config, Config]) -> None:
    old, new = pair
    plan = reload_plan(old, new)
    old_listeners = {lst.name: lst for lst in old.listeners}
    new_listeners = {lst.name: lst for lst in new.listeners}
    keep, start = names(plan.keep_listeners), names(plan.start_listeners)

    # Every new listener is kept or started, never both; kept ones keep their socket.
    assert sorted(keep + start) == sorted(new_listeners)
    assert not set(keep) & set(start)
    for name in keep:
        assert name in old_listeners and same_socket(old_listeners[name], new_listeners[name])
    for name in start:
        assert name not in old_listeners or not same_socket(old_listeners[name], new_listeners[name])
    # Every old listener not kept is retired (once).
    assert sorted(plan.retire_listeners) == sorted(set(old_listeners) - set(keep))
    assert len(set(plan.retire_listeners)) == len(plan.retire_listeners)
    # The plan's configs are the new ones.
    assert all(lst == new_listeners[lst.name] for lst in (*plan.keep_listeners, *plan.start_listeners))
    # Changed: exactly the kept listeners whose settings differ.
    assert sorted(plan.changed_listeners) == sorted(n for n in keep if old_listeners[n] != new_listeners[n])
    # Moved: retired and started under one name.
    assert sorted(plan.moved) == sorted(set(plan.retire_listeners) & set(start))
    # Bound first: exactly the started listeners on an address no old listener holds.
    held = {(lst.bind, lst.protocol) for lst in old.listeners}
    assert set(plan.bind_first) <= set(start)
    assert sorted(plan.bind_first) == sorted(
        n for n in start if (new_listeners[n].bind, new_listeners[n].protocol) not in held)

    old_pools = {p.name: p for p in old.pools}
    new_pools = {p.name: p for p in new.pools}
    added, changed = names(plan.add_pools), names(plan.change_pools)
    unchanged = [n for n in new_pools if n in old_pools and old_pools[n] == new_pools[n]]
    assert sorted(added + changed + unchanged) == sorted(new_pools)
    assert len(set(added + changed + unchanged)) == len(new_pools)
    assert sorted(added) == sorted(set(new_pools) - set(old_pools))
    assert sorted(plan.remove_pools) == sorted(set(old_pools) - set(new_pools))
    assert [c.name for c in plan.pool_changes] == changed
    for change in plan.pool_changes:
        before = {b.id for b in old_pools[change.name].backends}
        after = {b.id for b in new_pools[change.name].backends}
        assert set(change.added_backends) == after - before
        assert set(change.removed_backends) == before - after

    empty = not (start or plan.retire_listeners or plan.changed_listeners or added or changed
                 or plan.remove_pools)
    assert (plan.describe() == "no change") == empty
    assert_nothing_to_do(reload_plan(new, new))


def test_bind_lists_are_compared_whole_and_held_addresses_wait() -> None:
    """A listener whose bind list changes restarts; it binds first only when none of its
    addresses is held by a running listener (else after that one lets go)."""
    old = build([listener("web", 8080, "web", bind=["127.0.0.1:8080", "127.0.0.1:8090-8091"]),
                 listener("db", 6432, "db")], BASE_POOLS)
    same = build([listener("web", 8080, "web", bind=["127.0.0.1:8080", "127.0.0.1:8090-8091"]),
                  listener("db", 6432, "db")], BASE_POOLS)
    assert_nothing_to_do(reload_plan(old, same))
    wider = build([listener("web", 8080, "web", bind=["127.0.0.1:8080", "127.0.0.1:8090-8092"]),
                   listener("db", 6432, "db")], BASE_POOLS)
    plan = reload_plan(old, wider)
    assert names(plan.retire_listeners) == names(plan.start_listeners) == ["web"]
    assert plan.moved == ("web",) and plan.bind_first == ()  # 8080, 8090, 8091 are held
    elsewhere = build([listener("web", 8080, "web", bind=["127.0.0.2:8080", "127.0.0.2:8090"]),
                       listener("db", 6432, "db")], BASE_POOLS)
    assert reload_plan(old, elsewhere).bind_first == ("web",)  # nothing held: bound first
    assert not same_socket(old.listeners[0], wider.listeners[0])
