"""The README's "Next" commands work as printed: pasted into a shell in the clone while the demo
runs, then with the README's complete config saved as pointsman.yaml.

They use the fixed ports the README shows (8800, 9900, 6432): when another process holds one,
the test is skipped with that reason rather than rewritten to other ports (then it would no
longer test what the README prints).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from tests.support import LOOPBACK, PointsmanProcess

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
VENV_POINTSMAN = ROOT / ".venv" / "bin" / "pointsman"
ENV_VARS = ("POINTSMAN_ADMIN", "POINTSMAN_TOKEN", "POINTSMAN_TOKEN_FILE", "POINTSMAN_CONFIG")
TIMEOUT = 20.0


def section(title: str) -> str:
    return README.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def commands(block: str) -> list[str]:
    """The command lines of a sh block, without their trailing comments."""
    out = []
    for line in block.splitlines():
        command = re.split(r"\s{2,}#", line, maxsplit=1)[0].strip()
        if command and not command.startswith("#"):
            out.append(command)
    return out


def sh_blocks(text: str) -> list[str]:
    return re.findall(r"```sh\n(.*?)```", text, re.S)


def need_free(*ports: int) -> None:
    for port in ports:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((LOOPBACK, port))
            except OSError:
                pytest.skip(f"port {port}, which the README shows, is in use here")
    if not VENV_POINTSMAN.exists():
        pytest.skip("no .venv in the clone (the README's commands are for scripts/setup.sh)")


def shell(command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    return subprocess.run(command, shell=True, cwd=cwd, capture_output=True, text=True,
                          timeout=TIMEOUT, env=env, check=False)


def test_the_first_two_commands_are_the_scripts() -> None:
    assert commands(sh_blocks(README)[0]) == ["bash scripts/demo.sh", "bash scripts/test.sh"]


def test_next_commands_against_the_demo(tmp_path: Path) -> None:
    need_free(8800, 9900)
    block = commands(sh_blocks(section("Next"))[0])
    assert any(c.startswith(".venv/bin/pointsman drain demo backend-1") for c in block)
    demo = PointsmanProcess(["demo"], tmp_path)
    try:
        demo.wait_lines(lambda lines: any("Stop with Ctrl-C" in line for line in lines))
        for command in block:
            if command.startswith("echo hi | socat") and shutil.which("socat") is None:
                continue
            done = shell(command, ROOT)
            assert done.returncode == 0, (command, done.stderr)
            if "socat" in command:
                assert done.stdout.startswith("hello from backend-"), done.stdout
        assert demo.stop() == 0, demo.stderr()
    finally:
        demo.close()


def test_next_commands_with_the_complete_config(tmp_path: Path) -> None:
    need_free(6432, 9900)
    config = re.findall(r"```yaml\n(.*?)```", section("A complete config"), re.S)[0]
    (tmp_path / "pointsman.yaml").write_text(config)
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")  # "in the clone": .venv/bin/... resolves
    check, run, status = commands(sh_blocks(section("Next"))[1])
    assert run == ".venv/bin/pointsman run pointsman.yaml"

    done = shell(check, tmp_path)
    assert done.returncode == 0 and done.stdout.startswith("ok pg: tcp 127.0.0.1:6432"), done.stderr
    # the run line as printed, but with the file's full path: the test runner's cwd is elsewhere
    server = PointsmanProcess(["run", str(tmp_path / "pointsman.yaml")], tmp_path)
    try:
        server.wait_lines(lambda lines: any(line.startswith("admin api") for line in lines))
        assert server.lines[0].startswith("listening tcp 127.0.0.1:6432 -> pool pg"), server.lines
        done = shell(status, tmp_path)
        assert done.returncode == 0 and "pg-b" in done.stdout, (status, done.stderr)
        assert server.stop() == 0, server.stderr()
    finally:
        server.close()
