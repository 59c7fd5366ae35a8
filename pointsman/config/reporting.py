"""Config problems on a terminal: every issue on its own line, a count, exit status 1. Shared by
the commands that load a config (`check`, `run`, `config push`)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import click

from pointsman.config.loader import ConfigError, ConfigIssue, load_file
from pointsman.config.model import Config


def exit_with(issues: Sequence[ConfigIssue], path: str, prefix: str = "", hint: str = "") -> None:
    """Print `issues` (file:line: field: message), an optional hint and the count; exit 1."""
    for issue in issues:
        click.echo(str(issue), err=True)
    if hint:
        click.echo(f"hint: {hint}", err=True)
    click.echo(f"{prefix}{len(issues)} error(s) in {path}", err=True)
    sys.exit(1)


def load_or_exit(path: str | Path) -> Config:
    try:
        return load_file(path)
    except ConfigError as exc:
        exit_with(exc.issues, str(path))
        raise  # not reached: exit_with exits
