"""The `pointsman` command line: check, run, demo."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from pointsman import __version__
from pointsman.admin.client import AdminClient, AdminError, client_tls
from pointsman.config.addresses import HostPort
from pointsman.config.loader import ConfigError, ConfigIssue
from pointsman.config.model import Config
from pointsman.config.reporting import exit_with, load_or_exit
from pointsman.loop import run as run_loop

if TYPE_CHECKING:
    from pointsman.config.node import NodeFile
    from pointsman.fleet.agent import NodeAgent
    from pointsman.node.activation import Inherited


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )




@click.group()
@click.version_option(__version__, prog_name="pointsman")
def main() -> None:
    """pointsman: a Layer 4 (TCP/UDP) load balancer.

    \b
    Commands that talk to a running pointsman (status, drain, enable, maintenance, weight,
    backend, deny, reload, node) find its admin API, first match wins:
      --admin URL, --token-file FILE    on the command line
      -c/--config FILE                  that config's admin.bind and admin.token_file
      POINTSMAN_ADMIN, POINTSMAN_TOKEN_FILE, POINTSMAN_TOKEN (the token itself)
      POINTSMAN_CONFIG                  a config file, as -c
      http://127.0.0.1:9900, no token   otherwise
    """


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--no-bind", is_flag=True,
              help="Do not try to bind the listener and admin addresses.")
def check(config: str, no_bind: bool) -> None:
    """Validate CONFIG and what `run` needs from this host: the files it names are readable, the
    flow log can be written, every listener and the admin address can be bound (tried and
    released at once; addresses a running pointsman of this config holds are skipped), and a
    `kernel.datapath: tc` listener's program can be built and its interfaces exist.
    Prints one line per listener (exit 0), or every problem with its file, line and field."""
    from pointsman.config.node import is_node_file
    from pointsman.config.preflight import preflight_file, preflight_node

    if is_node_file(config):
        node = _load_node_or_exit(config)
        _exit_on_issues(preflight_node(node, bind=not no_bind), config)
        click.echo(f"ok node {node.name}: cluster config from etcd {','.join(node.etcd.endpoints)} "
                   f"{node.etcd.prefix}config; node-local keys: {', '.join(node.local) or 'none'}")
        return
    cfg = load_or_exit(config)
    held = () if no_bind else _held_by_running(cfg)
    _exit_on_issues(preflight_file(config, cfg, bind=not no_bind, held=held), config)
    for listener in cfg.listeners:
        pool = cfg.pool(listener.fallback_pool)
        n = len(pool.backends)
        click.echo(
            f"ok {listener.name}: {listener.protocol} {listener.bind} -> pool {pool.name} "
            f"({n} backend{'s' if n != 1 else ''}, {pool.algorithm})"
        )
    from pointsman.admin.auth import admin_warnings

    for warning in admin_warnings(cfg.admin):
        click.echo(f"warning: {warning}", err=True)


def _exit_on_issues(issues: list[ConfigIssue], path: str, prefix: str = "") -> None:
    if not issues:
        return
    busy = any("address already in use" in issue.message for issue in issues)
    exit_with(issues, path, prefix, hint="`ss -ltnup` shows who holds a port; to check the config "
              "of a running pointsman whose admin API it does not name, use --no-bind" if busy else "")


def _held_by_running(cfg: Config) -> list[tuple[HostPort, str]]:
    """The addresses held by the pointsman that runs this config, found at its admin address (a
    reload keeps them, so `check` before `reload` does not report them taken). It is this
    config's pointsman when it runs a listener of the same name; another one (the demo, say)
    holds nothing of ours. Nothing when nothing answers there."""
    from pointsman.admin.target import url_for
    from pointsman.config.addresses import binds_of

    if cfg.admin is None:
        return []
    url = url_for(cfg.admin)
    try:
        listeners = AdminClient(url, timeout=2.0).status()["listeners"]
        names = {str(lst["name"]) for lst in listeners}
        held = [(address, str(lst["protocol"])) for lst in listeners
                for address in binds_of(lst.get("binds") or lst["bind"]).addresses]
    except (AdminError, KeyError, TypeError, ValueError):
        return []
    if not names & {listener.name for listener in cfg.listeners}:
        click.echo(f"note: the pointsman at {url} runs other listeners ({', '.join(sorted(names))}): "
                   "not this config's", err=True)
        return []
    click.echo(f"note: this config's pointsman runs at {url}: the {len(held) + 1} addresses it "
               "holds were not tried (a reload keeps them)", err=True)
    return [*held, (cfg.admin.bind, "tcp")]


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
    from pointsman.config.preflight import preflight_file, preflight_node
    from pointsman.config.workers import worker_count
    from pointsman.proxy.resources import prepare_process

    if is_node_file(config):
        node = _load_node_or_exit(config)
        _exit_on_issues(preflight_node(node), config, "cannot start: ")
        prepare_process(None)  # soft RLIMIT_NOFILE up to the hard limit (workers inherit it)
        run_loop(_serve_node(node, log_level, _passed_sockets(None)), use_uvloop=not no_uvloop)
        return
    cfg = load_or_exit(config)
    inherited = _passed_sockets(cfg)
    # What `check` finds (files, addresses to bind) stops `run` before anything is bound, with
    # the same file:line: field: message lines, instead of a half-started node. Addresses that
    # systemd passed sockets for are not tried (they are bound: by systemd).
    _exit_on_issues(preflight_file(config, cfg, held=inherited.held(cfg)), config,
                    "cannot start: ")
    try:
        worker_count(cfg)
    except ValueError as exc:  # POINTSMAN_WORKERS is not a number of workers
        click.echo(f"cannot start: {exc}", err=True)
        sys.exit(1)
    prepare_process(cfg)  # RLIMIT_NOFILE raised, and a warning if the tables do not fit
    run_loop(_serve(cfg, config, log_level, inherited=inherited), use_uvloop=not no_uvloop)


def _passed_sockets(cfg: Config | None) -> Inherited:
    """The listening sockets systemd passed (socket activation; none outside it). A fleet node
    (`cfg` None) matches them to its listeners once the cluster config arrives."""
    from pointsman.node.activation import ActivationError, Inherited

    try:
        inherited = Inherited.from_environment()
        if cfg is not None:
            inherited.held(cfg)  # a named socket that does not fit its listener: say so now
    except ActivationError as exc:
        click.echo(f"cannot start: socket activation: {exc}", err=True)
        sys.exit(1)
    if inherited:
        logging.getLogger("pointsman").info(
            "socket activation: %s", ", ".join(s.describe() for s in inherited.sockets))
    return inherited



def _load_node_or_exit(path: str) -> NodeFile:
    from pointsman.config.node import load_node_file

    try:
        return load_node_file(path)
    except ConfigError as exc:
        exit_with(exc.issues, path)
        raise  # not reached: exit_with exits


async def _serve_node(node: NodeFile, log_level: str, inherited: Inherited) -> None:
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
    await _serve(cfg, None, log_level, agent=agent, inherited=inherited)


async def _serve(cfg: Config, path: str | None, log_level: str = "info",
                 agent: NodeAgent | None = None, inherited: Inherited | None = None) -> None:
    from pointsman import __version__
    from pointsman.app import build_node
    from pointsman.config.workers import worker_count

    def announce(line: str) -> None:
        print(line, flush=True)

    from pointsman.proxy.engines import engine_in_use

    workers = worker_count(cfg)
    log = logging.getLogger("pointsman")
    try:
        engine = engine_in_use()
    except (ValueError, RuntimeError) as exc:  # POINTSMAN_ENGINE names no engine, or one not built
        log.error("cannot start: %s", exc)
        sys.exit(1)
    log.info("pointsman %s starting: %s, %d listener%s, connection engine %s", __version__,
             f"a control process and {workers} workers" if workers > 1 else "one process",
             len(cfg.listeners), "" if len(cfg.listeners) == 1 else "s", engine)
    node = build_node(cfg, config_path=path, announce=announce, workers=workers,
                      log_level=log_level, agent=agent, inherited=inherited)
    # Before the "listening" lines: a SIGTERM right after them must stop us cleanly, not kill us.
    node.install_signal_handlers()
    try:
        await node.start()
    except (OSError, RuntimeError) as exc:  # a bind, a worker, the admin TLS, the kernel tables
        log.error("cannot start: %s", exc)
        await node.shutdown(0.0)
        sys.exit(1)
    await node.run()


@main.command()
@click.option("--port", default=8800, show_default=True, help="Port of the demo listener.")
@click.option("--admin-port", default=9900, show_default=True,
              help="Port of the admin API and status page (0: none).")
def demo(port: int, admin_port: int) -> None:
    """Start 3 local echo backends and a listener in front of them, and say how to try it."""
    from pointsman.demo import DemoError, command_name, run_demo

    _setup_logging("info")
    try:
        run_loop(run_demo(port, admin_port, command_name()))
    except DemoError as exc:
        click.echo(str(exc), err=True)
        sys.exit(1)


# --- talking to a running pointsman through its admin API -------------------------------------------

F = TypeVar("F", bound=Callable[..., Any])


_TLS_OPTIONS = (  # kept in the click context (ctx.meta), so no command's signature changes
    ("--cacert", "POINTSMAN_CACERT", "CA certificate (PEM) to trust for an https admin URL."),
    ("--cert", "POINTSMAN_CERT", "Client certificate (PEM) for an admin API that asks for one."),
    ("--key", "POINTSMAN_KEY", "Private key (PEM) of --cert."),
)


def _remember(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    ctx.meta[f"pointsman.{param.name}"] = value
    return value


def _admin_options(f: F) -> F:
    for flag, env, doc in reversed(_TLS_OPTIONS):
        f = click.option(flag, envvar=env, show_envvar=True, default=None, expose_value=False,
                         callback=_remember,
                         type=click.Path(dir_okay=False), help=doc)(f)
    f = click.option("--admin", "admin_url", default=None, envvar="POINTSMAN_ADMIN", show_envvar=True,
                     help="Admin API URL [default: -c's admin.bind, else http://127.0.0.1:9900].")(f)
    f = click.option("-c", "--config", "admin_config", envvar="POINTSMAN_CONFIG", show_envvar=True,
                     type=click.Path(dir_okay=False), expose_value=False, callback=_keep_config,
                     help="Use the admin address and token file of this pointsman config.")(f)
    return click.option("--token-file", default=None, envvar="POINTSMAN_TOKEN_FILE", show_envvar=True,
                        help="File holding the bearer token (the token itself: POINTSMAN_TOKEN).")(f)


def _keep_config(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    """Remember -c/POINTSMAN_CONFIG for `_client` (the commands' signatures stay as they are)."""
    ctx.meta["pointsman.admin_config"] = value


def _client(admin_url: str | None, token_file: str | None) -> AdminClient:
    """A client for the admin API that flags, -c, the environment or the default name (see
    pointsman.admin.target for the order)."""
    from click.core import ParameterSource

    from pointsman.admin.target import Layer, choose, config_layer, read_token

    ctx = click.get_current_context()

    def given(name: str, value: str | None, source: ParameterSource) -> str | None:
        return value if ctx.get_parameter_source(name) == source else None

    cmdline, env = ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT
    flags = Layer(given("admin_url", admin_url, cmdline), given("token_file", token_file, cmdline),
                  origin="--token-file")
    environment = Layer(given("admin_url", admin_url, env), given("token_file", token_file, env),
                        os.environ.get("POINTSMAN_TOKEN") or None, origin="POINTSMAN_TOKEN_FILE")
    config_path = ctx.meta.get("pointsman.admin_config")
    config: list[Layer] = []
    if config_path:
        try:
            config = [config_layer(config_path)]
        except ConfigError as exc:
            for issue in exc.issues:
                click.echo(f"error: {issue}", err=True)
            sys.exit(1)
    from_flag = ctx.get_parameter_source("admin_config") == cmdline
    layers = [flags, *config, environment] if from_flag else [flags, environment, *config]
    target = choose(layers)
    token, note = read_token(target)
    if note is not None and target.token_origin == "--token-file":
        click.echo(f"error: {note}", err=True)  # asked for by name: do not go on without it
        sys.exit(1)
    meta = ctx.meta
    try:
        tls = client_tls(target.url, *(meta.get(f"pointsman.{flag[2:]}") for flag, _, _ in _TLS_OPTIONS))
    except AdminError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    return AdminClient(target.url, token, token_note=note, tls=tls)


def _call(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except AdminError as exc:
        for line in exc.lines():
            click.echo(line, err=True)
        sys.exit(1)


@main.command()
@_admin_options
@click.option("--json", "as_json", is_flag=True,
              help="Print the API's status document as JSON (one sample, no conn/s).")
def status(admin_url: str | None, token_file: str | None, as_json: bool) -> None:
    """Show pools and backends: state, weight, active connections, conn/s."""
    from pointsman.admin.table import render_status

    client = _client(admin_url, token_file)
    first = _call(client.status)
    if as_json:
        click.echo(json.dumps(first, indent=2))
        return
    time.sleep(1.0)  # two samples one second apart give conn/s
    second = _call(client.status)
    click.echo(render_status(first, second, 1.0))


def _say_backend(pool: str, result: dict[str, Any], extra: str = "") -> None:
    click.echo(f"{pool}/{result['backend']}: {result['state']} ({result['active']} active){extra}")


@main.command()
@click.argument("pool")
@click.argument("backend")
@click.option("--timeout", default=None, metavar="DURATION",
              help="Close its remaining connections this long from now (60s, 5m); default: the "
                   "pool's drain_timeout, if any.")
@_admin_options
def drain(pool: str, backend: str, timeout: str | None, admin_url: str | None,
          token_file: str | None) -> None:
    """Drain BACKEND of POOL: no new connections, existing ones finish (or are closed once the
    timeout passes, counted as drain_timeout). BACKEND is its name or its host:port."""
    from pointsman.config.durations import parse_duration

    if timeout is not None:
        try:
            parse_duration(timeout)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--timeout") from None
    options = {"timeout": timeout} if timeout is not None else None
    result = _call(lambda: _client(admin_url, token_file).backend_action(pool, backend, "drain",
                                                                         options))
    _say_backend(pool, result, f"; closing what is left in {timeout}" if timeout else "")


@main.command()
@click.argument("pool")
@click.argument("backend")
@_admin_options
def enable(pool: str, backend: str, admin_url: str | None, token_file: str | None) -> None:
    """Return BACKEND of POOL to service (a removal under way is cancelled). BACKEND is its
    name or its host:port."""
    _say_backend(pool, _call(lambda: _client(admin_url, token_file).backend_action(
        pool, backend, "enable")))


@main.command()
@click.argument("pool")
@click.argument("backend")
@click.option("--close", is_flag=True, help="Close its open connections now (closed_by_operator).")
@_admin_options
def maintenance(pool: str, backend: str, close: bool, admin_url: str | None,
                token_file: str | None) -> None:
    """Put BACKEND of POOL in maintenance: no new connections; with --close its open ones are
    closed now. BACKEND is its name or its host:port."""
    options = {"close": True} if close else None
    result = _call(lambda: _client(admin_url, token_file).backend_action(
        pool, backend, "maintenance", options))
    _say_backend(pool, result, f"; closed {result['closed']}" if "closed" in result else "")


@main.group()
def backend() -> None:
    """Add or remove a pool's backends at run time (kept across reloads; with state_file,
    across restarts too)."""


@backend.command(name="add", context_settings={"ignore_unknown_options": True})
@click.argument("pool")
@click.argument("address")
@click.option("--weight", type=click.IntRange(0, 1000), default=None, help="0-1000 [default: 1].")
@click.option("--name", default=None, help="Its id in the pool [default: ADDRESS as written].")
@click.option("--backup", is_flag=True, help="Serve only while no other backend is available.")
@_admin_options
def backend_add(pool: str, address: str, weight: int | None, name: str | None, backup: bool,
                admin_url: str | None, token_file: str | None) -> None:
    """Add the backend at ADDRESS (host:port) to POOL. It starts in the pool's initial_state
    and is health checked as the others."""
    entry: dict[str, Any] = {"address": address}
    if name is not None:
        entry["name"] = name
    if weight is not None:
        entry["weight"] = weight
    if backup:
        entry["backup"] = True
    result = _call(lambda: _client(admin_url, token_file).add_backend(pool, entry))
    click.echo(f"{pool}/{result['backend']}: added ({result['address']}, {result['state']})")


@backend.command(name="remove")
@click.argument("pool")
@click.argument("backend_name", metavar="BACKEND")
@_admin_options
def backend_remove(pool: str, backend_name: str, admin_url: str | None,
                   token_file: str | None) -> None:
    """Drain BACKEND (its name, or host:port) of POOL and remove it once its connections end
    (or the pool's drain_timeout closes them)."""
    result = _call(lambda: _client(admin_url, token_file).remove_backend(pool, backend_name))
    if result.get("removed"):
        click.echo(f"{pool}/{result['backend']}: removed")
    else:
        click.echo(f"{pool}/{result['backend']}: draining ({result['active']} active); removed "
                   "once they end (`pointsman status` shows it meanwhile)")


# ignore_unknown_options: `weight p b -1` is a weight out of range, not an unknown option "-1".
@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("pool")
@click.argument("backend")
@click.argument("weight", type=click.IntRange(0, 1000))
@_admin_options
def weight(pool: str, backend: str, weight: int, admin_url: str | None,
           token_file: str | None) -> None:
    """Set the WEIGHT (0-1000) of BACKEND in POOL; 0 takes no new connections. BACKEND is its
    name or its host:port."""
    result = _call(lambda: _client(admin_url, token_file).set_weight(pool, backend, weight))
    click.echo(f"{pool}/{result['backend']}: weight {weight}")


@main.command()
@click.argument("listener")
@click.argument("prefixes", nargs=-1)
@click.option("--remove", is_flag=True, help="Lift PREFIXES from the deny list instead.")
@_admin_options
def deny(listener: str, prefixes: tuple[str, ...], remove: bool, admin_url: str,
         token_file: str | None) -> None:
    """Refuse new connections from PREFIXES (CIDRs) on LISTENER; without PREFIXES, show its deny
    list. Kept across reloads that leave the file's deny list alone."""
    from pointsman.protect.acl import parse_networks

    try:
        wanted = parse_networks(prefixes)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="PREFIXES") from None
    client = _client(admin_url, token_file)
    current = _call(lambda: client.listener_list(listener, "deny"))
    if wanted:
        new = [p for p in current if p not in wanted] if remove else \
            current + [p for p in wanted if p not in current]
        current = _call(lambda: client.set_listener_list(listener, "deny", new))
    click.echo(f"{listener}: deny {len(current)} prefix{'es' if len(current) != 1 else ''}")
    for prefix in current:
        click.echo(f"  {prefix}")


@main.group()
def node() -> None:
    """This node as a whole: withdraw (drain) or announce (resume) its VIPs by BGP."""


def _node_command(action: str, doc: str) -> None:
    @node.command(name=action, help=doc)
    @_admin_options
    def command(admin_url: str | None, token_file: str | None) -> None:
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
def node_status(admin_url: str | None, token_file: str | None) -> None:
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
def reload(admin_url: str | None, token_file: str | None) -> None:
    """Ask a running pointsman to re-read its config file."""
    _call(lambda: _client(admin_url, token_file).reload())
    click.echo("reloaded")


def _add_fleet_commands() -> None:
    from pointsman.fleet.cli import config_group, fleet_group, member_group

    for group in (config_group, fleet_group, member_group):
        main.add_command(group)


_add_fleet_commands()
