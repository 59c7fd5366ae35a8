"""The thin adapter around one ExaBGP child process: start it, carry command lines to it, read its
messages, stop it without leaving a process behind.

    pointsman ── Unix socket ── relay (ExaBGP's API helper) ── stdin/stdout ── ExaBGP ── BGP ── router

ExaBGP runs in its own session (process group), so stopping it is one killpg. The relay is put in
a group of its own by ExaBGP; it exits when ExaBGP's pipes close, and if it has not once ExaBGP is
gone, pointsman kills it by the pid the kernel reports for the socket's peer (SO_PEERCRED).
No decisions here: the announcer says what to send, this module only sends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import importlib.util
import logging
import os
import pwd
import shutil
import signal
import socket
import struct
import sys
import tempfile
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from pointsman.bgp import exabgp
from pointsman.bgp.exabgp import Kind, LineSplitter, Message, ProtocolError
from pointsman.bgp.relay import DIRECTORY_PREFIX
from pointsman.config.model import BgpConfig

log = logging.getLogger("pointsman.bgp")
exabgp_log = logging.getLogger("pointsman.bgp.exabgp")

RELAY_CONNECT_TIMEOUT = 30.0  # ExaBGP imports, parses its config and runs the relay: ~0.3 s here
TERM_TIMEOUT = 5.0  # ExaBGP's shutdown waits up to 2 s per helper; then SIGKILL
RELAY_EXIT_TIMEOUT = 3.0  # after ExaBGP is gone the relay sees EOF at once
LOG_TAIL = 30  # ExaBGP output lines kept to explain an unexpected exit


class State(enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"  # ExaBGP runs; its relay has not connected yet
    RUNNING = "running"  # commands flow
    STOPPING = "stopping"
    FAILED = "failed"  # gone without being asked: the announcer restarts a new speaker


class SpeakerError(RuntimeError):
    """ExaBGP could not be started (not installed, bad command, cannot write its config)."""


def default_command() -> list[str]:
    return [sys.executable, "-m", "exabgp"]


class ExaBgpSpeaker:
    def __init__(
        self,
        config: BgpConfig,
        on_running: Callable[[], None],
        on_message: Callable[[Message], None],
        on_failed: Callable[[str], None],
    ) -> None:
        self.config = config
        self._on_running = on_running
        self._on_message = on_message
        self._on_failed = on_failed
        self.state = State.STOPPED
        self.peers: dict[str, str] = {}  # peer address -> "connected", "up", "down: <reason>"
        self.pid: int | None = None
        self.relay_pid: int | None = None
        self.commands_sent = 0
        self.errors = 0
        self._loop = asyncio.get_running_loop()
        self._dir: Path | None = None
        self._server: asyncio.AbstractServer | None = None
        self._relay: _RelayProtocol | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._connect_timer: asyncio.TimerHandle | None = None
        # Commands sent and not yet answered. ExaBGP answers each command once but not in order
        # (a bad line at once, a route once its reactor ran it), so answers are counted, not paired.
        self._pending = 0
        self._acked = asyncio.Event()
        self._acked.set()
        self._tail: deque[str] = deque(maxlen=LOG_TAIL)

    # --- start ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen for the relay, write ExaBGP's config, run ExaBGP. Returns once it is spawned."""
        command = list(self.config.exabgp_command or default_command())
        if self.config.exabgp_command is None and importlib.util.find_spec("exabgp") is None:
            raise SpeakerError("ExaBGP is not installed for this Python: pip install 'pointsman[bgp]'")
        if shutil.which(command[0]) is None:
            raise SpeakerError(f"cannot find the ExaBGP command {command[0]!r}")
        self._dir = Path(tempfile.mkdtemp(prefix=DIRECTORY_PREFIX))
        sock_path = self._dir / "api.sock"
        relay = [sys.executable, "-I", str(Path(__file__).with_name("relay.py")), str(sock_path)]
        conf_path = self._dir / "exabgp.conf"
        self.state = State.STARTING  # before any await: the relay may connect at once
        try:
            conf_path.write_text(exabgp.render_config(self.config, relay))
            self._server = await self._loop.create_unix_server(
                lambda: _RelayProtocol(self), str(sock_path))
            env = {**os.environ, **exabgp.environment(pwd.getpwuid(os.getuid()).pw_name)}
            self._process = await asyncio.create_subprocess_exec(
                *command, str(conf_path),
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, env=env, start_new_session=True,
                cwd=str(self._dir),
            )
        except (OSError, ValueError) as exc:
            self.state = State.STOPPED
            await self._cleanup()
            raise SpeakerError(f"cannot start ExaBGP ({' '.join(command)}): {exc}") from exc
        self.pid = self._process.pid
        self._reader = self._loop.create_task(self._read_output(self._process),
                                              name="bgp:exabgp-output")
        self._connect_timer = self._loop.call_later(RELAY_CONNECT_TIMEOUT, self._fail,
                                                    "ExaBGP did not run its API helper in time")
        log.info("bgp: started ExaBGP (pid %d)", self.pid)

    async def _read_output(self, process: asyncio.subprocess.Process) -> None:
        """ExaBGP's log goes to ours at debug level; its last lines explain an unexpected exit."""
        stream = process.stdout
        assert stream is not None
        while True:
            try:
                line = await stream.readline()
            except ValueError:  # a line past the stream's limit: dropped, keep reading
                continue
            if not line:
                break
            text = exabgp.plain(line.decode(errors="replace"))
            if text:
                self._tail.append(text)
                exabgp_log.debug("%s", text)
        code = await process.wait()
        if self.state in (State.STARTING, State.RUNNING):
            tail = "\n".join(self._tail)
            self._fail(f"ExaBGP exited with status {code}; its last output:\n{tail}")

    # --- relay connection (called by _RelayProtocol) ------------------------------------------------

    def _relay_connected(self, relay: _RelayProtocol) -> bool:
        if self._relay is not None or self.state is not State.STARTING:
            return False  # one relay per ExaBGP: anything else is not ours
        self._relay = relay
        self.relay_pid = relay.peer_pid
        if self._connect_timer is not None:
            self._connect_timer.cancel()
        self.state = State.RUNNING
        log.info("bgp: ExaBGP API connected (relay pid %s)", self.relay_pid)
        self._on_running()
        return True

    def _relay_message(self, message: Message) -> None:
        if message.kind in (Kind.DONE, Kind.ERROR):
            if message.kind is Kind.ERROR:
                self.errors += 1
                log.warning("bgp: ExaBGP refused a command")
            self._pending = max(self._pending - 1, 0)
            if self._pending == 0:
                self._acked.set()
        elif message.kind is Kind.PEER_UP and message.peer:
            self.peers[message.peer] = "up"
            log.info("bgp: session with %s established", message.peer)
        elif message.kind is Kind.PEER_CONNECTED and message.peer:
            self.peers[message.peer] = "connected"
        elif message.kind is Kind.PEER_DOWN and message.peer:
            was_up = self.peers.get(message.peer) == "up"
            self.peers[message.peer] = f"down: {message.detail}"
            # A session that was up going down matters; failed attempts repeat every few seconds.
            log.log(logging.WARNING if was_up and self.state is State.RUNNING else logging.DEBUG,
                    "bgp: session with %s down: %s", message.peer, message.detail)
        self._on_message(message)

    def _relay_lost(self, relay: _RelayProtocol, reason: str) -> None:
        if relay is not self._relay:
            return
        self._relay = None
        self._pending = 0
        self._acked.set()
        if self.state is State.RUNNING:
            self._fail(f"lost ExaBGP's API helper: {reason}")

    def _fail(self, reason: str) -> None:
        if self.state not in (State.STARTING, State.RUNNING):
            return
        log.error("bgp: %s", reason)
        self.state = State.FAILED
        self._on_failed(reason)

    # --- commands ------------------------------------------------------------------------------

    def send(self, lines: list[str]) -> bool:
        """Write command lines; False (nothing written) unless the API is connected."""
        relay = self._relay
        if self.state is not State.RUNNING or relay is None or not lines:
            return not lines
        relay.write("".join(lines).encode("ascii"))
        self.commands_sent += len(lines)
        self._pending += len(lines)
        self._acked.clear()
        return True

    async def wait_acked(self, timeout: float) -> bool:
        """Wait until ExaBGP acknowledged every command sent; False on timeout or lost API."""
        try:
            async with asyncio.timeout(timeout):
                await self._acked.wait()
        except TimeoutError:
            return False
        return self.state is State.RUNNING

    # --- stop ----------------------------------------------------------------------------------

    async def stop(self) -> None:
        """SIGTERM ExaBGP's process group (it closes its sessions: peers drop our routes), SIGKILL
        after TERM_TIMEOUT; then make sure the relay is gone too; remove the temporary files."""
        if self.state is State.STOPPED:
            return
        self.state = State.STOPPING
        if self._connect_timer is not None:
            self._connect_timer.cancel()
        process = self._process
        if process is not None and process.returncode is None:
            _killpg(process.pid, signal.SIGTERM)
            try:
                async with asyncio.timeout(TERM_TIMEOUT):
                    await process.wait()
            except TimeoutError:
                log.warning("bgp: ExaBGP ignored SIGTERM for %.0fs; killing it", TERM_TIMEOUT)
                _killpg(process.pid, signal.SIGKILL)
                await process.wait()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        relay = self._relay
        if relay is not None and not await relay.wait_closed(RELAY_EXIT_TIMEOUT):
            if relay.peer_pid is not None:
                log.warning("bgp: relay %d outlived ExaBGP; killing it", relay.peer_pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(relay.peer_pid, signal.SIGKILL)
            relay.abort()
        await self._cleanup()
        self.state = State.STOPPED
        log.info("bgp: ExaBGP stopped")

    async def _cleanup(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    @property
    def directory(self) -> Path | None:
        """The private directory holding ExaBGP's config and the relay's socket (while running)."""
        return self._dir

    def statistics(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "pid": self.pid,
            "relay_pid": self.relay_pid,
            "peers": dict(self.peers),
            "commands_sent": self.commands_sent,
            "commands_refused": self.errors,
            "commands_pending": self._pending,
        }


def _killpg(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


class _RelayProtocol(asyncio.Protocol):
    """pointsman's end of the relay's socket: lines in, command bytes out."""

    def __init__(self, speaker: ExaBgpSpeaker) -> None:
        self._speaker = speaker
        self._splitter = LineSplitter()
        self._transport: asyncio.WriteTransport | None = None
        self._closed = asyncio.get_running_loop().create_future()
        self.peer_pid: int | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: keep the declared type.
        self._transport = cast(asyncio.WriteTransport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            self.peer_pid = struct.unpack("3i", creds)[0]
        if not self._speaker._relay_connected(self):
            transport.close()

    def data_received(self, data: bytes) -> None:
        try:
            lines = self._splitter.feed(data)
        except ProtocolError as exc:
            log.error("bgp: %s", exc)
            self.abort()
            return
        for line in lines:
            message = exabgp.parse_line(line)
            if message is not None:
                self._speaker._relay_message(message)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._closed.done():
            self._closed.set_result(None)
        self._speaker._relay_lost(self, str(exc) if exc else "closed")

    def write(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    async def wait_closed(self, timeout: float) -> bool:
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._closed)
        except TimeoutError:
            return False
        return True
