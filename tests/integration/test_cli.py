"""The command line as an operator meets it: check, run, demo, --version."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import pointsman
from tests.support import (
    LOOPBACK,
    PointsmanProcess,
    free_port,
    one_pool_config,
    pointsman_process,
    refused_port,
)

PYTHON_M = [sys.executable, "-m", "pointsman"]
CLI_TIMEOUT = 20.0


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PYTHON_M, *args], capture_output=True, text=True, timeout=CLI_TIMEOUT, check=False
    )


GOOD = textwrap.dedent(
    """\
    listeners:
      - name: pg
        bind: "127.0.0.1:6432"
        pool: pg
      - name: web
        bind: "[::1]:8080"
        pool: web
    pools:
      - name: pg
        backends:
          - address: "127.0.0.1:5432"
          - address: "127.0.0.1:5433"
      - name: web
        algorithm: least_connections
        backends:
          - address: "127.0.0.1:8081"
    """
)

BAD = textwrap.dedent(
    """\
    listeners:
      - name: pg
        bind: "127.0.0.1"
        pool: pgx
        backlog: many
    pools:
      - name: pg
        connect_timeout: -2s
        backends:
          - address: "127.0.0.1:99999"
    """
)


def test_version() -> None:
    result = cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"pointsman, version {pointsman.__version__}"


def test_check_good_config_prints_one_line_per_listener(tmp_path: Path) -> None:
    path = tmp_path / "good.yaml"
    path.write_text(GOOD)
    result = cli("check", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "ok pg: tcp 127.0.0.1:6432 -> pool pg (2 backends, round_robin)",
        "ok web: tcp [::1]:8080 -> pool web (1 backend, least_connections)",
    ]


@pytest.mark.skipif(shutil.which("pointsman") is None, reason="console script not on PATH")
def test_console_script_runs_check(tmp_path: Path) -> None:
    path = tmp_path / "good.yaml"
    path.write_text(GOOD)
    result = subprocess.run(
        ["pointsman", "check", str(path)],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 2


def test_check_bad_config_prints_every_error_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(BAD)
    result = cli("check", str(path))
    assert result.returncode == 1
    assert result.stdout == ""
    where = str(path)
    assert result.stderr.splitlines() == [
        f"{where}:3: listeners[0].bind: expected host:port, got '127.0.0.1'",
        f"{where}:4: listeners[0].pool: no pool named 'pgx'",
        f"{where}:5: listeners[0].backlog: input should be a valid integer, "
        "unable to parse string as an integer, got 'many'",
        f"{where}:8: pools[0].connect_timeout: a duration cannot be negative, got '-2s'",
        f"{where}:10: pools[0].backends[0].address: "
        "expected a port between 1 and 65535, got '127.0.0.1:99999'",
        f"5 error(s) in {where}",
    ]


def test_check_missing_file_exits_1(tmp_path: Path) -> None:
    result = cli("check", str(tmp_path / "nope.yaml"))
    assert result.returncode == 1
    assert "nope.yaml: cannot read" in result.stderr


def test_run_refuses_bad_config_without_listening(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(BAD)
    result = cli("run", str(path))
    assert result.returncode == 1
    assert result.stdout == ""
    assert f"5 error(s) in {path}" in result.stderr


def test_run_prints_listening_line_and_exits_0_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    with refused_port() as b1, refused_port() as b2:
        config = one_pool_config(f"{LOOPBACK}:{port}", [f"{LOOPBACK}:{b1}", f"{LOOPBACK}:{b2}"])
        with pointsman_process(config, tmp_path) as proc:
            assert proc.lines == [
                f"listening tcp {LOOPBACK}:{port} -> pool p (2 backends, round_robin)"
            ]
            code = proc.stop()
    assert code == 0, proc.stderr()


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_run_sigterm_right_after_listening_line_exits_0(tmp_path: Path, loop: str) -> None:
    """The "listening" line means ready: signal handlers must already be in place."""
    config = one_pool_config(f"{LOOPBACK}:{free_port()}", [f"{LOOPBACK}:1"])
    with pointsman_process(config, tmp_path, uvloop=loop == "uvloop") as proc:
        proc.signal()  # no pause: the line was just read
        code = proc.wait()
    assert code == 0, f"exit status {code}; stderr:\n{proc.stderr()}"


def test_run_exits_1_when_the_address_is_taken(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = tmp_path / "pointsman.yaml"
        path.write_text(one_pool_config(f"{LOOPBACK}:{port}", [f"{LOOPBACK}:1"]))
        result = cli("run", str(path))
    assert result.returncode == 1
    assert "cannot start" in result.stderr


def greeting(port: int) -> str:
    """Connect to the demo, read its greeting line, check the echo, close."""
    with socket.create_connection((LOOPBACK, port), timeout=5.0) as sock:
        reader = sock.makefile("rb")
        line = reader.readline().decode()
        sock.sendall(b"echo me\n")
        assert reader.readline() == b"echo me\n"
    return line.strip()


def test_demo_round_robins_over_three_backends(tmp_path: Path) -> None:
    port = free_port()
    proc = PointsmanProcess(["demo", "--port", str(port), "--admin-port", str(free_port())], tmp_path)
    try:
        proc.wait_lines(lambda lines: any("Stop with Ctrl-C" in line for line in lines))
        assert f"listening tcp {LOOPBACK}:{port} -> pool demo (3 backends, round_robin)" in (
            proc.lines
        )
        greetings = [greeting(port) for _ in range(6)]
        assert proc.stop() == 0, proc.stderr()
    finally:
        proc.close()

    names = {f"hello from backend-{i}" for i in (1, 2, 3)}
    assert set(greetings[:3]) == names  # one full turn visits each backend once ...
    assert greetings[3:] == greetings[:3]  # ... and the next turn repeats the order
