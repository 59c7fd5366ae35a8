"""The command line as an operator meets it: check, run, demo, --version."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

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


ENV_VARS = ("POINTSMAN_ADMIN", "POINTSMAN_TOKEN", "POINTSMAN_TOKEN_FILE", "POINTSMAN_CONFIG")
# TEST-NET-1 (RFC 5737): documentation only, never an address of a test host.
NOT_LOCAL = "192.0.2.10"


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    return subprocess.run(
        [*PYTHON_M, *args], capture_output=True, text=True, timeout=CLI_TIMEOUT, check=False,
        env={**clean, **(env or {})},
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
    result = cli("check", "--no-bind", str(path))  # fixed ports: other tests may hold them
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
        ["pointsman", "check", "--no-bind", str(path)],
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
    port, admin = free_port(), free_port()
    proc = PointsmanProcess(["demo", "--port", str(port), "--admin-port", str(admin)], tmp_path)
    try:
        proc.wait_lines(lambda lines: any("Stop with Ctrl-C" in line for line in lines))
        assert f"listening tcp {LOOPBACK}:{port} -> pool demo (3 backends, round_robin)" in (
            proc.lines
        )
        greetings = [greeting(port) for _ in range(6)]

        # The printed commands work as printed (the admin port is not the default: --admin).
        status = next(line.strip() for line in proc.lines if " status --admin" in line)
        assert status.endswith(f" status --admin http://{LOOPBACK}:{admin}"), status
        drain = next(line.strip() for line in proc.lines if " drain demo " in line)
        drain = drain.split("    (")[0]
        clean = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
        for command, expected in ((status, "backend-1"), (drain, "demo/backend-1: draining")):
            done = subprocess.run(command, shell=True, capture_output=True, text=True, env=clean,
                                  timeout=CLI_TIMEOUT, check=False)
            assert done.returncode == 0 and expected in done.stdout, (command, done.stderr)
        assert proc.stop() == 0, proc.stderr()
    finally:
        proc.close()

    names = {f"hello from backend-{i}" for i in (1, 2, 3)}
    assert set(greetings[:3]) == names  # one full turn visits each backend once ...
    assert greetings[3:] == greetings[:3]  # ... and the next turn repeats the order


# --- check: what run would trip on -------------------------------------------------------------------


def test_check_finds_taken_ports_foreign_addresses_and_missing_files(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen()
        busy = f"{LOOPBACK}:{taken.getsockname()[1]}"
        admin = f"{LOOPBACK}:{free_port()}"
        path = tmp_path / "pointsman.yaml"
        path.write_text(textwrap.dedent(f"""\
            listeners:
              - {{name: a, bind: "{busy}", pool: p}}
              - {{name: b, bind: "{NOT_LOCAL}:7000", pool: p}}
              - {{name: c, bind: "{admin}", pool: p}}
            pools:
              - {{name: p, backends: [{{address: "127.0.0.1:1"}}]}}
            admin:
              bind: "{admin}"
              token_file: {tmp_path / "token"}
            """))
        result = cli("check", str(path))
        unbound = cli("check", "--no-bind", str(path))
    where = str(path)
    token_error = (f"{where}:9: admin.token_file: cannot read {tmp_path / 'token'}: "
                   "no such file or directory")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.splitlines() == [
        f"{where}:2: listeners[0].bind: cannot bind {busy}/tcp: address already in use",
        f"{where}:3: listeners[1].bind: cannot bind {NOT_LOCAL}:7000/tcp: "
        f"{NOT_LOCAL} is not an address of this host",
        f"{where}:8: admin.bind: same address as listeners[2].bind",
        token_error,
        "hint: `ss -ltnup` shows who holds a port; to check the config of a running pointsman "
        "whose admin API it does not name, use --no-bind",
        f"4 error(s) in {where}",
    ]
    assert unbound.returncode == 1
    assert unbound.stderr.splitlines() == [token_error, f"1 error(s) in {where}"]


def test_check_before_reload_skips_what_the_running_pointsman_holds(tmp_path: Path) -> None:
    """`check` then `reload` on a running node: its own listener and admin ports are not errors."""
    admin = f"{LOOPBACK}:{free_port()}"
    config = one_pool_config(f"{LOOPBACK}:{free_port()}", [f"{LOOPBACK}:1"]) + (
        f'admin: {{bind: "{admin}"}}\nworkers: 1\n')
    other = tmp_path / "other.yaml"  # another config that names the same admin address
    other.write_text(config.replace("name: lb", "name: web"))
    with pointsman_process(config, tmp_path):
        result = cli("check", str(tmp_path / "pointsman.yaml"))
        not_ours = cli("check", str(other))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok lb: tcp")
    assert result.stderr == (f"note: this config's pointsman runs at http://{admin}: the 2 "
                             "addresses it holds were not tried (a reload keeps them)\n")
    # a pointsman that runs other listeners is not this config's: its ports are taken
    assert not_ours.returncode == 1
    assert not_ours.stderr.splitlines()[0] == (
        f"note: the pointsman at http://{admin} runs other listeners (lb): not this config's")
    assert f"admin.bind: cannot bind {admin}/tcp: address already in use" in not_ours.stderr


# --- the CLI finds its node --------------------------------------------------------------------------


def test_help_names_the_environment_variables() -> None:
    for args in ([], ["status"], ["drain"]):
        text = cli(*args, "--help").stdout
        for name in ENV_VARS:
            assert name in text, (args, name)
    assert "-c, --config" in cli("reload", "--help").stdout


def test_admin_commands_find_the_node_through_its_config(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    admin = f"{LOOPBACK}:{free_port()}"
    with refused_port() as port_a, refused_port() as port_b:
        a, b = f"{LOOPBACK}:{port_a}", f"{LOOPBACK}:{port_b}"
        config = yaml.safe_dump({
            "listeners": [{"name": "lb", "bind": f"{LOOPBACK}:{free_port()}", "pool": "p"}],
            "pools": [{"name": "p", "backends": [{"address": a, "name": "a"}, {"address": b}],
                       "health_check": {"type": "none"}}],
            "admin": {"bind": admin, "token_file": str(token)},
            "workers": 1,
        }, sort_keys=False)
        with pointsman_process(config, tmp_path):
            path = str(tmp_path / "pointsman.yaml")
            # -c: address and token from the config; backends by name or host:port
            done = cli("drain", "p", a, "-c", path)
            assert (done.returncode, done.stdout) == (0, "p/a: draining (0 active)\n"), done.stderr
            done = cli("weight", "p", b, "7", "--config", path)
            assert (done.returncode, done.stdout) == (0, f"p/{b}: weight 7\n"), done.stderr
            done = cli("status", "--json", env={"POINTSMAN_CONFIG": path})
            assert done.returncode == 0, done.stderr
            backends = json.loads(done.stdout)["pools"][0]["backends"]
            assert [(x["id"], x["state"], x["weight"]) for x in backends] == [
                ("a", "draining", 1), (b, "up", 7)]

            # the API's reasons, and what to do
            done = cli("enable", "p", "nope", "-c", path)
            assert done.returncode == 1
            assert done.stderr == (f"error: 404 Not Found: no backend 'nope' in pool 'p'; "
                                   f"its backends: a, {b}\n")
            done = cli("enable", "p", "a", "--admin", f"http://{admin}")
            assert done.returncode == 1
            assert done.stderr.splitlines()[0] == "error: 401 Unauthorized: a bearer token is required"
            assert "hint: no token was sent; give the admin token: --token-file FILE" in done.stderr
            done = cli("weight", "p", "a", "-1", "-c", path)
            assert done.returncode == 2
            assert "-1 is not in the range 0<=x<=1000" in done.stderr
            assert "No such option" not in done.stderr

            # --admin on the command line beats POINTSMAN_CONFIG (nobody at port 1)
            done = cli("status", "--admin", f"http://{LOOPBACK}:1", env={"POINTSMAN_CONFIG": path})
            assert done.returncode == 1 and "cannot reach the admin API at" in done.stderr

            # a broken file: reload -c still reaches the node, and shows every error line
            broken = config.replace("  pool: p\n", "  pool: q\n  protocl: tcp\n", 1)
            assert broken.splitlines()[3:5] == ["  pool: q", "  protocl: tcp"]
            Path(path).write_text(broken)
            done = cli("reload", "-c", path)
            assert done.returncode == 1
            assert done.stderr.splitlines() == [
                "error: reload refused, the running config stays (422)",
                f"  {path}:4: listeners[0].pool: no pool named 'q'",
                f"  {path}:5: listeners[0].protocl: unknown key (did you mean 'protocol'?)",
            ]
            assert cli("status", "--json", "-c", path).returncode == 0  # still serving


def test_a_config_without_admin_section_says_so(tmp_path: Path) -> None:
    path = tmp_path / "pointsman.yaml"
    path.write_text(one_pool_config(f"{LOOPBACK}:1", [f"{LOOPBACK}:2"]))
    done = cli("status", "-c", str(path))
    assert done.returncode == 1
    assert done.stderr == (f"error: {path}: admin: no admin section: that pointsman runs no "
                           "admin API\n")


# --- demo on a busy port -------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["--port", "--admin-port"])
def test_demo_on_a_busy_port_says_so_in_one_line(which: str) -> None:
    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen()
        port = taken.getsockname()[1]
        other = "--admin-port" if which == "--port" else "--port"
        result = cli("demo", which, str(port), other, str(free_port()))
    assert result.returncode == 1
    assert result.stderr == (f"pointsman demo: cannot bind {LOOPBACK}:{port}/tcp: address already "
                             f"in use (choose another with {which})\n")
