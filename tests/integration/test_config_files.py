"""Config files as operators keep them: `pointsman check` and reload with include and ${ENV}."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from pointsman.app import build_node
from pointsman.config.loader import load_file
from tests.integration.peers import ask_name, named_backends
from tests.support import LOOPBACK, free_port


def check(path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pointsman", "check", str(path)],
                          capture_output=True, text=True, timeout=30,
                          env={**os.environ, **env})


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def test_check_reads_includes_and_the_environment(tmp_path: Path) -> None:
    main = write(tmp_path / "pointsman.yaml", """
        include: [conf.d/*.yaml]
        shutdown_grace: ${GRACE:-5s}
    """)
    web = write(tmp_path / "conf.d" / "web.yaml", """
        listeners: [{name: web, bind: "127.0.0.1:${WEB_PORT}", pool: web}]
        pools: [{name: web, backends: [{address: "127.0.0.1:9001"}, {address: "127.0.0.1:9002"}]}]
    """)
    done = check(main, WEB_PORT="8080")
    assert (done.returncode, done.stdout) == (
        0, "ok web: tcp 127.0.0.1:8080 -> pool web (2 backends, round_robin)\n"), done.stderr
    env = {k: v for k, v in os.environ.items() if k != "WEB_PORT"}
    done = subprocess.run([sys.executable, "-m", "pointsman", "check", str(main)],
                          capture_output=True, text=True, timeout=30, env=env)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"{web}:1: listeners[0].bind: environment variable WEB_PORT is not set (write "
        "${WEB_PORT:-default} to give a default)",
        f"1 error(s) in {main}",
    ]


async def test_reload_picks_up_a_new_included_file(tmp_path: Path) -> None:
    first, second = f"{LOOPBACK}:{free_port()}", f"{LOOPBACK}:{free_port()}"
    async with named_backends("a", "b") as (a, b):
        main = write(tmp_path / "pointsman.yaml", f"""
            include: [conf.d/*.yaml]
            shutdown_grace: 0.2s
            listeners: [{{name: one, bind: "{first}", pool: a}}]
            pools: [{{name: a, backends: [{{address: "{a.address}", name: a}}]}}]
        """)
        runtime = build_node(load_file(main), config_path=main, announce=lambda line: None, workers=1)
        await runtime.start()
        try:
            assert await ask_name(first) == "a"
            write(tmp_path / "conf.d" / "two.yaml", f"""
                listeners: [{{name: two, bind: "{second}", pool: b}}]
                pools: [{{name: b, backends: [{{address: "{b.address}", name: b}}]}}]
            """)
            assert await runtime.reload() == []
            assert await ask_name(second) == "b"
            write(tmp_path / "conf.d" / "three.yaml", "pools: [{name: a, backends: []}]\n")
            errors = await runtime.reload()  # refused whole, naming the new file's line
            assert errors == [f"{tmp_path}/conf.d/three.yaml:1: pools[0]: duplicate name 'a' "
                              f"(first at {main}:4, pools[0])",
                              f"{tmp_path}/conf.d/three.yaml:1: pools[0].backends: list should "
                              "have at least 1 item after validation, not 0, got []"]
            assert await asyncio.wait_for(ask_name(second), 5) == "b"
        finally:
            await runtime.shutdown()
