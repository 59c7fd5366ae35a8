"""The announcer's reactions, with real pools and a speaker that records instead of running ExaBGP.

The speaker stands in for ExaBGP here because what is tested is the order and content of
commands across events (pool changes, drain, reload, speaker death), which the netns test can only
observe at the router; the real speaker runs in tests/netns/test_bgp.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from pointsman.bgp import announcer as announcer_module
from pointsman.bgp.announcer import Announcer
from pointsman.bgp.exabgp import Kind, Message
from pointsman.bgp.speaker import SpeakerError, State
from pointsman.config.model import BgpConfig, ListenerConfig, PoolConfig
from pointsman.pool.pool import Pool


class RecordingSpeaker:
    """Speaks the ExaBgpSpeaker interface; `instances` keeps every one made, in order."""

    instances: list[RecordingSpeaker] = []
    fail_start = False

    def __init__(self, config: BgpConfig, on_running: Callable[[], None],
                 on_message: Callable[[Message], None], on_failed: Callable[[str], None]) -> None:
        self.config = config
        self.on_running, self.on_message, self.on_failed = on_running, on_message, on_failed
        self.state = State.STOPPED
        self.sent: list[str] = []
        self.events: list[str] = []
        RecordingSpeaker.instances.append(self)

    async def start(self) -> None:
        if RecordingSpeaker.fail_start:
            raise SpeakerError("no ExaBGP here")
        self.state = State.STARTING
        self.events.append("start")

    def connect(self) -> None:
        """What the relay connecting does."""
        self.state = State.RUNNING
        self.on_running()

    def send(self, lines: list[str]) -> bool:
        if self.state is not State.RUNNING:
            return not lines
        self.sent.extend(line.strip() for line in lines)
        return True

    async def wait_acked(self, timeout: float) -> bool:
        return self.state is State.RUNNING

    async def stop(self) -> None:
        self.events.append("stop")
        self.state = State.STOPPED

    def die(self, reason: str = "ExaBGP exited with status 1") -> None:
        self.state = State.FAILED
        self.on_failed(reason)

    def statistics(self) -> dict[str, Any]:
        return {"state": self.state.value}


@dataclass
class FakeListener:
    config: ListenerConfig
    accepting: bool = True


@dataclass
class FakeNode:
    pools: dict[str, Pool] = field(default_factory=dict)
    listeners: dict[str, FakeListener] = field(default_factory=dict)


def pool(name: str, backends: int = 1) -> Pool:
    return Pool(PoolConfig.model_validate({
        "name": name,
        "backends": [{"address": f"127.0.0.1:{9000 + i}"} for i in range(backends)],
        "health_check": {"type": "tcp"},
    }))


def bgp(*vips: dict[str, object], **changes: object) -> BgpConfig:
    data: dict[str, object] = {
        "asn": 65001, "router_id": "10.0.0.1",
        "peers": [{"address": "10.0.0.254", "asn": 65000}],
        "vips": list(vips) or [{"prefix": "10.99.0.10", "pool": "web"}],
    }
    data.update(changes)
    return BgpConfig.model_validate(data)


ANNOUNCE = "announce route 10.99.0.10/32 next-hop self"
WITHDRAW = "withdraw route 10.99.0.10/32 next-hop self"


@pytest.fixture(autouse=True)
def _fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    RecordingSpeaker.instances = []
    RecordingSpeaker.fail_start = False
    monkeypatch.setattr(announcer_module, "RESTART_DELAYS", (0.01, 0.02))


async def running(node: FakeNode, config: BgpConfig | None = None) -> tuple[Announcer, RecordingSpeaker]:
    announcer = Announcer(config or bgp(), node, RecordingSpeaker)  # type: ignore[arg-type]
    await announcer.start()
    speaker = RecordingSpeaker.instances[-1]
    speaker.connect()
    return announcer, speaker


async def settle() -> None:
    """Let call_soon callbacks (the coalesced decision) run."""
    for _ in range(3):
        await asyncio.sleep(0)


async def test_a_new_speaker_is_told_every_vip_that_should_be_announced() -> None:
    node = FakeNode({"web": pool("web")})
    announcer, speaker = await running(node)
    assert speaker.sent == [ANNOUNCE]
    assert announcer.statistics()["vips"][0]["announced"] is True


async def test_pool_changes_withdraw_and_announce() -> None:
    web = pool("web", backends=2)
    node = FakeNode({"web": web})
    _, speaker = await running(node)
    web.health_verdict("127.0.0.1:9000", False, "refused")
    await settle()
    assert speaker.sent == [ANNOUNCE]  # one backend left: still serving
    web.health_verdict("127.0.0.1:9001", False, "refused")
    await settle()
    assert speaker.sent == [ANNOUNCE, WITHDRAW]
    web.health_verdict("127.0.0.1:9000", True, "connected")
    web.health_verdict("127.0.0.1:9001", True, "connected")  # same tick: one decision
    await settle()
    assert speaker.sent == [ANNOUNCE, WITHDRAW, ANNOUNCE]


async def test_drain_and_resume() -> None:
    node = FakeNode({"web": pool("web")})
    announcer, speaker = await running(node)
    assert await announcer.drain() is True
    assert speaker.sent[-1] == WITHDRAW
    assert announcer.statistics()["vips"][0]["reason"] == "node_drained"
    assert await announcer.resume() is True
    assert speaker.sent[-1] == ANNOUNCE


async def test_stop_withdraws_before_stopping_the_speaker_and_ignores_later_snapshots() -> None:
    web = pool("web")
    node = FakeNode({"web": web})
    announcer, speaker = await running(node)
    await announcer.stop()
    assert speaker.sent == [ANNOUNCE, WITHDRAW]
    assert speaker.events == ["start", "stop"]
    web.health_verdict("127.0.0.1:9000", False, "refused")
    await settle()
    assert speaker.sent == [ANNOUNCE, WITHDRAW]


async def test_a_dead_speaker_is_replaced_and_the_new_one_told_everything() -> None:
    node = FakeNode({"web": pool("web")})
    announcer, first = await running(node)
    first.die()
    async with asyncio.timeout(2):
        while len(RecordingSpeaker.instances) < 2 or "start" not in RecordingSpeaker.instances[1].events:
            await asyncio.sleep(0.005)
    second = RecordingSpeaker.instances[1]
    assert first.events == ["start", "stop"]
    second.connect()
    assert second.sent == [ANNOUNCE]
    assert announcer.restarts == 1
    second.on_message(Message(Kind.PEER_UP, "10.0.0.254"))
    await announcer.stop()


async def test_start_raises_when_exabgp_cannot_run_and_retries_on_reload() -> None:
    node = FakeNode({"web": pool("web")})
    RecordingSpeaker.fail_start = True
    with pytest.raises(SpeakerError):
        await Announcer(bgp(), node, RecordingSpeaker).start()  # type: ignore[arg-type]
    announcer = Announcer(bgp(), node, RecordingSpeaker)  # type: ignore[arg-type]
    await announcer.start(retry=True)  # a reload: log, back off, try again
    RecordingSpeaker.fail_start = False
    async with asyncio.timeout(2):
        while not any("start" in s.events for s in RecordingSpeaker.instances):
            await asyncio.sleep(0.005)
    await announcer.stop()


async def test_reload_with_new_vips_only_sends_the_difference() -> None:
    node = FakeNode({"web": pool("web"), "db": pool("db")})
    announcer, speaker = await running(node)
    await announcer.reconfigure(bgp({"prefix": "10.99.0.10", "pool": "web"},
                                    {"prefix": "10.99.0.20", "pool": "db"}))
    assert speaker.sent == [ANNOUNCE, "announce route 10.99.0.20/32 next-hop self"]
    assert len(RecordingSpeaker.instances) == 1


async def test_reload_with_new_peers_restarts_the_speaker() -> None:
    node = FakeNode({"web": pool("web")})
    announcer, first = await running(node)
    await announcer.reconfigure(bgp(peers=[{"address": "10.0.0.253", "asn": 65000}]))
    assert first.events == ["start", "stop"]
    second = RecordingSpeaker.instances[1]
    second.connect()
    assert second.sent == [ANNOUNCE]


async def test_a_pool_added_by_reload_is_watched() -> None:
    node = FakeNode({"web": pool("web")})
    announcer, speaker = await running(node)
    db = node.pools["db"] = pool("db")
    await announcer.reconfigure(bgp({"prefix": "10.99.0.10", "pool": "web"},
                                    {"prefix": "10.99.0.20", "pool": "db"}))
    db.health_verdict("127.0.0.1:9000", False, "refused")
    await settle()
    assert speaker.sent[-1] == "withdraw route 10.99.0.20/32 next-hop self"


async def test_a_listener_vip_follows_the_listener() -> None:
    listener = FakeListener(ListenerConfig.model_validate(
        {"name": "edge", "bind": "10.99.0.30:443", "pool": "web"}))
    node = FakeNode({"web": pool("web")}, {"edge": listener})
    announcer, speaker = await running(node, bgp({"prefix": "10.99.0.30", "listener": "edge"}))
    assert speaker.sent == ["announce route 10.99.0.30/32 next-hop self"]
    listener.accepting = False
    await announcer.reconfigure(announcer.config)
    assert speaker.sent[-1] == "withdraw route 10.99.0.30/32 next-hop self"


PEER = "10.0.0.254"


async def test_sessions_and_flaps_follow_the_peer_messages() -> None:
    node = FakeNode({"web": pool("web")})
    announcer, speaker = await running(node)
    stats = announcer.statistics
    assert stats()["sessions"] == {PEER: False} and stats()["session_flaps"] == {PEER: 0}
    speaker.on_message(Message(Kind.PEER_CONNECTED, PEER))
    speaker.on_message(Message(Kind.PEER_DOWN, PEER, "connection refused"))  # never up: no flap
    assert stats()["session_flaps"] == {PEER: 0}
    speaker.on_message(Message(Kind.PEER_UP, PEER))
    assert stats()["sessions"] == {PEER: True}
    speaker.on_message(Message(Kind.PEER_DOWN, PEER, "hold timer expired"))
    speaker.on_message(Message(Kind.PEER_DOWN, PEER, "hold timer expired"))  # repeated: once
    assert stats()["sessions"] == {PEER: False} and stats()["session_flaps"] == {PEER: 1}
    speaker.on_message(Message(Kind.PEER_UP, PEER))
    speaker.on_message(Message(Kind.PEER_DOWN, PEER, "notification"))
    assert stats()["session_flaps"] == {PEER: 2}
    await announcer.stop()


async def test_a_dying_exabgp_takes_its_established_sessions_down_with_it() -> None:
    node = FakeNode({"web": pool("web")})
    announcer, first = await running(node)
    first.on_message(Message(Kind.PEER_UP, PEER))
    first.die()
    assert announcer.statistics()["sessions"] == {PEER: False}
    assert announcer.statistics()["session_flaps"] == {PEER: 1}
    async with asyncio.timeout(2):
        while len(RecordingSpeaker.instances) < 2:
            await asyncio.sleep(0.005)
    second = RecordingSpeaker.instances[1]
    second.connect()
    second.on_message(Message(Kind.PEER_UP, PEER))
    assert announcer.statistics()["sessions"] == {PEER: True}
    assert announcer.statistics()["session_flaps"] == {PEER: 1}  # kept across the restart
    assert announcer.statistics()["restarts"] == 1
    await announcer.stop()


async def test_new_session_settings_reset_the_sessions_and_count_them() -> None:
    node = FakeNode({"web": pool("web")})
    announcer, first = await running(node)
    first.on_message(Message(Kind.PEER_UP, PEER))
    await announcer.reconfigure(bgp(peers=[{"address": PEER, "asn": 65000, "hold_time": "30s"}]))
    assert announcer.statistics()["sessions"] == {PEER: False}
    assert announcer.statistics()["session_flaps"] == {PEER: 1}
    await announcer.stop()


async def test_ipv6_peers_match_however_exabgp_spells_them() -> None:
    config = bgp(peers=[{"address": "10.0.0.254", "asn": 65000},
                        {"address": "2001:DB8::FE", "asn": 65000}])
    announcer, speaker = await running(FakeNode({"web": pool("web")}), config)
    speaker.on_message(Message(Kind.PEER_UP, "2001:0db8:0000:0000:0000:0000:0000:00fe"))
    assert announcer.statistics()["sessions"] == {PEER: False, "2001:db8::fe": True}
    await announcer.stop()
