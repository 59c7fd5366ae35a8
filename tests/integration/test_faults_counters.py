"""Counters add up: for every TCP listener, at every moment,

    accepted = sum(rejected) + sum(ended) + active

after a mix of normal, refused, preamble-FIN, reset, timeout and shutdown connections; each
connection is refused at most once, with one reason; `ended{reason="rejected"}` does not exist.
UDP sessions: created = sum(ended) + active.

A watcher task checks the identity on (almost) every turn of the loop while the mix runs, so a
counter that moves one callback before its partner shows up.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import yaml

from pointsman.protocols.proxy_protocol import build_v1
from pointsman.telemetry.flow import EndReason, RejectReason
from tests.hostile import (
    admin_metrics,
    junk_preamble,
    metric_sum,
    raw_connect,
    read_to_end,
    reset,
    send_all,
)
from tests.integration.udp_support import udp_clients, udp_echo
from tests.support import LOOPBACK, echo_backend, free_port, running, wait_for

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("engine")]

HEADER = build_v1(("198.51.100.7", 4000), ("192.0.2.1", 80))
JUNK = 70 * 1024


def tcp_identity(stats: Any) -> tuple[int, int]:
    return stats.accepted, sum(stats.rejected.values()) + sum(stats.ended.values()) + stats.active


@contextlib.asynccontextmanager
async def watching(check: Callable[[], tuple[int, int]]) -> AsyncIterator[list[tuple[int, int]]]:
    """Run `check` on every turn of the loop; the list collects every violation seen."""
    violations: list[tuple[int, int]] = []

    async def watch() -> None:
        while True:
            left, right = check()
            if left != right:
                violations.append((left, right))
            await asyncio.sleep(0)

    task = asyncio.get_running_loop().create_task(watch())
    try:
        yield violations
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def proxied(listen: str) -> socket.socket:
    """A client through the PROXY listener: header, one echoed line."""
    sock = await raw_connect(listen)
    await send_all(sock, HEADER + b"hello\n")
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(5.0):
        got = b""
        while len(got) < 6:
            got += await loop.sock_recv(sock, 64)
    assert got == b"hello\n"
    return sock


async def test_tcp_counters_add_up_through_a_mix_of_endings() -> None:
    async with echo_backend() as peer:
        listen = f"{LOOPBACK}:{free_port()}"
        admin = f"{LOOPBACK}:{free_port()}"
        config = {
            "admin": {"bind": admin},
            "listeners": [{
                "name": "lb", "bind": listen, "pool": "p", "max_connections": 3,
                "proxy_protocol": {"accept": "required", "timeout": "300ms"},
            }],
            "pools": [{"name": "p", "connect_timeout": "1s", "idle_timeout": "400ms",
                       "backends": [{"address": peer.address}]}],
        }
        async with running(yaml.safe_dump(config), shutdown_grace=0.1) as runtime:
            stats = runtime.listeners["lb"].stats
            async with watching(lambda: tcp_identity(stats)) as violations:
                for _ in range(3):  # normal: the client closes
                    sock = await proxied(listen)
                    sock.shutdown(socket.SHUT_WR)
                    assert await read_to_end(sock, 5.0) == (b"", "eof")
                    sock.close()

                # Junk where a header is required, in one read larger than any preamble.
                assert await junk_preamble(listen, JUNK) in ("eof", "reset")

                sock = await raw_connect(listen)  # FIN in the middle of the header
                await send_all(sock, HEADER[:8])
                sock.shutdown(socket.SHUT_WR)
                await read_to_end(sock, 5.0)
                sock.close()

                reset(await proxied(listen))  # client reset

                sock = await raw_connect(listen)  # never finishes its header: inspect timeout
                await send_all(sock, HEADER[:5])
                assert (await read_to_end(sock, 5.0))[0] == b""
                sock.close()

                idle = await proxied(listen)  # idle timeout
                assert await read_to_end(idle, 5.0) == (b"", "eof")
                idle.close()

                held = [await proxied(listen) for _ in range(3)]  # the table is full
                sock = await raw_connect(listen)
                assert (await read_to_end(sock, 5.0))[0] == b""
                sock.close()
                for sock in held[:2]:
                    sock.close()
                await wait_for(lambda: stats.active == 1, 5.0, what="two of three closed")

                # /metrics says the same, and has no ended{reason="rejected"}.
                metrics = await asyncio.to_thread(admin_metrics, admin)
                accepted = metric_sum(metrics, "pointsman_connections_accepted_total")
                rejected = metric_sum(metrics, "pointsman_connections_rejected_total")
                ended = metric_sum(metrics, "pointsman_connections_ended_total")
                active = metric_sum(metrics, "pointsman_active_connections")
                assert accepted == rejected + ended + active
                assert not any('reason="rejected"' in key for key in metrics
                               if key.startswith("pointsman_connections_ended_total"))
            assert violations == [], f"accepted != rejected + ended + active: {violations[:5]}"
        # The last held connection was cut by the shutdown.
        held[2].close()

    assert tcp_identity(stats) == (stats.accepted, stats.accepted)
    assert stats.accepted == 3 + 1 + 1 + 1 + 1 + 1 + 3 + 1
    assert dict(stats.rejected) == {
        RejectReason.PROXY_HEADER_MISSING: 1,
        RejectReason.INSPECT_TIMEOUT: 1,
        RejectReason.TABLE_FULL: 1,
    }
    assert dict(stats.ended) == {
        EndReason.CLIENT_FIN: 3 + 1 + 2,
        EndReason.CLIENT_RESET: 1,
        EndReason.IDLE_TIMEOUT: 1,
        EndReason.SHUTDOWN: 1,
    }
    assert stats.active == 0


async def test_udp_sessions_add_up() -> None:
    """created = sum(ended) + active, through replies-complete, idle and shutdown endings."""
    async with udp_echo() as peer:
        port = free_port(kind=socket.SOCK_DGRAM)
        config = {
            "listeners": [{"name": "u", "bind": f"{LOOPBACK}:{port}", "protocol": "udp",
                           "pool": "p", "udp": {"session_timeout": "300ms"}}],
            "pools": [{"name": "p", "backends": [{"address": peer.address}]}],
        }
        async with running(yaml.safe_dump(config)) as runtime:
            stats = runtime.listeners["u"].stats

            def identity() -> tuple[int, int]:
                return stats.sessions_created, sum(stats.sessions_ended.values()) + stats.sessions

            async with watching(identity) as violations, udp_clients((LOOPBACK, port), 5) as cl:
                for client in cl[:3]:
                    await client.request(b"ping")
                await wait_for(lambda: stats.sessions == 0, 5.0, what="idle sessions expired")
                for client in cl:
                    await client.request(b"again")
                assert stats.sessions == 5
            assert violations == []
            created = stats.sessions_created
    assert identity() == (created, created)
    assert stats.sessions_ended["idle_timeout"] == 3
    assert stats.sessions_ended["shutdown"] == 5
