"""What a restart of pointsman costs clients, with and without socket activation.

Run from the repository root:  python3 bench/restart_bench.py [--rounds 3] [--workers 1 2]

Each round starts `pointsman run`, then a client opens short connections back to back (connect,
send 16 bytes, read them back from an echo backend, close) while pointsman is stopped (SIGTERM)
and started again. It counts the connections served, the ones refused (ECONNREFUSED) and other
failures, and the longest wait of a served one (the restart gap it spent in a backlog). In
"plain" mode pointsman binds the listener itself; in "activated" mode this script holds the
listening socket, as systemd does, and passes it to each pointsman (LISTEN_FDS). Medians over
rounds. On a shared machine read the counts, not the times.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

STOP_TIMEOUT = 30.0
START_TIMEOUT = 30.0
PAYLOAD = b"0123456789abcdef"


def echo_server() -> tuple[socket.socket, threading.Event]:
    """A threaded echo backend on loopback; set the event to stop it."""
    server = socket.create_server(("127.0.0.1", 0), backlog=512)
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return server, stop


@dataclass
class Tally:
    served: int = 0
    refused: int = 0
    failed: int = 0
    longest: float = 0.0
    errors: list[str] = field(default_factory=list)


def client(port: int, stop: threading.Event, tally: Tally) -> None:
    while not stop.is_set():
        began = time.monotonic()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=STOP_TIMEOUT) as sock:
                sock.sendall(PAYLOAD)
                got = b""
                while len(got) < len(PAYLOAD):
                    chunk = sock.recv(64)
                    if not chunk:
                        raise ConnectionError("closed early")
                    got += chunk
            tally.served += 1
            tally.longest = max(tally.longest, time.monotonic() - began)
        except ConnectionRefusedError:
            tally.refused += 1
            time.sleep(0.001)
        except OSError as exc:
            tally.failed += 1
            tally.errors.append(repr(exc))
            time.sleep(0.001)


class Pointsman:
    def __init__(self, config: Path, passed: socket.socket | None) -> None:
        argv = [sys.executable, "-m", "pointsman", "run", str(config)]
        env = dict(os.environ)
        preexec = None
        if passed is not None:
            fd = passed.fileno()
            env.update(LISTEN_FDS="1", LISTEN_FDNAMES="web")
            argv = ["sh", "-c", 'LISTEN_PID=$$ exec "$@"', "sh", *argv]

            def preexec() -> None:
                os.dup2(fd, 3)

        self.popen = subprocess.Popen(argv, env=env, preexec_fn=preexec, close_fds=passed is None,
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)

    def wait_listening(self) -> None:
        assert self.popen.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            line = self.popen.stdout.readline()
            if not line:
                raise RuntimeError("pointsman exited before listening")
            if line.startswith(b"listening "):
                return
        raise RuntimeError("pointsman not listening in time")

    def stop(self) -> None:
        self.popen.send_signal(signal.SIGTERM)
        self.popen.wait(STOP_TIMEOUT)
        if self.popen.stdout is not None:
            self.popen.stdout.close()


def one_round(tmp: Path, workers: int, activated: bool, backend_port: int) -> Tally:
    held = None
    if activated:
        held = socket.socket()
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        held.bind(("127.0.0.1", 0))
        held.listen(1024)
        port = held.getsockname()[1]
    else:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
    config = tmp / "restart.yaml"
    config.write_text(yaml.safe_dump({
        "workers": workers, "shutdown_grace": "2s",
        "listeners": [{"name": "web", "bind": f"127.0.0.1:{port}", "pool": "p"}],
        "pools": [{"name": "p", "backends": [{"address": f"127.0.0.1:{backend_port}"}]}]}))
    first = Pointsman(config, held)
    first.wait_listening()
    tally, stop = Tally(), threading.Event()
    thread = threading.Thread(target=client, args=(port, stop, tally))
    thread.start()
    time.sleep(0.3)
    first.stop()
    second = Pointsman(config, held)
    second.wait_listening()
    time.sleep(0.3)
    stop.set()
    thread.join()
    second.stop()
    if held is not None:
        held.close()
    return tally


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    backend, stop_backend = echo_server()
    try:
        with tempfile.TemporaryDirectory(prefix="restart_bench") as tmp:
            print(f"{'mode':<10} {'workers':>7} {'served':>7} {'refused':>8} {'failed':>7} "
                  f"{'longest wait':>13}   (medians of {args.rounds} rounds)")
            for workers in args.workers:
                for activated in (False, True):
                    tallies = [one_round(Path(tmp), workers, activated, backend.getsockname()[1])
                               for _ in range(args.rounds)]
                    median = statistics.median
                    print(f"{'activated' if activated else 'plain':<10} {workers:>7} "
                          f"{median(t.served for t in tallies):>7.0f} "
                          f"{median(t.refused for t in tallies):>8.0f} "
                          f"{median(t.failed for t in tallies):>7.0f} "
                          f"{median(t.longest for t in tallies):>12.2f}s")
    finally:
        stop_backend.set()
        backend.close()


if __name__ == "__main__":
    main()
