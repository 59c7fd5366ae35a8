"""Zero-copy forwarding for bulk streams: splice(2) socket -> pipe -> socket, no bytes in Python.

A connection moves here from the transport path once it has carried `zero_copy_after` bytes and
both write buffers are empty (so no byte can be reordered). The transports are closed on
duplicates of their sockets, so the connections live on, owned by two `Pump`s (one per
direction). Request/response traffic never gets here: measured, splice pays off only on long
transfers (it halves the proxy's CPU per GB; on short ones its extra syscalls cost more).

Semantics match the transport path: a FIN is forwarded as shutdown(SHUT_WR) once the pipe is
drained; a reset is forwarded as a reset (SO_LINGER 0) once the pipe towards the other side is
drained and its send queue sent; the pipe is the only buffer, and a full pipe stops reading its
source (backpressure).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
from collections.abc import Callable

from pointsman.proxy.resets import ResetWhenSent, reset_and_close, unsent

SPLICE = hasattr(os, "splice")  # Linux, Python >= 3.10
F_SETPIPE_SZ = 1031  # linux/fcntl.h; Python 3.11 has no constant
PIPE_SIZE = 1 << 20  # bytes in flight per direction: a few socket buffers' worth
CHUNK = 1 << 20
FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
SRC, DST = "src", "dst"  # which end of a pump failed


class Pump:
    """One direction: `src` socket -> pipe -> `dst` socket."""

    __slots__ = ("done", "drained", "dst", "eof", "loop", "on_bytes", "on_done", "on_error",
                 "pending", "pipe_r", "pipe_w", "reading", "src", "stopped", "writing")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        src: int,
        dst: int,
        on_bytes: Callable[[int], None],
        on_done: Callable[[], None],
        on_error: Callable[[OSError, str], None],
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
        self.stopped = False
        self.drained: Callable[[], None] | None = None  # set by drain(): called once empty

    def start(self) -> None:
        self._read_on()

    def _read_on(self) -> None:
        if not self.reading and self.drained is None:
            self.reading = True
            self.loop.add_reader(self.src, self._readable)

    def _read_off(self) -> None:
        if self.reading:
            self.reading = False
            self.loop.remove_reader(self.src)

    def _readable(self) -> None:
        while True:
            try:
                n = os.splice(self.src, self.pipe_w, CHUNK, flags=FLAGS)
            except BlockingIOError:
                break
            except OSError as exc:
                self.on_error(exc, SRC)
                return
            if n == 0:
                self.eof = True
                self._read_off()
                break
            self.pending += n
            self.on_bytes(n)
            try:
                empty = self._flush()
            except OSError as exc:
                self.on_error(exc, DST)
                return
            if not empty:
                self._read_off()
                self._write_on()
                return
        if self.eof and self.pending == 0:
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

    def _write_off(self) -> None:
        if self.writing:
            self.writing = False
            self.loop.remove_writer(self.dst)

    def _writable(self) -> None:
        try:
            empty = self._flush()
        except OSError as exc:
            if self.drained is not None:  # draining towards a side that broke too: done
                self.pending = 0
                self._drained()
                return
            self.on_error(exc, DST)
            return
        if not empty:
            return
        self._write_off()
        if self.drained is not None:
            self._drained()
        elif self.eof:
            self._finish()
        else:
            self._read_on()

    def _finish(self) -> None:
        """Source sent FIN and the pipe is drained: forward the FIN."""
        with contextlib.suppress(OSError):
            _shutdown_write(self.dst)
        self.done = True
        self.on_done()

    def drain(self, then: Callable[[], None]) -> None:
        """The source is gone (reset): read no more, deliver what the pipe holds, then `then()`
        (also when the destination fails meanwhile: then nothing more can be delivered)."""
        self._read_off()
        self.drained = then
        try:
            empty = self._flush()
        except OSError:
            empty = True
            self.pending = 0
        if empty:
            self._drained()
        else:
            self._write_on()

    def _drained(self) -> None:
        then, self.drained = self.drained, None
        self._write_off()
        if then is not None:
            then()

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        self._read_off()
        self._write_off()
        os.close(self.pipe_r)
        os.close(self.pipe_w)


def _shutdown_write(fd: int) -> None:
    sock = socket.socket(fileno=fd)
    try:
        sock.shutdown(socket.SHUT_WR)
    finally:
        sock.detach()  # the fd stays ours to close later


class Spliced:
    """Both directions of one connection, spliced; ends once, like the transport path.

    A reset on one side is forwarded as a reset to the other after the pipe towards it is
    drained and its kernel queue sent (`ResetWhenSent`); `abort()` resets both at once."""

    __slots__ = ("client_fd", "down", "ended", "first_fin", "loop", "on_end", "on_fin",
                 "resetting", "up", "upstream_fd")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        client_fd: int,
        upstream_fd: int,
        count_in: Callable[[int], None],
        count_out: Callable[[int], None],
        on_end: Callable[[str], None],
        on_fin: Callable[[], None] | None = None,
    ) -> None:
        """`on_end(reason)` gets "client_fin" or "backend_fin" (whichever side closed first),
        "client_reset", "backend_reset" or "aborted"; `on_fin()` is called when the first FIN
        (or reset) crosses, so the owner's FIN timer can take over."""
        self.loop = loop
        self.on_fin = on_fin
        self.client_fd = client_fd
        self.upstream_fd = upstream_fd
        self.on_end = on_end
        self.ended = False
        self.first_fin = ""
        self.resetting: ResetWhenSent | None = None
        self.up = Pump(loop, client_fd, upstream_fd, count_in, lambda: self._half_done("client_fin"),
                       lambda exc, end: self._failed("client" if end == SRC else "backend"))
        try:
            self.down = Pump(loop, upstream_fd, client_fd, count_out,
                             lambda: self._half_done("backend_fin"),
                             lambda exc, end: self._failed("backend" if end == SRC else "client"))
        except OSError:  # no descriptors for the second pipe: give the first one back
            self.up.stop()
            raise

    def start(self) -> None:
        self.up.start()
        self.down.start()

    def _half_done(self, which: str) -> None:
        if not self.first_fin:
            self.first_fin = which
            if self.on_fin is not None:
                self.on_fin()
        if self.up.done and self.down.done:
            self._end(self.first_fin)

    def _failed(self, side: str) -> None:
        """`side` ("client" or "backend") reset or broke: forward a reset to the other side."""
        if self.ended or self.resetting is not None or self.first_fin.endswith("_reset"):
            return
        self.first_fin = f"{side}_reset"
        if self.on_fin is not None:
            self.on_fin()
        if side == "client":
            dead_fd, towards, live_fd, other = self.client_fd, self.up, self.upstream_fd, self.down
        else:
            dead_fd, towards, live_fd, other = self.upstream_fd, self.down, self.client_fd, self.up
        other.stop()  # nothing more can reach the dead side
        towards.drain(lambda: self._reset_live(dead_fd, live_fd))

    def _reset_live(self, dead_fd: int, live_fd: int) -> None:
        self.up.stop()
        self.down.stop()
        if unsent(live_fd) == 0:
            self._close(dead_fd, live_fd)
            return
        self.resetting = ResetWhenSent(self.loop, live_fd, lambda: self._closed(dead_fd))

    def _close(self, dead_fd: int, live_fd: int) -> None:
        reset_and_close(live_fd)
        self._closed(dead_fd)

    def _closed(self, dead_fd: int) -> None:
        os.close(dead_fd)
        self._finish_end(self.first_fin)

    def abort(self) -> None:
        """Cut now: both sides get a RST (a reset being forwarded goes at once)."""
        if self.ended:
            return
        if self.resetting is not None:
            self.resetting.cancel()
            return
        self.up.stop()
        self.down.stop()
        reset_and_close(self.client_fd)
        reset_and_close(self.upstream_fd)
        self._finish_end(self.first_fin if self.first_fin.endswith("_reset") else "aborted")

    def _end(self, reason: str) -> None:
        """Both FINs crossed: close both."""
        if self.ended:
            return
        self.up.stop()
        self.down.stop()
        os.close(self.client_fd)
        os.close(self.upstream_fd)
        self._finish_end(reason)

    def _finish_end(self, reason: str) -> None:
        if self.ended:
            return
        self.ended = True
        self.on_end(reason)
