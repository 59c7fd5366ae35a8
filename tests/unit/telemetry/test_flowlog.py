"""The flow log's formatting and its writer: the TCP line says what the record formatter says,
a full queue drops and counts, a writer stuck on a full pipe holds neither the loop nor
the records already queued, and shutdown writes what is left."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from pointsman.telemetry.flowlog import (
    CHUNK,
    FIELDS,
    FlowLog,
    Record,
    format_record,
    tcp_head,
    tcp_line,
)
from tests.support import wait_for

NAMES = st.sampled_from(["web", "b1", "client_fin", "rejected:table_full", 'odd "name"\\', "é"])
SECONDS = st.floats(min_value=0, max_value=1e6, allow_nan=False)
CLIENT = st.one_of(
    st.tuples(st.sampled_from(["127.0.0.1", "::1", "10.1.2.3"]), st.integers(0, 65535)),
    st.just("unix"))
RECORD = st.tuples(
    st.one_of(st.floats(min_value=1e9, max_value=4e9), st.just("2026-01-01T00:00:00.000Z")),
    st.just("tcp"), NAMES, CLIENT, st.one_of(st.none(), NAMES),
    st.integers(0, 1 << 40), st.integers(0, 1 << 40), st.one_of(SECONDS, st.integers(0, 10)),
    st.one_of(st.none(), SECONDS), NAMES)


@given(st.lists(RECORD, max_size=20))
def test_a_tcp_line_is_its_record_as_one_json_line(records: list[Record]) -> None:
    text = "".join(tcp_line(r[0], *r[2:]) for r in records)  # type: ignore[arg-type]
    assert text == "".join(format_record(r) for r in records)
    lines = text.split("\n")
    assert lines[-1] == ""
    for line, record in zip(lines[:-1], records, strict=True):
        parsed = json.loads(line)
        assert list(parsed) == list(FIELDS)
        assert (parsed["listener"], parsed["backend"], parsed["end"]) == (
            record[2], record[4], record[9])
        assert (parsed["bytes_in"], parsed["bytes_out"]) == (record[5], record[6])
        assert abs(parsed["duration"] - record[7]) <= 5e-7 * max(1.0, abs(record[7]))


def test_times_of_one_batch_share_their_text() -> None:
    at = time.time()
    lines = [tcp_line(at, "l", ("127.0.0.1", p), None, 0, 0, 0.5, None, "e") for p in range(3)]
    assert len({json.loads(line)["time"] for line in lines}) == 1
    assert [json.loads(line)["client"] for line in lines] == [f"127.0.0.1:{p}" for p in range(3)]


def add(log: FlowLog, count: int, start: int = 0) -> None:
    for port in range(start, start + count):
        log.tcp(time.time(), "lb", ("127.0.0.1", port), "b", port, 0, 0.25, None, "client_fin")


async def test_a_full_queue_drops_and_counts_and_close_writes_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "flows.jsonl"
    with path.open("w") as stream:
        log = FlowLog(stream, queue_size=10)
        add(log, 15)
        assert (len(log.queue), log.dropped) == (10, 5)
        await log.close()
    lines = path.read_text().splitlines()
    assert [json.loads(line)["bytes_in"] for line in lines] == list(range(10))
    assert (log.written, log.dropped) == (10, 5)


async def test_the_writer_flushes_after_the_interval_and_chunks_a_big_queue(
        tmp_path: Path) -> None:
    path = tmp_path / "flows.jsonl"
    with path.open("w") as stream:
        log = FlowLog(stream, queue_size=10 * CHUNK, flush_interval=0.05)
        writer = asyncio.create_task(log.run())
        add(log, 3)
        await wait_for(lambda: log.written == 3, 5.0, what="three records after the interval")
        add(log, 3 * CHUNK, start=3)  # past half the queue: written without the interval
        await wait_for(lambda: log.written == 3 + 3 * CHUNK, 5.0, what="every record")
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
        await log.close()
    ports = [json.loads(line)["bytes_in"] for line in path.read_text().splitlines()]
    assert ports == list(range(3 + 3 * CHUNK)) and log.dropped == 0


async def test_a_stuck_pipe_holds_the_writer_not_the_loop_and_loses_nothing_queued() -> None:
    """The reader of the log's pipe stops reading: the write blocks in the writer thread, the
    loop keeps running, records beyond the queue are dropped and counted; once the reader
    reads again, every record that was queued is written."""
    read_fd, write_fd = os.pipe()
    stream = os.fdopen(write_fd, "w")
    log = FlowLog(stream, queue_size=2 * CHUNK, flush_interval=0.01)
    writer = asyncio.create_task(log.run())
    add(log, 2 * CHUNK)  # a chunk is about 200 KiB of lines: more than the pipe holds
    await wait_for(lambda: log._writing is not None and len(log.queue) == CHUNK, 5.0,
                   what="the writer stuck in its first write")
    ticks = 0
    for _ in range(50):  # the loop runs on while the write blocks
        await asyncio.sleep(0)
        ticks += 1
    add(log, 3 * CHUNK, start=2 * CHUNK)
    assert ticks == 50 and log.dropped == 2 * CHUNK and len(log.queue) == 2 * CHUNK
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: os.read(read_fd, 1 << 16),
                                                                 b"")))
    reader.start()
    await wait_for(lambda: log.written == 3 * CHUNK, 10.0, what="every queued record")
    writer.cancel()
    await asyncio.gather(writer, return_exceptions=True)
    await log.close()
    stream.close()
    await asyncio.to_thread(reader.join, 10.0)
    os.close(read_fd)
    lines = b"".join(chunks).decode().splitlines()
    written = [json.loads(line)["bytes_in"] for line in lines]
    assert written == list(range(3 * CHUNK))
    assert (log.written, log.dropped) == (3 * CHUNK, 2 * CHUNK)


class WhereWritten(FlowLog):
    """Notes the thread of every write."""

    threads: list[int]

    def _emit(self, text: str, count: int) -> None:
        self.threads.append(threading.get_ident())
        super()._emit(text, count)


async def test_a_file_is_written_in_the_loop_until_a_write_is_slow_then_in_the_thread(
        tmp_path: Path) -> None:
    """To a regular file the writer writes in the loop; a write slower than `slow_write` (here
    every write) sends the following ones to the thread, which writes them all."""
    path = tmp_path / "flows.jsonl"
    with path.open("w") as stream:
        log = WhereWritten(stream, queue_size=10 * CHUNK, flush_interval=0.01, slow_write=-1.0)
        log.threads = []
        assert log.loop_writes_after == 0.0
        writer = asyncio.create_task(log.run())
        add(log, 3)
        await wait_for(lambda: log.written == 3, 5.0, what="the first write, in the loop")
        assert log.loop_writes_after > time.monotonic()  # slow: the thread from now on
        add(log, 3, start=3)
        await wait_for(lambda: log.written == 6, 5.0, what="the second write")
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
        await log.close()
    assert [json.loads(line)["bytes_in"] for line in path.read_text().splitlines()] == list(
        range(6))
    main = threading.get_ident()
    assert log.threads[0] == main and log.threads[1] != main and len(log.threads) == 2


def test_a_pipe_is_always_written_in_the_thread() -> None:
    read_fd, write_fd = os.pipe()
    with os.fdopen(write_fd, "w") as stream:
        assert FlowLog(stream).loop_writes_after == float("inf")
    os.close(read_fd)


def test_the_run_queue_clock_reads_this_threads_wait_for_a_cpu() -> None:
    from pointsman.telemetry.flowlog import _RunQueue

    clock = _RunQueue()
    first = clock.queued()
    sum(range(100_000))  # some work, perhaps preempted
    second = clock.queued()
    clock.close()
    assert 0.0 <= first <= second
    assert clock.fd is None


@given(st.integers(1, 12), st.sampled_from([1.0, 0.5]), st.lists(st.integers(0, 9), max_size=6),
       st.integers(0, 2**32))
def test_a_batch_of_lines_admits_as_one_call_per_line(queue_size: int, sample: float,
                                                      batches: list[int], seed: int) -> None:
    import random

    def fresh() -> FlowLog:
        return FlowLog(open(os.devnull, "w"), sample=sample,
                       queue_size=queue_size, rng=random.Random(seed))

    one, batch = fresh(), fresh()
    port = 0
    for size in batches:
        rows = [(time.time(), "lb", ("127.0.0.1", port + i), "b", i, 0, 0.25, None, "client_fin")
                for i in range(size)]
        port += size
        for row in rows:
            one.tcp(*row)  # type: ignore[arg-type]
        batch.tcp_lines([tcp_line(*row) for row in rows])  # type: ignore[arg-type]
        assert list(batch.queue) == list(one.queue)
        assert (batch.dropped, batch._wake.is_set(), batch._urge.is_set()) == (
            one.dropped, one._wake.is_set(), one._urge.is_set())
        if len(one.queue) > queue_size // 2:  # the writer took some: both the same
            for log in (one, batch):
                log._take(2)
                log._wake.clear()
                log._urge.clear()
    one.stream.close()
    batch.stream.close()


@given(st.lists(st.tuples(st.one_of(st.floats(min_value=1e9, max_value=4e9),
                                    st.sampled_from([1.7e9 + 0.0005, 1.7e9 + 0.0009, 1.7e9 + 0.001]),
                                    st.just("2026-01-01T00:00:00.000Z")),
                          NAMES), max_size=30))
def test_a_batch_head_is_the_start_of_each_line_of_that_time(batches: list[tuple[object, str]]
                                                             ) -> None:
    for at, listener in batches:  # in turn: a head made for one time is never reused for another
        line = tcp_line(at, listener, ("127.0.0.1", 1), None, 0, 0, 0.5, None, "e")  # type: ignore[arg-type]
        assert line.startswith(tcp_head(at, listener))  # type: ignore[arg-type]
