"""The TCP policy's own cost per connection: a real TcpListener's callbacks driven in a loop.

    python bench/policy_bench.py [--connections 20000] [--rounds 7] [--batch 4] [--flow-log]

No sockets move: the listener runs on a real engine (its targets are real), and this script
plays the engine's part: `accepted` (admission and the pick), or, once the listener gave the
engine a fast table, `admitted` for the whole batch (the engine's own admissions),
`connect_result` (OK; not called for a quiet target, as the engine does: their successes go
to `connected` once per batch, counted in the connect_result column), and the `ended` records
of `--batch` connections at a time, as one engine wake-up hands them over. With `--flow-log`
the records go to a FlowLog writing to /dev/null (formatting included, the write left out).
Prints microseconds per connection for each callback and in all (median of the rounds), so a
change to the policy can be measured without the kernel's noise.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import socket
import statistics
import time

import uvloop

from pointsman.config.loader import load_text
from pointsman.pool.pool import Pool
from pointsman.proxy.engine import api
from pointsman.proxy.engine.api import RECORD, End, Flag, Status
from pointsman.proxy.listener import TcpListener
from pointsman.telemetry.flowlog import FlowLog

CONNECTED = getattr(api, "CONNECTED", None)  # a tree before `connected` has none
CONFIG = """\
listeners:
  - {name: http, bind: "127.0.0.1:1", pool: http, max_connections: 50000}
pools:
  - {name: http, idle_timeout: 10m, backends: [{address: "127.0.0.1:9"}]}
"""


async def run(args: argparse.Namespace) -> None:
    config = load_text(CONFIG)
    pool = Pool(config.pools[0])
    loop = asyncio.get_running_loop()
    flow_log = FlowLog(open("/dev/null", "w")) if args.flow_log else None  # noqa: SIM115
    sink: object = None
    if flow_log is not None:  # a tree before the batch form (PYTHONPATH) took one call a record
        sink = flow_log if hasattr(flow_log, "tcp_lines") else flow_log.tcp
    listener = TcpListener(config.listeners[0], pool, loop, flow_sink=sink)  # type: ignore[arg-type]
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    await listener.start(sock)
    lid = listener.lids[0]
    n, batch = args.connections, args.batch
    results: dict[str, list[float]] = {"accepted": [], "connect_result": [], "ended": []}
    conn_id = 1
    flags = Flag.CLIENT_FIN | Flag.BACKEND_FIN | Flag.CONNECTED
    quiet = getattr(Flag, "QUIET", 0)  # a tree before quiet targets has neither
    extended = RECORD.size == 80  # the record carries the connect attempt's start
    # A tree before `connected` counted quiet successes in `ended` (its column then holds them).
    on_connected = getattr(listener, "connected", None)
    for _ in range(args.rounds):
        spent = dict.fromkeys(results, 0.0)
        for _start in range(0, n, batch):
            ids = range(conn_id, conn_id + batch)
            conn_id += batch
            t0 = time.perf_counter()
            fast = getattr(listener, "_fast", None)
            if fast is not None:  # the engine admits: one call for the batch
                slots = list(fast[2].values())
                backends = [slots[cid % len(slots)].target for cid in ids]
                started = time.monotonic_ns()
                listener.admitted([(cid, target.backend, started, "127.0.0.1", 40000 + cid % 20000)
                                   for cid, target in zip(ids, backends, strict=True)])
            else:
                backends = [listener.accepted(cid, "127.0.0.1", 40000 + cid % 20000)
                            for cid in ids]
            t1 = time.perf_counter()
            entries = b""  # the wake-up's quiet successes, packed as the engine does (untimed)
            if on_connected is not None and CONNECTED is not None:
                entries = b"".join(CONNECTED.pack(cid, target.backend, 10_000)
                                   for cid, target in zip(ids, backends, strict=True)
                                   if getattr(target, "quiet", False))
            t1b = time.perf_counter()
            for cid, target in zip(ids, backends, strict=True):
                if not getattr(target, "quiet", False):
                    listener.connect_result(cid, 1, Status.OK, 0, 0.00005)
            if entries:
                on_connected(entries)  # type: ignore[misc]
            t2 = time.perf_counter()
            now = time.monotonic_ns()
            records = b"".join(
                RECORD.pack(cid, target.backend, End.CLIENT_FIN,
                            flags | (quiet if getattr(target, "quiet", False) else 0), 0, 78,
                            210, now - 300_000, now - 250_000, now - 120_000, now, lid,
                            *((now - 260_000,) if extended else ()))
                for cid, target in zip(ids, backends, strict=True))
            t3 = time.perf_counter()
            listener.ended(records)
            t4 = time.perf_counter()
            spent["accepted"] += t1 - t0
            spent["connect_result"] += t2 - t1b
            spent["ended"] += t4 - t3
            if flow_log is not None and len(flow_log.queue) > 4096:
                flow_log.queue.clear()
        for name, value in spent.items():
            results[name].append(value * 1e6 / n)
    total = [sum(each) for each in zip(*results.values(), strict=True)]
    for name, values in (*results.items(), ("total", total)):
        print(f"{name:>15}: {statistics.median(values):6.2f} us "
              f"(min {min(values):.2f}, max {max(values):.2f})")
    assert listener.stats.active == 0, listener.stats.active
    listener.stop_accepting()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--flow-log", action="store_true")
    parser.add_argument("--no-gc", action="store_true")
    args = parser.parse_args()
    if args.no_gc:
        gc.disable()
    uvloop.run(run(args))


if __name__ == "__main__":
    main()
