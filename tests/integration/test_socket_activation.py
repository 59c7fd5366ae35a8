"""Socket activation through a real `pointsman run`: the test plays systemd. It makes the
listening sockets, starts pointsman with them as descriptors 3, 4, ... and LISTEN_FDS,
LISTEN_FDNAMES and LISTEN_PID set (a `sh` wrapper sets LISTEN_PID to its own pid, then execs, so
the pid is pointsman's), and keeps them open across restarts as systemd does. Connections made
while pointsman is down wait in the socket's backlog and are served by the next process; with
workers every worker accepts on the passed socket."""

from __future__ import annotations

import asyncio
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.udp_support import udp_clients, udp_echo
from tests.support import (
    LOOPBACK,
    START_TIMEOUT,
    STOP_TIMEOUT,
    echo_backend,
    free_port,
    has_ipv6,
    roundtrip,
)

STEP = 5.0
# pointsman runs in a subprocess (uvloop): the test's own loop does not matter; run it once.
pytestmark = pytest.mark.asyncio(loop_factories=["uvloop"])


class Activated:
    """`pointsman run CONFIG` given `sockets` as systemd gives them."""

    def __init__(self, config: Path, sockets: list[tuple[socket.socket, str]]) -> None:
        fds = [sock.fileno() for sock, _ in sockets]
        env = {**os.environ, "LISTEN_FDS": str(len(fds)),
               "LISTEN_FDNAMES": ":".join(name for _, name in sockets)}

        def as_systemd_does() -> None:  # in the child: the sockets become 3, 4, ...
            moved = [os.dup(fd) for fd in fds]  # first out of the way of 3, 4, ...
            for i, fd in enumerate(moved):
                os.dup2(fd, 3 + i)

        self.stderr_path = config.with_suffix(".stderr")
        with self.stderr_path.open("wb") as stderr:
            self.popen = subprocess.Popen(
                ["sh", "-c", 'LISTEN_PID=$$ exec "$@"', "sh", sys.executable, "-m", "pointsman",
                 "run", str(config)],
                env=env, preexec_fn=as_systemd_does, close_fds=False, stdout=subprocess.PIPE,
                stderr=stderr)
        self.lines: list[str] = []
        self._pending = b""

    def wait_listening(self, count: int, admin: bool = False) -> None:
        """Until `count` "listening" lines (and the admin API's, if asked) are out."""
        assert self.popen.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT
        with selectors.DefaultSelector() as sel:
            sel.register(self.popen.stdout, selectors.EVENT_READ)
            while sum(line.startswith("listening ") for line in self.lines) < count or \
                    (admin and not any(line.startswith("admin api") for line in self.lines)):
                assert time.monotonic() < deadline, f"not listening: {self.stderr()}"
                if sel.select(deadline - time.monotonic()):
                    chunk = os.read(self.popen.stdout.fileno(), 65536)  # unbuffered: select sees all
                    assert chunk, f"exited: {self.stderr()}"
                    *complete, self._pending = (self._pending + chunk).split(b"\n")
                    self.lines.extend(line.decode() for line in complete)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(STOP_TIMEOUT)
        finally:
            self.close()

    def close(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()
        if self.popen.stdout is not None:
            self.popen.stdout.close()


@pytest.fixture
def made() -> Iterator[list[socket.socket]]:
    """The sockets "systemd" holds: open for the whole test, across pointsman restarts."""
    sockets: list[socket.socket] = []
    yield sockets
    for sock in sockets:
        sock.close()


def listening(made: list[socket.socket], kind: int = socket.SOCK_STREAM,
              host: str = LOOPBACK) -> socket.socket:
    sock = socket.socket(socket.AF_INET, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    if kind == socket.SOCK_STREAM:
        sock.listen(64)
    made.append(sock)
    return sock


def write_config(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "pointsman.yaml"
    path.write_text(yaml.safe_dump({"shutdown_grace": "1s", **data}, sort_keys=False))
    return path


def port_of(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])


@pytest.mark.parametrize("workers", [1, 2], ids=["w1", "w2"])
async def test_a_restart_refuses_nothing(tmp_path: Path, made: list[socket.socket],
                                         workers: int) -> None:
    web = listening(made)
    async with echo_backend() as backend:
        path = write_config(tmp_path, {
            "workers": workers,
            "listeners": [{"name": "web", "bind": f"{LOOPBACK}:{port_of(web)}", "pool": "p"}],
            "pools": [{"name": "p", "backends": [{"address": backend.address}]}]})
        first = Activated(path, [(web, "web")])
        try:
            await asyncio.to_thread(first.wait_listening, 1)
            reader, writer = await asyncio.open_connection(LOOPBACK, port_of(web))
            await roundtrip(reader, writer, b"served by the first process")
            writer.close()
        finally:
            assert await asyncio.to_thread(first.stop) == 0, first.stderr()
        # pointsman is down; systemd's socket still listens: these wait in its backlog.
        waiting = [await asyncio.open_connection(LOOPBACK, port_of(web)) for _ in range(3)]
        for i, (_, writer) in enumerate(waiting):
            writer.write(f"sent while down {i}".encode())
        second = Activated(path, [(web, "web")])
        try:
            await asyncio.to_thread(second.wait_listening, 1)
            for i, (reader, writer) in enumerate(waiting):
                async with asyncio.timeout(STEP):
                    assert await reader.readexactly(len(f"sent while down {i}")) == \
                        f"sent while down {i}".encode()
                writer.close()
        finally:
            assert await asyncio.to_thread(second.stop) == 0, second.stderr()
        assert "socket activation: fd 3 (web" in second.stderr()
        assert "address already in use" not in second.stderr()


@pytest.mark.parametrize("workers", [1, 2], ids=["w1", "w2"])
async def test_matched_by_address_with_udp_and_an_address_bound_as_usual(
        tmp_path: Path, made: list[socket.socket], workers: int) -> None:
    tcp = listening(made)
    udp = listening(made, socket.SOCK_DGRAM)
    own = free_port()  # not passed: pointsman binds it itself
    admin = f"{LOOPBACK}:{free_port()}"
    async with echo_backend() as backend, udp_echo() as dns:
        path = write_config(tmp_path, {
            "workers": workers,
            "admin": {"bind": admin},
            "listeners": [
                {"name": "web", "bind": [f"{LOOPBACK}:{port_of(tcp)}", f"{LOOPBACK}:{own}"],
                 "pool": "p"},
                {"name": "dns", "bind": f"{LOOPBACK}:{port_of(udp)}", "protocol": "udp",
                 "pool": "d"}],
            "pools": [{"name": "p", "backends": [{"address": backend.address}]},
                      {"name": "d", "backends": [{"address": dns.address}]}]})
        node = Activated(path, [(tcp, "pointsman.socket"), (udp, "pointsman.socket")])
        try:
            await asyncio.to_thread(node.wait_listening, 2, True)
            for port in (port_of(tcp), own):
                reader, writer = await asyncio.open_connection(LOOPBACK, port)
                await roundtrip(reader, writer, f"to {port}".encode())
                writer.close()
            async with udp_clients((LOOPBACK, port_of(udp))) as [client]:
                await client.request(b"a question")
            doc = await asyncio.to_thread(status, admin)
            if workers > 1:  # a worker that restarts gets the passed sockets again
                pids = [w["pid"] for w in doc["workers"]]
                for pid in pids:
                    os.kill(pid, signal.SIGKILL)
                deadline = time.monotonic() + 3 * START_TIMEOUT
                while not all(w["state"] == "running" and w["pid"] not in pids
                              for w in (await asyncio.to_thread(status, admin))["workers"]):
                    assert time.monotonic() < deadline, "the workers did not come back"
                    await asyncio.sleep(0.1)  # polling the admin API of another process
                for _ in range(4):
                    reader, writer = await asyncio.open_connection(LOOPBACK, port_of(tcp))
                    await roundtrip(reader, writer, b"served by a restarted worker")
                    writer.close()
        finally:
            assert await asyncio.to_thread(node.stop) == 0, node.stderr()
    assert doc["passed_sockets"] == [
        {"fd": 3, "name": "pointsman.socket", "protocol": "tcp",
         "address": f"{LOOPBACK}:{port_of(tcp)}", "listener": "web"},
        {"fd": 4, "name": "pointsman.socket", "protocol": "udp",
         "address": f"{LOOPBACK}:{port_of(udp)}", "listener": "dns"}]


def status(admin: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{admin}/api/v1/status", timeout=STEP) as response:
        doc: dict[str, Any] = json.loads(response.read())
        return doc


async def test_a_named_socket_on_another_address_stops_the_start(
        tmp_path: Path, made: list[socket.socket]) -> None:
    sock = listening(made)
    wanted = free_port()
    path = write_config(tmp_path, {
        "listeners": [{"name": "web", "bind": f"{LOOPBACK}:{wanted}", "pool": "p"}],
        "pools": [{"name": "p", "backends": [{"address": f"{LOOPBACK}:9"}]}]})
    node = Activated(path, [(sock, "web")])
    try:
        code = await asyncio.to_thread(node.popen.wait, STOP_TIMEOUT)
    finally:
        node.close()
    assert code == 1
    assert (f"cannot start: socket activation: listener web: the passed socket fd 3 (web, "
            f"{LOOPBACK}:{port_of(sock)}/tcp) is named after it but is not tcp on one of its "
            f"addresses ({LOOPBACK}:{wanted})") in node.stderr()


UNIT = Path(__file__).parents[2] / "deploy" / "systemd" / "pointsman.socket"


def unit_sockets() -> tuple[list[str], str]:
    """The shipped socket unit's ListenStream= addresses and its FileDescriptorName=."""
    streams, name = [], ""
    for line in UNIT.read_text().splitlines():
        key, _, value = line.partition("=")
        if key == "ListenStream":
            streams.append(value)
        elif key == "FileDescriptorName":
            name = value
    return streams, name


async def test_the_shipped_socket_unit_serves_its_listener(tmp_path: Path,
                                                           made: list[socket.socket]) -> None:
    """The sockets deploy/systemd/pointsman.socket describes (on a free port instead of 443),
    made as systemd makes them (v6-only, as BindIPv6Only=ipv6-only), serve the listener the unit
    names, with the bind list its comment gives."""
    streams, name = unit_sockets()
    assert streams == ["0.0.0.0:443", "[::]:443"] and name == "web"
    port = free_port("0.0.0.0")
    hosts = ["0.0.0.0", "::"] if has_ipv6() else ["0.0.0.0"]
    for host in hosts:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if ":" in host:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(64)
        made.append(sock)
    async with echo_backend() as backend:
        path = write_config(tmp_path, {
            "listeners": [{"name": "web", "bind": [f"0.0.0.0:{port}", f"[::]:{port}"],
                           "pool": "p"}],
            "pools": [{"name": "p", "backends": [{"address": backend.address}]}]})
        node = Activated(path, [(sock, name) for sock in made])
        try:
            await asyncio.to_thread(node.wait_listening, 1)
            for host in ["127.0.0.1", "::1"][:len(hosts)]:
                reader, writer = await asyncio.open_connection(host, port)
                await roundtrip(reader, writer, f"via {host}".encode())
                writer.close()
        finally:
            assert await asyncio.to_thread(node.stop) == 0, node.stderr()
    assert ("address already in use" not in node.stderr()) and len(hosts) == len(made)


@pytest.mark.parametrize("workers", [1, 2], ids=["w1", "w2"])
async def test_a_reload_gives_an_unused_passed_socket_to_the_listener_it_adds(
        tmp_path: Path, made: list[socket.socket], workers: int) -> None:
    """In the test's process: a passed socket no listener takes at start is kept; a reload that
    adds a listener on its address serves on it (while this test holds it bound, so binding the
    address anew would fail)."""
    from pointsman.app import build_node
    from pointsman.config.loader import load_file
    from pointsman.node.activation import Inherited, inspect
    from tests.support import wait_for

    spare = listening(made)
    async with echo_backend() as backend:
        data: dict[str, Any] = {
            "workers": workers,
            "listeners": [{"name": "web", "bind": f"{LOOPBACK}:{free_port()}", "pool": "p"}],
            "pools": [{"name": "p", "backends": [{"address": backend.address}]}]}
        path = write_config(tmp_path, data)
        inherited = Inherited([inspect(spare.fileno(), "pointsman.socket")])
        node = build_node(load_file(path), config_path=path, announce=lambda line: None,
                          workers=workers, inherited=inherited)
        await node.start()
        try:
            assert [s["listener"] for s in node.passed_sockets()] == [None]
            data["listeners"].append({"name": "late", "bind": f"{LOOPBACK}:{port_of(spare)}",
                                      "pool": "p"})
            write_config(tmp_path, data)
            assert await node.reload() == []
            await wait_for(lambda: all(lst.accepting for lst in node.listeners.values()), STEP,
                           what="the new listener served")
            reader, writer = await asyncio.open_connection(LOOPBACK, port_of(spare))
            await roundtrip(reader, writer, b"on the passed socket")
            writer.close()
            assert [s["listener"] for s in node.passed_sockets()] == ["late"]
        finally:
            await node.shutdown()
