"""Our limits are ours: running out of file descriptors (EMFILE, ENFILE), buffers or memory, or
source ports, is a local resource error. The connection is refused (`local_resource`), the error
is counted in `pointsman_local_resource_errors_total{op, errno}`, and no backend is blamed: no
passive failure, no ejection, no health change. Accept errors are counted in
`pointsman_accept_errors_total{errno}` and the listener backs off instead of spinning.

The subprocess tests run `pointsman run` (uvloop, as operators do) under `prlimit --nofile=256`,
with one and with two workers; the in-process tests run out of descriptors in the test's own
event loop, on asyncio and uvloop, to see the accept path itself fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.hostile import (
    admin_json,
    admin_metrics,
    echo,
    metric_sum,
    raw_backend,
    raw_connect,
    read_to_end,
    send_all,
)
from tests.integration.udp_support import UdpClient, udp_echo
from tests.support import LOOPBACK, echo_backend, free_port, running, wait_for

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("engine")]

NOFILE = 256
HELD = 400
UDP_HELD = 3 * NOFILE  # one descriptor per session: more than two workers' limits together
AFTER = 100
AFTER_DEADLINE = 2.0


def fd_config(listen: str, admin: str, backends: list[str], workers: int,
              protocol: str = "tcp") -> str:
    listener: dict[str, Any] = {"name": "lb", "bind": listen, "pool": "p", "protocol": protocol,
                                "max_connections": 1000}
    if protocol == "udp":
        listener["udp"] = {"session_timeout": "500ms"}
    return yaml.safe_dump({
        "workers": workers,
        "shutdown_grace": "1s",
        "admin": {"bind": admin},
        "listeners": [listener],
        "pools": [{"name": "p", "connect_timeout": "1s",
                   "backends": [{"address": a} for a in backends]}],
    })


def assert_no_backend_blamed(admin: str) -> None:
    status = admin_json(admin)
    assert status["transitions"] == [], f"backends changed state: {status['transitions']}"
    for pool in status["pools"]:
        for b in pool["backends"]:
            assert b["state"] == "up", b
            assert b["connect_failures"] == 0, b


async def echo_once(listen: str, line: bytes) -> None:
    sock = await raw_connect(listen)
    try:
        await send_all(sock, line)
        sock.shutdown(socket.SHUT_WR)
        assert await read_to_end(sock, AFTER_DEADLINE) == (line, "eof")
    finally:
        sock.close()


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_tcp_out_of_descriptors_blames_no_backend(workers: int, tmp_path: Path) -> None:
    from tests.hostile import fd_limited_pointsman

    # Raw backends: a listen backlog of 1024, so 400 connects at once never overflow it (a
    # dropped SYN would be a real connect failure, and rightly blamed on the backend).
    async with raw_backend(echo) as a, raw_backend(echo) as b:
        listen = f"{LOOPBACK}:{free_port()}"
        admin = f"{LOOPBACK}:{free_port()}"
        text = fd_config(listen, admin, [a.address, b.address], workers)
        with fd_limited_pointsman(text, tmp_path, NOFILE, soft=NOFILE // 2) as proc:
            # The soft limit goes up to the hard one at start, and the tables do not fit in it.
            log = proc.stderr()
            assert f"open-file limit raised from {NOFILE // 2} to {NOFILE}" in log
            assert "could need" in log and f"but the limit is {NOFILE}" in log

            def limit_was_hit() -> bool:
                m = admin_metrics(admin)
                return (metric_sum(m, "pointsman_local_resource_errors_total")
                        + metric_sum(m, "pointsman_accept_errors_total")) > 0

            held = []
            try:
                for i in range(HELD):
                    sock = await raw_connect(listen, timeout=5.0)
                    held.append(sock)
                    with contextlib.suppress(OSError):
                        sock.send(b"held %d\n" % i)
                await wait_for(limit_was_hit, 10.0, what="the descriptor limit reached, counted")
            finally:
                for sock in held:
                    sock.close()
            loop = asyncio.get_running_loop()
            began = loop.time()
            results = await asyncio.gather(
                *(echo_once(listen, b"after %d\n" % i) for i in range(AFTER)),
                return_exceptions=True)
            took = loop.time() - began
            failures = [r for r in results if isinstance(r, BaseException)]
            assert not failures, f"{len(failures)} of {AFTER} failed, first: {failures[0]!r}"
            assert took <= AFTER_DEADLINE, f"{AFTER} connects took {took:.2f}s"
            await asyncio.to_thread(assert_no_backend_blamed, admin)
            final = await asyncio.to_thread(admin_metrics, admin)
            refused = metric_sum(final, "pointsman_connections_rejected_total",
                                 reason="local_resource")
            errors = metric_sum(final, "pointsman_local_resource_errors_total")
            assert refused <= errors, "a local_resource refusal without its counted error"


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_udp_out_of_descriptors_blames_no_backend(workers: int, tmp_path: Path) -> None:
    from tests.hostile import fd_limited_pointsman

    async with udp_echo() as a, udp_echo() as b:
        port = free_port(kind=socket.SOCK_DGRAM)
        listen = f"{LOOPBACK}:{port}"
        admin = f"{LOOPBACK}:{free_port()}"
        text = fd_config(listen, admin, [a.address, b.address], workers, protocol="udp")
        with fd_limited_pointsman(text, tmp_path, NOFILE):
            clients = [await UdpClient.open((LOOPBACK, port)) for _ in range(UDP_HELD)]
            try:
                for client in clients:
                    client.send(b"held")

                def drops() -> float:
                    return metric_sum(admin_metrics(admin), "pointsman_udp_drops_total",
                                      reason="local_resource")

                await wait_for(lambda: drops() > 0, 10.0, what="sessions refused for lack of fds")
                await wait_for(
                    lambda: metric_sum(admin_metrics(admin), "pointsman_udp_sessions") == 0,
                    10.0, what="held sessions expired")
            finally:
                for client in clients:
                    client.close()
            fresh = [await UdpClient.open((LOOPBACK, port)) for _ in range(AFTER)]
            try:
                async with asyncio.timeout(AFTER_DEADLINE):
                    await asyncio.gather(*(c.request(b"after %d" % i)
                                           for i, c in enumerate(fresh)))
            finally:
                for client in fresh:
                    client.close()
            await asyncio.to_thread(assert_no_backend_blamed, admin)
            final = await asyncio.to_thread(admin_metrics, admin)
            assert metric_sum(final, "pointsman_local_resource_errors_total", op="socket") > 0


# --- in the test's own process: the accept itself fails --------------------------------------------


@contextlib.contextmanager
def descriptors_exhausted() -> Iterator[list[int]]:
    """Lower this process's soft RLIMIT_NOFILE to just above what is open and fill the rest, so
    the next socket()/accept() fails with EMFILE; yields the filler fds (close them to free)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 16, hard))
    fillers: list[int] = []
    try:
        while True:
            try:
                fillers.append(os.open("/dev/null", os.O_RDONLY))
            except OSError:
                break
        yield fillers
    finally:
        for fd in fillers:
            with contextlib.suppress(OSError):
                os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_accept_emfile_is_counted_and_the_listener_recovers() -> None:
    async with echo_backend() as peer:
        listen = f"{LOOPBACK}:{free_port()}"
        config = yaml.safe_dump({
            "listeners": [{"name": "lb", "bind": listen, "pool": "p"}],
            "pools": [{"name": "p", "backends": [{"address": peer.address}]}]})
        async with running(config) as runtime:
            loop = asyncio.get_running_loop()
            stats = runtime.listeners["lb"].stats
            client = socket.socket()
            client.setblocking(False)
            try:
                with descriptors_exhausted() as fillers:
                    with contextlib.suppress(BlockingIOError):
                        client.connect((LOOPBACK, int(listen.rpartition(":")[2])))
                    await wait_for(lambda: stats.accept_errors["EMFILE"] >= 1, 5.0,
                                   what="accept EMFILE counted")
                    spins = stats.accept_errors["EMFILE"]
                    await asyncio.sleep(0.2)
                    # Backing off: a handful of retries in 200 ms, not one per loop turn.
                    assert stats.accept_errors["EMFILE"] - spins <= 10
                    for fd in fillers:
                        os.close(fd)
                    fillers.clear()
                await loop.sock_sendall(client, b"late but served\n")
                client.shutdown(socket.SHUT_WR)
                assert await read_to_end(client, 5.0) == (b"late but served\n", "eof")
            finally:
                client.close()
            assert not runtime.transitions


async def test_connect_emfile_is_local_resource_not_a_backend_failure() -> None:
    """The client is accepted, then socket() for the backend fails: refused as local_resource,
    counted with its op and errno, and the pool never hears of it."""
    async with echo_backend() as peer:
        listen = f"{LOOPBACK}:{free_port()}"
        config = yaml.safe_dump({
            "listeners": [{"name": "lb", "bind": listen, "pool": "p"}],
            "pools": [{"name": "p", "passive": {"consecutive_failures": 1},
                       "backends": [{"address": peer.address}]}]})
        async with running(config) as runtime:
            loop = asyncio.get_running_loop()
            stats = runtime.listeners["lb"].stats
            client = socket.socket()
            client.setblocking(False)
            try:
                with descriptors_exhausted() as fillers:
                    os.close(fillers.pop())  # room for the accept, none for the backend socket
                    with contextlib.suppress(BlockingIOError):
                        client.connect((LOOPBACK, int(listen.rpartition(":")[2])))
                    await wait_for(lambda: stats.rejected["local_resource"] == 1, 5.0,
                                   what="refused as local_resource")
                _, how = await read_to_end(client, 5.0)
                assert how in ("eof", "reset")
            finally:
                client.close()
            assert sum(v for k, v in stats.local_resource.items() if k.endswith("EMFILE")) == 1
            pool = runtime.pools["p"]
            assert all(m.stats.connect_failures == 0 for m in pool.members())
            assert not runtime.transitions
            assert stats.ended == {}
            await echo_once_inline(loop, listen)


async def echo_once_inline(loop: asyncio.AbstractEventLoop, listen: str) -> None:
    await echo_once(listen, b"fine again\n")
