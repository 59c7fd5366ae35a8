"""Which connection engine runs: `pointsman run` names it in its start-up line, POINTSMAN_ENGINE
chooses it (and a wrong value stops the start with one clear line), and every TCP listener of a
process shares that one engine, driven by one reader on the node's loop, given back when the
last listener is done with it."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import yaml

from pointsman.proxy import engines
from tests.support import (
    LOOPBACK,
    close_writer,
    connect,
    echo_backend,
    free_port,
    one_pool_config,
    pointsman_process,
    roundtrip,
    running,
    wait_for,
)


def test_the_start_up_line_names_the_engine(engine: str, tmp_path: Path) -> None:
    listen = f"{LOOPBACK}:{free_port()}"
    with pointsman_process(one_pool_config(listen, [f"{LOOPBACK}:{free_port()}"]),
                           tmp_path) as proc:
        starting = [line for line in proc.stderr().splitlines() if "starting: " in line]
    assert starting and starting[0].endswith(f"connection engine {engine}"), starting


def test_an_unknown_engine_stops_the_start(tmp_path: Path) -> None:
    path = tmp_path / "pointsman.yaml"
    path.write_text(one_pool_config(f"{LOOPBACK}:{free_port()}", [f"{LOOPBACK}:{free_port()}"]))
    done = subprocess.run([sys.executable, "-m", "pointsman", "run", str(path)],
                          capture_output=True, text=True, timeout=30,
                          env={"POINTSMAN_ENGINE": "rust", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 1
    assert "cannot start: POINTSMAN_ENGINE must be 'python', 'cython' or 'auto'" in done.stderr
    assert "listening" not in done.stdout


async def test_listeners_of_a_process_share_one_engine_given_back_at_the_end(
        engine: str) -> None:
    async with echo_backend() as peer:
        a, b = f"{LOOPBACK}:{free_port()}", f"{LOOPBACK}:{free_port()}"
        text = yaml.safe_load(one_pool_config(a, [peer.address]))
        text["listeners"].append({"name": "other", "bind": b, "pool": "p"})
        loop = asyncio.get_running_loop()
        async with running(yaml.safe_dump(text)) as node:
            shared = engines.shared_engine(loop)
            assert shared is not None and shared.name == engine
            assert {lst.engine for lst in node.listeners.values()} == {shared}  # type: ignore[attr-defined]
            for address in (a, b):
                reader, writer = await connect(address)
                await roundtrip(reader, writer, b"through the one engine")
                await close_writer(writer)
        await wait_for(lambda: engines.shared_engine(loop) is None, 2.0,
                       what="the engine shut down once both listeners were done")
