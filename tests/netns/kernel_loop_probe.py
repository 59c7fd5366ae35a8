"""Run a kernel listener against the real kernel with asyncio's debug mode on, and report every
slow callback (run inside a namespace by test_kernel_loop.py: `python -m tests.netns.kernel_loop_probe
NAT UPDATES`).

It drives what a running pointsman does to a kernel listener: start (structure and a 4093-slot map),
pool publications (health verdicts and weight changes, each waited for until committed), scrapes
(`statistics()` and the kernel metric families every 10 ms), `close_backend` (conntrack -D), then
the shutdown order (stop_accepting, wait_drained with conntrack -L, close_all). Prints one JSON line:
the slow callbacks asyncio logged ("Executing ... took ..."), transactions applied and scrapes made.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from types import SimpleNamespace

from pointsman.admin.metrics import RuntimeCollector
from pointsman.config.model import ListenerConfig, PoolConfig
from pointsman.kernel.listener import KernelListener
from pointsman.pool.pool import Pool
from pointsman.telemetry.flow import EndReason

SLOW_CALLBACK = 0.05  # seconds: asyncio's threshold for "Executing ... took"
SLOTS = 4093
UPDATE_TIMEOUT = 10.0


class Slow(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Executing"):
            self.messages.append(message[:120] + " ... " + message[-24:])


def configs(nat: str) -> tuple[ListenerConfig, PoolConfig]:
    kernel = {"slots": SLOTS, "nat": nat, "snat": "none" if nat == "stateless" else "masquerade"}
    listener = ListenerConfig.model_validate({"name": "probe", "bind": "10.99.100.1:80", "pool": "probe",
                                              "dataplane": "kernel", "kernel": kernel})
    pool = PoolConfig.model_validate({
        "name": "probe", "algorithm": "maglev", "hash_key": "source_ip_port",
        # The pool's own userspace Maglev table (65537 slots by default) is built on the loop at
        # every change and is not used by a kernel listener: outside this probe's question.
        "maglev_table_size": 13,
        "backends": [{"address": f"10.99.{11 + i}.2:8080", "name": f"b{i + 1}"} for i in range(3)],
    })
    return listener, pool


async def main(nat: str, updates: int) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    loop.set_debug(True)
    loop.slow_callback_duration = SLOW_CALLBACK
    slow = Slow()
    logging.getLogger("asyncio").addHandler(slow)
    listener_config, pool_config = configs(nat)
    pool = Pool(pool_config)
    kernel = KernelListener(listener_config, pool, loop)
    collector = RuntimeCollector(SimpleNamespace(listeners={"probe": kernel}))  # type: ignore[arg-type]
    await kernel.start()
    scrapes = 0
    done = asyncio.Event()

    async def scrape() -> None:
        nonlocal scrapes
        while not done.is_set():
            kernel.statistics()
            list(collector._kernel())
            scrapes += 1
            await asyncio.sleep(0.01)

    scraper = asyncio.create_task(scrape())
    started = time.monotonic()
    for k in range(updates):
        applied = kernel.updates.applied
        if k % 3 == 2:
            pool.set_weight("b1", 1 + k % 4)
        else:
            pool.health_verdict("b2", k % 3 == 1, "probe")
        if k == updates // 2:
            kernel.close_backend("b3", EndReason.BACKEND_DOWN)
        async with asyncio.timeout(UPDATE_TIMEOUT):
            while kernel.updates.applied == applied:
                await asyncio.sleep(0.005)
    took = time.monotonic() - started
    kernel.stop_accepting()
    drained = await kernel.wait_drained(1.0)
    kernel.close_all(EndReason.SHUTDOWN)
    done.set()
    await scraper
    return {"slow": slow.messages, "applied": kernel.updates.applied, "failed": kernel.updates.failed,
            "scrapes": scrapes, "seconds": round(took, 2), "drained": drained}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1], int(sys.argv[2])))), flush=True)
