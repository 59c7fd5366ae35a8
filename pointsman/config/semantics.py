"""Cross-object rules: what no single model can check (names, references, combinations). Pure.

Each rule yields `(loc, message)` with `loc` the path of the offending field in the (merged)
config; the loader turns the path into a file, a line and a field name. Rules that point at a
second place ("duplicate name, first at ...") ask `Places` how to name it, so that with `include`
the other place can be in another file.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from typing import Any, Protocol

from pointsman.balance.maglev import is_prime
from pointsman.config.addresses import MAX_BIND_PORTS, HostPort, binds_of
from pointsman.config.model import Config, HealthCheckConfig, ListenerConfig, PoolConfig
from pointsman.discovery.rules import discovery_problems

Loc = tuple[str | int, ...]
Problem = tuple[Loc, str]

__all__ = ["Loc", "Places", "fallback_chain", "model_problems", "reference_problems"]


class Places(Protocol):
    def first(self, loc: Loc, other: Loc) -> str:
        """How the item at `loc` names the earlier item `other` it duplicates ("index 0")."""
        ...

    def named(self, loc: Loc, other: Loc) -> str:
        """How the item at `loc` names the item `other` ("listeners[0]")."""
        ...


class OneFile:
    """Every item is in one file: name the other place by its index."""

    def first(self, loc: Loc, other: Loc) -> str:
        return f"index {other[-1]}"

    def named(self, loc: Loc, other: Loc) -> str:
        return _format(other)


def _format(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def _items(data: Any, key: str) -> list[dict[str, Any]]:
    """The mappings under data[key], tolerating any shape (pydantic reports bad shapes)."""
    value = data.get(key) if isinstance(data, dict) else None
    return [item if isinstance(item, dict) else {} for item in value] if isinstance(value, list) else []


def reference_problems(data: Any, places: Places | None = None) -> Iterator[Problem]:
    """Rules on names and references, checked on the raw data so they are reported beside type
    errors."""
    places = places or OneFile()
    listeners, pools = _items(data, "listeners"), _items(data, "pools")
    yield from _duplicates(("listeners",), [str(item.get("name")) for item in listeners], places)
    yield from _duplicates(("pools",), [str(item.get("name")) for item in pools], places)
    pool_names = {item.get("name") for item in pools}
    yield from _bind_overlaps(listeners, places)
    for i, listener in enumerate(listeners):
        for field in ("pool", "default_pool"):
            if field in listener and listener[field] not in pool_names:
                yield ("listeners", i, field), f"no pool named {listener[field]!r}"
        if "pool" not in listener and "default_pool" not in listener:
            yield ("listeners", i, "pool"), "required key is missing (pool, or default_pool)"
        for j, route in enumerate(_items(listener, "tls_routes")):
            if "pool" in route and route["pool"] not in pool_names:
                yield ("listeners", i, "tls_routes", j, "pool"), f"no pool named {route['pool']!r}"
    for i, pool in enumerate(pools):
        ids = [str(b.get("name") or b.get("address")) for b in _items(pool, "backends")]
        yield from _duplicates(("pools", i, "backends"), ids, places, "backend")
    yield from _fallback_problems(pools, pool_names)


def _bind_overlaps(listeners: list[dict[str, Any]], places: Places) -> Iterator[Problem]:
    """No address (and protocol) is bound by two listeners, or twice by one (a list or ranges
    that overlap). Reported once per entry, at the entry (`bind[1]` when written as a list)."""
    held: dict[tuple[HostPort, str], Loc] = {}
    for i, listener in enumerate(listeners):
        raw = listener.get("bind")
        entries = raw if isinstance(raw, list) else [raw]
        protocol = str(listener.get("protocol", "tcp"))
        for j, entry in enumerate(entries):
            try:
                addresses = binds_of(entry).addresses
            except ValueError:
                continue  # the model reports it
            loc: Loc = ("listeners", i, "bind", j) if isinstance(raw, list) else ("listeners", i, "bind")
            for address in addresses:
                other = held.setdefault((address, protocol), loc)
                if other != loc:
                    where = "an earlier entry" if other[:2] == loc[:2] else places.named(loc[:2], other[:2])
                    yield loc, (f"same address as {where}" if len(addresses) == 1
                                else f"{address} is also bound by {where}")
                    break


def _fallback_problems(pools: list[dict[str, Any]], names: set[Any]) -> Iterator[Problem]:
    """fallback_pool names a pool, and following the chain never comes back (a cycle would pass a
    connection around forever when every pool in it is empty)."""
    fallback = {p.get("name"): p.get("fallback_pool") for p in pools if p.get("fallback_pool")}
    for i, pool in enumerate(pools):
        target = pool.get("fallback_pool")
        if target is None:
            continue
        if target not in names:
            yield ("pools", i, "fallback_pool"), f"no pool named {target!r}"
            continue
        chain = [pool.get("name")]
        while (step := fallback.get(chain[-1])) is not None and step in names:
            if step in chain:
                if step == chain[0]:
                    path = " -> ".join(str(n) for n in [*chain, step])
                    yield ("pools", i, "fallback_pool"), f"fallback cycle: {path}"
                break  # a cycle further down the chain is reported at its own pools
            chain.append(step)


def _duplicates(base: Loc, names: list[str], places: Places, what: str = "name") -> Iterator[Problem]:
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            loc = (*base, i)
            yield loc, f"duplicate {what} {name!r} (first at {places.first(loc, (*base, seen[name]))})"
        seen.setdefault(name, i)


def fallback_chain(config: Config, name: str) -> list[PoolConfig]:
    """`name`'s pool and the pools its fallback_pool chain reaches, in order (the loader has
    refused cycles; the bound only keeps a bug from looping)."""
    chain = [config.pool(name)]
    while (nxt := chain[-1].fallback_pool) is not None and len(chain) <= len(config.pools):
        if any(p.name == nxt for p in chain):
            break
        chain.append(config.pool(nxt))
    return chain


def model_problems(config: Config) -> Iterator[Problem]:
    """Rules on a validated config (pools and listeners exist by now)."""
    if config.bgp is not None:
        pools = {pool.name for pool in config.pools}
        listeners = {listener.name for listener in config.listeners}
        for i, vip in enumerate(config.bgp.vips):
            if vip.pool is not None and vip.pool not in pools:
                yield ("bgp", "vips", i, "pool"), f"no pool named {vip.pool!r}"
            if vip.listener is not None and vip.listener not in listeners:
                yield ("bgp", "vips", i, "listener"), f"no listener named {vip.listener!r}"
    known = {pool.name for pool in config.pools}
    for i in range(len(config.listeners)):
        yield from _listener_problems(config, i, known)
    yield from _stateless_shared_backends(config, known)
    yield from _kernel_name_clashes(config)
    admin = config.admin
    if admin is not None and not admin.has_tokens and not _is_loopback(admin.bind.host):
        yield ("admin", "token_file"), "required when admin.bind is not a loopback address"
    for i, pool in enumerate(config.pools):
        if pool.algorithm == "maglev" and not is_prime(pool.maglev_table_size):
            yield ("pools", i, "maglev_table_size"), f"must be prime, got {pool.maglev_table_size}"
        if pool.health_check is not None:
            yield from _health_problems(("pools", i), pool, pool.health_check)
        if pool.discovery is not None:
            for where, message in discovery_problems(pool.discovery):
                yield ("pools", i, "discovery", *where), message


def _listener_problems(config: Config, i: int, known: set[str]) -> Iterator[Problem]:
    listener = config.listeners[i]
    if listener.protocol == "udp" and (listener.tls_routes or
                                       listener.proxy_protocol.accept != "off"):
        yield ("listeners", i, "protocol"), "tls_routes and proxy_protocol.accept need tcp"
    if listener.fallback_pool in known:
        chain = fallback_chain(config, listener.fallback_pool)
        v1 = next((p for p in chain if p.proxy_protocol.send == "v1"), None)
        if listener.protocol == "udp" and v1 is not None:
            via = "" if v1 is chain[0] else " (through fallback_pool)"
            yield ("listeners", i, "pool"), (f"pool {v1.name!r}{via} sends PROXY v1, which is for "
                                             "TCP only: use v2 for UDP")
        if listener.dataplane == "kernel" and len(chain) > 1:
            yield ("listeners", i, "pool"), (f"pool {chain[0].name!r} has a fallback_pool, which "
                                             "the kernel data plane does not follow (use dataplane: "
                                             "proxy)")
    if len(listener.addresses) > MAX_BIND_PORTS:
        yield ("listeners", i, "bind"), (f"{len(listener.addresses)} addresses; at most "
                                         f"{MAX_BIND_PORTS} per listener (each port is a socket "
                                         "per worker)")
    if listener.dataplane == "kernel":
        yield from _kernel_bind_problems(listener, i)
    for j, route in enumerate(listener.tls_routes):
        if not route.server_names and not route.alpn:
            yield ("listeners", i, "tls_routes", j), "needs server_names or alpn"
    if listener.dataplane == "kernel" and listener.acl_on == "proxy_header":
        yield ("listeners", i, "acl_on"), ("the kernel data plane judges the packet's source "
                                           "address, not a PROXY header: use acl_on: peer (or "
                                           "dataplane: proxy)")
    pool = next((p for p in config.pools if p.name == listener.pool), None)
    if pool is not None and (listener.protocol == "udp" or listener.dataplane == "kernel") and (
            pool.backend_max_connections is not None
            or any(b.max_connections is not None for b in pool.backends)):
        what = "UDP sessions" if listener.protocol == "udp" else "the kernel data plane"
        yield ("listeners", i, "pool"), (f"pool {pool.name!r} caps its backends' connections "
                                         f"(max_connections), which {what} cannot enforce: "
                                         "caps and the queue are for TCP on dataplane: proxy")
    yield from _lifetime_problems(config, i, known)
    if listener.acl_on == "proxy_header" and listener.proxy_protocol.accept == "off":
        yield ("listeners", i, "acl_on"), ("proxy_header needs proxy_protocol.accept (required "
                                           "or optional): there is no header to judge")


def _stateless_shared_backends(config: Config, known: set[str]) -> Iterator[Problem]:
    """Stateless kernel listeners tell replies apart by their source (the backend's address and
    port): two of them (same protocol) cannot share a backend."""
    owner: dict[tuple[str, str], str] = {}
    for i, listener in enumerate(config.listeners):
        if listener.dataplane != "kernel" or listener.kernel.nat != "stateless":
            continue
        if listener.fallback_pool not in known:
            continue
        for backend in config.pool(listener.fallback_pool).backends:
            key = (str(backend.address), listener.protocol)
            other = owner.setdefault(key, listener.name)
            if other != listener.name:
                yield ("listeners", i, "pool"), (
                    f"backend {backend.address} is also a backend of stateless listener "
                    f"{other!r}: stateless listeners know replies by their source address and "
                    "port, so they cannot share a backend (use kernel.nat: conntrack for one)")
                break


def _kernel_name_clashes(config: Config) -> Iterator[Problem]:
    """A kernel listener's nftables objects are named `l_<listener>_<what>`, and its backends'
    `l_<listener>_b<index>_<what>`: a kernel listener named like another's name plus `_...`
    (`web` and `web_b0`) could own objects of the same name, so it is refused."""
    names = [lst.name for lst in config.listeners if lst.dataplane == "kernel"]
    for i, listener in enumerate(config.listeners):
        if listener.dataplane != "kernel":
            continue
        for other in names:
            if listener.name.startswith(other + "_"):
                yield ("listeners", i, "name"), (
                    f"kernel listener {listener.name!r} starts with kernel listener {other!r} "
                    "and '_': their nftables objects could share names; rename one")
                break


def _kernel_bind_problems(listener: ListenerConfig, i: int) -> Iterator[Problem]:
    """A kernel listener's binds: one address family (DNAT keeps the family, and the backends
    have one); with nat: stateless, one address and one port (replies are rewritten to them with
    no state that could say which of several a client used)."""
    versions = {ipaddress.ip_address(e.host).version for e in listener.bind if _is_ip(e.host)}
    if len(versions) > 1:
        yield ("listeners", i, "bind"), ("the kernel data plane serves one address family per "
                                         f"listener (got {listener.bind}): use a listener per "
                                         "family")
    if listener.kernel.nat == "stateless" and len(listener.addresses) != 1:
        yield ("listeners", i, "bind"), ("kernel.nat: stateless takes one address and one port "
                                         f"(got {listener.bind}): use nat: conntrack for address "
                                         "lists and port ranges")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _lifetime_problems(config: Config, i: int, known: set[str]) -> Iterator[Problem]:
    """tcp_keepalive and max_connection_duration live in the proxy's TCP engine: a UDP listener
    has no TCP socket to keep alive, and the kernel data plane holds no socket at all."""
    listener = config.listeners[i]
    if listener.tcp_keepalive is not None and listener.protocol == "udp":
        yield ("listeners", i, "tcp_keepalive"), "UDP has no keepalive (sessions end by session_timeout)"
    if listener.dataplane != "kernel":
        return
    if listener.tcp_keepalive is not None:
        yield ("listeners", i, "tcp_keepalive"), ("the kernel data plane holds no client socket to "
                                                  "keep alive (use dataplane: proxy)")
    if listener.fallback_pool in known:
        pool = config.pool(listener.fallback_pool)
        for key in ("tcp_keepalive", "max_connection_duration"):
            if getattr(pool, key) is not None:
                yield ("listeners", i, "pool"), (f"pool {pool.name!r} sets {key}, which the kernel "
                                                 "data plane does not apply (use dataplane: proxy)")


def _health_problems(pool_loc: Loc, pool: PoolConfig, check: HealthCheckConfig) -> Iterator[Problem]:
    loc = (*pool_loc, "health_check")
    if check.type in ("send_expect", "udp") and check.send is None and check.send_hex is None:
        yield (*loc, "send"), f"type {check.type} needs send or send_hex"
    if check.type == "send_expect" and check.expect is None and check.expect_regex is None:
        yield (*loc, "expect"), "type send_expect needs expect or expect_regex"
    if check.timeout > check.interval:
        yield (*loc, "timeout"), "must not be longer than interval"
    if check.type == "exec" and not check.command:
        yield (*loc, "command"), "type exec needs command: [program, arg, ...]"
    if check.type != "exec" and check.command is not None:
        yield (*loc, "command"), f"only type exec runs a command (type is {check.type})"
    if check.address is not None and check.port is not None:
        yield (*loc, "port"), "address already names the port: give address or port, not both"
    if check.type == "agent" and check.address is None and check.port is None and any(
            b.health_check_address is None for b in pool.backends):
        yield (*loc, "type"), ("an agent listens on its own port: give port (on each backend's "
                               "host) or address (or health_check_address on every backend)")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
