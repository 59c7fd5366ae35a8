"""Nothing in the kernel data plane blocks the event loop (issue 13, item 6), checked against the
real kernel: kernel_loop_probe.py runs a kernel listener in a namespace with asyncio's debug mode
(slow callback threshold 50 ms) through map updates, scrapes, a conntrack cut and the shutdown
order, and reports every slow callback. There must be none.

The probe runs under SCHED_FIFO (`chrt`) where it can: asyncio measures wall time per callback,
and on a machine shared with other busy processes the scheduler can leave the loop off the CPU
for tens of milliseconds, which says nothing about pointsman. Real-time priority keeps other
tenants out, so what remains is what the code does to the loop (waits for I/O, locks, the GIL).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from .netns_support import namespace, nftables_unavailable_reason

_reason = nftables_unavailable_reason()
pytestmark = pytest.mark.skipif(_reason is not None, reason=_reason or "")

ROOT = Path(__file__).resolve().parents[2]
UPDATES = 30


@pytest.mark.parametrize("nat", ["conntrack", "stateless"])
def test_no_slow_callback_over_map_updates_and_scrapes(nat: str) -> None:
    with namespace("loop") as ns:
        ns.sysctl("net.ipv4.ip_forward", "1")
        realtime = ["chrt", "-f", "10"] if shutil.which("chrt") else []
        out = ns.run(*realtime, sys.executable, "-m", "tests.netns.kernel_loop_probe", nat, str(UPDATES),
                     timeout=120)
        assert "pointsman" not in ns.run("nft", "list", "tables")
    result = json.loads(out.strip().splitlines()[-1])
    assert result["applied"] == UPDATES + 1 and result["failed"] == 0, result
    assert result["scrapes"] > UPDATES, result
    assert result["slow"] == [], result["slow"]
    print(f"\n{nat}: {UPDATES} map updates (4093 slots) in {result['seconds']} s, "
          f"{result['scrapes']} scrapes, no slow callback")
