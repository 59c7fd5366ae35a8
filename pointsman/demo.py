"""The built-in demo: three local backends that each say who they are, behind one listener.

What it prints must work when pasted: the `pointsman` command as this shell can run it (the
venv's path when it is not on PATH), `--admin` when the admin port is not the default, and a
way to connect that needs no extra package when socat is not installed.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from pointsman.app import build_node
from pointsman.config.loader import load_text
from pointsman.config.preflight import preflight
from pointsman.proxy.engine import engine_name

DEFAULT_ADMIN_PORT = 9900
NAMES = ("backend-1", "backend-2", "backend-3")

DEMO_CONFIG = """
listeners:
  - name: demo
    bind: "127.0.0.1:{port}"
    protocol: tcp
    pool: demo
pools:
  - name: demo
    algorithm: round_robin
    connect_timeout: 1s
    idle_timeout: 1m
    retries: 2
    health_check: {{type: tcp, interval: 2s, timeout: 1s}}
    backends:
{backends}
{admin}"""

# Which demo option moves each address the demo binds.
_OPTION_FOR = {"listeners[0].bind": "--port", "admin.bind": "--admin-port"}


class DemoError(Exception):
    """The demo cannot start; the message is the one line to show."""


async def _backend(name: str) -> asyncio.Server:
    """A backend that greets with its name, then echoes what it reads."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(f"hello from {name}\n".encode())
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


def invocation(argv0: str, cwd: str, executable: str,
               which: Callable[[str], str | None] = shutil.which) -> str:
    """How the operator's shell runs this pointsman: `pointsman` when PATH finds this very one,
    else its path (relative to `cwd` when under it); `python -m pointsman` likewise."""
    if Path(argv0).name == "__main__.py":  # python -m pointsman
        name = os.path.basename(executable)
        found = which(name)  # a venv's python is a symlink: compare paths, not their targets
        same = found is not None and os.path.abspath(found) == os.path.abspath(executable)
        return f"{name if same else _shown(executable, cwd)} -m pointsman"
    found = which("pointsman")
    if found is not None and os.path.abspath(found) == os.path.abspath(os.path.join(cwd, argv0)):
        return "pointsman"
    return _shown(argv0, cwd)


def _shown(path: str, cwd: str) -> str:
    full = os.path.abspath(os.path.join(cwd, path))
    rel = os.path.relpath(full, cwd)
    return full if rel.startswith("..") else rel


def hints(port: int, admin_port: int, backend_ports: list[int], command: str,
          has_socat: bool, engine: str = "cython") -> str:
    """The text printed once the demo is ready (pure, so its commands are tested as printed)."""
    if has_socat:
        connect = f"echo hi | socat - TCP:127.0.0.1:{port}"
    else:
        connect = f"bash -c 'exec 3<>/dev/tcp/127.0.0.1/{port}; echo hi >&3; head -2 <&3'"
    lines = [
        "",
        f"pointsman demo: backends {', '.join(NAMES)} on ports "
        f"{', '.join(map(str, backend_ports))}, behind 127.0.0.1:{port}; connection engine "
        f"{engine}" + ("." if engine == "cython" else
                       " (bash scripts/setup.sh --engine builds the compiled one)."),
        f"Try:  {connect}    (a few times: round robin)",
    ]
    if admin_port:
        admin = "" if admin_port == DEFAULT_ADMIN_PORT else f" --admin http://127.0.0.1:{admin_port}"
        lines += [
            f"      open http://127.0.0.1:{admin_port}/    (status page)",
            f"      {command} status{admin}",
            f"      {command} drain demo {NAMES[0]}{admin}    (then: enable, the same way)",
        ]
    lines += ["Stop with Ctrl-C.", ""]
    return "\n".join(lines)


async def run_demo(port: int, admin_port: int = 0, command: str = "pointsman") -> None:
    """Serve the demo until SIGTERM/SIGINT; DemoError (one line) when it cannot start."""
    servers = [await _backend(name) for name in NAMES]
    try:
        ports = [s.sockets[0].getsockname()[1] for s in servers]
        backends = "\n".join(f'      - {{name: {name}, address: "127.0.0.1:{p}"}}'
                             for name, p in zip(NAMES, ports, strict=True))
        admin = f'admin: {{bind: "127.0.0.1:{admin_port}"}}\n' if admin_port else ""
        config = load_text(DEMO_CONFIG.format(port=port, backends=backends, admin=admin), "<demo>")
        for issue in preflight(config, "<demo>", {}):
            option = _OPTION_FOR.get(issue.path, "")
            raise DemoError(f"pointsman demo: {issue.message}" + (f" (choose another with {option})"
                                                                  if option else ""))
        runtime = build_node(config, workers=1)
        runtime.install_signal_handlers()  # before "listening" is printed, as in `pointsman run`
        try:
            await runtime.start()
        except OSError as exc:  # taken between the preflight and now
            await runtime.shutdown()
            raise DemoError(f"pointsman demo: cannot start: {exc.strerror or exc}") from None
        print(hints(port, admin_port, ports, command, shutil.which("socat") is not None,
                    engine_name()), flush=True)
        await runtime.run()
    finally:
        for server in servers:
            server.close()


def command_name() -> str:
    """`invocation()` for this process."""
    return invocation(sys.argv[0], os.getcwd(), sys.executable)
