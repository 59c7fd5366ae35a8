"""ExaBGP's side of the conversation, as text: its config file, its environment, the API commands
pointsman writes and the messages ExaBGP writes back. Pure: no processes, no sockets.

ExaBGP talks to the programs it runs over their stdin and stdout, one line per command or message
(the "text" encoder). What we send: `announce route <prefix> next-hop <nh>` and
`withdraw route <prefix> next-hop <nh>`. What comes back, with `api.ack` on and the
`neighbor-changes` API option: `done` or `error` once per command, `neighbor <ip> connected`,
`neighbor <ip> up`, `neighbor <ip> down - <reason>`, and `shutdown <pid> <ppid>` when ExaBGP
exits (ExaBGP 5, reactor/api/response/text.py). Blank lines separate some messages.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass

from pointsman.bgp.decision import Command
from pointsman.config.model import BgpConfig

PROCESS_NAME = "pointsman"

# ExaBGP's messages to us are one short line each (acks, neighbor changes); we never ask it for
# updates. 16 KiB is also what ExaBGP reads from its helpers in one go (Processes.received), so a
# line longer than that is not a message we asked for: the stream is broken.
MAX_LINE = 16 * 1024

# Characters that ExaBGP's config tokeniser treats as syntax; a path holding one cannot be given to
# `run` (the tokeniser splits on white space and has no escaping we can rely on).
_UNSAFE = re.compile(r"[\s;{}\[\]\"'#\\]")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class ProtocolError(Exception):
    """ExaBGP (or the relay) sent something that is not a line of its API."""


# --- what ExaBGP writes to us ------------------------------------------------------------------


class Kind(enum.Enum):
    DONE = "done"
    ERROR = "error"
    PEER_CONNECTED = "connected"
    PEER_UP = "up"
    PEER_DOWN = "down"
    SHUTDOWN = "shutdown"
    OTHER = "other"


@dataclass(frozen=True, slots=True)
class Message:
    kind: Kind
    peer: str | None = None
    detail: str = ""


def parse_line(line: str) -> Message | None:
    """One line from ExaBGP -> a Message; None for the blank separator lines."""
    text = line.strip()
    if not text:
        return None
    if text == "done":
        return Message(Kind.DONE)
    if text == "error":
        return Message(Kind.ERROR)
    if text == "shutdown" or text.startswith("shutdown "):
        return Message(Kind.SHUTDOWN, detail=text)
    words = text.split(" ", 3)
    if len(words) >= 3 and words[0] == "neighbor":
        peer, state = words[1], words[2]
        if state == "up":
            return Message(Kind.PEER_UP, peer)
        if state == "connected":
            return Message(Kind.PEER_CONNECTED, peer)
        if state == "down":
            reason = words[3] if len(words) > 3 else ""
            return Message(Kind.PEER_DOWN, peer, reason.removeprefix("-").strip())
    return Message(Kind.OTHER, detail=text)


class LineSplitter:
    """Bytes in, complete lines out; raises ProtocolError past MAX_LINE without a newline."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[str]:
        self._buffer += data
        *lines, rest = self._buffer.split(b"\n")
        if len(rest) > MAX_LINE:
            raise ProtocolError(f"a line longer than {MAX_LINE} bytes from ExaBGP")
        self._buffer = rest
        try:
            return [line.decode("ascii") for line in lines]
        except UnicodeDecodeError:
            raise ProtocolError("non-ASCII bytes from ExaBGP (its API is ASCII text)") from None


# --- what we write to ExaBGP -------------------------------------------------------------------


def command_line(command: Command) -> str:
    """`announce route 10.99.0.10/32 next-hop self` (with the newline ExaBGP waits for)."""
    route = command.route
    return f"{command.action} route {route.prefix} next-hop {route.next_hop}\n"


# --- how ExaBGP is started -----------------------------------------------------------------------


def render_config(config: BgpConfig, relay: Sequence[str]) -> str:
    """The ExaBGP config: one API process (the relay to pointsman) and one neighbor per peer.

    No static routes: every announcement comes through the API, so a route exists only while
    pointsman asks for it. Each peer negotiates the unicast family of its own address; a VIP is
    sent to the peers of its IP version.
    """
    for arg in relay:
        if _UNSAFE.search(arg):
            raise ValueError(f"cannot pass {arg!r} to ExaBGP's `run` (white space or config syntax)")
    lines = [
        f"process {PROCESS_NAME} {{",
        f"    run {' '.join(relay)};",
        "    encoder text;",
        "}",
    ]
    for peer in config.peers:
        family = "ipv4" if ipaddress.ip_address(peer.address).version == 4 else "ipv6"
        lines += [
            "",
            f"neighbor {peer.address} {{",
            f"    router-id {config.router_id};",
            f"    local-as {config.asn};",
            f"    peer-as {peer.asn};",
            f"    hold-time {round(peer.hold_time)};",
        ]
        if peer.local_address is not None:
            lines.append(f"    local-address {peer.local_address};")
        if peer.port != 179:
            lines.append(f"    connect {peer.port};")
        lines += [
            "    adj-rib-out true;",  # a session that comes back gets our routes again
            f"    family {{ {family} unicast; }}",
            f"    api {{ processes [ {PROCESS_NAME} ]; neighbor-changes; }}",
            "}",
        ]
    return "\n".join(lines) + "\n"


def environment(user: str) -> dict[str, str]:
    """ExaBGP settings given as environment variables (they override any exabgp.env file).

    - run as `user` and do not drop privileges: as root in a network namespace ExaBGP otherwise
      switches to "nobody" and cannot run the relay or read the config we wrote (0700 directory);
    - no CLI named pipes: pointsman is the only controller, and the pipes need a writable /run;
    - never respawn the relay: a relay that dies means pointsman lost ExaBGP, and pointsman then
      restarts both together, from a clean RIB;
    - acks on: each command answers `done` or `error`, which is how a withdraw is known to be in
      ExaBGP's RIB before shutdown goes on;
    - no listening socket: ExaBGP connects out to each peer (routers usually peer that way with
      route-server-like speakers) and never competes for port 179 on the node.
    """
    return {
        "exabgp_daemon_user": user,
        "exabgp_daemon_drop": "false",
        "exabgp_daemon_daemonize": "false",
        "exabgp_api_cli": "false",
        "exabgp_api_respawn": "false",
        "exabgp_api_ack": "true",
        "exabgp_api_encoder": "text",
        "exabgp_tcp_bind": "",
        "exabgp_log_destination": "stdout",
        "exabgp_log_statistics": "false",
    }


def plain(line: str) -> str:
    """An ExaBGP log line without its colour codes."""
    return _ANSI.sub("", line).rstrip()
