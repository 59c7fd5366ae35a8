"""RSS stays flat over many connections (slow, out of CI): 20,000 short connections after a
warm-up of 5,000 through each engine, in a child process so nothing else moves its RSS."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.integration.engine_support import ENGINES

SOAK = textwrap.dedent("""
    import asyncio, json, socket, sys
    from pathlib import Path
    from pointsman.proxy.engine import new_engine
    from pointsman.proxy.engine.simple import RoundRobinPolicy

    def rss():
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])

    async def main(name, warm, total):
        loop = asyncio.get_running_loop()

        async def echo(r, w):
            w.write(await r.read(100))
            await w.drain()
            w.close()

        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        engine = new_engine(loop, name)
        policy = RoundRobinPolicy([engine.target(0, "127.0.0.1", server.sockets[0].getsockname()[1])],
                                  keep_records=False)
        lsock = socket.socket()
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1024)
        engine.add_listener(lsock, policy)
        port = lsock.getsockname()[1]

        async def one():
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"x" * 64)
            data = await r.read(100)
            w.close()
            assert data == b"x" * 64, data

        async def run(count):
            for start in range(0, count, 100):
                await asyncio.gather(*(one() for _ in range(100)))
            while engine.active():
                await asyncio.sleep(0.01)

        await run(warm)
        before = rss()
        await run(total)
        after = rss()
        print(json.dumps({"before": before, "after": after, "ended": policy.ended_count}))
        engine.shutdown(0)

    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
""")


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_rss_is_flat_over_many_connections(engine: str) -> None:
    warm, total = 5_000, 20_000
    run = subprocess.run([sys.executable, "-c", SOAK, engine, str(warm), str(total)],
                         capture_output=True, text=True, timeout=600, check=False,
                         env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["ended"] == warm + total
    growth = result["after"] - result["before"]
    assert growth < 2048, result  # KiB: under 0.1 KiB per connection, i.e. no per-connection leak
