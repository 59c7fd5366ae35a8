"""Preflight: what `run` would trip on that a valid config can still hold, found before it binds.

A config can be valid and still not start: a token file that is missing or unreadable, a flow log
directory we cannot write, a listener port another process holds, an address this host does not
have, a tc listener on a host without clang or libbpf or without its interfaces. `pointsman check`
reports all of them at once, each with the file, line and field, and `run` calls the same
`preflight()` before it binds anything (like `nginx -t` and `haproxy -c`, but we also try the binds,
since that is where most first starts fail).

Two halves: `needs(config)` is pure (which files to read, which directories to write, which
addresses to bind, and where each is in the file); `problems(needs)` does the I/O with the same
socket options `run` uses (SO_REUSEADDR, v6-only, listen for TCP).
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from pointsman.config.addresses import HostPort
from pointsman.config.loader import ConfigIssue, Loc, _line_for, _parse_yaml, format_loc, read_text
from pointsman.config.model import Config
from pointsman.config.node import _PLACEHOLDER, NodeFile
from pointsman.proxy.sockets import listen_socket

# An address a running pointsman already holds: (address, "tcp" | "udp").
Held = tuple[HostPort, str]


@dataclass(frozen=True, slots=True)
class ReadFile:
    """A file the config names that must exist and be readable (a token must not be empty)."""

    loc: Loc
    path: str
    non_empty: bool = False


@dataclass(frozen=True, slots=True)
class WriteFile:
    """A file we append to: writable if it exists, else its directory must let us create it.
    `replaced`: the file is replaced whole (write a temporary file, rename it over): its
    directory must be writable, and an existing file readable (it is read back at start)."""

    loc: Loc
    path: str
    replaced: bool = False


@dataclass(frozen=True, slots=True)
class Bind:
    """An address `run` binds: a listener (tcp or udp) or the admin API (tcp)."""

    loc: Loc
    address: HostPort
    protocol: str  # "tcp" | "udp"
    backlog: int = 1024


@dataclass(frozen=True, slots=True)
class TcProgram:
    """A `kernel.datapath: tc` listener: this host must build and load its BPF program."""

    loc: Loc


@dataclass(frozen=True, slots=True)
class Interface:
    """A network interface a tc listener attaches to: it must exist here."""

    loc: Loc
    name: str


Need = ReadFile | WriteFile | Bind | TcProgram | Interface


# --- what to check (pure) ------------------------------------------------------------------------

# `*_file` keys that name files pointsman writes, not reads (see `needs`).
WRITTEN_FILES = frozenset({"state_file"})


def needs(config: Config, *, bind: bool = True) -> list[Need]:
    """Everything `run` needs from this host for `config`, in file order of the fields."""
    out: list[Need] = list(file_needs(config, ()))
    if config.flow_log is not None and config.flow_log.enabled and config.flow_log.path != "-":
        out.append(WriteFile(("flow_log", "path"), config.flow_log.path))
    if config.state_file is not None:
        out.append(WriteFile(("state_file",), config.state_file, replaced=True))
    for i, listener in enumerate(config.listeners):
        if listener.dataplane == "kernel" and listener.kernel.datapath == "tc":
            out.append(TcProgram(("listeners", i, "kernel", "datapath")))
            out.extend(Interface(("listeners", i, "kernel", "interfaces", j), name)
                       for j, name in enumerate(listener.kernel.interfaces))
    if bind:
        for i, listener in enumerate(config.listeners):
            if listener.dataplane == "kernel":
                continue  # nftables DNAT: no socket is bound (the VIP need not be local)
            listed = len(listener.bind) > 1
            for j, entry in enumerate(listener.bind):
                loc: Loc = ("listeners", i, "bind", j) if listed else ("listeners", i, "bind")
                out.extend(Bind(loc, address, listener.protocol, listener.backlog)
                           for address in entry.addresses)
        if config.admin is not None:
            out.append(Bind(("admin", "bind"), config.admin.bind, "tcp"))
    return out


def file_needs(model: BaseModel, loc: Loc) -> Iterator[ReadFile]:
    """Every `*_file` field in the model tree (token_file, ca_file, cert_file, key_file, ...):
    new keys that name files are checked without a change here."""
    for name, value in model:
        here = (*loc, name)
        if isinstance(value, BaseModel):
            yield from file_needs(value, here)
        elif isinstance(value, list | tuple):
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    yield from file_needs(item, (*here, i))
        elif isinstance(value, str) and name.endswith("_file") and name not in WRITTEN_FILES:
            yield ReadFile(here, value, non_empty="token" in name)


# --- checking (I/O) ------------------------------------------------------------------------------


def problems(wanted: list[Need], held: Collection[Held] = ()) -> Iterator[tuple[Loc, str]]:
    """(where, what is wrong) for each need this host cannot meet. Sockets bound on the way are
    held until every bind was tried, so two of the config's own addresses that clash show up."""
    sockets: list[socket.socket] = []
    first: dict[tuple[HostPort, str], Loc] = {}
    try:
        for need in wanted:
            if isinstance(need, ReadFile):
                message = _read_problem(need)
            elif isinstance(need, WriteFile):
                message = _replace_problem(need.path) if need.replaced else _write_problem(need.path)
            elif isinstance(need, TcProgram):
                from pointsman.kernel.tcbpf import missing  # ctypes, libbpf: only with tc

                message = missing()
            elif isinstance(need, Interface):
                message = _interface_problem(need.name)
            elif (need.address, need.protocol) in first:
                message = f"same address as {format_loc(first[need.address, need.protocol])}"
            elif (need.address, need.protocol) in held:
                continue  # the running pointsman holds it; a reload keeps it
            else:
                first[need.address, need.protocol] = need.loc
                message = _bind_problem(need, sockets)
            if message is not None:
                yield need.loc, message
    finally:
        for sock in sockets:
            sock.close()


def _read_problem(need: ReadFile) -> str | None:
    try:
        with open(need.path, "rb") as f:
            data = f.read(4096)
    except OSError as exc:
        return f"cannot read {need.path}: {_reason(exc)}"
    if need.non_empty and not data.strip():
        return f"{need.path} is empty"
    return None


def _write_problem(path: str) -> str | None:
    target = Path(path)
    if target.is_dir():
        return f"{path} is a directory"
    if target.exists():
        return None if os.access(target, os.W_OK) else f"cannot write {path}: permission denied"
    parent = target.parent
    if not parent.is_dir():
        return f"cannot create {path}: no directory {parent}"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot create {path}: directory {parent} is not writable"
    return None


def _replace_problem(path: str) -> str | None:
    """A file written to a temporary name in its directory and renamed over (atomic)."""
    target = Path(path)
    if target.is_dir():
        return f"{path} is a directory"
    parent = target.parent
    if not parent.is_dir():
        return f"cannot write {path}: no directory {parent}"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot write {path}: directory {parent} is not writable"
    if target.exists() and not os.access(target, os.R_OK):
        return f"cannot read {path}: permission denied"
    return None


def _interface_problem(name: str) -> str | None:
    try:
        socket.if_nametoindex(name)
    except OSError:
        return f"no network interface {name!r} on this host"
    return None


def _bind_problem(need: Bind, sockets: list[socket.socket]) -> str | None:
    kind = socket.SOCK_DGRAM if need.protocol == "udp" else socket.SOCK_STREAM
    try:
        sockets.append(listen_socket(need.address, kind, backlog=need.backlog))
    except OSError as exc:
        return f"cannot bind {need.address}/{need.protocol}: {_bind_reason(exc, need.address)}"
    return None


def _bind_reason(exc: OSError, address: HostPort) -> str:
    if exc.errno == errno.EADDRINUSE:
        return "address already in use"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"{address.host} is not an address of this host"
    if exc.errno == errno.EACCES and address.port < 1024:
        return "permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
    return _reason(exc)


def _reason(exc: OSError) -> str:
    text = exc.strerror or str(exc)
    return text[:1].lower() + text[1:]


# --- entry points ----------------------------------------------------------------------------------


def preflight(config: Config, source: str, lines: Mapping[Loc, int], *, bind: bool = True,
              held: Collection[Held] = ()) -> list[ConfigIssue]:
    """Every problem `run` would meet starting `config`, as ConfigIssues (file, line, field).
    `lines` maps field paths to lines (empty for a config that came from etcd); `held` lists
    addresses a running pointsman already holds (a reload keeps them: not tried)."""
    return _issues(problems(needs(config, bind=bind), held), source, lines)


def preflight_file(path: str, config: Config, *, bind: bool = True,
                   held: Collection[Held] = ()) -> list[ConfigIssue]:
    """`preflight()` for a config loaded from `path` (read again for its line numbers)."""
    _, lines = _parse_yaml(read_text(path), path)
    return preflight(config, path, lines, bind=bind, held=held)


def preflight_node(node: NodeFile, *, bind: bool = True) -> list[ConfigIssue]:
    """`preflight()` for what a node file holds itself: its etcd credentials and its node-local
    keys (admin, flow_log). Its listeners come from etcd: `run` checks them once they arrive."""
    _, lines = _parse_yaml(read_text(node.source), node.source)
    config = Config.model_validate({**_PLACEHOLDER, **node.local})
    local = [need for need in needs(config, bind=bind) if need.loc[0] in node.local]
    wanted = [*file_needs(node.etcd, ("config_source", "etcd")), *local]
    return _issues(problems(wanted), node.source, lines)


def _issues(found: Iterator[tuple[Loc, str]], source: str,
            lines: Mapping[Loc, int]) -> list[ConfigIssue]:
    by_loc = dict(lines)
    issues = [ConfigIssue(source, _line_for(loc, by_loc), format_loc(loc), message)
              for loc, message in found]
    return sorted(issues, key=lambda issue: (issue.line or 0, issue.path))
