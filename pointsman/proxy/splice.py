"""Zero-copy forwarding for bulk streams: splice(2) socket -> pipe -> socket, no bytes in Python.

A connection moves here from the transport path once it has carried `zero_copy_after` bytes and
both write buffers are empty (so no byte can be reordered). The transports are closed on
duplicates of their sockets, so the connections live on, owned by two `Pump`s (one per
direction). Request/response traffic never gets here: measured, splice pays off only on long
transfers (it halves the proxy's CPU per GB; on short ones its extra syscalls cost more).

Semantics match the transport path: a FIN is forwarded as shutdown(SHUT_WR) once the pipe is
drained; a reset aborts both sides (SO_LINGER 0 sends the RST on); the pipe is the only buffer,
and a full pipe stops reading its source (backpressure).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
import struct
from collections.abc import Callable

SPLICE = hasattr(os, "splice")  # Linux, Python >= 3.10
F_SETPIPE_SZ = 1031  # linux/fcntl.h; Python 3.11 has no constant
PIPE_SIZE = 1 << 20  # bytes in flight per direction: a few socket buffers' worth
CHUNK = 1 << 20
FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
_LINGER_RESET = struct.pack("ii", 1, 0)


class Pump:
    """One direction: `src` socket -> pipe -> `dst` socket."""

    __slots__ = ("done", "dst", "eof", "loop", "on_bytes", "on_done", "on_error", "pending",
                 "pipe_r", "pipe_w", "reading", "src", "writing")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        src: int,
        dst: int,
        on_bytes: Callable[[int], None],
        on_done: Callable[[], None],
        on_error: Callable[[OSError], None],
    ) -> None:
        self.loop = loop
        self.src = src
        self.dst = dst
        self.on_bytes = on_bytes
        self.on_done = on_done
        self.on_error = on_error
        self.pipe_r, self.pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # Over /proc/sys/fs/pipe-max-size this fails: the default 64 KiB pipe works, slower.
        with contextlib.suppress(OSError):
            fcntl.fcntl(self.pipe_w, F_SETPIPE_SZ, PIPE_SIZE)
        self.pending = 0
        self.eof = False
        self.done = False
        self.reading = False
        self.writing = False

    def start(self) -> None:
        self._read_on()

    def _read_on(self) -> None:
        if not self.reading:
            self.reading = True
            self.loop.add_reader(self.src, self._readable)

    def _read_off(self) -> None:
        if self.reading:
            self.reading = False
            self.loop.remove_reader(self.src)

    def _readable(self) -> None:
        try:
            while True:
                n = os.splice(self.src, self.pipe_w, CHUNK, flags=FLAGS)
                if n == 0:
                    self.eof = True
                    self._read_off()
                    break
                self.pending += n
                self.on_bytes(n)
                if not self._flush():
                    self._read_off()
                    self._write_on()
                    return
        except BlockingIOError:
            pass
        except OSError as exc:
            self.on_error(exc)
            return
        if self.eof and self._flush():
            self._finish()

    def _flush(self) -> bool:
        """Move the pipe into `dst`; True when the pipe is empty."""
        while self.pending:
            try:
                n = os.splice(self.pipe_r, self.dst, self.pending, flags=FLAGS)
            except BlockingIOError:
                return False
            self.pending -= n
        return True

    def _write_on(self) -> None:
        if not self.writing:
            self.writing = True
            self.loop.add_writer(self.dst, self._writable)

    def _writable(self) -> None:
        try:
            empty = self._flush()
        except OSError as exc:
            self.on_error(exc)
            return
        if not empty:
            return
        self.writing = False
        self.loop.remove_writer(self.dst)
        if self.eof:
            self._finish()
        else:
            self._read_on()

    def _finish(self) -> None:
        """Source sent FIN and the pipe is drained: forward the FIN."""
        with contextlib.suppress(OSError):
            _shutdown_write(self.dst)
        self.done = True
        self.on_done()

    def stop(self) -> None:
        self._read_off()
        if self.writing:
            self.writing = False
            self.loop.remove_writer(self.dst)
        os.close(self.pipe_r)
        os.close(self.pipe_w)


def _shutdown_write(fd: int) -> None:
    sock = socket.socket(fileno=fd)
    try:
        sock.shutdown(socket.SHUT_WR)
    finally:
        sock.detach()  # the fd stays ours to close later


def reset_and_close(fd: int) -> None:
    """Close with SO_LINGER 0, so the peer gets a RST (a reset is forwarded as a reset)."""
    sock = socket.socket(fileno=fd)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    sock.close()


class Spliced:
    """Both directions of one connection, spliced; ends once, like the transport path."""

    __slots__ = ("client_fd", "down", "ended", "first_fin", "on_end", "up", "upstream_fd")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        client_fd: int,
        upstream_fd: int,
        count_in: Callable[[int], None],
        count_out: Callable[[int], None],
        on_end: Callable[[str], None],
    ) -> None:
        """`on_end(reason)` gets "client_fin" or "backend_fin" (whichever side closed first),
        "client_reset", "backend_reset" or "aborted"."""
        self.client_fd = client_fd
        self.upstream_fd = upstream_fd
        self.on_end = on_end
        self.ended = False
        self.first_fin = ""
        self.up = Pump(loop, client_fd, upstream_fd, count_in, lambda: self._half_done("client_fin"),
                       lambda exc: self._reset("client_reset"))
        self.down = Pump(loop, upstream_fd, client_fd, count_out,
                         lambda: self._half_done("backend_fin"),
                         lambda exc: self._reset("backend_reset"))

    def start(self) -> None:
        self.up.start()
        self.down.start()

    def _half_done(self, which: str) -> None:
        self.first_fin = self.first_fin or which
        if self.up.done and self.down.done:
            self._end(self.first_fin, reset=False)

    def _reset(self, reason: str) -> None:
        self._end(reason, reset=True)

    def abort(self) -> None:
        self._end("aborted", reset=True)

    def _end(self, reason: str, reset: bool) -> None:
        if self.ended:
            return
        self.ended = True
        self.up.stop()
        self.down.stop()
        for fd in (self.client_fd, self.upstream_fd):
            if reset:
                reset_and_close(fd)
            else:
                os.close(fd)
        self.on_end(reason)
