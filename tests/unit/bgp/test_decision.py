"""The rules that decide which VIPs this node announces, and the commands that get ExaBGP there."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pointsman.bgp.decision import (
    Command,
    NodeView,
    Reason,
    Route,
    decide,
    desired,
    plan,
)
from pointsman.config.model import BgpConfig


def bgp(*vips: dict[str, object], next_hop: str = "self") -> BgpConfig:
    return BgpConfig.model_validate({
        "asn": 65001, "router_id": "10.0.0.1", "next_hop": next_hop,
        "peers": [{"address": "10.0.0.254", "asn": 65000}],
        "vips": list(vips),
    })


WEB = {"prefix": "10.99.0.10", "pool": "web"}
DB = {"prefix": "10.99.0.20", "pool": "db", "min_available": 2}
EDGE = {"prefix": "10.99.0.30", "listener": "edge"}


def node(**changes: object) -> NodeView:
    base: dict[str, object] = {
        "available": {"web": 1, "db": 2, "tls": 0, "fallback": 1},
        "accepting": {"edge": True},
        "listener_pools": {"edge": ("fallback", "tls")},
    }
    base.update(changes)
    return NodeView(**base)  # type: ignore[arg-type]


def test_a_healthy_node_announces_every_vip_with_next_hop_self() -> None:
    decisions = decide(bgp(WEB, DB, EDGE), node())
    assert [d.reason for d in decisions] == [Reason.SERVING] * 3
    assert desired(decisions) == {
        "10.99.0.10/32": Route("10.99.0.10/32", "self"),
        "10.99.0.20/32": Route("10.99.0.20/32", "self"),
        "10.99.0.30/32": Route("10.99.0.30/32", "self"),
    }


def test_a_pool_without_an_available_backend_withdraws_its_vip_only() -> None:
    web, db = decide(bgp(WEB, DB), node(available={"web": 0, "db": 2}))
    assert (web.announced, web.reason, web.available) == (False, Reason.TOO_FEW_BACKENDS, 0)
    assert db.announced
    assert web.describe() == ("withdraw 10.99.0.10/32: pool web has 0 available backends, "
                              "needs 1")


def test_min_available_sets_the_threshold() -> None:
    (db,) = decide(bgp(DB), node(available={"db": 1}))
    assert db.reason is Reason.TOO_FEW_BACKENDS
    (db,) = decide(bgp(DB), node(available={"db": 2}))
    assert db.announced


def test_drain_and_stop_withdraw_everything_and_stop_wins() -> None:
    drained = decide(bgp(WEB, EDGE), node(drained=True))
    assert {d.reason for d in drained} == {Reason.NODE_DRAINED}
    assert desired(drained) == {}
    stopping = decide(bgp(WEB, EDGE), node(drained=True, stopping=True))
    assert {d.reason for d in stopping} == {Reason.NODE_STOPPING}


def test_a_listener_vip_needs_the_listener_accepting_and_one_of_its_pools_serving() -> None:
    (edge,) = decide(bgp(EDGE), node(accepting={"edge": False}))
    assert edge.reason is Reason.LISTENER_NOT_ACCEPTING
    # the fallback pool is empty but a TLS route's pool can serve: keep announcing
    (edge,) = decide(bgp(EDGE), node(available={"fallback": 0, "tls": 3}))
    assert (edge.announced, edge.available) == (True, 3)
    (edge,) = decide(bgp(EDGE), node(available={"fallback": 0, "tls": 0}))
    assert edge.reason is Reason.TOO_FEW_BACKENDS


def test_a_pool_or_listener_gone_by_reload_withdraws() -> None:
    web, edge = decide(bgp(WEB, EDGE), node(available={}, listener_pools={}))
    assert web.reason is edge.reason is Reason.UNKNOWN_TARGET


def test_next_hop_comes_from_the_vip_then_the_bgp_section() -> None:
    config = bgp({**WEB, "next_hop": "10.0.0.9"}, DB, next_hop="10.0.0.1")
    web, db = decide(config, node())
    assert web.route == Route("10.99.0.10/32", "10.0.0.9")
    assert db.route == Route("10.99.0.20/32", "10.0.0.1")


# --- plan ------------------------------------------------------------------------------------------

A = Route("10.99.0.1/32", "self")
B = Route("10.99.0.2/32", "self")
B2 = Route("10.99.0.2/32", "10.0.0.9")


def test_plan_withdraws_first_then_announces_in_prefix_order() -> None:
    assert plan({"10.99.0.2/32": B}, {"10.99.0.1/32": A}) == [
        Command("withdraw", B), Command("announce", A)]


def test_plan_re_announces_a_changed_next_hop_without_withdrawing() -> None:
    assert plan({"10.99.0.2/32": B}, {"10.99.0.2/32": B2}) == [Command("announce", B2)]


def test_plan_sends_nothing_when_nothing_changed() -> None:
    assert plan({"10.99.0.1/32": A}, {"10.99.0.1/32": A}) == []


routes = st.dictionaries(
    st.sampled_from([f"10.99.0.{i}/32" for i in range(6)]),
    st.sampled_from(["self", "10.0.0.9"]),
    max_size=6,
).map(lambda d: {p: Route(p, nh) for p, nh in d.items()})


@given(told=routes, wanted=routes)
def test_plan_applied_to_a_rib_yields_exactly_what_is_wanted(
    told: dict[str, Route], wanted: dict[str, Route]
) -> None:
    """A RIB keyed by prefix (as ExaBGP's and the router's are) ends equal to `wanted`, with
    at most one command per prefix."""
    rib = dict(told)
    commands = plan(told, wanted)
    for command in commands:
        if command.action == "withdraw":
            del rib[command.route.prefix]
        else:
            rib[command.route.prefix] = command.route
    assert rib == wanted
    assert len({c.route.prefix for c in commands}) == len(commands)
    assert plan(wanted, wanted) == []
