"""Load a config file: YAML with line numbers -> pydantic models -> cross-object checks.

Every problem becomes a `ConfigIssue` naming the file, the line and the field path, e.g.
`pointsman.yaml:14: pools[0].backends[1].address: expected host:port, got '127.0.0.1'`, and all of
them are reported together, not only the first.

Two things happen before validation:

* `${VAR}` / `${VAR:-default}` in values are expanded from the environment (`envsubst`), inside
  each YAML scalar after parsing, so a value can never inject YAML structure and every error
  keeps its line. A plain (unquoted) scalar is typed after expansion (`port: ${PORT}` is an int);
  a quoted one stays a string. Keys and comments are never expanded.
* `include: [conf.d/*.yaml]` (main file only) merges the `listeners` and `pools` of other files,
  globs relative to the including file, in sorted order. Each merged item remembers its file, so
  every error names the file and line the item came from, and a duplicate name across files names
  both places.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from pointsman.config.addresses import HostPort, resolve
from pointsman.config.envsubst import EnvError, expand
from pointsman.config.model import Config
from pointsman.config.semantics import Loc, model_problems, reference_problems
from pointsman.config.suggest import did_you_mean

# Names pointsman.config.node imports: it checks node files with the same machinery.
__all__ = ["ConfigError", "ConfigIssue", "Loc", "_line_for", "_model_problems", "_parse_yaml",
           "_pydantic_issues", "format_loc", "load_file", "load_text", "read_text"]
_model_problems = model_problems

INCLUDE_KEY = "include"
INCLUDABLE = ("listeners", "pools")  # the keys an included file may hold
# More included files than this is a runaway glob (conf.d/** on the wrong directory), not a config.
MAX_INCLUDED_FILES = 1000


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


def load_file(path: str | Path, environ: Mapping[str, str] | None = os.environ) -> Config:
    """Load a config file; `include` globs are relative to its directory."""
    return load_text(read_text(path), str(path), environ=environ, base_dir=Path(path).parent)


def load_text(
    text: str,
    source: str = "<config>",
    *,
    environ: Mapping[str, str] | None = os.environ,
    base_dir: str | Path | None = None,
) -> Config:
    """Parse and validate; raise ConfigError with every issue found.

    `environ` None leaves `${...}` alone: for text that was expanded once already (a validated
    config dumped back to YAML). `base_dir` None refuses `include` (text that is not a file).
    """
    data, lines = _parse_yaml(text, source, environ)
    if isinstance(data, dict) and "config_source" in data:
        raise ConfigError([ConfigIssue(source, lines.get(("config_source",)), "config_source",
                                       "this is a node file (its cluster config is in etcd): "
                                       "`pointsman run` and `pointsman check` take it")])
    origins = _Origins(_File(source, lines))
    if isinstance(data, dict) and INCLUDE_KEY in data:
        data = _with_includes(data, origins, environ, base_dir)
    issues = [origins.issue(loc, msg) for loc, msg in reference_problems(data, origins)]
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        issues.extend(origins.issue(loc, msg) for loc, msg in _pydantic_problems(exc))
    else:
        issues.extend(origins.issue(loc, msg) for loc, msg in model_problems(config))
    if issues:
        raise ConfigError(sorted(issues, key=_order))
    return _resolved(config, origins)


def _order(issue: ConfigIssue) -> tuple[str, int, str]:
    return (issue.source, issue.line or 0, issue.path)


# --- YAML with lines and environment ------------------------------------------------------------


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (a silent override hides operator mistakes)."""


_RESOLVER = yaml.resolver.Resolver()


def _implicit_tag(value: str) -> str:
    """The tag YAML gives a plain scalar with this text (int, float, bool, null or str)."""
    return str(_RESOLVER.resolve(yaml.ScalarNode, value, (True, False)))  # type: ignore[no-untyped-call]


@dataclass(slots=True)
class _Build:
    source: str
    environ: Mapping[str, str] | None
    lines: dict[Loc, int] = field(default_factory=dict)
    issues: list[ConfigIssue] = field(default_factory=list)


def _parse_yaml(
    text: str, source: str, environ: Mapping[str, str] | None = os.environ
) -> tuple[Any, dict[Loc, int]]:
    try:
        root = yaml.compose(text, Loader=_LineLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([ConfigIssue(source, line, "", f"invalid YAML: {problem}")]) from None
    if root is None:
        raise ConfigError([ConfigIssue(source, None, "", "the file is empty")])
    build = _Build(source, environ)
    data = _build(root, (), build)
    if build.issues:
        raise ConfigError(build.issues)
    return data, build.lines


def _build(node: yaml.Node, loc: Loc, build: _Build) -> Any:
    build.lines.setdefault(loc, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = yaml.safe_load(yaml.serialize(key_node))
            child = (*loc, key)
            if key in out:
                line = key_node.start_mark.line + 1
                build.issues.append(ConfigIssue(build.source, line, format_loc(child), "duplicate key"))
            build.lines[child] = key_node.start_mark.line + 1
            out[key] = _build(value_node, child, build)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_build(item, (*loc, i), build) for i, item in enumerate(node.value)]
    if build.environ is not None and isinstance(node, yaml.ScalarNode) and "$" in node.value:
        return _expanded(node, loc, build, build.environ)
    return yaml.safe_load(yaml.serialize(node))


def _expanded(node: yaml.ScalarNode, loc: Loc, build: _Build, environ: Mapping[str, str]) -> Any:
    """The scalar with `${...}` expanded; a plain scalar is typed again after expansion (unless it
    carried an explicit tag such as !!str), a quoted one stays a string."""
    try:
        value = expand(node.value, environ)
    except EnvError as exc:
        build.issues.append(ConfigIssue(build.source, node.start_mark.line + 1, format_loc(loc),
                                        str(exc)))
        return None
    tag = node.tag
    if node.style is None and tag == _implicit_tag(node.value):
        tag = _implicit_tag(value)
    try:
        return yaml.safe_load(yaml.serialize(yaml.ScalarNode(tag, value)))
    except yaml.YAMLError as exc:
        build.issues.append(ConfigIssue(build.source, node.start_mark.line + 1, format_loc(loc),
                                        f"after expanding the environment: {exc}"))
        return None


def _line_for(loc: Loc, lines: dict[Loc, int]) -> int | None:
    """The line of the deepest part of `loc` that exists in the file."""
    for end in range(len(loc), -1, -1):
        if (line := lines.get(loc[:end])) is not None:
            return line
    return None


# --- where each item came from --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _File:
    source: str
    lines: dict[Loc, int]


class _Origins:
    """Maps a path in the merged config to the file, line and path it was written at."""

    def __init__(self, main: _File) -> None:
        self.main = main
        self.items: dict[tuple[str, int], tuple[_File, int]] = {}  # (key, merged) -> (file, local)

    def locate(self, loc: Loc) -> tuple[_File, Loc]:
        if len(loc) >= 2 and isinstance(loc[0], str) and isinstance(loc[1], int):
            found = self.items.get((loc[0], loc[1]))
            if found is not None:
                file, local = found
                return file, (loc[0], local, *loc[2:])
        return self.main, loc

    def issue(self, loc: Loc, message: str) -> ConfigIssue:
        file, local = self.locate(loc)
        return ConfigIssue(file.source, _line_for(local, file.lines), format_loc(local), message)

    # semantics.Places: name another item, with its file when that is another file
    def first(self, loc: Loc, other: Loc) -> str:
        here, _ = self.locate(loc)
        there, local = self.locate(other)
        if there is here:
            return f"index {local[-1]}"
        return f"{there.source}:{_line_for(local, there.lines)}, {format_loc(local)}"

    def named(self, loc: Loc, other: Loc) -> str:
        here, _ = self.locate(loc)
        there, local = self.locate(other)
        if there is here:
            return format_loc(local)
        return f"{format_loc(local)} in {there.source}:{_line_for(local, there.lines)}"


def _with_includes(data: dict[str, Any], origins: _Origins, environ: Mapping[str, str] | None,
                   base_dir: str | Path | None) -> dict[str, Any]:
    """The main file's data with the listeners and pools of every included file appended."""
    main = origins.main
    patterns = data.pop(INCLUDE_KEY)
    merged: dict[str, Any] = {key: data.get(key) for key in INCLUDABLE}
    for key, items in merged.items():
        for i in range(len(items) if isinstance(items, list) else 0):
            origins.items[(key, i)] = (main, i)
    issues: list[ConfigIssue] = []
    for path, loc in _included_paths(patterns, main, base_dir, issues):
        try:
            file_data, lines = _parse_yaml(read_text(path), str(path), environ)
        except ConfigError as exc:
            issues.extend(exc.issues)
            continue
        file = _File(str(path), lines)
        if not isinstance(file_data, dict):
            issues.append(ConfigIssue(file.source, 1, "", "an included file holds a mapping with "
                                      "listeners and/or pools"))
            continue
        for key, value in file_data.items():
            if key not in INCLUDABLE:
                issues.append(ConfigIssue(file.source, lines.get((key,)), str(key),
                                          "an included file may hold only listeners and pools "
                                          f"(included from {main.source}:{_line_for(loc, main.lines)})"))
            elif not isinstance(value, list):
                issues.append(ConfigIssue(file.source, lines.get((key,)), str(key), "expected a list"))
            elif merged[key] is None or isinstance(merged[key], list):  # else: the main file's
                target: list[Any] = list(merged[key] or [])               # shape error is reported
                for i, item in enumerate(value):
                    origins.items[(key, len(target))] = (file, i)
                    target.append(item)
                merged[key] = target
    if issues:
        raise ConfigError(issues)
    return {**data, **{key: value for key, value in merged.items() if value is not None}}


def _included_paths(patterns: Any, main: _File, base_dir: str | Path | None,
                    issues: list[ConfigIssue]) -> Iterator[tuple[Path, Loc]]:
    """Each file the include patterns name, once, in pattern order then sorted order."""
    where: Loc = (INCLUDE_KEY,)
    if base_dir is None:
        issues.append(ConfigIssue(main.source, _line_for(where, main.lines), INCLUDE_KEY,
                                  "include needs a config file to be relative to (this config "
                                  "did not come from a file)"))
        return
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        issues.append(ConfigIssue(main.source, _line_for(where, main.lines), INCLUDE_KEY,
                                  "expected a list of file names or globs, e.g. [conf.d/*.yaml]"))
        return
    seen: set[Path] = {Path(main.source).resolve()}
    count = 0
    for i, pattern in enumerate(patterns):
        loc: Loc = (INCLUDE_KEY, i)
        full = pattern if os.path.isabs(pattern) else os.path.join(base_dir, pattern)
        matches = sorted(glob.glob(full)) if glob.has_magic(pattern) else [full]
        if not glob.has_magic(pattern) and not os.path.exists(full):
            issues.append(ConfigIssue(main.source, _line_for(loc, main.lines), format_loc(loc),
                                      f"no such file: {full}"))
            continue
        for match in matches:
            path = Path(match)
            if path.resolve() in seen or path.is_dir():
                continue
            seen.add(path.resolve())
            count += 1
            if count > MAX_INCLUDED_FILES:
                issues.append(ConfigIssue(main.source, _line_for(loc, main.lines), format_loc(loc),
                                          f"more than {MAX_INCLUDED_FILES} included files"))
                return
            yield path, loc


# --- pydantic's errors, in the operator's words -----------------------------------------------


def _pydantic_problems(exc: ValidationError) -> Iterator[tuple[Loc, str]]:
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and "[" in p))
        yield loc, _message(err)


def _pydantic_issues(exc: ValidationError, lines: dict[Loc, int], source: str) -> Iterator[ConfigIssue]:
    """One file's pydantic errors as issues (pointsman.config.node checks node files with it)."""
    for loc, message in _pydantic_problems(exc):
        yield ConfigIssue(source, _line_for(loc, lines), format_loc(loc), message)


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


# --- names resolved once, at load --------------------------------------------------------------


def _resolved(config: Config, origins: _Origins) -> Config:
    """Resolve backend (and health-check) host names once, now; unresolvable names are config
    errors."""
    issues: list[ConfigIssue] = []
    pools = []

    def resolved(address: HostPort | None, loc: Loc) -> HostPort | None:
        if address is None:
            return None
        try:
            return resolve(address)
        except ValueError as exc:
            issues.append(origins.issue(loc, str(exc)))
            return address

    for i, pool in enumerate(config.pools):
        backends = []
        for j, backend in enumerate(pool.backends):
            at: Loc = ("pools", i, "backends", j)
            backends.append(backend.model_copy(update={
                "address": resolved(backend.address, (*at, "address")),
                "health_check_address": resolved(backend.health_check_address,
                                                 (*at, "health_check_address"))}))
        update: dict[str, Any] = {"backends": backends}
        check = pool.health_check
        if check is not None and check.address is not None:
            address = resolved(check.address, ("pools", i, "health_check", "address"))
            update["health_check"] = check.model_copy(update={"address": address})
        pools.append(pool.model_copy(update=update))
    if issues:
        raise ConfigError(issues)
    return config.model_copy(update={"pools": pools})
