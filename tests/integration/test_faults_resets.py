"""A reset stays a reset: a RST on one side reaches the other side as a RST, after every byte that
came before it, on the transport path and on the splice path, during the preamble and during
the connect. The flow record and `connections_ended_total{reason}` say which side reset.

A reset that arrives as a FIN makes a truncated reply look complete; a reset that throws away
the bytes still queued in the proxy truncates a reply that the backend did send.
"""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Any

import pytest
import yaml

from pointsman.telemetry.flow import EndReason
from tests.hostile import (
    Received,
    pattern,
    raw_backend,
    raw_connect,
    read_to_end,
    record_until_end,
    reset,
    send_all,
    send_then_reset,
    wait_sent,
)
from tests.support import LOOPBACK, free_port, one_pool_config, running, wait_for

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("engine")]

SIZES = [0, 1000, 1 << 20]
REQUEST = 4096  # what the client sends first: past `zero_copy_after` on the splice path
SPLICE_AFTER = 1024
PATHS = {
    "transport": {"zero_copy": "off"},
    "splice": {"zero_copy": "auto", "zero_copy_after": SPLICE_AFTER},
}


def config(listen: str, backend: str, path: str, log: Path, **listener: Any) -> str:
    data = yaml.safe_load(one_pool_config(listen, [backend], pool=PATHS[path], listener=listener))
    data["flow_log"] = {"path": str(log)}
    return yaml.safe_dump(data)


async def flow_records(log: Path, count: int) -> list[dict[str, Any]]:
    """The flow log is written in batches: wait until `count` records are there."""

    def lines() -> list[str]:
        return log.read_text().splitlines() if log.exists() else []

    await wait_for(lambda: len(lines()) >= count, 5.0, what=f"{count} flow records")
    return [json.loads(line) for line in lines()]


def greet_then_reset(n: int, go: asyncio.Event) -> Any:
    """Backend: read the request, send a greeting (the splice path's threshold is passed both
    ways), wait for the test's go, send `n` bytes, wait until they all left, then RST."""

    async def handler(sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        got = 0
        while got < REQUEST:
            data = await loop.sock_recv(sock, 65536)
            if not data:
                return
            got += len(data)
        await send_all(sock, GREETING)
        await go.wait()
        await send_then_reset(n)(sock)

    return handler


GREETING = pattern(2 * SPLICE_AFTER, seed=9)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("n", SIZES)
async def test_backend_reset_reaches_the_client_after_every_byte(
        path: str, n: int, tmp_path: Path) -> None:
    go = asyncio.Event()
    async with raw_backend(greet_then_reset(n, go)) as peer:
        listen = f"{LOOPBACK}:{free_port()}"
        log = tmp_path / "flows.jsonl"
        async with running(config(listen, peer.address, path, log)) as runtime:
            stats = runtime.listeners["lb"].stats
            sock = await raw_connect(listen)
            try:
                await send_all(sock, pattern(REQUEST))
                if path == "splice":
                    await wait_for(lambda: stats.spliced == 1, 5.0, what="moved to splice")
                go.set()
                data, how = await read_to_end(sock, 20.0)
            finally:
                sock.close()
            await wait_for(lambda: stats.active == 0, 5.0, what="connection ended")
            assert (len(data) - len(GREETING), how) == (n, "reset")
            assert data == GREETING + pattern(n)
            assert dict(stats.ended) == {EndReason.BACKEND_RESET: 1}
            (record,) = await flow_records(log, 1)
            assert record["end"] == "backend_reset"
            assert record["bytes_out"] == len(GREETING) + n


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("n", SIZES)
async def test_client_reset_reaches_the_backend_after_every_byte(
        path: str, n: int, tmp_path: Path) -> None:
    got: list[Received] = []
    async with raw_backend(record_until_end(got)) as peer:
        listen = f"{LOOPBACK}:{free_port()}"
        log = tmp_path / "flows.jsonl"
        async with running(config(listen, peer.address, path, log)) as runtime:
            stats = runtime.listeners["lb"].stats
            sock = await raw_connect(listen)
            await send_all(sock, pattern(REQUEST))
            await wait_for(lambda: peer.accepted == 1 and stats.bytes_in >= REQUEST, 5.0,
                           what="backend connected")
            await send_all(sock, GREETING)  # past zero_copy_after once connected
            if path == "splice":
                await wait_for(lambda: stats.spliced == 1, 5.0, what="moved to splice")
            await send_all(sock, pattern(n, seed=3))
            await wait_sent(sock)
            reset(sock)
            await wait_for(lambda: len(got) == 1, 10.0, what="backend saw the end")
            await wait_for(lambda: stats.active == 0, 5.0, what="connection ended")
            sent = pattern(REQUEST) + GREETING + pattern(n, seed=3)
            assert (len(got[0].data), got[0].end) == (len(sent), "reset")
            assert got[0].data == sent
            assert dict(stats.ended) == {EndReason.CLIENT_RESET: 1}
            (record,) = await flow_records(log, 1)
            assert record["end"] == "client_reset"


async def test_client_reset_during_the_preamble_is_one_client_reset(tmp_path: Path) -> None:
    got: list[Received] = []
    async with raw_backend(record_until_end(got)) as peer:
        listen = f"{LOOPBACK}:{free_port()}"
        log = tmp_path / "flows.jsonl"
        text = config(listen, peer.address, "transport", log,
                      proxy_protocol={"accept": "required"})
        async with running(text) as runtime:
            sock = await raw_connect(listen)
            await send_all(sock, b"PROXY TCP4 ")  # half a header
            await wait_sent(sock)
            reset(sock)
            stats = runtime.listeners["lb"].stats
            await wait_for(lambda: stats.active == 0 and stats.accepted == 1, 5.0,
                           what="connection ended")
            assert dict(stats.ended) == {EndReason.CLIENT_RESET: 1}
            assert sum(stats.rejected.values()) == 0
            assert peer.accepted == 0
            (record,) = await flow_records(log, 1)
            assert record["end"] == "client_reset"


async def test_client_reset_during_the_connect_never_reaches_the_backend_as_a_clean_end(
        tmp_path: Path) -> None:
    """The backend's accept queue is full, so the proxy's connect hangs in SYN_SENT; the client
    sends a request and resets. The backend must never see that request followed by a FIN."""
    loop = asyncio.get_running_loop()
    slow = socket.socket()
    slow.bind((LOOPBACK, 0))
    slow.listen(0)
    slow.setblocking(False)
    filler = socket.socket()
    filler.setblocking(False)
    address = f"{LOOPBACK}:{slow.getsockname()[1]}"
    try:
        await loop.sock_connect(filler, slow.getsockname())  # the one queue slot
        listen = f"{LOOPBACK}:{free_port()}"
        log = tmp_path / "flows.jsonl"
        data = yaml.safe_load(one_pool_config(listen, [address], pool={"connect_timeout": "10s"}))
        data["flow_log"] = {"path": str(log)}
        async with running(yaml.safe_dump(data)) as runtime:
            sock = await raw_connect(listen)
            await send_all(sock, b"DELETE everything\n")
            await wait_sent(sock)
            reset(sock)
            stats = runtime.listeners["lb"].stats
            await wait_for(lambda: stats.active == 0 and stats.accepted == 1, 5.0,
                           what="connection ended")
            assert dict(stats.ended) == {EndReason.CLIENT_RESET: 1}
            # Whatever reached the backend's queue meanwhile (the filler, maybe the proxy's late
            # connection) must not be a request followed by a FIN.
            for _ in range(3):
                try:
                    conn, _ = slow.accept()
                except BlockingIOError:
                    break
                conn.setblocking(False)
                try:
                    got, how = await read_to_end(conn, 0.5)
                except TimeoutError:
                    got, how = b"", "open"
                conn.close()
                assert not (got and how == "eof"), "the request reached the backend as complete"
            (record,) = await flow_records(log, 1)
            assert record["end"] == "client_reset"
            assert not runtime.transitions, "a client reset changed a backend's state"
    finally:
        filler.close()
        slow.close()



@pytest.mark.parametrize("path", list(PATHS))
async def test_a_reset_towards_a_client_that_does_not_read_goes_after_half_close_timeout(
        path: str) -> None:
    """The bytes before the reset wait for a client that reads; one that does not read gets the
    reset (never a FIN) once half_close_timeout has passed without progress."""
    n = 200_000  # more than the client's small window takes, less than the proxy buffers
    async with raw_backend(send_then_reset(n, read_first=REQUEST)) as peer:
        listen = f"{LOOPBACK}:{free_port()}"
        text = one_pool_config(listen, [peer.address], pool={
            **PATHS[path], "half_close_timeout": "500ms", "idle_timeout": "60s"})
        async with running(text) as runtime:
            stats = runtime.listeners["lb"].stats
            sock = await raw_connect(listen, rcvbuf=4096)
            try:
                await send_all(sock, pattern(REQUEST))
                await wait_for(lambda: stats.active == 0, 10.0, what="connection ended")
                data, how = await read_to_end(sock, 5.0)
            finally:
                sock.close()
            assert how == "reset"
            assert data == pattern(n)[:len(data)] and len(data) < n
            assert dict(stats.ended) == {EndReason.BACKEND_RESET: 1}
