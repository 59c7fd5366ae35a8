"""TCP keepalive notices a dead peer: in a network namespace this test creates and deletes, a
client connects through pointsman (in the test's loop, its thread inside the namespace) to a
backend, all on the namespace's loopback; then nftables drops one peer's packets, as a NAT that
forgot the flow would. With keepalive idle 1s, interval 1s, 2 probes, pointsman's socket to that
peer fails with ETIMEDOUT within a few seconds: the connection ends as `keepalive_timeout`
(counted, in the flow log, the counters identity holding) and the other peer gets a reset.

- listener side: `listeners[].tcp_keepalive`, the client's packets to the listener are dropped;
- pool side: `pools[].tcp_keepalive`, the backend's packets to pointsman are dropped.

Both engines (here in tests/integration for the engine and loop matrix; the namespace comes
from tests/netns/netns_support.py, and the tests skip where namespaces cannot be made). The
namespace's loopback carries everything; the drop rule matches one direction
by port (on loopback the output hook sees both).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from pointsman.node.runtime import Node
from pointsman.telemetry.flow import EndReason
from tests.integration.operator_support import run_node
from tests.integration.test_engine_keepalive import own_socket
from tests.netns.netns_support import Netns, namespace, unavailable_reason
from tests.support import LOOPBACK, free_port, running, wait_for

pytestmark = pytest.mark.timeout(90)

KEEPALIVE = "{idle: 1s, interval: 1s, count: 2}"
NOTICED = 10.0  # idle 1 + 2 probes 1s apart: ~3 s; generous for a loaded 2-core VM
STEP = 5.0


def _skip_reason() -> str | None:
    reason = unavailable_reason()
    if reason is None and shutil.which("nft") is None:
        reason = "nft is not installed (Debian package nftables)"
    return reason


@pytest.fixture(scope="module")
def netns_ok() -> None:
    reason = _skip_reason()
    if reason is not None:
        pytest.skip(reason)


@contextlib.contextmanager
def inside(ns: Netns) -> Iterator[None]:
    """The test's thread (its event loop, pointsman, the peers) inside `ns` for the block."""
    with ns.entered():
        yield


class Backend:
    """An echo backend that tells how each of its connections ended: eof or reset."""

    def __init__(self) -> None:
        self.ends: list[str] = []
        self.peers: list[tuple[str, int]] = []  # the proxy's address of each connection
        self.port = free_port()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.peers.append(writer.get_extra_info("peername")[:2])
        end = "eof"
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionResetError:
            end = "reset"
        finally:
            self.ends.append(end)
            writer.close()


@contextlib.asynccontextmanager
async def serving(backend: Backend) -> AsyncIterator[None]:
    server = await asyncio.start_server(backend.handle, LOOPBACK, backend.port)
    try:
        yield
    finally:
        server.close()


def config(listen: int, backend: int, log: Path | None, listener_keepalive: str | None,
           pool_keepalive: str | None) -> str:
    listener_key = f"tcp_keepalive: {listener_keepalive}" if listener_keepalive else ""
    pool_key = f"tcp_keepalive: {pool_keepalive}" if pool_keepalive else ""
    return textwrap.dedent(f"""
        listeners:
          - name: lb
            bind: "{LOOPBACK}:{listen}"
            pool: p
            {listener_key}
        pools:
          - name: p
            idle_timeout: 60s
            {pool_key}
            backends: [{{address: "{LOOPBACK}:{backend}"}}]
    """) + (f'flow_log: {{path: "{log}"}}\n' if log is not None else "")


def identity_holds(node: Node) -> bool:
    stats = node.listeners["lb"].statistics()
    return stats.accepted == sum(stats.rejected.values()) + sum(stats.ended.values()) + stats.active


async def one_connection(listen: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(LOOPBACK, listen)
    writer.write(b"hello\n")
    async with asyncio.timeout(STEP):
        assert await reader.readexactly(6) == b"hello\n"
    return reader, writer


async def client_end(reader: asyncio.StreamReader) -> str:
    try:
        async with asyncio.timeout(NOTICED):
            while await reader.read(65536):
                pass
    except ConnectionResetError:
        return "reset"
    return "eof"


async def keepalive_case(tmp_path: Path, drop: str, listener_keepalive: str | None,
                         pool_keepalive: str | None) -> tuple[str, list[str], float]:
    """One connection through pointsman, then the drop rule; returns how the client's stream
    ended, how the backend's ended, and the seconds from the drop to the count."""
    with namespace("ka") as ns, inside(ns):
        backend = Backend()
        listen = free_port()
        log = tmp_path / "flows.log"
        text = config(listen, backend.port, log, listener_keepalive, pool_keepalive)
        async with serving(backend), running(text) as node:
            reader, writer = await one_connection(listen)
            port = listen if drop == "client" else backend.port
            direction = "dport" if drop == "client" else "sport"
            ns.run("nft", f"add table inet ka; add chain inet ka out {{ type filter hook output "
                   f"priority 0; }}; add rule inet ka out tcp {direction} {port} drop")
            dropped = time.monotonic()
            ended = node.listeners["lb"].statistics().ended
            await wait_for(lambda: ended[EndReason.KEEPALIVE_TIMEOUT] == 1, NOTICED,
                           what="keepalive_timeout counted")
            took = time.monotonic() - dropped
            ns.run("nft", "delete table inet ka")  # the survivor's reset may now arrive
            client = "none"
            if drop == "backend":
                client = await client_end(reader)
            else:
                await wait_for(lambda: bool(backend.ends), STEP, what="the backend's end")
            writer.close()
            stats = node.listeners["lb"].statistics()
            assert sum(stats.ended.values()) == 1 and stats.active == 0
            assert identity_holds(node)
            await wait_for(lambda: log.exists() and "keepalive_timeout" in log.read_text(), STEP,
                           what="the flow log line")
        return client, backend.ends, took


async def test_a_silent_client_is_noticed_by_the_listeners_keepalive(
        tmp_path: Path, engine: str, netns_ok: None) -> None:
    _, backend_ends, took = await keepalive_case(tmp_path, "client", KEEPALIVE, None)
    assert backend_ends == ["reset"]
    assert took >= 1.0  # not before the idle time


async def test_a_silent_backend_is_noticed_by_the_pools_keepalive(
        tmp_path: Path, engine: str, netns_ok: None) -> None:
    client, _, took = await keepalive_case(tmp_path, "backend", None, KEEPALIVE)
    assert client == "reset"
    assert took >= 1.0


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_without_keepalive_a_silent_client_goes_unnoticed(tmp_path: Path,
                                                                netns_ok: None) -> None:
    """The control: the same drop, no keepalive, and the connection stays open."""
    with namespace("ka") as ns, inside(ns):
        backend = Backend()
        listen = free_port()
        text = config(listen, backend.port, tmp_path / "flows.log", None, None)
        async with serving(backend), running(text) as node:
            _, writer = await one_connection(listen)
            ns.run("nft", f"add table inet ka; add chain inet ka out {{ type filter hook output "
                   f"priority 0; }}; add rule inet ka out tcp dport {listen} drop")
            await asyncio.sleep(4.0)  # past when keepalive would have ended it (~3 s)
            stats = node.listeners["lb"].statistics()
            assert stats.active == 1 and sum(stats.ended.values()) == 0
            writer.close()


# --- the options on the sockets, on the test's own loopback -----------------------------------


def proxy_sides(listen: int, client: asyncio.StreamWriter, backend: Backend, index: int
                ) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
    """The keepalive options of the proxy's socket to `client` and of its socket to `backend`
    for the backend's connection `index` (the proxy runs in this process)."""
    client_side = own_socket((LOOPBACK, listen), client.get_extra_info("sockname")[:2])
    backend_side = own_socket(backend.peers[index], (LOOPBACK, backend.port))
    return client_side, backend_side


OFF = 0


async def test_the_options_are_on_the_proxys_sockets_and_a_reload_changes_new_ones(
        tmp_path: Path, engine: str) -> None:
    """Listener keepalive on the accepted client socket, pool keepalive on the backend socket,
    exactly as configured; a reload changes both for new connections only; off means off."""
    backend = Backend()
    listen = free_port()
    path = tmp_path / "pointsman.yaml"
    path.write_text(config(listen, backend.port, tmp_path / "flows.log",
                           "{idle: 7s, interval: 3s, count: 4}", "{idle: 11s, interval: 5s, count: 2}"))
    async with serving(backend), run_node(path) as node:
        _, first = await one_connection(listen)
        client_side, backend_side = proxy_sides(listen, first, backend, 0)
        assert client_side == (1, 7, 3, 4)
        assert backend_side == (1, 11, 5, 2)
        path.write_text(config(listen, backend.port, tmp_path / "flows.log",
                               "{idle: 2m, interval: 20s, count: 9}", None))
        assert await node.reload() == []
        _, second = await one_connection(listen)
        client_side, backend_side = proxy_sides(listen, second, backend, 1)
        assert client_side == (1, 120, 20, 9)
        assert backend_side[0] == OFF
        # the first connection keeps what it had
        old_client, old_backend = proxy_sides(listen, first, backend, 0)
        assert (old_client, old_backend) == ((1, 7, 3, 4), (1, 11, 5, 2))
        path.write_text(config(listen, backend.port, tmp_path / "flows.log", None, None))
        assert await node.reload() == []
        _, third = await one_connection(listen)
        client_side, _ = proxy_sides(listen, third, backend, 2)
        assert client_side[0] == OFF
        for writer in (first, second, third):
            writer.close()


def timers(port_filter: str) -> list[str]:
    """`ss -tno` timer fields of the established loopback sockets matching the filter."""
    out = subprocess.run(["ss", "-tnoH", "state", "established", port_filter],
                         capture_output=True, text=True, timeout=10, check=True).stdout
    return [line.split("timer:", 1)[1] if "timer:" in line else "" for line in out.splitlines()]


@pytest.mark.skipif(shutil.which("ss") is None, reason="ss (iproute2) is not installed")
async def test_the_kernel_runs_the_keepalive_timers_with_workers(workers: int) -> None:
    """What an operator sees with `ss -o`: a keepalive timer on the proxy's client socket and
    on its backend socket, whichever process (worker) holds them."""
    backend = Backend()
    listen = free_port()
    text = config(listen, backend.port, None, "{idle: 50s, interval: 5s, count: 3}",
                  "{idle: 40s, interval: 5s, count: 3}")
    async with serving(backend), running(text, workers=workers):
        _, writer = await one_connection(listen)
        client = writer.get_extra_info("sockname")[1]
        proxy_client = timers(f"( sport = :{listen} and dport = :{client} )")
        proxy_backend = timers(f"( dport = :{backend.port} )")
        assert len(proxy_client) == 1 and proxy_client[0].startswith("(keepalive,"), proxy_client
        assert len(proxy_backend) == 1 and proxy_backend[0].startswith("(keepalive,"), proxy_backend
        # the test's own sockets (no keepalive) show no keepalive timer: the check discriminates
        assert not timers(f"( sport = :{client} )")[0].startswith("(keepalive,")
        writer.close()
