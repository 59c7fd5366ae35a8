"""The `pointsman` command line: check, run, demo."""

from __future__ import annotations

import asyncio
import logging
import sys

import click

from pointsman import __version__
from pointsman.config.loader import ConfigError, load_file
from pointsman.config.model import Config
from pointsman.loop import run as run_loop


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
    cfg = _load_or_exit(config)
    for listener in cfg.listeners:
        pool = cfg.pool(listener.pool)
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
    """Run CONFIG in the foreground until SIGTERM or SIGINT (SIGHUP reloads it)."""
    _setup_logging(log_level)
    cfg = _load_or_exit(config)
    run_loop(_serve(cfg, config), use_uvloop=not no_uvloop)


async def _serve(cfg: Config, path: str | None) -> None:
    from pointsman.runtime import Runtime

    def announce(line: str) -> None:
        print(line, flush=True)

    runtime = Runtime(cfg, path, announce=announce)
    try:
        await runtime.start()
    except OSError as exc:
        logging.getLogger("pointsman").error("cannot start: %s", exc)
        await runtime.shutdown()
        sys.exit(1)
    await runtime.run()


@main.command()
@click.option("--port", default=8800, show_default=True, help="Port of the demo listener.")
def demo(port: int) -> None:
    """Start 3 local echo backends and a listener in front of them, and say how to try it."""
    from pointsman.demo import run_demo

    _setup_logging("info")
    run_loop(run_demo(port))


if __name__ == "__main__":  # pragma: no cover
    main()
