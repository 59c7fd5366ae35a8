"""ExaBGP's text: the config we render, the API lines we write and the messages we read back.

The message formats are ExaBGP 5.0.15's (reactor/api/response/text.py and answer.py), and were
seen verbatim on a relay between ExaBGP 5.0.15 and bird 2.0.12 (tests/netns/test_bgp.py runs it).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pointsman.bgp.decision import Command, Route
from pointsman.bgp.exabgp import (
    MAX_LINE,
    Kind,
    LineSplitter,
    Message,
    ProtocolError,
    command_line,
    environment,
    parse_line,
    render_config,
)
from pointsman.config.model import BgpConfig

RELAY = [sys.executable, "-I", "/opt/pointsman/bgp/relay.py", "/tmp/pointsman-bgp-x/api.sock"]


def config(**changes: object) -> BgpConfig:
    data: dict[str, object] = {
        "asn": 65001, "router_id": "10.0.0.1",
        "peers": [{"address": "10.0.0.254", "asn": 65000}],
        "vips": [{"prefix": "10.99.0.10", "pool": "web"}],
    }
    data.update(changes)
    return BgpConfig.model_validate(data)


# --- messages from ExaBGP ------------------------------------------------------------------------


@pytest.mark.parametrize(("line", "message"), [
    ("done", Message(Kind.DONE)),
    ("error", Message(Kind.ERROR)),
    ("neighbor 10.0.11.254 connected", Message(Kind.PEER_CONNECTED, "10.0.11.254")),
    ("neighbor 10.0.11.254 up", Message(Kind.PEER_UP, "10.0.11.254")),
    ("neighbor 10.0.11.254 down - peer reset, message [closing connection] error[]",
     Message(Kind.PEER_DOWN, "10.0.11.254", "peer reset, message [closing connection] error[]")),
    ("neighbor 2001:db8::1 down - ", Message(Kind.PEER_DOWN, "2001:db8::1", "")),
    ("shutdown 1234 1200", Message(Kind.SHUTDOWN, detail="shutdown 1234 1200")),
    ("shutdown", Message(Kind.SHUTDOWN, detail="shutdown")),
    ("neighbor 10.0.11.254 receive update start", Message(
        Kind.OTHER, detail="neighbor 10.0.11.254 receive update start")),
])
def test_each_message_kind_parses(line: str, message: Message) -> None:
    assert parse_line(line) == message


def test_blank_separator_lines_are_not_messages() -> None:
    assert parse_line("") is None
    assert parse_line("   ") is None


def test_the_splitter_returns_whole_lines_across_reads() -> None:
    splitter = LineSplitter()
    assert splitter.feed(b"neighbor 10.0.11.254 connected\n\nneigh") == [
        "neighbor 10.0.11.254 connected", ""]
    assert splitter.feed(b"bor 10.0.11.254 up\n") == ["neighbor 10.0.11.254 up"]
    assert splitter.feed(b"do") == []
    assert splitter.feed(b"ne\ndone\n") == ["done", "done"]


def test_the_splitter_refuses_an_endless_line_and_non_ascii() -> None:
    splitter = LineSplitter()
    splitter.feed(b"x" * MAX_LINE)  # at the cap: still waiting for its newline
    with pytest.raises(ProtocolError):
        splitter.feed(b"x")
    with pytest.raises(ProtocolError):
        LineSplitter().feed("d\u00f6ne\n".encode())


# --- commands to ExaBGP --------------------------------------------------------------------------


def test_commands_are_one_line_each() -> None:
    route = Route("10.99.0.10/32", "self")
    assert command_line(Command("announce", route)) == "announce route 10.99.0.10/32 next-hop self\n"
    assert command_line(Command("withdraw", Route("2001:db8::10/128", "2001:db8::1"))) == (
        "withdraw route 2001:db8::10/128 next-hop 2001:db8::1\n")


# --- config and environment ------------------------------------------------------------------------

GOLDEN = """\
process pointsman {
    run PYTHON -I /opt/pointsman/bgp/relay.py /tmp/pointsman-bgp-x/api.sock;
    encoder text;
}

neighbor 10.0.0.254 {
    router-id 10.0.0.1;
    local-as 65001;
    peer-as 65000;
    hold-time 9;
    local-address 10.0.0.1;
    connect 1179;
    adj-rib-out true;
    family { ipv4 unicast; }
    api { processes [ pointsman ]; neighbor-changes; }
}

neighbor 2001:db8::1 {
    router-id 10.0.0.1;
    local-as 65001;
    peer-as 4200000000;
    hold-time 90;
    adj-rib-out true;
    family { ipv6 unicast; }
    api { processes [ pointsman ]; neighbor-changes; }
}
""".replace("PYTHON", sys.executable)

TWO_PEERS = config(
    peers=[{"address": "10.0.0.254", "asn": 65000, "port": 1179, "hold_time": "9s",
            "local_address": "10.0.0.1"},
           {"address": "2001:db8::1", "asn": 4_200_000_000}],
    vips=[{"prefix": "10.99.0.10", "pool": "web"}, {"prefix": "2001:db8::10", "pool": "web"}],
)


def test_config_has_one_api_process_and_one_neighbor_per_peer() -> None:
    """Golden text written by hand from ExaBGP 5's neighbor syntax; `exabgp validate` accepts
    it (the next test)."""
    assert render_config(TWO_PEERS, RELAY) == GOLDEN


@pytest.mark.skipif(importlib.util.find_spec("exabgp") is None, reason="ExaBGP is not installed")
def test_exabgp_itself_accepts_the_config(tmp_path: Path) -> None:
    relay = [sys.executable, "-I", str(tmp_path / "relay.py"), str(tmp_path / "api.sock")]
    (tmp_path / "relay.py").write_text("")
    path = tmp_path / "exabgp.conf"
    path.write_text(render_config(TWO_PEERS, relay))
    env = {**os.environ, **environment("root")}
    result = subprocess.run([sys.executable, "-m", "exabgp", "validate", str(path)],
                            capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    path.write_text(render_config(TWO_PEERS, relay).replace("peer-as", "peer-asn"))
    result = subprocess.run([sys.executable, "-m", "exabgp", "validate", str(path)],
                            capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode != 0  # the check above can fail


def test_paths_exabgp_cannot_parse_are_refused() -> None:
    with pytest.raises(ValueError, match="white space or config syntax"):
        render_config(config(), ["/usr/bin/python3", "/tmp/my dir/relay.py", "/tmp/x.sock"])
    with pytest.raises(ValueError):
        render_config(config(), ["/usr/bin/python3", "/tmp/a;b/relay.py", "/tmp/x.sock"])


def test_environment_keeps_root_never_respawns_and_never_listens() -> None:
    env = environment("root")
    assert env["exabgp_daemon_user"] == "root"
    assert env["exabgp_daemon_drop"] == "false"
    assert env["exabgp_api_cli"] == "false"
    assert env["exabgp_api_respawn"] == "false"
    assert env["exabgp_api_ack"] == "true"
    assert env["exabgp_tcp_bind"] == ""
