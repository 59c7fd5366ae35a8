"""The key layout under a cluster's prefix, in one place (pure: no I/O).

```
<prefix>config                      the cluster config: one YAML document, one atomic revision
<prefix>nodes/<node>                each node's registration (JSON, on the node's lease)
<prefix>drain/<node>                present while an operator has drained the node (JSON reason)
<prefix>members/<pool>/<host:port>  a self-registered backend (JSON, on the backend's lease)
```
"""

from __future__ import annotations

import re

from pointsman.config.addresses import HostPort, parse_host_port

# The same rule as a pool or node name in the config (model.Name).
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def normalise_prefix(prefix: str) -> str:
    """Prefixes are directories: "/pointsman/prod" and "/pointsman/prod/" mean the same."""
    if not prefix:
        raise ValueError("the etcd prefix must not be empty")
    return prefix if prefix.endswith("/") else prefix + "/"


def _name(kind: str, name: str) -> str:
    if not _NAME.match(name):
        raise ValueError(f"invalid {kind} name {name!r}: letters, digits, '_', '.', '-' (1-64)")
    return name


def config_key(prefix: str) -> str:
    return normalise_prefix(prefix) + "config"


def nodes_prefix(prefix: str) -> str:
    return normalise_prefix(prefix) + "nodes/"


def node_key(prefix: str, node: str) -> str:
    return nodes_prefix(prefix) + _name("node", node)


def drain_key(prefix: str, node: str) -> str:
    return normalise_prefix(prefix) + "drain/" + _name("node", node)


def members_prefix(prefix: str, pool: str) -> str:
    return normalise_prefix(prefix) + "members/" + _name("pool", pool) + "/"


def member_key(prefix: str, pool: str, address: str) -> str:
    """The key for backend `address` (host:port, checked) of `pool`."""
    return members_prefix(prefix, pool) + str(parse_host_port(address))


def member_address(prefix: str, pool: str, key: str) -> HostPort | None:
    """The backend address in a member key of `pool`; None for a key that is not one."""
    head = members_prefix(prefix, pool)
    if not key.startswith(head):
        return None
    try:
        return parse_host_port(key[len(head):])
    except ValueError:
        return None
