"""The contract between a connection engine and the Python policy that drives it.

An engine owns the I/O of TCP connections (accept, connect, relay, half-close, resets, splice,
timers, close); the policy owns every decision (admission, preamble parsing, the pick, retries)
and all telemetry. They talk through a few calls, so a plain connection costs about two Python
calls (the accept decision and the connect outcome), and what the engine reports in bulk (ended
connections) arrives in one packed buffer per listener per engine wake-up.

Engine -> policy (one policy object per listener; see `Policy`):
- `accepted(conn_id, host, port)` returns a decision for a new connection;
- `preamble(conn_id, data)` gets every byte received so far while a preamble is read, and
  returns None (need more) or a decision;
- `connect_result(conn_id, backend, status, err, elapsed)` reports one connect attempt; after a
  failure its return value is the next decision (another target: a retry; None: give up). A
  success through a *quiet* target (`engine.target(..., quiet=True)`) is not reported: the
  engine counts it on the target (`target.connected`), marks the record (`Flag.QUIET`, with
  the attempt's start in `attempt`) and packs it for `connected`, so a plain connection costs
  one Python call, not two;
- `connected(entries)`, when the policy has it (optional): the quiet successes of one wake-up,
  packed (`CONNECTED`: conn_id, backend, elapsed ns), handed over after that listener's
  `admitted` and before its `ended` (the connections they name are still open to the policy);
- `admitted(batch)`, when the policy has it (optional) and gave the engine a fast table
  (`engine.set_fast`): the connections the engine admitted without asking, as
  `(conn_id, backend, accepted ns, host, port)` tuples in accept order, handed over before any
  other call about that listener;
- `ended(records)` gets the packed records (`RECORD`) of connections that ended;
- `accept_error(errno)`, when the policy has it (optional): accept() failed on its listener
  (rare, and worth a log line: one call each).

Decisions: a target made by `engine.target(...)` (connect there, nothing to send first),
`Connect(target, send_first, consume, source)`, `ReadPreamble(...)`, `Refuse(code)`, or `Hold()`
(keep the connection, read nothing, connect nothing: a queued connection), continued later with
`engine.resume(conn_id, decision)`.

Codes the policy passes (refusal codes, operator close codes) are small integers the engine
stores and hands back untouched: the engine has no vocabulary of reasons of its own beyond `End`.
"""

from __future__ import annotations

import enum
import errno
import socket
import struct
from collections.abc import Iterator
from typing import NamedTuple, Protocol

# Bytes read from a client before its backend is connected (preamble included); past this the
# client is not read until the backend takes them: a PROXY v2 header (4 KiB cap) plus a
# ClientHello (16 KiB) fit.
EARLY_DATA_MAX = 64 * 1024
# One read. A direction with bytes its destination has not taken is not read again until they
# are taken (crossed watermarks with high = one read, low = empty), so a connection holds at most
# two reads of user memory, below the Python path's ~2 x (256 KiB + one read).
READ_CHUNK = 64 * 1024
# Bytes moved per direction per engine wake-up before the connection yields to the others.
WAKE_BUDGET = 1 << 20
# Accepts per listener per wake-up: new connections cannot starve established ones.
ACCEPT_BATCH = 64
# After EMFILE/ENFILE/ENOBUFS/ENOMEM on accept, a listener rests this long (or until one of our
# connections closes and frees a descriptor) instead of spinning on a full backlog.
ACCEPT_BACKOFF = 0.1
# Timer wheel resolution: timeouts fire within one tick after they are due.
TICK = 0.01
# splice(2) pipe per direction once a connection moves to zero copy.
PIPE_SIZE = 1 << 20
NEVER = (1 << 63) - 1  # splice_after when zero copy is off
# Record details the engine sets itself: the policy raised (or returned no decision), and an
# unexpected error inside the engine while handling this connection's event (logged).
POLICY_ERROR = 0xFFFF
ENGINE_ERROR = 0xFFFE


class Status(enum.IntEnum):
    """Outcome of one connect attempt."""

    OK = 0
    BACKEND = 1  # the backend failed: refused, unreachable, timed out (ETIMEDOUT)
    LOCAL = 2  # our own resources ran out: never the backend's fault


class Op(enum.IntEnum):
    """The call a local resource error came from (the `op` label of the local error counters)."""

    SOCKET = 0
    BIND = 1
    CONNECT = 2
    PIPE = 3


class End(enum.IntEnum):
    """How a connection ended: the `reason` field of a record."""

    CLIENT_FIN = 1  # both sides finished; the client's FIN came first
    BACKEND_FIN = 2
    CLIENT_RESET = 3  # the client reset; the backend got a reset
    BACKEND_RESET = 4
    IDLE_TIMEOUT = 5
    HALF_CLOSE_TIMEOUT = 6  # one side sent FIN and the other stopped moving
    CONNECT_FAILED = 7  # the policy gave up after backend failures (detail: last errno)
    LOCAL_RESOURCE = 8  # the policy gave up after a local resource error (detail: errno)
    REFUSED = 9  # the policy refused it, or its preamble timed out / overflowed (detail: code)
    CLOSED = 10  # an operator call cut it (detail: the caller's code)
    # A side's socket failed with ETIMEDOUT once connected (keepalive probes or retransmissions
    # unanswered: the peer is gone); handled as that side's reset, so the other side gets one.
    CLIENT_TIMEOUT = 11
    BACKEND_TIMEOUT = 12


class Flag(enum.IntFlag):
    """What happened on the way, whatever the end reason (a record's `flags`)."""

    CLIENT_FIN = 1  # the client sent FIN
    BACKEND_FIN = 2
    CLIENT_RESET = 4  # the client side reset (or was cut with a reset by us)
    BACKEND_RESET = 8
    CONNECTED = 16  # a backend connection was established
    SPLICED = 32  # moved to splice(2)
    # Connected through a quiet target: `connect_result` was not called for the success; the
    # record's `connected - attempt` is the elapsed time it would have been given.
    QUIET = 64


# Errors from socket()/bind()/connect()/pipe() that say our process or host ran out of something.
LOCAL_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM,
                          errno.EADDRNOTAVAIL})
# accept() errors after which the listener backs off (the next accept would fail the same way).
BACKOFF_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def classify(op: Op, err: int) -> Status:
    """Whose fault a failed connect step is. A source address already in use (EADDRINUSE on
    bind) is ours as well: the backend never saw the attempt."""
    if err in LOCAL_ERRNOS or (op is Op.BIND and err == errno.EADDRINUSE):
        return Status.LOCAL
    if op is Op.PIPE:
        return Status.LOCAL
    return Status.BACKEND


# --- TCP keepalive ----------------------------------------------------------------------------

# The kernel's bounds (include/net/tcp.h: MAX_TCP_KEEPIDLE, MAX_TCP_KEEPINTVL, MAX_TCP_KEEPCNT).
KEEPIDLE_MAX = 32767
KEEPINTVL_MAX = 32767
KEEPCNT_MAX = 127


class Keepalive(NamedTuple):
    """SO_KEEPALIVE with TCP_KEEPIDLE / TCP_KEEPINTVL (whole seconds) and TCP_KEEPCNT: after
    `idle` seconds without a byte, a probe every `interval` seconds; `probes` unanswered ones
    and the socket fails with ETIMEDOUT (the connection then ends as End.*_TIMEOUT)."""

    idle: int
    interval: int
    probes: int  # the config's `count` (a tuple has a count() already)

    def check(self) -> Keepalive:
        if not (0 < self.idle <= KEEPIDLE_MAX and 0 < self.interval <= KEEPINTVL_MAX
                and 0 < self.probes <= KEEPCNT_MAX):
            raise ValueError(f"keepalive out of the kernel's range: {self}")
        return self


def set_keepalive(sock: socket.socket, keepalive: Keepalive | None) -> None:
    """Put `keepalive` in force on `sock` (None: SO_KEEPALIVE off). On a listening socket it is
    what every socket accepted from then on inherits (Linux copies the options at accept), so a
    listener's keepalive costs no system call per connection."""
    if keepalive is None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 0)
        return
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, keepalive.idle)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, keepalive.interval)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, keepalive.probes)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


def set_nodelay(sock: socket.socket, nodelay: bool) -> bool:
    """Put TCP_NODELAY (on or off) on the listening socket `sock`: Linux copies it to every
    socket accepted from it, like keepalive, so a listener's connections need no system call of
    their own for it. False when the socket refused it (then set it on each accepted socket)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1 if nodelay else 0)
    except OSError:
        return False
    return True


# --- decisions --------------------------------------------------------------------------------


class Refuse:
    """Close the connection now, nothing forwarded; `code` comes back in the record's detail."""

    __slots__ = ("code",)

    def __init__(self, code: int) -> None:
        self.code = code

    def __repr__(self) -> str:
        return f"Refuse({self.code})"


class ReadPreamble:
    """Read the client first: `preamble(conn_id, data)` is called as bytes arrive, until it
    returns a decision. Refused with `timeout_code` after `timeout` seconds, or with
    `overflow_code` once `max_bytes` (at most EARLY_DATA_MAX) arrived without a decision."""

    __slots__ = ("max_bytes", "overflow_code", "timeout", "timeout_code")

    def __init__(self, max_bytes: int, timeout: float, timeout_code: int, overflow_code: int) -> None:
        if not 0 < max_bytes <= EARLY_DATA_MAX:
            raise ValueError(f"max_bytes must be in 1..{EARLY_DATA_MAX}")
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.timeout_code = timeout_code
        self.overflow_code = overflow_code


class Target(Protocol):
    """Where to connect: made once per backend by `engine.target(...)`, reused by every
    connection (each engine has its own concrete type, parsed and validated when made)."""

    @property
    def backend(self) -> int: ...


class Connect:
    """Connect to `target`, after dropping `consume` bytes from the front of what the client
    sent (a PROXY header), and send `send_first` (a PROXY header of ours) before the rest.
    `source` overrides the target's source address (transparent mode: the client's address)."""

    __slots__ = ("consume", "send_first", "source", "target")

    def __init__(self, target: Target, send_first: bytes = b"", consume: int = 0,
                 source: str | None = None) -> None:
        self.target = target
        self.send_first = send_first
        self.consume = consume
        self.source = source


class Hold:
    """Keep the connection as it is: read nothing more from the client, connect nothing, no
    timer (the policy owns the wait: a queue with its own deadline). `engine.resume(conn_id,
    decision)` continues it with a target, `Connect` or `Refuse`. A held client that sends FIN
    or resets is ended at once (`CLIENT_FIN` / `CLIENT_RESET`): without reading it, that is the
    only sign it gave up (HAProxy's `option abortonclose`). Allowed from `accepted` and
    `preamble` only."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "Hold()"


HOLD = Hold()  # stateless: one instance serves every connection

Decision = Target | Connect | Refuse | ReadPreamble | Hold


class Policy(Protocol):
    """What an engine calls, one object per listener, always on the event loop's thread.

    Callbacks may call the engine's operator methods; a connection closed from inside a
    callback is ended once the engine is done with the event that called it."""

    def accepted(self, conn_id: int, host: str, port: int) -> Decision: ...

    def preamble(self, conn_id: int, data: bytes) -> Decision | None: ...

    def connect_result(self, conn_id: int, backend: int, status: int, err: int,
                       elapsed: float) -> Decision | None: ...

    def ended(self, records: bytes) -> None: ...


# --- records ----------------------------------------------------------------------------------

# One ended connection, native byte order, 80 bytes: conn_id, backend (-1: none), reason (End),
# flags (Flag), detail (refusal/close code or errno), bytes_in (client -> backend), bytes_out,
# then CLOCK_MONOTONIC nanoseconds: accepted, backend connected (0: never), first backend byte
# (0: none), ended; the engine's listener id; the start of the connect attempt that succeeded
# (0: never connected).
RECORD = struct.Struct("=QiBBHQQqqqqqq")
assert RECORD.size == 80


# One quiet connect success, native byte order, 24 bytes: conn_id, the target's backend id, and
# the attempt's elapsed CLOCK_MONOTONIC nanoseconds (connected - attempt: the record's fields of
# the same connection; elapsed / 1e9 is the float connect_result would have been given).
CONNECTED = struct.Struct("=Qqq")
assert CONNECTED.size == 24


class Connected(NamedTuple):
    conn_id: int
    backend: int
    elapsed: int


def iter_connected(entries: bytes) -> Iterator[Connected]:
    """Decode a packed batch of quiet successes (tests and slow consumers)."""
    for fields in CONNECTED.iter_unpack(entries):
        yield Connected._make(fields)


class Ended(NamedTuple):
    conn_id: int
    backend: int
    reason: int
    flags: int
    detail: int
    bytes_in: int
    bytes_out: int
    started: int
    connected: int
    first_byte: int
    ended: int
    listener: int
    attempt: int


def iter_records(records: bytes) -> Iterator[Ended]:
    """Decode a packed batch (for tests and slow consumers; hot consumers use RECORD)."""
    for fields in RECORD.iter_unpack(records):
        yield Ended._make(fields)


class ListenerCounters(NamedTuple):
    """Live totals of one listener. accepted == refused + ended + active at every read."""

    accepted: int
    refused: int
    ended: int
    active: int
    bytes_in: int
    bytes_out: int
    spliced: int
    accept_errors: int


class EngineStatistics(NamedTuple):
    """Engine-wide error tallies: accept errors by errno, local resource errors by (op, errno)."""

    accept_errors: dict[int, int]
    local_errors: dict[tuple[int, int], int]
    connections: int
