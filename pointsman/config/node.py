"""A node file: what belongs to one node, when the cluster config (listeners, pools) is in etcd.

```yaml
node: {name: lb-a}
config_source:
  etcd:
    endpoints: ["http://127.0.0.1:2379"]
    prefix: /pointsman/clusters/prod/
    token_file: /etc/pointsman/etcd.token   # optional: a token, or user:password
admin: {bind: "127.0.0.1:9900"}              # node-local keys: any top-level config key but
workers: 2                                   # listeners and pools
```

Node-local keys replace the cluster config's key of the same name (the whole value), so a node
can run its own admin bind, worker count, flow log or BGP session. They are checked here, with
their line in the node file, by the same models as in a config file.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from pointsman.config.loader import (
    ConfigError,
    ConfigIssue,
    Loc,
    _line_for,
    _model_problems,
    _parse_yaml,
    _pydantic_issues,
    format_loc,
    read_text,
)
from pointsman.config.model import Bind, Config, Duration, Name, Strict

NODE_KEYS = ("node", "config_source")
CLUSTER_KEYS = ("listeners", "pools")  # only ever from the cluster config
# `node` is the node file's own section (a plain config may carry a `node: {name}` of its own).
LOCAL_KEYS = tuple(k for k in Config.model_fields if k not in CLUSTER_KEYS + NODE_KEYS)

# Stand-ins that let the node-local keys be validated by the Config model on their own.
_PLACEHOLDER: dict[str, Any] = {
    "listeners": [{"name": "x", "bind": "127.0.0.1:1", "pool": "x"}],
    "pools": [{"name": "x", "backends": [{"address": "127.0.0.1:1"}]}],
}


class NodeSection(Strict):
    name: Name
    # Per-node listener addresses, by listener name: nodes that do not share one VIP (DNS round
    # robin over node addresses, or several nodes on one test host) run the same cluster config.
    binds: dict[Name, Bind] = Field(default_factory=dict)
    # The node's registration lease: a crashed node leaves `fleet status` after this long.
    lease_ttl: Annotated[Duration, Field(ge=2.0, le=3600.0)] = 10.0


class EtcdSourceConfig(Strict):
    endpoints: list[str] = Field(min_length=1)
    prefix: str = Field(min_length=1)
    token_file: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    @field_validator("endpoints")
    @classmethod
    def _urls(cls, endpoints: list[str]) -> list[str]:
        for url in endpoints:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"expected http:// or https:// URLs, got {url!r}")
        return endpoints

    @model_validator(mode="after")
    def _key_needs_cert(self) -> EtcdSourceConfig:
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("key_file needs cert_file")
        return self


class ConfigSourceConfig(Strict):
    etcd: EtcdSourceConfig


class _NodeModel(BaseModel):
    node: NodeSection
    config_source: ConfigSourceConfig


@dataclass(frozen=True)
class NodeFile:
    name: str
    lease_ttl: float
    etcd: EtcdSourceConfig
    local: Mapping[str, Any] = field(default_factory=dict)  # raw node-local keys, as written
    binds: Mapping[str, str | list[str]] = field(default_factory=dict)  # listener -> its bind
    source: str = "<node>"


def is_node_data(data: object) -> bool:
    """A node file has `config_source`, or `node` without the cluster keys (a plain config may
    name its node: `node: {name: lb-a}` beside its listeners and pools)."""
    if not isinstance(data, dict):
        return False
    return "config_source" in data or ("node" in data
                                       and not any(key in data for key in CLUSTER_KEYS))


def is_node_file(path: str | Path) -> bool:
    """True when the file at `path` is a node file (see `is_node_data`)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False  # the config loader reports the problem with its line
    return is_node_data(data)


def load_node_file(path: str | Path) -> NodeFile:
    return load_node_text(read_text(path), str(path))


def load_node_text(text: str, source: str = "<node>") -> NodeFile:
    """Parse and validate a node file; raise ConfigError with every issue found."""
    data, lines = _parse_yaml(text, source)
    if not isinstance(data, dict):
        raise ConfigError([ConfigIssue(source, 1, "", "expected a mapping with node and config_source")])
    issues = list(_unknown_keys(data, lines, source))
    node_part = {key: data[key] for key in NODE_KEYS if key in data}
    local = {key: data[key] for key in LOCAL_KEYS if key in data}
    model: _NodeModel | None = None
    try:
        model = _NodeModel.model_validate(node_part)
    except ValidationError as exc:
        issues.extend(_pydantic_issues(exc, lines, source))
    issues.extend(_local_issues(local, lines, source))
    if issues or model is None:
        raise ConfigError(sorted(issues, key=lambda i: (i.line or 0, i.path)))
    return NodeFile(
        name=model.node.name,
        lease_ttl=model.node.lease_ttl,
        etcd=model.config_source.etcd,
        local=local,
        binds={name: bind.as_written() for name, bind in model.node.binds.items()},
        source=source,
    )


def _unknown_keys(data: dict[str, Any], lines: dict[Loc, int], source: str) -> Iterator[ConfigIssue]:
    for key in data:
        if key in CLUSTER_KEYS:
            yield ConfigIssue(source, lines.get((key,)), str(key),
                              "comes from the cluster config in etcd, not from a node file")
        elif key not in NODE_KEYS and key not in LOCAL_KEYS:
            yield ConfigIssue(source, lines.get((key,)), str(key), "unknown key")


def _local_issues(local: dict[str, Any], lines: dict[Loc, int], source: str) -> Iterator[ConfigIssue]:
    """Check node-local keys with the Config model (stand-in listeners and pools)."""
    try:
        config = Config.model_validate({**_PLACEHOLDER, **local})
    except ValidationError as exc:
        yield from (i for i in _pydantic_issues(exc, lines, source) if i.path.split(".")[0].split("[")[0]
                    in local)
        return
    for loc, message in _model_problems(config):
        if loc and loc[0] in local:
            yield ConfigIssue(source, _line_for(loc, lines), format_loc(loc), message)


def overlay_local(cluster: Mapping[str, Any], local: Mapping[str, Any],
                  binds: Mapping[str, str | list[str]] | None = None) -> dict[str, Any]:
    """The cluster config's data with the node-local keys put over it (each replaces the whole
    key) and this node's listener addresses (a listener the config lacks is left alone)."""
    data = {**cluster, **local}
    if binds and isinstance(data.get("listeners"), list):
        data["listeners"] = [
            {**item, "bind": binds[item["name"]]}
            if isinstance(item, dict) and item.get("name") in binds else item
            for item in data["listeners"]
        ]
    return data
