"""The messages between a control process and its workers: typed values, one codec, one channel.

Every message is a frozen dataclass below; nothing else crosses the channel. A frame is a 4-byte
big-endian length and a pickle of one message. Pickle keeps the config and the statistics
objects exact (resolved addresses, enums, histograms) without a second schema; the decoder only
rebuilds classes (never calls functions) and only classes of this package and a few builtins, and
refuses anything that is not a message. The channel is a private socketpair between processes
of one node, so the codec guards against our own bugs, not against an attacker.

Handshake: the control process sends `Start` first; the worker answers `Ready` (or
`StartFailed`). Both carry `IPC_VERSION`, and each side refuses a peer of another version (a
worker left over from an upgrade must not run a newer control's messages).

Control -> worker: Start, PoolEvent/WeightSet/AgentScaleSet (the owner's decisions, in order),
ListenerAcl (an allow/deny list set through the admin API), CloseConnections (a drain timed out,
or maintenance with close: the owner decides when, each worker closes its own), ApplyConfig
(also how backends added or removed at run time reach the workers), Stop.
Worker -> control: Ready/StartFailed, Signal (passive connect outcomes), StatsReport (every
half second), ConfigApplied, Stopped.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import io
import pickle
import socket
import struct
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, cast

from pointsman.config.model import Config
from pointsman.node.activation import PassedSocket
from pointsman.pool.events import AgentScale, BackendEvent, PassiveSignal, PoolState, WeightChange
from pointsman.telemetry.flow import EndReason
from pointsman.telemetry.process import ProcessFigures
from pointsman.telemetry.stats import BackendStats, ListenerStats, PoolStats
from pointsman.telemetry.udp_stats import UdpListenerStats

IPC_VERSION = 1

# A config with thousands of backends pickles to a few MiB; a frame past this is a bug.
MAX_FRAME = 64 * 1024 * 1024
_HEADER = struct.Struct("!I")


class IpcError(Exception):
    """A frame that is not one of our messages, or a peer of another version."""


# --- control -> worker ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ListenerAcl:
    """A listener's allow or deny list set at run time (the admin API), for the workers that
    serve it."""

    listener: str
    kind: Literal["allow", "deny"]
    prefixes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Start:
    version: int
    index: int
    workers: int
    config: Config
    pools: tuple[PoolState, ...]  # the owner's decisions so far
    acls: tuple[ListenerAcl, ...] = ()  # lists set at run time so far
    # Sockets systemd passed to the control process; the worker has them under the same numbers
    # (pass_fds) and accepts on them instead of binding those addresses.
    sockets: tuple[PassedSocket, ...] = ()


@dataclass(frozen=True, slots=True)
class CloseConnections:
    """Close this worker's connections (and UDP sessions) to one backend of one pool now."""

    pool: str
    backend: str
    reason: EndReason


@dataclass(frozen=True, slots=True)
class PoolEvent:
    event: BackendEvent


@dataclass(frozen=True, slots=True)
class WeightSet:
    change: WeightChange


@dataclass(frozen=True, slots=True)
class AgentScaleSet:
    change: AgentScale


@dataclass(frozen=True, slots=True)
class ApplyConfig:
    seq: int
    config: Config


@dataclass(frozen=True, slots=True)
class Stop:
    grace: float


# --- worker -> control ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ready:
    version: int
    index: int
    pid: int


@dataclass(frozen=True, slots=True)
class StartFailed:
    index: int
    error: str


@dataclass(frozen=True, slots=True)
class Signal:
    signal: PassiveSignal


ListenerStatistics = ListenerStats | UdpListenerStats


@dataclass(frozen=True, slots=True)
class StatsReport:
    """One worker's counters at one moment (each object is consistent: taken in one callback)."""

    index: int
    listeners: Mapping[str, ListenerStatistics]
    accepting: frozenset[str]  # listeners this worker has bound and accepts on
    backends: Mapping[tuple[str, str], BackendStats]  # (pool, backend id)
    process: ProcessFigures
    flow_log_dropped: int
    # The oldest open connection by (listener, pool), in seconds, at `at` (time.monotonic(): one
    # clock for every process of the host).
    ages: Mapping[tuple[str, str], float] = field(default_factory=dict)
    at: float = 0.0
    pools: Mapping[str, PoolStats] = field(default_factory=dict)  # each pool's queue figures


@dataclass(frozen=True, slots=True)
class ConfigApplied:
    seq: int
    index: int
    errors: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Stopped:
    index: int


ToWorker = (Start | PoolEvent | WeightSet | AgentScaleSet | ListenerAcl | CloseConnections
            | ApplyConfig | Stop)
ToControl = Ready | StartFailed | Signal | StatsReport | ConfigApplied | Stopped
Message = ToWorker | ToControl
MESSAGES: tuple[type, ...] = (Start, PoolEvent, WeightSet, AgentScaleSet, ListenerAcl,
                              CloseConnections, ApplyConfig, Stop, Ready, StartFailed, Signal,
                              StatsReport, ConfigApplied, Stopped)

# --- codec ----------------------------------------------------------------------------------------

_BUILTINS = frozenset({"set", "frozenset", "slice", "complex", "bytearray", "range"})
_ALLOWED_MODULES = ("collections", "copyreg")


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> type:
        if module == "builtins" and name in _BUILTINS:
            found: object = getattr(builtins, name)
        elif (module.startswith("pointsman.") or module in _ALLOWED_MODULES) and "." not in name \
                and module in sys.modules:  # never import here: importing runs a module's code
            found = getattr(sys.modules[module], name, None)
            if module.startswith("pointsman.") and \
                    not str(getattr(found, "__module__", "")).startswith("pointsman."):
                raise IpcError(f"refusing {module}.{name}: not one of pointsman's classes")
        else:
            raise IpcError(f"refusing {module}.{name} in a message")
        if not isinstance(found, type) and (module, name) != ("copyreg", "_reconstructor"):
            raise IpcError(f"refusing {module}.{name}: not a class")
        return found  # type: ignore[return-value]


def encode(message: Message) -> bytes:
    """One frame: length and pickle."""
    if not isinstance(message, MESSAGES):
        raise IpcError(f"not a message: {type(message).__name__}")
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    if len(payload) > MAX_FRAME:
        raise IpcError(f"message of {len(payload)} bytes is over the {MAX_FRAME} byte frame limit")
    return _HEADER.pack(len(payload)) + payload


def decode(payload: bytes) -> Message:
    """The message in one frame's payload (without its length)."""
    try:
        message = _Unpickler(io.BytesIO(payload)).load()
    except IpcError:
        raise
    except Exception as exc:
        raise IpcError(f"undecodable frame: {exc!r}") from None
    if not isinstance(message, MESSAGES):
        raise IpcError(f"not a message: {type(message).__name__}")
    return cast(Message, message)


def check_version(version: int) -> None:
    if version != IPC_VERSION:
        raise IpcError(f"peer speaks IPC version {version}, this process {IPC_VERSION}")


# --- channel --------------------------------------------------------------------------------------


class Channel:
    """Frames over one end of a socketpair, with asyncio streams: sending never blocks the loop
    (frames queue in the transport; `buffered` lets the owner bound that queue)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def open(cls, sock: socket.socket) -> Channel:
        reader, writer = await asyncio.open_connection(sock=sock, limit=MAX_FRAME)
        return cls(reader, writer)

    def send(self, message: Message) -> None:
        """Queue one message; ConnectionError once the channel is closing."""
        if self._writer.is_closing():
            raise ConnectionResetError("channel closed")
        self._writer.write(encode(message))

    async def receive(self) -> Message:
        """The next message; EOFError when the peer has gone (IpcError on a bad frame)."""
        try:
            header = await self._reader.readexactly(_HEADER.size)
            (size,) = _HEADER.unpack(header)
            if size > MAX_FRAME:
                raise IpcError(f"frame of {size} bytes is over the {MAX_FRAME} byte limit")
            payload = await self._reader.readexactly(size)
        except (asyncio.IncompleteReadError, ConnectionError):
            raise EOFError("channel closed") from None
        return decode(payload)

    async def drain(self) -> None:
        with contextlib.suppress(ConnectionError):
            await self._writer.drain()

    @property
    def buffered(self) -> int:
        transport = self._writer.transport
        return transport.get_write_buffer_size() if not transport.is_closing() else 0

    def close(self) -> None:
        self._writer.close()
