"""The flow log to a file: one JSON record per finished connection, written once at teardown,
with the bytes, the backend and how the connection ended; `sample: 0` writes nothing.

Records are read after the runtime shut down (shutdown flushes the log) unless a test is about
when a record appears, in which case it polls the file with a deadline.

Tests that take the `workers` fixture run with one process and with a control process and two
workers, where every worker appends its own records to the same file: the records must still
add up, one whole JSON line per connection. The other tests are about what one record says,
which the same code writes in either model, so they run once.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
from pathlib import Path
from typing import Any

import pytest
import yaml

from pointsman.telemetry.flowlog import FIELDS
from tests.integration.udp_support import udp_clients, udp_echo
from tests.support import (
    LOOPBACK,
    backend,
    close_writer,
    connect,
    echo_backend,
    free_port,
    read_all,
    refused_port,
    roundtrip,
    running,
    statistics_when,
    wait_closed,
    wait_for,
)

# Both engines: the compiled one passes the records through the compiled pass (proxy/_policy.pyx),
# the pure-Python one through proxy/fold.py; the lines must be the same either way.
pytestmark = pytest.mark.usefixtures("engine")

ISO_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
FLUSH_TIMEOUT = 2.0  # the log flushes every 250 ms


def config(listen: str, backends: list[str], log: Path, *, sample: float = 1.0,
           listener: dict[str, Any] | None = None, pool: dict[str, Any] | None = None) -> str:
    return yaml.safe_dump({
        "listeners": [{"name": "lb", "bind": listen, "pool": "p", **(listener or {})}],
        "pools": [{"name": "p", "connect_timeout": "1s",
                   "backends": [{"address": address, "name": f"b{i}"}
                                for i, address in enumerate(backends)], **(pool or {})}],
        "flow_log": {"path": str(log), "sample": sample},
    })


def records(log: Path) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


def client_address(writer: asyncio.StreamWriter) -> str:
    host, port = writer.get_extra_info("sockname")[:2]
    return f"{host}:{port}"


def check_shape(record: dict[str, Any]) -> None:
    assert list(record) == list(FIELDS)
    assert ISO_TIME.match(record["time"]), record["time"]
    assert record["protocol"] == "tcp" and record["listener"] == "lb"
    assert record["duration"] >= 0


async def test_client_fin_record_has_bytes_backend_and_client(tmp_path: Path, workers: int) -> None:
    log = tmp_path / "flows.jsonl"
    listen = f"{LOOPBACK}:{free_port()}"
    async with (
        echo_backend() as peer,
        running(config(listen, [peer.address], log), workers=workers) as runtime,
    ):
        reader, writer = await connect(listen)
        client = client_address(writer)
        await roundtrip(reader, writer, b"0123456789")
        await roundtrip(reader, writer, b"abc")
        writer.write_eof()
        assert await read_all(reader, 2.0) == b""
        await close_writer(writer)
        await statistics_when(runtime, lambda s: sum(s.ended.values()) == 1,
                              what="connection torn down")

    [record] = records(log)
    check_shape(record)
    assert record["client"] == client
    assert record["backend"] == "b0"
    assert (record["bytes_in"], record["bytes_out"]) == (13, 13)
    assert record["end"] == "client_fin"
    assert record["ttfb"] is not None and 0 <= record["ttfb"] <= record["duration"]


async def test_backend_fin_record(tmp_path: Path) -> None:
    async def greet_and_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 hello\r\n")
        await writer.drain()
        writer.write_eof()
        await reader.read()  # until the client's FIN

    log = tmp_path / "flows.jsonl"
    listen = f"{LOOPBACK}:{free_port()}"
    async with backend(greet_and_close) as peer, running(config(listen, [peer.address], log)):
        reader, writer = await connect(listen)
        assert await read_all(reader, 2.0) == b"220 hello\r\n"
        await close_writer(writer)

    [record] = records(log)
    check_shape(record)
    assert record["end"] == "backend_fin"
    assert (record["bytes_in"], record["bytes_out"]) == (0, 11)
    assert record["backend"] == "b0"


async def test_connect_failed_record_has_no_backend(tmp_path: Path) -> None:
    log = tmp_path / "flows.jsonl"
    listen = f"{LOOPBACK}:{free_port()}"
    with refused_port() as dead:
        async with running(config(listen, [f"{LOOPBACK}:{dead}"], log)):
            reader, writer = await connect(listen)
            await wait_closed(reader, 3.0)
            await close_writer(writer)

    [record] = records(log)
    check_shape(record)
    assert record["end"] == "connect_failed"
    assert record["backend"] is None and record["ttfb"] is None
    assert (record["bytes_in"], record["bytes_out"]) == (0, 0)


# One process only: with workers a table of one is one per worker (shares of the whole), so the
# second connection may well be served by the other worker.
async def test_table_full_rejection_is_recorded(tmp_path: Path) -> None:
    log = tmp_path / "flows.jsonl"
    listen = f"{LOOPBACK}:{free_port()}"
    async with echo_backend() as peer:
        text = config(listen, [peer.address], log, listener={"max_connections": 1})
        async with running(text) as runtime:
            reader, writer = await connect(listen)
            await roundtrip(reader, writer, b"held")  # occupies the only table entry
            refused_reader, refused_writer = await connect(listen)
            assert await wait_closed(refused_reader, 2.0) in ("eof", "reset")
            await close_writer(refused_writer)
            stats = runtime.listeners["lb"].stats
            await close_writer(writer)
            await wait_for(lambda: stats.active == 0, 2.0, what="held connection torn down")

    by_end = {record["end"]: record for record in records(log)}
    assert set(by_end) == {"rejected:table_full", "client_fin"}
    rejected = by_end["rejected:table_full"]
    check_shape(rejected)
    assert rejected["backend"] is None and rejected["ttfb"] is None
    assert (rejected["bytes_in"], rejected["bytes_out"]) == (0, 0)
    assert by_end["client_fin"]["bytes_in"] == 4


async def test_idle_timeout_record(tmp_path: Path) -> None:
    log = tmp_path / "flows.jsonl"
    listen = f"{LOOPBACK}:{free_port()}"
    async with echo_backend() as peer:
        text = config(listen, [peer.address], log, pool={"idle_timeout": "200ms"})
        async with running(text):
            reader, writer = await connect(listen)
            await roundtrip(reader, writer, b"ping")
            await wait_closed(reader, 2.0)  # pointsman cuts it after 200 ms of silence
            await close_writer(writer)

    [record] = records(log)
    check_shape(record)
    assert record["end"] == "idle_timeout"
    assert record["backend"] == "b0"
    assert (record["bytes_in"], record["bytes_out"]) == (4, 4)
    assert record["duration"] >= 0.2


async def test_one_record_per_connection_written_at_teardown(tmp_path: Path, workers: int) -> None:
    log = tmp_path / "flows.jsonl"
    listen = f"{LOOPBACK}:{free_port()}"
    async with echo_backend() as peer, running(config(listen, [peer.address], log), workers=workers):
        held_reader, held_writer = await connect(listen)
        await roundtrip(held_reader, held_writer, b"still open")
        clients = []
        for i in range(5):
            reader, writer = await connect(listen)
            clients.append(client_address(writer))
            await roundtrip(reader, writer, f"message {i}".encode())
            await close_writer(writer)
        await wait_for(lambda: len(records(log)) == 5, FLUSH_TIMEOUT, what="five records")
        # The open connection has no record yet: records are written once, at teardown.
        assert sorted(r["client"] for r in records(log)) == sorted(clients)
        held = client_address(held_writer)
        await close_writer(held_writer)
        await wait_for(lambda: len(records(log)) == 6, FLUSH_TIMEOUT, what="sixth record")
        assert records(log)[-1]["client"] == held
        assert records(log)[-1]["bytes_in"] == len(b"still open")

    assert len(records(log)) == 6  # shutdown adds nothing: every record was written once


async def test_sample_zero_writes_nothing(tmp_path: Path, workers: int) -> None:
    log = tmp_path / "flows.jsonl"
    listen = f"{LOOPBACK}:{free_port()}"
    async with (
        echo_backend() as peer,
        running(config(listen, [peer.address], log, sample=0.0), workers=workers) as runtime,
    ):
        for _ in range(5):
            reader, writer = await connect(listen)
            await roundtrip(reader, writer, b"ping")
            await close_writer(writer)
        await statistics_when(runtime, lambda s: sum(s.ended.values()) == 5,
                              what="five connections done")
        dropped = runtime.flow_log_dropped()
        # The writer's own counts live where the log is written: here only with one process.
        flow_log = runtime.flow_log
        assert (flow_log is not None) == (workers == 1)

    assert records(log) == []
    assert dropped == 0
    if flow_log is not None:
        assert (flow_log.written, flow_log.dropped) == (0, 0)


MANY = 240  # connections, from CLIENTS concurrent clients
CLIENTS = 8


async def test_every_connection_is_one_whole_line_when_workers_share_the_file(
    tmp_path: Path, workers: int
) -> None:
    """Concurrent connections of distinct sizes: every line of the file is one whole JSON
    record, one per connection, and the bytes of each add up to what its client sent."""
    log = tmp_path / "flows.jsonl"
    listen = f"{LOOPBACK}:{free_port()}"
    sent: dict[str, int] = {}

    async def client(number: int) -> None:
        for i in range(number, MANY, CLIENTS):
            reader, writer = await connect(listen)
            sent[client_address(writer)] = i + 1
            await roundtrip(reader, writer, b"x" * (i + 1))
            await close_writer(writer)

    async with echo_backend() as peer, running(config(listen, [peer.address], log),
                                               workers=workers) as runtime:
        async with asyncio.timeout(30.0):
            await asyncio.gather(*(client(n) for n in range(CLIENTS)))
        stats = await statistics_when(runtime, lambda s: sum(s.ended.values()) == MANY,
                                      what="every connection ended")

    lines = log.read_text().split("\n")
    assert lines[-1] == "", "the file does not end with a whole line"
    parsed = []
    for number, line in enumerate(lines[:-1]):
        try:
            parsed.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"line {number + 1} is not one JSON record: {line[:200]!r}") from None
    for record in parsed:
        check_shape(record)
    assert len(parsed) == MANY == len(sent)
    assert {r["client"]: r["bytes_in"] for r in parsed} == sent
    assert all(r["bytes_out"] == r["bytes_in"] and r["end"] == "client_fin" for r in parsed)
    assert sum(r["bytes_in"] for r in parsed) == stats.bytes_in == MANY * (MANY + 1) // 2


async def test_a_udp_session_is_one_record(tmp_path: Path) -> None:
    """A UDP session's record: its listener, client, backend, bytes and end, the same fields."""
    log = tmp_path / "flows.jsonl"
    async with udp_echo() as peer:
        port = free_port(kind=socket.SOCK_DGRAM)
        text = yaml.safe_dump({
            "listeners": [{"name": "u", "bind": f"{LOOPBACK}:{port}", "protocol": "udp",
                           "pool": "p", "udp": {"session_timeout": "200ms"}}],
            "pools": [{"name": "p", "backends": [{"address": peer.address, "name": "b0"}]}],
            "flow_log": {"path": str(log)},
        })
        async with running(text), udp_clients((LOOPBACK, port), 1) as clients:
            await clients[0].request(b"ping")
            await wait_for(lambda: len(records(log)) == 1, 5.0, what="the session's record")
    (record,) = records(log)
    assert list(record) == list(FIELDS) and ISO_TIME.match(record["time"])
    assert (record["protocol"], record["listener"], record["backend"]) == ("udp", "u", "b0")
    assert (record["bytes_in"], record["bytes_out"]) == (4, 4)
    assert record["end"] == "idle_timeout" and record["ttfb"] is None and record["duration"] > 0
