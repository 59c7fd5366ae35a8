"""The recording hooks outside the admin server: the BGP announcer records each change of a VIP's
decision, the composer records every config it applies or refuses (etcd and discovery as well as
the file), and a mirror pool (a worker's) records nothing, so each transition is logged once."""

from __future__ import annotations

import yaml

from pointsman.bgp.announcer import Announcer
from pointsman.config.model import BgpConfig, PoolConfig
from pointsman.discovery.composer import Composer
from pointsman.pool.pool import Pool
from pointsman.telemetry.eventlog import EVENTS, record_transition
from pointsman.telemetry.events import BgpEvent, BgpSessionEvent, EventFilter, ReloadEvent
from tests.unit.bgp.test_announcer import FakeNode, RecordingSpeaker, pool


def recorded_since(seen: int, kind: str) -> list[object]:
    return [e.event for e in EVENTS.ring.query(EventFilter(after=seen, kinds=frozenset({kind})))]


async def test_the_announcer_records_each_vip_decision_change() -> None:
    web = pool("web")
    config = BgpConfig.model_validate({
        "asn": 65001, "router_id": "10.0.0.1",
        "peers": [{"address": "10.0.0.2", "asn": 65000}],
        "vips": [{"prefix": "10.99.0.10", "pool": "web"}]})
    seen = EVENTS.ring.recorded
    announcer = Announcer(config, FakeNode(pools={"web": web}), speaker_factory=RecordingSpeaker)
    await announcer.start()
    web.health_verdict(web.members()[0].id, False, "refused")
    announcer._sync()  # what the coalesced call_soon does
    announcer._sync()  # nothing changed: no event
    await announcer.stop()
    events = recorded_since(seen, "bgp")
    assert all(isinstance(e, BgpEvent) for e in events)
    assert [(e.prefix, e.announced, e.reason, e.pool) for e in events if isinstance(e, BgpEvent)] == [
        ("10.99.0.10/32", True, "serving", "web"),
        ("10.99.0.10/32", False, "too_few_backends", "web"),
        ("10.99.0.10/32", False, "node_stopping", "web"),
    ]


BASE = {
    "listeners": [{"name": "web", "bind": "127.0.0.1:8000", "pool": "p"}],
    "pools": [{"name": "p", "backends": [{"address": "127.0.0.1:9000", "name": "a"}]}],
}


async def test_the_composer_records_configs_from_every_source() -> None:
    from pointsman.config.loader import load_text

    applied = []

    async def apply(config: object) -> list[str]:
        applied.append(config)
        return []

    composer = Composer()
    seen = EVENTS.ring.recorded
    await composer.start(load_text(yaml.safe_dump(BASE), "<base>"), apply)
    try:
        more = {**BASE, "pools": [{"name": "p", "backends": [
            {"address": "127.0.0.1:9000", "name": "a"}, {"address": "127.0.0.1:9001", "name": "b"}]}]}
        assert await composer.apply_text(yaml.safe_dump(more), "etcd /c/config", "etcd") == []
        bad = {**BASE, "listeners": [{"name": "web", "bind": "127.0.0.1:8000", "pool": "nope"}]}
        assert await composer.apply_text(yaml.safe_dump(bad), "etcd /c/config", "etcd")
    finally:
        await composer.stop()
    events = [e for e in recorded_since(seen, "reload") if isinstance(e, ReloadEvent)]
    assert [(e.source, e.accepted) for e in events] == [("etcd", True), ("etcd", False)]
    assert events[0].diff is not None and events[0].diff.backends.added == ("p/b",)
    assert events[1].diff is None and "nope" in events[1].errors[0]
    assert len(applied) == 1


def test_a_pool_records_through_its_subscriber_and_a_mirror_is_left_out() -> None:
    """The runtime subscribes `record_transition` to pools that are not mirrors: a worker's
    mirror applies the control process's events, which the control process already recorded."""
    config = PoolConfig.model_validate({"name": "m", "backends": [{"address": "127.0.0.1:9", "name": "x"}]})
    seen = EVENTS.ring.recorded
    control = Pool(config)
    control.subscribe(record_transition)
    control.drain("x", "operator drain")
    mirror = Pool(config, mirror=True)  # not subscribed, as in the runtime
    mirror.apply_event("x", "drain", "operator drain")
    events = recorded_since(seen, "backend")
    assert len(events) == 1


async def test_the_announcer_records_bgp_sessions_going_up_and_down() -> None:
    from pointsman.bgp.exabgp import Kind, Message

    config = BgpConfig.model_validate({
        "asn": 65001, "router_id": "10.0.0.1",
        "peers": [{"address": "10.0.0.2", "asn": 65000}],
        "vips": [{"prefix": "10.99.0.10", "pool": "web"}]})
    seen = EVENTS.ring.recorded
    announcer = Announcer(config, FakeNode(pools={"web": pool("web")}),
                          speaker_factory=RecordingSpeaker)
    await announcer.start()
    speaker = RecordingSpeaker.instances[-1]
    speaker.connect()
    speaker.on_message(Message(Kind.PEER_UP, peer="10.0.0.2"))
    speaker.on_message(Message(Kind.PEER_UP, peer="10.0.0.2"))  # still up: no second event
    speaker.on_message(Message(Kind.PEER_DOWN, peer="10.0.0.2"))
    speaker.on_message(Message(Kind.PEER_UP, peer="10.0.0.2"))
    speaker.die()  # ExaBGP exits: its session ends with it
    await announcer.stop()
    sessions = [(e.peer, e.up, e.reason) for e in recorded_since(seen, "bgp")
                if isinstance(e, BgpSessionEvent)]
    assert sessions == [("10.0.0.2", True, ""), ("10.0.0.2", False, "the peer or the network"),
                        ("10.0.0.2", True, ""), ("10.0.0.2", False, "ExaBGP stopped")]
