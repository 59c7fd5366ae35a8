"""Load a config file: YAML with line numbers -> pydantic models -> cross-object checks.

Every problem becomes a `ConfigIssue` naming the file, the line and the field path, e.g.
`pointsman.yaml:14: pools[0].backends[1].address: expected host:port, got '127.0.0.1'`, and all of
them are reported together, not only the first.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from pointsman.balance.maglev import is_prime
from pointsman.config.addresses import resolve
from pointsman.config.model import Config
from pointsman.config.suggest import did_you_mean
from pointsman.discovery.rules import discovery_problems

Loc = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    source: str
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}" if self.line else self.source
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ConfigError(Exception):
    """The config is not valid; `issues` lists every problem found."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        super().__init__("\n".join(str(i) for i in issues))
        self.issues = issues


def format_loc(loc: Loc) -> str:
    """pools[0].backends[1].address"""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def read_text(path: str | Path) -> str:
    """The file's text; an unreadable file is a ConfigError naming it."""
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise ConfigError([ConfigIssue(str(path), None, "", f"cannot read: {exc.strerror}")]) from None


def load_file(path: str | Path) -> Config:
    return load_text(read_text(path), str(path))


def load_text(text: str, source: str = "<config>") -> Config:
    """Parse and validate; raise ConfigError with every issue found."""
    data, lines = _parse_yaml(text, source)
    if isinstance(data, dict) and "config_source" in data:
        raise ConfigError([ConfigIssue(source, lines.get(("config_source",)), "config_source",
                                       "this is a node file (its cluster config is in etcd): "
                                       "`pointsman run` and `pointsman check` take it")])
    issues = [
        ConfigIssue(source, _line_for(loc, lines), format_loc(loc), msg)
        for loc, msg in _reference_problems(data)
    ]
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        issues.extend(_pydantic_issues(exc, lines, source))
    else:
        issues.extend(
            ConfigIssue(source, _line_for(loc, lines), format_loc(loc), msg)
            for loc, msg in _model_problems(config)
        )
    if issues:
        raise ConfigError(sorted(issues, key=_order))
    return _resolved(config, lines, source)


def _order(issue: ConfigIssue) -> tuple[int, str]:
    return (issue.line or 0, issue.path)


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (a silent override hides operator mistakes)."""


def _parse_yaml(text: str, source: str) -> tuple[Any, dict[Loc, int]]:
    try:
        root = yaml.compose(text, Loader=_LineLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([ConfigIssue(source, line, "", f"invalid YAML: {problem}")]) from None
    if root is None:
        raise ConfigError([ConfigIssue(source, None, "", "the file is empty")])
    lines: dict[Loc, int] = {}
    duplicates: list[ConfigIssue] = []
    data = _build(root, (), lines, duplicates, source)
    if duplicates:
        raise ConfigError(duplicates)
    return data, lines


def _build(
    node: yaml.Node, loc: Loc, lines: dict[Loc, int], dups: list[ConfigIssue], source: str
) -> Any:
    lines.setdefault(loc, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = yaml.safe_load(yaml.serialize(key_node))
            child = (*loc, key)
            if key in out:
                line = key_node.start_mark.line + 1
                dups.append(ConfigIssue(source, line, format_loc(child), "duplicate key"))
            lines[child] = key_node.start_mark.line + 1
            out[key] = _build(value_node, child, lines, dups, source)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_build(item, (*loc, i), lines, dups, source) for i, item in enumerate(node.value)]
    return yaml.safe_load(yaml.serialize(node))


def _line_for(loc: Loc, lines: dict[Loc, int]) -> int | None:
    """The line of the deepest part of `loc` that exists in the file."""
    for end in range(len(loc), -1, -1):
        if (line := lines.get(loc[:end])) is not None:
            return line
    return None


def _pydantic_issues(exc: ValidationError, lines: dict[Loc, int], source: str) -> Iterator[ConfigIssue]:
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and "[" in p))
        yield ConfigIssue(source, _line_for(loc, lines), format_loc(loc), _message(err))


def _message(err: Any) -> str:
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        return "unknown key" + did_you_mean(err["loc"])
    if kind == "missing":
        return "required key is missing"
    if kind == "literal_error":
        return f"{msg.replace('Input should be', 'expected one of')}, got {err['input']!r}"
    if kind == "value_error":
        return str(msg).removeprefix("Value error, ")
    return f"{msg[:1].lower()}{msg[1:]}, got {err['input']!r}"


def _items(data: Any, key: str) -> list[dict[str, Any]]:
    """The mappings under data[key], tolerating any shape (pydantic reports bad shapes)."""
    value = data.get(key) if isinstance(data, dict) else None
    return [item if isinstance(item, dict) else {} for item in value] if isinstance(value, list) else []


def _reference_problems(data: Any) -> Iterator[tuple[Loc, str]]:
    """Cross-object rules, checked on the raw data so they are reported beside type errors."""
    listeners, pools = _items(data, "listeners"), _items(data, "pools")
    yield from _duplicates("listeners", [str(item.get("name")) for item in listeners])
    yield from _duplicates("pools", [str(item.get("name")) for item in pools])
    pool_names = {item.get("name") for item in pools}
    binds: dict[tuple[str, str], int] = {}
    for i, listener in enumerate(listeners):
        for field in ("pool", "default_pool"):
            if field in listener and listener[field] not in pool_names:
                yield ("listeners", i, field), f"no pool named {listener[field]!r}"
        if "pool" not in listener and "default_pool" not in listener:
            yield ("listeners", i, "pool"), "required key is missing (pool, or default_pool)"
        for j, route in enumerate(_items(listener, "tls_routes")):
            if "pool" in route and route["pool"] not in pool_names:
                yield ("listeners", i, "tls_routes", j, "pool"), f"no pool named {route['pool']!r}"
        key = (str(listener.get("bind")), str(listener.get("protocol", "tcp")))
        if key in binds:
            yield ("listeners", i, "bind"), f"same address as listeners[{binds[key]}]"
        binds.setdefault(key, i)
    for i, pool in enumerate(pools):
        ids = [str(b.get("name") or b.get("address")) for b in _items(pool, "backends")]
        yield from _duplicates(("pools", i, "backends"), ids, "backend")


def _model_problems(config: Config) -> Iterator[tuple[Loc, str]]:
    if config.bgp is not None:
        pools = {pool.name for pool in config.pools}
        listeners = {listener.name for listener in config.listeners}
        for i, vip in enumerate(config.bgp.vips):
            if vip.pool is not None and vip.pool not in pools:
                yield ("bgp", "vips", i, "pool"), f"no pool named {vip.pool!r}"
            if vip.listener is not None and vip.listener not in listeners:
                yield ("bgp", "vips", i, "listener"), f"no listener named {vip.listener!r}"
    for i, listener in enumerate(config.listeners):
        if listener.protocol == "udp" and (listener.tls_routes or
                                           listener.proxy_protocol.accept != "off"):
            yield ("listeners", i, "protocol"), "tls_routes and proxy_protocol.accept need tcp"
        pool = next((p for p in config.pools if p.name == listener.fallback_pool), None)
        if listener.protocol == "udp" and pool is not None and pool.proxy_protocol.send == "v1":
            yield ("listeners", i, "pool"), (f"pool {pool.name!r} sends PROXY v1, which is for "
                                             "TCP only: use v2 for UDP")
        for j, route in enumerate(listener.tls_routes):
            if not route.server_names and not route.alpn:
                yield ("listeners", i, "tls_routes", j), "needs server_names or alpn"
    admin = config.admin
    if admin is not None and admin.token_file is None and not _is_loopback(admin.bind.host):
        yield ("admin", "token_file"), "required when admin.bind is not a loopback address"
    for i, pool in enumerate(config.pools):
        if pool.algorithm == "maglev" and not is_prime(pool.maglev_table_size):
            yield ("pools", i, "maglev_table_size"), f"must be prime, got {pool.maglev_table_size}"
        if pool.health_check is not None:
            yield from _health_problems(("pools", i, "health_check"), pool.health_check)
        if pool.discovery is not None:
            for where, message in discovery_problems(pool.discovery):
                yield ("pools", i, "discovery", *where), message


def _health_problems(loc: Loc, check: Any) -> Iterator[tuple[Loc, str]]:
    if check.type in ("send_expect", "udp") and check.send is None and check.send_hex is None:
        yield (*loc, "send"), f"type {check.type} needs send or send_hex"
    if check.type == "send_expect" and check.expect is None and check.expect_regex is None:
        yield (*loc, "expect"), "type send_expect needs expect or expect_regex"
    if check.timeout > check.interval:
        yield (*loc, "timeout"), "must not be longer than interval"


def _duplicates(where: str | Loc, names: list[str], what: str = "name") -> Iterator[tuple[Loc, str]]:
    base: Loc = (where,) if isinstance(where, str) else where
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            yield (*base, i), f"duplicate {what} {name!r} (first at index {seen[name]})"
        seen.setdefault(name, i)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _resolved(config: Config, lines: dict[Loc, int], source: str) -> Config:
    """Resolve backend host names once, now; unresolvable names are config errors."""
    issues: list[ConfigIssue] = []
    pools = []
    for i, pool in enumerate(config.pools):
        backends = []
        for j, backend in enumerate(pool.backends):
            try:
                backends.append(backend.model_copy(update={"address": resolve(backend.address)}))
            except ValueError as exc:
                loc: Loc = ("pools", i, "backends", j, "address")
                issues.append(ConfigIssue(source, _line_for(loc, lines), format_loc(loc), str(exc)))
        pools.append(pool.model_copy(update={"backends": backends}))
    if issues:
        raise ConfigError(issues)
    return config.model_copy(update={"pools": pools})
