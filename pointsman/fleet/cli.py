"""Commands that talk to etcd: `config push|get`, `fleet status|drain|resume`, `member register`.

Each takes the etcd endpoints and the cluster prefix as options (or the environment variables
POINTSMAN_ETCD_ENDPOINTS and POINTSMAN_ETCD_PREFIX, or a node file with `--node-file`).
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import click

from pointsman.fleet import keys
from pointsman.fleet.etcd import EtcdClient, EtcdError, EtcdSettings
from pointsman.fleet.lease import LeaseKeeper
from pointsman.fleet.status import parse_nodes, render_fleet
from pointsman.loop import run as run_loop

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")

WAIT_STEP = 0.2  # how often `fleet drain --wait` re-reads the node's registration


@dataclass(frozen=True)
class Target:
    settings: EtcdSettings
    prefix: str


def etcd_options(f: F) -> F:
    for option in reversed([
        click.option("--endpoints", envvar="POINTSMAN_ETCD_ENDPOINTS",
                     help="etcd client URLs, comma-separated (http://127.0.0.1:2379)."),
        click.option("--prefix", envvar="POINTSMAN_ETCD_PREFIX",
                     help="The cluster's key prefix, e.g. /pointsman/clusters/prod/."),
        click.option("--node-file", type=click.Path(dir_okay=False),
                     help="Take endpoints, prefix and credentials from this node file."),
        click.option("--token-file", help="etcd token, or user:password, in a file."),
        click.option("--ca-file", help="CA bundle for https endpoints."),
        click.option("--cert-file", help="Client certificate (TLS)."),
        click.option("--key-file", help="Client key (TLS)."),
    ]):
        f = option(f)
    return f


def _target(endpoints: str | None, prefix: str | None, node_file: str | None,
            token_file: str | None, ca_file: str | None, cert_file: str | None,
            key_file: str | None) -> Target:
    if node_file is not None:
        from pointsman.config.loader import ConfigError
        from pointsman.config.node import load_node_file
        from pointsman.fleet.agent import settings_for

        try:
            node = load_node_file(node_file)
        except ConfigError as exc:
            _fail("\n".join(str(i) for i in exc.issues))
        return Target(settings_for(node), keys.normalise_prefix(node.etcd.prefix))
    if not endpoints or not prefix:
        _fail("give --endpoints and --prefix (or --node-file, or POINTSMAN_ETCD_ENDPOINTS and "
              "POINTSMAN_ETCD_PREFIX)")
    urls = tuple(u.strip() for u in endpoints.split(",") if u.strip())
    return Target(EtcdSettings(urls, token_file, ca_file, cert_file, key_file),
                  keys.normalise_prefix(prefix))


def _fail(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


def _run(target: Target, body: Callable[[EtcdClient], Awaitable[T]]) -> T:
    async def main() -> T:
        async with EtcdClient(target.settings) as client:
            return await body(client)

    try:
        return run_loop(main())
    except (EtcdError, OSError) as exc:
        _fail(str(exc))


# --- config --------------------------------------------------------------------------------------------

@click.group(name="config")
def config_group() -> None:
    """The cluster config in etcd (one YAML document under <prefix>config)."""


@config_group.command()
@click.argument("cluster_config", type=click.Path(dir_okay=False))
@etcd_options
def push(cluster_config: str, **options: Any) -> None:
    """Validate CLUSTER_CONFIG as `pointsman check` does; write it to etcd only if it is valid."""
    from pointsman.config.reporting import load_or_exit

    load_or_exit(cluster_config)  # exits 1 with every error, as `check` does
    target = _target(**options)
    with open(cluster_config) as f:
        text = f.read()
    key = keys.config_key(target.prefix)
    revision = _run(target, lambda client: client.put(key, text))
    click.echo(f"pushed {cluster_config} to {key} (revision {revision})")


@config_group.command()
@etcd_options
def get(**options: Any) -> None:
    """Print the cluster config stored in etcd (its revision goes to stderr)."""
    target = _target(**options)
    key = keys.config_key(target.prefix)
    kv, _ = _run(target, lambda client: client.get(key))
    if kv is None:
        _fail(f"no cluster config at {key}")
    click.echo(f"# {key} revision {kv.mod_revision}", err=True)
    click.echo(kv.value.decode(errors="replace"), nl=not kv.value.endswith(b"\n"))


# --- fleet ---------------------------------------------------------------------------------------------

@click.group(name="fleet")
def fleet_group() -> None:
    """Every node registered under a cluster prefix."""


@fleet_group.command()
@etcd_options
def status(**options: Any) -> None:
    """Show every registered node: health, config revision, pools, version, uptime."""
    target = _target(**options)

    async def read(client: EtcdClient) -> tuple[list[bytes], int, dict[str, str]]:
        nodes, _ = await client.get_prefix(keys.nodes_prefix(target.prefix))
        config, _ = await client.get(keys.config_key(target.prefix))
        drain_prefix = keys.normalise_prefix(target.prefix) + "drain/"
        drained, _ = await client.get_prefix(drain_prefix)
        return ([kv.value for kv in nodes], config.mod_revision if config else 0,
                {kv.key[len(drain_prefix):]: kv.value.decode(errors="replace") for kv in drained})

    values, revision, drained = _run(target, read)
    click.echo(render_fleet(parse_nodes(values), revision, drained, time.time(),
                            title=f"pointsman fleet {target.prefix}"), nl=False)


def _registration(client: EtcdClient, prefix: str, node: str) -> Coroutine[Any, Any, dict[str, Any]]:
    async def read() -> dict[str, Any]:
        kv, _ = await client.get(keys.node_key(prefix, node))
        return parse_nodes([kv.value])[0] if kv is not None else {}

    return read()


def _drain_command(drain: bool) -> None:
    @fleet_group.command(name="drain" if drain else "resume",
                         help="Drain NODE through etcd: it withdraws its VIPs (BGP) and reports "
                              "itself draining; open connections go on. It stays drained across "
                              "restarts until `fleet resume`." if drain else
                              "Return a drained NODE to service.")
    @click.argument("node")
    @click.option("--reason", default="drained by an operator", show_default=True, hidden=not drain)
    @click.option("--wait", "wait_seconds", default=10.0, show_default=True,
                  help="Seconds to wait for the node to confirm (0: do not wait).")
    @etcd_options
    def command(node: str, reason: str, wait_seconds: float, **options: Any) -> None:
        target = _target(**options)
        try:
            key = keys.drain_key(target.prefix, node)
        except ValueError as exc:
            _fail(str(exc))

        async def act(client: EtcdClient) -> str | None:
            if drain:
                await client.put(key, json.dumps({"reason": reason, "at": round(time.time(), 3)}))
            else:
                await client.delete(key)
            deadline = time.monotonic() + wait_seconds
            health = (await _registration(client, target.prefix, node)).get("health")
            while wait_seconds > 0 and (health == "draining") != drain and time.monotonic() < deadline:
                await asyncio.sleep(WAIT_STEP)
                health = (await _registration(client, target.prefix, node)).get("health")
            return str(health) if health is not None else None

        health = _run(target, act)
        if health is None:
            click.echo(f"{node}: {'drained' if drain else 'resumed'} in etcd; the node is not "
                       "registered now (it will follow when it starts)")
        elif (health == "draining") == drain:
            click.echo(f"{node}: {health}")
        else:
            click.echo(f"{node}: still {health} after {wait_seconds:.0f}s", err=True)
            sys.exit(1)


_drain_command(True)
_drain_command(False)


# --- member ----------------------------------------------------------------------------------------------

@click.group(name="member")
def member_group() -> None:
    """Backends that register themselves in a pool (`discovery: {etcd_members: true}`)."""


@member_group.command()
@click.argument("pool")
@click.argument("address")
@click.option("--ttl", default=5, show_default=True, type=click.IntRange(2, 3600),
              help="Lease seconds: a killed registrant's backend leaves the pool after this.")
@click.option("--weight", default=1, show_default=True, type=click.IntRange(0, 1000))
@etcd_options
def register(pool: str, address: str, ttl: int, weight: int, **options: Any) -> None:
    """Register ADDRESS (host:port) in POOL and keep it registered until SIGTERM or SIGINT."""
    target = _target(**options)
    try:
        key = keys.member_key(target.prefix, pool, address)
    except ValueError as exc:
        _fail(str(exc))
    value = json.dumps({"weight": weight})

    async def hold(client: EtcdClient) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        keeper = LeaseKeeper(client, ttl, lambda: {key: value})
        task = loop.create_task(keeper.run())
        registered = loop.create_task(keeper.registered.wait())
        stopped = loop.create_task(stop.wait())
        await asyncio.wait([registered, stopped], return_when=asyncio.FIRST_COMPLETED)
        if registered.done():
            click.echo(f"registered {key} (lease {keeper.lease:x}, ttl {ttl}s)")
            sys.stdout.flush()
        await stopped
        registered.cancel()
        task.cancel()
        await asyncio.gather(registered, task, return_exceptions=True)
        await keeper.close()
        click.echo(f"deregistered {key}")

    _run(target, hold)
