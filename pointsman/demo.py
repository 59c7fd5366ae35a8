"""The built-in demo: three local backends that each say who they are, behind one listener."""

from __future__ import annotations

import asyncio

from pointsman.app import build_node
from pointsman.config.loader import load_text

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


async def run_demo(port: int, admin_port: int = 0) -> None:
    servers = [await _backend(f"backend-{i}") for i in range(1, 4)]
    ports = [s.sockets[0].getsockname()[1] for s in servers]
    backends = "\n".join(f'      - address: "127.0.0.1:{p}"' for p in ports)
    admin = f'admin: {{bind: "127.0.0.1:{admin_port}"}}\n' if admin_port else ""
    config = load_text(DEMO_CONFIG.format(port=port, backends=backends, admin=admin), "<demo>")
    runtime = build_node(config, workers=1)
    runtime.install_signal_handlers()  # before "listening" is printed, as in `pointsman run`
    await runtime.start()
    print(
        f"\npointsman demo: 3 backends on ports {', '.join(map(str, ports))}.\n"
        f"Try:  echo hi | socat - TCP:127.0.0.1:{port}    (a few times: round robin)\n"
        + (f"      open http://127.0.0.1:{admin_port}/ (status page),  pointsman status,\n"
           f"      pointsman drain demo 127.0.0.1:{ports[0]}\n" if admin_port else "")
        + "Stop with Ctrl-C.\n",
        flush=True,
    )
    try:
        await runtime.run()
    finally:
        for server in servers:
            server.close()
