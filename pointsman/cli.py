"""The `pointsman` command line: check, run, demo."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from pointsman import __version__
from pointsman.admin.client import AdminClient, AdminError, token_from
from pointsman.config.loader import ConfigError, load_file
from pointsman.config.model import Config
from pointsman.loop import run as run_loop

if TYPE_CHECKING:
    from pointsman.config.node import NodeFile
    from pointsman.fleet.agent import NodeAgent


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _load_or_exit(path: str) -> Config:
    try:
        return load_file(path)
    except ConfigError as exc:
        for issue in exc.issues:
            click.echo(str(issue), err=True)
        click.echo(f"{len(exc.issues)} error(s) in {path}", err=True)
        sys.exit(1)


@click.group()
@click.version_option(__version__, prog_name="pointsman")
def main() -> None:
    """pointsman: a Layer 4 (TCP/UDP) load balancer."""


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
def check(config: str) -> None:
    """Validate CONFIG; print one line per listener, or every error with its line and field."""
    from pointsman.config.node import is_node_file

    if is_node_file(config):
        node = _load_node_or_exit(config)
        click.echo(f"ok node {node.name}: cluster config from etcd {','.join(node.etcd.endpoints)} "
                   f"{node.etcd.prefix}config; node-local keys: {', '.join(node.local) or 'none'}")
        return
    cfg = _load_or_exit(config)
    for listener in cfg.listeners:
        pool = cfg.pool(listener.fallback_pool)
        n = len(pool.backends)
        click.echo(
            f"ok {listener.name}: {listener.protocol} {listener.bind} -> pool {pool.name} "
            f"({n} backend{'s' if n != 1 else ''}, {pool.algorithm})"
        )


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--no-uvloop", is_flag=True, help="Use the plain asyncio event loop.")
def run(config: str, log_level: str, no_uvloop: bool) -> None:
    """Run CONFIG in the foreground until SIGTERM or SIGINT (SIGHUP reloads it). CONFIG may be a
    node file: then the cluster config comes from etcd and every revision of it is applied."""
    _setup_logging(log_level)
    from pointsman.config.node import is_node_file
    from pointsman.proxy.resources import prepare_process

    if is_node_file(config):
        node = _load_node_or_exit(config)
        prepare_process(None)  # issue 14: soft RLIMIT_NOFILE up to the hard limit
        run_loop(_serve_node(node, log_level), use_uvloop=not no_uvloop)
        return
    cfg = _load_or_exit(config)
    prepare_process(cfg)  # issue 14: RLIMIT_NOFILE raised, warned if the tables do not fit
    run_loop(_serve(cfg, config, log_level), use_uvloop=not no_uvloop)


def _load_node_or_exit(path: str) -> NodeFile:
    from pointsman.config.node import load_node_file

    try:
        return load_node_file(path)
    except ConfigError as exc:
        for issue in exc.issues:
            click.echo(str(issue), err=True)
        click.echo(f"{len(exc.issues)} error(s) in {path}", err=True)
        sys.exit(1)


async def _serve_node(node: NodeFile, log_level: str) -> None:
    """Wait for a valid cluster config in etcd (SIGTERM/SIGINT end the wait), then serve it."""
    import asyncio
    import signal

    from pointsman.fleet.agent import NodeAgent

    agent = NodeAgent(node)
    loop = asyncio.get_running_loop()
    waiting = loop.create_task(agent.wait_first_config())
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, waiting.cancel)
    try:
        cfg = await waiting
    except asyncio.CancelledError:
        logging.getLogger("pointsman").info("stopped before a cluster config arrived")
        await agent.client.close()
        return
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    await _serve(cfg, None, log_level, agent=agent)


async def _serve(cfg: Config, path: str | None, log_level: str = "info",
                 agent: NodeAgent | None = None) -> None:
    from pointsman.runtime import Runtime
    from pointsman.supervisor import Supervisor

    def announce(line: str) -> None:
        print(line, flush=True)

    workers = cfg.workers or int(os.environ.get("POINTSMAN_WORKERS", "0")) or os.cpu_count() or 1
    runtime = Runtime(cfg, path, announce=announce, role="control" if workers > 1 else "single")
    if agent is not None:  # a node-file run: etcd config, node registration, drain
        runtime.composer, runtime.fleet = agent.composer, agent
    # Before the "listening" lines: a SIGTERM right after them must stop us cleanly, not kill us.
    runtime.install_signal_handlers()
    try:
        if workers > 1:
            supervisor = Supervisor(runtime, workers, log_level)
            runtime.stop_workers = supervisor.stop
            await supervisor.start()
        await runtime.start()
    except (OSError, RuntimeError) as exc:
        logging.getLogger("pointsman").error("cannot start: %s", exc)
        await runtime.shutdown()
        sys.exit(1)
    await runtime.run()


@main.command()
@click.option("--port", default=8800, show_default=True, help="Port of the demo listener.")
@click.option("--admin-port", default=9900, show_default=True,
              help="Port of the admin API and status page (0: none).")
def demo(port: int, admin_port: int) -> None:
    """Start 3 local echo backends and a listener in front of them, and say how to try it."""
    from pointsman.demo import run_demo

    _setup_logging("info")
    run_loop(run_demo(port, admin_port))


# --- talking to a running pointsman through its admin API -------------------------------------------

F = TypeVar("F", bound=Callable[..., Any])


def _admin_options(f: F) -> F:
    f = click.option("--admin", "admin_url", default="http://127.0.0.1:9900", show_default=True,
                     envvar="POINTSMAN_ADMIN", help="Admin API URL.")(f)
    return click.option("--token-file", default=None,
                        help="File holding the bearer token (or POINTSMAN_TOKEN).")(f)


def _client(admin_url: str, token_file: str | None) -> AdminClient:
    return AdminClient(admin_url, token_from(token_file))


def _call(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except AdminError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)


@main.command()
@_admin_options
def status(admin_url: str, token_file: str | None) -> None:
    """Show pools and backends: state, weight, active connections, conn/s."""
    from pointsman.admin.table import render_status

    client = _client(admin_url, token_file)
    first = _call(client.status)
    time.sleep(1.0)  # two samples one second apart give conn/s
    second = _call(client.status)
    click.echo(render_status(first, second, 1.0))


def _backend_command(action: str, doc: str) -> None:
    @main.command(name=action, help=doc)
    @click.argument("pool")
    @click.argument("backend")
    @_admin_options
    def command(pool: str, backend: str, admin_url: str, token_file: str | None) -> None:
        result = _call(lambda: _client(admin_url, token_file).backend_action(pool, backend, action))
        click.echo(f"{pool}/{backend}: {result['state']} ({result['active']} active)")


_backend_command("drain", "Drain BACKEND of POOL: no new connections, existing ones finish.")
_backend_command("enable", "Return BACKEND of POOL to service.")
_backend_command("maintenance", "Put BACKEND of POOL in maintenance: no new connections.")


@main.command()
@click.argument("pool")
@click.argument("backend")
@click.argument("weight", type=click.IntRange(0, 1000))
@_admin_options
def weight(pool: str, backend: str, weight: int, admin_url: str, token_file: str | None) -> None:
    """Set the WEIGHT of BACKEND in POOL (0 takes no new connections)."""
    _call(lambda: _client(admin_url, token_file).set_weight(pool, backend, weight))
    click.echo(f"{pool}/{backend}: weight {weight}")


@main.group()
def node() -> None:
    """This node as a whole: withdraw (drain) or announce (resume) its VIPs by BGP."""


def _node_command(action: str, doc: str) -> None:
    @node.command(name=action, help=doc)
    @_admin_options
    def command(admin_url: str, token_file: str | None) -> None:
        result = _call(lambda: _client(admin_url, token_file).node_action(action))
        for vip in result["bgp"]["vips"]:
            state = "announced" if vip["announced"] else f"withdrawn ({vip['reason']})"
            click.echo(f"{vip['prefix']}: {state}")
        if not result["acknowledged"]:
            click.echo("warning: ExaBGP has not acknowledged the change (is it running?)", err=True)


_node_command("drain", "Withdraw every VIP of this node from BGP; open connections go on.")
_node_command("resume", "Announce this node's VIPs again (each still gated by its pool's health).")


@node.command(name="status")
@_admin_options
def node_status(admin_url: str, token_file: str | None) -> None:
    """Show each VIP (announced or why not) and each BGP session."""
    bgp = _call(lambda: _client(admin_url, token_file).request("GET", "/api/v1/node"))["bgp"]
    if bgp is None:
        click.echo("bgp is not configured")
        return
    click.echo(f"drained: {'yes' if bgp['drained'] else 'no'}")
    for vip in bgp["vips"]:
        state = "announced" if vip["announced"] else f"withdrawn ({vip['reason']})"
        click.echo(f"{vip['prefix']}: {state}, {vip['available']} available")
    speaker = bgp["speaker"] or {}
    click.echo(f"exabgp: {speaker.get('state', 'none')} (pid {speaker.get('pid')}, "
               f"{bgp['restarts']} restarts)")
    for peer, state in sorted(speaker.get("peers", {}).items()):
        click.echo(f"peer {peer}: {state}")


@main.command()
@_admin_options
def reload(admin_url: str, token_file: str | None) -> None:
    """Ask a running pointsman to re-read its config file."""
    _call(lambda: _client(admin_url, token_file).reload())
    click.echo("reloaded")


def _add_fleet_commands() -> None:
    from pointsman.fleet.cli import config_group, fleet_group, member_group

    for group in (config_group, fleet_group, member_group):
        main.add_command(group)


_add_fleet_commands()
