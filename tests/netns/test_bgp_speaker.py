"""The ExaBGP adapter's process lifecycle, on loopback only (no namespace, no root needed).

ExaBGP is configured with one peer on a loopback port that refuses connections: no session ever
comes up, which is enough to exercise what this module owns: starting ExaBGP and its relay,
acknowledged commands, and leaving no process or file behind whichever side dies first.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pointsman.bgp.exabgp import Kind, Message
from pointsman.bgp.speaker import ExaBgpSpeaker, State
from pointsman.config.model import BgpConfig
from tests.support import refused_port, wait_for

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(importlib.util.find_spec("exabgp") is None,
                       reason="ExaBGP is not installed (pip install 'pointsman[bgp]')"),
]

START = 15.0  # ExaBGP's start: ~0.4 s here


def alive(pid: int | None) -> bool:
    """True while `pid` runs (a zombie waiting for its parent counts as gone)."""
    if pid is None:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class Recorder:
    def __init__(self) -> None:
        self.running = asyncio.Event()
        self.messages: list[Message] = []
        self.failures: list[str] = []


@pytest.fixture
async def speaker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[
        tuple[ExaBgpSpeaker, Recorder]]:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    recorder = Recorder()
    with refused_port() as port:
        config = BgpConfig.model_validate({
            "asn": 65001, "router_id": "127.0.0.1",
            "peers": [{"address": "127.0.0.1", "asn": 65000, "port": port}],
            "vips": [{"prefix": "10.99.0.10", "pool": "web"}],
        })
        the_speaker = ExaBgpSpeaker(config, recorder.running.set, recorder.messages.append,
                                    recorder.failures.append)
        await the_speaker.start()
        try:
            async with asyncio.timeout(START):
                await recorder.running.wait()
            yield the_speaker, recorder
        finally:
            await the_speaker.stop()
            # whatever the test did, nothing of ExaBGP's survives stop()
            assert not alive(the_speaker.pid)
            assert not alive(the_speaker.relay_pid)
            assert not any(tmp_path.iterdir()), list(tmp_path.iterdir())


async def test_commands_are_acknowledged_and_stop_leaves_nothing(
        speaker: tuple[ExaBgpSpeaker, Recorder]) -> None:
    the_speaker, recorder = speaker
    assert the_speaker.state is State.RUNNING
    assert alive(the_speaker.pid) and alive(the_speaker.relay_pid)
    assert the_speaker.send(["announce route 10.99.0.10/32 next-hop 127.0.0.1\n",
                             "withdraw route 10.99.0.10/32 next-hop 127.0.0.1\n",
                             "this is not a command\n"])
    assert await the_speaker.wait_acked(5.0)
    acks = [m.kind for m in recorder.messages if m.kind in (Kind.DONE, Kind.ERROR)]
    # one answer per command, but not in command order: ExaBGP refuses a bad line at once and
    # answers route commands once its reactor ran them (so the speaker counts, never pairs)
    assert Counter(acks) == Counter([Kind.DONE, Kind.DONE, Kind.ERROR])
    assert the_speaker.statistics()["commands_refused"] == 1
    await the_speaker.stop()
    assert the_speaker.state is State.STOPPED
    assert not the_speaker.send(["announce route 10.99.0.10/32 next-hop self\n"])
    assert recorder.failures == []  # a requested stop is not a failure


async def test_exabgp_killed_is_a_failure_and_its_relay_exits(
        speaker: tuple[ExaBgpSpeaker, Recorder]) -> None:
    the_speaker, recorder = speaker
    relay = the_speaker.relay_pid
    assert the_speaker.pid is not None
    os.kill(the_speaker.pid, signal.SIGKILL)
    await wait_for(lambda: bool(recorder.failures), 5.0, what="the failure to be reported")
    assert the_speaker.state is State.FAILED
    await wait_for(lambda: not alive(relay), 5.0, what="the relay to exit on EOF")


async def test_relay_stops_exabgp_when_pointsman_goes_away(
        speaker: tuple[ExaBgpSpeaker, Recorder]) -> None:
    """What a killed pointsman looks like to the relay: its socket closes. The relay then stops
    ExaBGP (whose sessions close) and removes the directory; pointsman's stop() is not needed."""
    the_speaker, recorder = speaker
    directory = the_speaker.directory
    assert directory is not None and directory.exists()
    the_speaker._relay.abort()  # type: ignore[union-attr]
    await wait_for(lambda: not alive(the_speaker.pid), 10.0, what="ExaBGP to exit")
    await wait_for(lambda: not alive(the_speaker.relay_pid), 5.0, what="the relay to exit")
    await wait_for(lambda: not directory.exists(), 5.0, what="the relay to remove the directory")
    assert recorder.failures  # pointsman, had it lived, would know and restart
