"""The flow log: one JSON record per finished connection or UDP session, written once, at teardown.

The data plane formats each record as its JSON line at once and appends it to a bounded queue; no
I/O. A TCP listener makes the lines of one engine batch in its pass over the records
(proxy/fold.py: `tcp_head` once per batch, then the record's fields; compiled with the compiled
engine, about 0.3 us a line) and hands them over in one `tcp_lines` call; UDP sessions and the
reference path format one record at a time (`tcp_line`, `format_record`: about 1.5 us). A
writer task (owned by the node's task supervisor) wakes every `flush_interval` (sooner when the
queue is half full) and writes the queued lines, a chunk of at most CHUNK lines per write: to a
regular file in the loop (a write to the page cache), to anything else (a pipe, stderr), and to a
file whose last loop write was slow (> SLOW_WRITE), in a thread, so a slow disk or reader holds
only the writer task. While it is held the queue fills; a record that finds it full is dropped
and counted (`dropped`). At shutdown `close` writes what is queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import stat
import sys
import time
from collections import deque
from typing import IO, TYPE_CHECKING

from pointsman.config.model import FlowLogConfig

if TYPE_CHECKING:
    from pointsman.node.tasks import Tasks
    from pointsman.proxy.udp import UdpSession

Record = tuple[object, ...]
CHUNK = 1024  # lines joined in the loop and written in one write (about 200 KiB)
# A write to a regular file that takes longer than this (a slow or stalled disk) sends the next
# writes to the thread for SLOW_BACKOFF seconds.
SLOW_WRITE = 0.005
SLOW_BACKOFF = 60.0
FIELDS = ("time", "protocol", "listener", "client", "backend", "bytes_in", "bytes_out",
          "duration", "ttfb", "end")


class FlowLog:
    def __init__(
        self,
        stream: IO[str] | None = None,
        sample: float = 1.0,
        queue_size: int = 10_000,
        flush_interval: float = 0.25,
        rng: random.Random | None = None,
        slow_write: float = SLOW_WRITE,
    ) -> None:
        self.stream = stream or sys.stderr
        self.sample = sample
        self.queue: deque[str] = deque()  # the JSON lines of the records not yet written
        self.queue_size = queue_size
        self.flush_interval = flush_interval
        self.dropped = 0
        self.written = 0
        self._rng = rng or random.Random()
        self.soon = max(1, queue_size // 2)  # records that wake the writer before flush_interval
        self._wake = asyncio.Event()  # the first record after an empty queue
        self._urge = asyncio.Event()  # the queue is half full
        self._owns_stream = False
        self._writing: asyncio.Future[None] | None = None  # the text in the writer thread
        self.slow_write = slow_write
        # In the loop until this time (time.monotonic()): only a regular file, whose writes land in
        # the page cache; a pipe, terminal or socket can block for as long as its reader likes.
        self.loop_writes_after = 0.0 if _regular(self.stream) else float("inf")
        self._clock = _RunQueue()

    @classmethod
    def open(cls, config: FlowLogConfig | None, tasks: Tasks) -> FlowLog | None:
        """The flow log `config` asks for, its writer started under `tasks`; None when off."""
        if config is None or not config.enabled:
            return None
        stream = sys.stderr if config.path == "-" else open(config.path, "a")  # noqa: SIM115
        flow_log = cls(stream, config.sample, config.queue_size)
        flow_log._owns_stream = stream is not sys.stderr
        tasks.spawn("flow-log", flow_log.run, kind="flow_log")
        return flow_log

    def _admit(self) -> bool:
        if self.sample < 1.0 and self._rng.random() >= self.sample:
            return False
        queued = len(self.queue)
        if queued >= self.soon:
            if queued >= self.queue_size:
                self.dropped += 1
                return False
            if not self._urge.is_set():
                self._urge.set()
        elif not queued and not self._wake.is_set():
            self._wake.set()
        return True

    def tcp(self, at: float, listener: str, client: tuple[str, int], backend: str | None,
            bytes_in: int, bytes_out: int, duration: float, ttfb: float | None,
            end: str) -> None:
        """One finished TCP connection, in the record form the listener builds from the
        engine's ended-connection records (`at`: wall time, read once per batch)."""
        if not self._admit():
            return
        self.queue.append(tcp_line(at, listener, client, backend, bytes_in, bytes_out, duration,
                                   ttfb, end))

    def udp(self, session: UdpSession) -> None:
        if not self._admit():
            return
        now = session.listener.loop.time()
        end = session.reason.value if session.reason is not None else "idle_timeout"
        self.queue.append(format_record((time.time(), "udp", session.listener.name,
                                         session.client, session.backend_id, session.bytes_in,
                                         session.bytes_out, now - session.started, None, end)))

    def tcp_lines(self, lines: list[str]) -> None:
        """The JSON lines of the finished TCP connections of one engine wake-up, made by the
        listener (proxy/fold.py: `tcp_head` and the record's fields, the same text as
        `tcp_line`): the same admissions, samples and counts as one `tcp` call per line."""
        if self.sample < 1.0:
            rng = self._rng
            lines = [line for line in lines if rng.random() < self.sample]
        queue = self.queue
        queued = len(queue)
        room = self.queue_size - queued
        if room < len(lines):
            self.dropped += len(lines) - max(room, 0)
            lines = lines[:max(room, 0)]
        if not lines:
            return
        # As one `_admit` per line: the first record into an empty queue wakes the writer; one
        # queued when it is half full urges it.
        if not queued and not self._wake.is_set():
            self._wake.set()
        if queued + len(lines) - 1 >= self.soon and not self._urge.is_set():
            self._urge.set()
        queue.extend(lines)

    async def run(self) -> None:
        """Write until cancelled: wait for a record, let the records of `flush_interval` gather
        (less when the queue is half full), then write them a chunk at a time: the loop runs
        its other callbacks between two chunks, and the thread has one write at a time."""
        while True:
            if not self.queue:
                self._wake.clear()
                await self._wake.wait()
            if len(self.queue) < self.soon:
                self._urge.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.flush_interval):
                        await self._urge.wait()
            while self.queue:
                self._write(self._take(CHUNK))
                if self._writing is not None:
                    await asyncio.shield(self._writing)
                    self._writing = None
                elif self.queue:
                    await asyncio.sleep(0)  # a big queue: not all its writes in one callback

    def _take(self, most: int) -> list[str]:
        queue = self.queue
        return [queue.popleft() for _ in range(min(most, len(queue)))]

    def _write(self, batch: list[str]) -> None:
        """Write the lines of `batch` (at most CHUNK, about 200 KiB): to a regular file right
        here, in the loop (the page cache takes it in about 0.1 ms; handing it to a thread cost
        about 2 us per record, measured: GIL hand-overs), unless a recent write was slow; else
        in a thread, so a slow disk or pipe holds the writer task (the queue fills, and what
        does not fit is dropped and counted), not the loop."""
        text = "".join(batch)
        start = time.monotonic()  # not loop.time(): uvloop's is read once per loop iteration
        if start >= self.loop_writes_after:
            queued = self._clock.queued()
            self._emit(text, len(batch))
            end = time.monotonic()
            # Slow: blocked in the write (a slow disk), not waiting for a CPU (a busy machine).
            if (end - start > self.slow_write
                    and end - start - (self._clock.queued() - queued) > self.slow_write):
                self.loop_writes_after = end + SLOW_BACKOFF  # the thread, a while
            return
        self._writing = asyncio.get_running_loop().run_in_executor(
            None, self._emit, text, len(batch))

    def _emit(self, text: str, count: int) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            self.dropped += count
            return
        self.written += count

    async def close(self) -> None:
        """Write what is queued (at shutdown, after the writer task has stopped)."""
        if self._writing is not None:
            await asyncio.gather(self._writing, return_exceptions=True)
            self._writing = None
        while self.queue:
            batch = self._take(CHUNK)
            self._emit("".join(batch), len(batch))
        self._clock.close()
        if self._owns_stream:
            self.stream.close()


class _Second:
    """The ISO 8601 text of a timestamp, the second's part made once per second and the whole
    text once per timestamp (a batch of records shares one), not once per record."""

    __slots__ = ("full", "text", "ts", "whole")

    def __init__(self) -> None:
        self.whole = -1
        self.text = ""
        self.ts = -1.0
        self.full = ""

    def iso(self, ts: float) -> str:
        if ts == self.ts:
            return self.full
        whole = int(ts)
        if whole != self.whole:
            self.whole = whole
            self.text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
        self.ts = ts
        self.full = full = f"{self.text}.{int((ts - whole) * 1000):03d}Z"
        return full


_SECOND = _Second()


class _RunQueue:
    """The time the calling thread has spent waiting for a CPU (Linux: the second figure of
    /proc/thread-self/schedstat; 0 where there is none), so that a write the scheduler held up
    is not taken for a slow disk. The file is opened at the first call, by the loop's thread."""

    __slots__ = ("fd",)

    def __init__(self) -> None:
        self.fd: int | None = None

    def queued(self) -> float:
        try:
            if self.fd is None:
                self.fd = os.open("/proc/thread-self/schedstat", os.O_RDONLY | os.O_CLOEXEC)
            return int(os.pread(self.fd, 128, 0).split()[1]) * 1e-9
        except (OSError, IndexError, ValueError):
            if self.fd is None:
                self.fd = -1  # not there: never asked again
            return 0.0

    def close(self) -> None:
        if self.fd is not None and self.fd >= 0:
            os.close(self.fd)
        self.fd = None


def _regular(stream: IO[str]) -> bool:
    """Whether `stream` is a regular file (not a pipe, terminal or socket)."""
    try:
        return stat.S_ISREG(os.fstat(stream.fileno()).st_mode)
    except (OSError, ValueError, AttributeError):  # io.UnsupportedOperation is an OSError
        return False


def client_text(client: object) -> str:
    """A client address as the flow log writes it: host:port, [host]:port for IPv6."""
    if isinstance(client, tuple):
        host, port = client[0], client[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(client)


_QUOTED: dict[object, str] = {}
_QUOTED_MAX = 4096  # names repeat (listeners, backends, end reasons): a small table holds them


def quoted(value: object) -> str:
    """JSON for a name, escaped once and then remembered."""
    found = _QUOTED.get(value)
    if found is None:
        if len(_QUOTED) >= _QUOTED_MAX:
            _QUOTED.clear()
        found = _QUOTED[value] = json.dumps(value)
    return found


def _number(value: object) -> str:
    """JSON for a duration (to the microsecond: six decimals, a quarter of round()'s cost), or
    null."""
    if value is None:
        return "null"
    return f"{value:.6f}" if isinstance(value, float) else json.dumps(value)


def format_record(record: Record) -> str:
    """One JSON line for a record, written out directly: the field names, the second's timestamp
    and the separators are fixed, names are escaped once (measured: 13 us per record with
    json.dumps of a dict, about 2 us this way)."""
    ts, protocol, listener, client, backend, bytes_in, bytes_out, duration, ttfb, end = record
    # A client address is digits, dots, colons and brackets: nothing JSON must escape.
    return (f'{{"time":"{_SECOND.iso(ts) if isinstance(ts, float) else ts}",'
            f'"protocol":{quoted(protocol)},"listener":{quoted(listener)},'
            f'"client":"{client_text(client)}","backend":{quoted(backend)},'
            f'"bytes_in":{bytes_in},"bytes_out":{bytes_out},"duration":{_number(duration)},'
            f'"ttfb":{_number(ttfb)},"end":{quoted(end)}}}\n')


_HEADS: dict[str, tuple[int, int, str]] = {}  # listener -> (second, millisecond, its head)


def tcp_head(at: float, listener: str) -> str:
    """What every TCP line of one batch (one wall time, one listener) starts with, up to the
    client's address (proxy/fold.py adds the rest); made again only when the time text moves
    on (it shows milliseconds: _Second.iso), as batches of one millisecond share it."""
    if type(at) is not float:
        return f'{{"time":"{at}","protocol":"tcp","listener":{quoted(listener)},"client":"'
    whole = int(at)
    milli = int((at - whole) * 1000)  # as _Second.iso makes it
    made = _HEADS.get(listener)
    if made is not None and made[0] == whole and made[1] == milli:
        return made[2]
    head = f'{{"time":"{_SECOND.iso(at)}","protocol":"tcp","listener":{quoted(listener)},"client":"'
    if len(_HEADS) >= _QUOTED_MAX:
        _HEADS.clear()
    _HEADS[listener] = (whole, milli, head)
    return head


def tcp_line(at: float, listener: str, client: tuple[str, int], backend: str | None,
             bytes_in: int, bytes_out: int, duration: float, ttfb: float | None,
             end: str) -> str:
    """The JSON line of a TCP record, the same as `format_record` of its tuple: the common case
    (a float time and durations, a (host, port) client, names seen before) without the tuple,
    and formatted at once, while its values are still in the cache."""
    names = _QUOTED.get(listener), _QUOTED.get(backend), _QUOTED.get(end)
    if (type(at) is not float or type(client) is not tuple or type(duration) is not float
            or None in names or (ttfb is not None and type(ttfb) is not float)):
        return format_record((at, "tcp", listener, client, backend, bytes_in, bytes_out,
                              duration, ttfb, end))
    host = client[0]
    return (f'{{"time":"{_SECOND.iso(at)}","protocol":"tcp","listener":{names[0]},'
            f'"client":"{f"[{host}]" if ":" in host else host}:{client[1]}",'
            f'"backend":{names[1]},"bytes_in":{bytes_in},"bytes_out":{bytes_out},'
            f'"duration":{duration:.6f},"ttfb":{"null" if ttfb is None else f"{ttfb:.6f}"},'
            f'"end":{names[2]}}}\n')
