"""The systemd unit's command line, run with NOTIFY_SOCKET set to a socket this test reads: READY=1
once every listener is bound, RELOADING=1 then READY=1 around a reload, STOPPING=1 at shutdown,
WATCHDOG=1 pings, and every notification from the main (control) process, never a worker.
"""

from __future__ import annotations

import configparser
import os
import shlex
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.support import LOOPBACK, free_port

UNIT = Path(__file__).parents[2] / "deploy" / "systemd" / "pointsman.service"
WAIT = 15.0
SO_PASSCRED, SCM_CREDENTIALS = 16, 2


def exec_start(config: Path) -> list[str]:
    """The unit's ExecStart with this checkout's pointsman and the test's config file."""
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(UNIT)
    argv = shlex.split(unit["Service"]["ExecStart"])
    assert argv[0].endswith("/pointsman") and argv[1] == "run", argv
    return [sys.executable, "-m", "pointsman", *argv[1:-1], str(config)]


class Notifications:
    """A notify socket that keeps every datagram with its sender's pid."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setsockopt(socket.SOL_SOCKET, SO_PASSCRED, 1)
        self.received: list[tuple[int, dict[str, str]]] = []

    def wait(self, key: str, value: str = "1", timeout: float = WAIT) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            for pid, fields in self.received:
                if fields.get(key) == value:
                    self.received.remove((pid, fields))
                    return {"pid": str(pid), **fields}
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {key}={value} in {timeout}s")
            self.sock.settimeout(remaining)
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except TimeoutError:
                continue
            pid = next((struct.unpack("iII", cdata)[0] for level, kind, cdata in ancillary
                        if level == socket.SOL_SOCKET and kind == SCM_CREDENTIALS), -1)
            lines = data.decode().splitlines()
            self.received.append((pid, dict(line.split("=", 1) for line in lines if "=" in line)))


@pytest.fixture
def notifications(tmp_path: Path) -> Iterator[Notifications]:
    received = Notifications(tmp_path / "notify.sock")
    try:
        yield received
    finally:
        received.sock.close()


def test_the_unit_command_line_notifies_ready_reloading_watchdog_and_stopping(
        tmp_path: Path, notifications: Notifications) -> None:
    listen = f"{LOOPBACK}:{free_port()}"
    config = tmp_path / "pointsman.yaml"
    config.write_text(yaml.safe_dump({
        "workers": 2,
        "listeners": [{"name": "lb", "bind": listen, "pool": "p"}],
        "pools": [{"name": "p", "backends": [{"address": f"{LOOPBACK}:{free_port()}"}]}],
        "shutdown_grace": "1s",
    }))
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "400000"}
    env.pop("POINTSMAN_WORKERS", None)
    proc = subprocess.Popen(exec_start(config), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        ready = notifications.wait("READY")
        assert ready["pid"] == ready["MAINPID"] == str(proc.pid)
        assert ready["STATUS"] == "1 listeners, 1 pools, 2 workers"
        with socket.create_connection(listen.rsplit(":", 1), timeout=2.0):
            pass  # bound when READY=1 arrives: not one connection refused
        notifications.wait("WATCHDOG")
        notifications.wait("WATCHDOG")

        proc.send_signal(signal.SIGHUP)
        reloading = notifications.wait("RELOADING")
        assert int(reloading["MONOTONIC_USEC"]) > 0
        assert notifications.wait("READY")["pid"] == str(proc.pid)

        proc.send_signal(signal.SIGTERM)
        stopping = notifications.wait("STOPPING")
        assert stopping["STATUS"].startswith("stopping: 0 connections open, grace 1s")
        assert proc.wait(timeout=WAIT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        _, stderr = proc.communicate(timeout=WAIT)
    senders = {pid for pid, _ in notifications.received} | {proc.pid}
    assert senders == {proc.pid}, f"notifications from workers: {senders}\n{stderr}"
