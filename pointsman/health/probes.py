"""Active probes: one short-lived connection, datagram or process per check, bounded by a timeout.

This is the thin I/O layer; judging replies lives in `dialects` (sans I/O). `probe` never raises
for anything the peer or the network does: every failure becomes `ProbeResult(ok=False)` with a
short detail for the status page ("refused", "timeout", "status 503", "no match", "tls: ...").
Only cancellation propagates, so the owner can stop a check at any time.

`exec` runs a command (no shell) in its own session, so that on timeout or cancellation the
whole process group it may have started is killed, never only its first process; helpers left
behind by a command that did exit are killed too, so checks cannot pile up processes.
`agent` reads one line from an HAProxy-style agent; its reply rides on the result (`agent`) and
may carry no health verdict at all (`counts=False`: "drain" or "75%" alone).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import signal
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, get_args

from pointsman.health.dialects import (
    MAX_AGENT_LINE,
    MAX_REPLY_BYTES,
    AgentReply,
    BadReply,
    build_http_request,
    expect_matches,
    host_header,
    parse_agent_line,
    parse_http_status,
)

__all__ = ["PROBE_TYPES", "ProbeResult", "ProbeSpec", "ProbeType", "probe"]

ProbeType = Literal["tcp", "send_expect", "http", "tls", "udp", "exec", "agent", "none"]
PROBE_TYPES: frozenset[str] = frozenset(get_args(ProbeType))

# Read size per recv; replies are small, and MAX_REPLY_BYTES bounds the total.
_READ_CHUNK = 4096

# Output of an exec check kept for the status page (its first line is shown). A check that
# prints more is not wrong; the rest is read and dropped so the command never blocks on a pipe.
MAX_EXEC_OUTPUT = 4096


@dataclass(frozen=True, slots=True)
class ProbeSpec:
    """How to check one backend. Built by the config layer; immutable and shareable."""

    type: ProbeType = "tcp"
    timeout: float = 1.0
    send: bytes | None = None
    expect: bytes | None = None
    expect_regex: re.Pattern[bytes] | None = None
    http_path: str = "/"
    http_host: str | None = None  # None: the backend's address and port
    http_expect_status: tuple[int, ...] = (200,)
    tls_server_name: str | None = None  # SNI; None: no SNI for an IP, else the host name
    tls_verify: bool = False  # False: the handshake must succeed, the chain is not checked
    command: tuple[str, ...] = ()  # exec: argv
    environment: tuple[tuple[str, str], ...] = ()  # exec: added to pointsman's environment

    def __post_init__(self) -> None:
        if self.type not in PROBE_TYPES:
            raise ValueError(f"unknown health check type {self.type!r}")
        if not self.timeout > 0:
            raise ValueError(f"health check timeout must be positive, got {self.timeout}")
        if self.type == "udp" and self.send is None:
            raise ValueError("a udp health check needs a payload to send")
        if self.type == "exec" and not self.command:
            raise ValueError("an exec health check needs a command")
        if self.type == "http":
            if not self.http_expect_status:
                raise ValueError("http expect_status must list at least one status")
            # Validates path and host once, at config time, not on every probe.
            build_http_request(self.http_path, self.http_host or "example")


@dataclass(frozen=True, slots=True)
class ProbeResult:
    ok: bool
    latency: float  # seconds from start to verdict
    detail: str
    agent: AgentReply | None = None  # an agent check's reply, applied by the pool
    counts: bool = True  # False: no health verdict in it (rise/fall ignore it)


_Outcome = tuple[bool, str]
_Runner = Callable[[ProbeSpec, str, int], Awaitable[_Outcome]]


async def probe(spec: ProbeSpec, host: str, port: int) -> ProbeResult:
    """Run one check of `spec` against host:port. What the backend does (refuse, time out, reset,
    answer wrongly) is a failed result; anything else raised is a bug in our probe code and
    propagates, so the node's task supervisor logs it with its traceback and counts it, and the
    backend's state is left alone (a bug is never a verdict on the backend)."""
    # time.monotonic, not loop.time(): uvloop's clock has millisecond resolution.
    start = time.monotonic()
    agent: AgentReply | None = None
    try:
        async with asyncio.timeout(spec.timeout):
            if spec.type == "agent":
                agent = await _agent(spec, host, port)
                ok, detail = agent.state != "down", str(agent)
            else:
                ok, detail = await _RUNNERS[spec.type](spec, host, port)
    except TimeoutError:
        ok, detail = False, "timeout"
    except ConnectionRefusedError:
        ok, detail = False, "refused"
    except ssl.SSLError as exc:
        ok, detail = False, f"tls: {exc.reason or exc}"
    except BadReply as exc:
        ok, detail = False, f"bad reply: {exc}"
    except OSError as exc:
        ok, detail = False, _os_detail(spec, exc)
    counts = agent is None or agent.state is not None
    return ProbeResult(ok, time.monotonic() - start, detail, agent, counts)


def _os_detail(spec: ProbeSpec, exc: OSError) -> str:
    if isinstance(exc, ConnectionResetError):
        text = "connection reset"
    else:
        text = (exc.strerror or str(exc) or type(exc).__name__).lower()
    return f"tls: {text}" if spec.type == "tls" else text


async def _none(spec: ProbeSpec, host: str, port: int) -> _Outcome:
    return True, "no check"


async def _tcp(spec: ProbeSpec, host: str, port: int) -> _Outcome:
    _, writer = await asyncio.open_connection(host, port)
    writer.transport.abort()
    return True, "connected"


async def _send_expect(spec: ProbeSpec, host: str, port: int) -> _Outcome:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        if spec.send:
            writer.write(spec.send)
            await writer.drain()
        if spec.expect is None and spec.expect_regex is None:
            return True, "sent"
        reply = b""
        while len(reply) < MAX_REPLY_BYTES:
            chunk = await reader.read(min(_READ_CHUNK, MAX_REPLY_BYTES - len(reply)))
            if not chunk:
                return False, "no match" if reply else "closed without reply"
            reply += chunk
            if expect_matches(reply, spec.expect, spec.expect_regex):
                return True, "matched"
        return False, f"no match in {MAX_REPLY_BYTES} bytes"
    finally:
        writer.transport.abort()


async def _http(spec: ProbeSpec, host: str, port: int) -> _Outcome:
    request = build_http_request(spec.http_path, spec.http_host or host_header(host, port))
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        await writer.drain()
        data = b""
        while (status := parse_http_status(data)) is None:
            chunk = await reader.read(_READ_CHUNK)
            if not chunk:
                return False, "closed before status"
            data += chunk
        return status in spec.http_expect_status, f"status {status}"
    finally:
        writer.transport.abort()


async def _tls(spec: ProbeSpec, host: str, port: int) -> _Outcome:
    context = _client_context(spec.tls_verify)
    server_name = spec.tls_server_name or host
    _, writer = await asyncio.open_connection(host, port, ssl=context, server_hostname=server_name)
    version = writer.get_extra_info("ssl_object").version()
    writer.transport.abort()
    return True, f"handshake ok ({version})"


@functools.cache
def _client_context(verify: bool) -> ssl.SSLContext:
    """One context per mode, built once: loading the CA store on every probe costs milliseconds."""
    if verify:
        return ssl.create_default_context()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class _OneReply(asyncio.DatagramProtocol):
    """Resolves `reply` with the first datagram, or with the error the socket reports."""

    def __init__(self, reply: asyncio.Future[bytes]) -> None:
        self.reply = reply

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        if not self.reply.done():
            self.reply.set_result(data)

    def error_received(self, exc: Exception) -> None:
        # On a connected UDP socket Linux reports an ICMP port unreachable as ECONNREFUSED.
        if not self.reply.done():
            self.reply.set_exception(exc)


async def _udp(spec: ProbeSpec, host: str, port: int) -> _Outcome:
    loop = asyncio.get_running_loop()
    reply: asyncio.Future[bytes] = loop.create_future()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: _OneReply(reply), remote_addr=(host, port)
    )
    try:
        transport.sendto(spec.send or b"")
        data = await reply
    finally:
        transport.abort()
    if expect_matches(data[:MAX_REPLY_BYTES], spec.expect, spec.expect_regex):
        return True, "matched"
    return False, "no match"


async def _agent(spec: ProbeSpec, host: str, port: int) -> AgentReply:
    """Connect, send `send` if any (HAProxy's agent-send), read one line (or up to the close)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        if spec.send:
            writer.write(spec.send)
            await writer.drain()
        data = b""
        while b"\n" not in data and len(data) <= MAX_AGENT_LINE:
            chunk = await reader.read(_READ_CHUNK)
            if not chunk:
                break
            data += chunk
    finally:
        writer.transport.abort()
    line, newline, _ = data.partition(b"\n")
    if not data:
        raise BadReply("closed without reply")
    if len(line) > MAX_AGENT_LINE or (not newline and len(data) > MAX_AGENT_LINE):
        raise BadReply(f"agent reply longer than {MAX_AGENT_LINE} bytes")
    return parse_agent_line(line)


async def _exec(spec: ProbeSpec, host: str, port: int) -> _Outcome:
    """Run the command; exit status 0 passes. The first output line is the detail."""
    env = {**os.environ, **dict(spec.environment),
           "POINTSMAN_CHECK_HOST": host, "POINTSMAN_CHECK_PORT": str(port)}
    proc = await asyncio.create_subprocess_exec(
        *spec.command, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, env=env, start_new_session=True)
    output = bytearray()
    try:
        assert proc.stdout is not None
        async with asyncio.TaskGroup() as group:
            group.create_task(_read_capped(proc.stdout, output))
            status = await proc.wait()
            _kill_group(proc.pid)  # helpers it left behind would keep the pipe (and run) on
    finally:
        if proc.returncode is None:  # timeout or cancellation: the whole group goes
            _kill_group(proc.pid)
            await proc.wait()
    first = bytes(output).strip().split(b"\n", 1)[0].decode("utf-8", "replace")[:200]
    detail = f"killed by signal {-status}" if status < 0 else f"exit {status}"
    return status == 0, f"{detail}: {first}" if first else detail


async def _read_capped(stream: asyncio.StreamReader, into: bytearray) -> None:
    while chunk := await stream.read(_READ_CHUNK):
        if len(into) < MAX_EXEC_OUTPUT:
            into += chunk[: MAX_EXEC_OUTPUT - len(into)]


def _kill_group(pgid: int) -> None:
    """SIGKILL the process group the check command leads (it was started in its own session)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


_RUNNERS: dict[str, _Runner] = {
    "none": _none,
    "tcp": _tcp,
    "send_expect": _send_expect,
    "http": _http,
    "tls": _tls,
    "udp": _udp,
    "exec": _exec,
}
