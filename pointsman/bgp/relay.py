"""The API process ExaBGP runs: it joins ExaBGP's stdin/stdout pipes to pointsman's Unix socket.

    python3 -I relay.py /tmp/pointsman-bgp-XXXX/api.sock

ExaBGP closes every inherited file descriptor before it runs a helper, so pointsman cannot hand
its end of a pipe down; the relay connects back instead. Standard library only, run by path with
`-I`: it must start fast and must not depend on how pointsman was installed.

Fate sharing, so that no route outlives the pointsman that asked for it:
- pointsman gone (its socket reads EOF, even after SIGKILL): the relay sends SIGTERM to ExaBGP,
  which closes its BGP sessions (the peers drop every route), waits for ExaBGP to close the
  pipes (ExaBGP does not stop by itself when a helper dies, even with `api.terminate`), removes
  the directory pointsman made for ExaBGP (a killed pointsman could not), and exits;
- ExaBGP gone (stdin reads EOF): the relay exits.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import shutil
import signal
import socket
import sys
import time

CHUNK = 16 * 1024  # ExaBGP reads its helpers 16 KiB at a time; the same size either way
CONNECT_TIMEOUT = 5.0  # pointsman listens before it starts ExaBGP: this is generous
PARENT_EXIT_TIMEOUT = 10.0  # ExaBGP's own shutdown waits up to ~2 s per helper
DIRECTORY_PREFIX = "pointsman-bgp-"  # speaker.py makes the directory; never remove anything else


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        sys.stderr.write("usage: relay.py SOCKET\n")
        return 2
    exabgp = os.getppid()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(CONNECT_TIMEOUT)
    try:
        sock.connect(argv[1])
    except OSError as exc:
        sys.stderr.write(f"pointsman relay: cannot reach pointsman at {argv[1]}: {exc}\n")
        _stop_parent(exabgp)
        return 1
    sock.setblocking(True)
    sock.settimeout(None)
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    with selectors.DefaultSelector() as selector:
        selector.register(stdin, selectors.EVENT_READ)
        selector.register(sock, selectors.EVENT_READ)
        while True:
            for key, _ in selector.select():
                if key.fd == stdin:
                    data = os.read(stdin, CHUNK)
                    if not data:
                        return 0  # ExaBGP is gone
                    try:
                        sock.sendall(data)
                    except OSError:
                        return _after_pointsman(exabgp, stdin, argv[1])
                else:
                    try:
                        data = sock.recv(CHUNK)
                    except OSError:
                        data = b""
                    if not data:
                        return _after_pointsman(exabgp, stdin, argv[1])
                    _write_all(stdout, data)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _after_pointsman(exabgp: int, stdin: int, sock_path: str) -> int:
    """pointsman closed the socket: stop ExaBGP, wait (bounded) for it to close our stdin, and
    remove pointsman's directory for ExaBGP, which a killed pointsman could not do. ExaBGP's own
    shutdown sends us SIGTERM: that ends the wait too, through the same cleanup."""
    signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        _stop_parent(exabgp)
        deadline = time.monotonic() + PARENT_EXIT_TIMEOUT
        with selectors.DefaultSelector() as selector:
            selector.register(stdin, selectors.EVENT_READ)
            while (left := deadline - time.monotonic()) > 0:
                if selector.select(left) and not os.read(stdin, CHUNK):
                    return 0
        return 1
    finally:
        directory = os.path.dirname(os.path.abspath(sock_path))
        if os.path.basename(directory).startswith(DIRECTORY_PREFIX):
            shutil.rmtree(directory, ignore_errors=True)


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _stop_parent(exabgp: int) -> None:
    """SIGTERM ExaBGP, unless it already died (then we were re-parented: do not kill that)."""
    if os.getppid() == exabgp and exabgp > 1:
        with contextlib.suppress(ProcessLookupError):
            os.kill(exabgp, signal.SIGTERM)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
