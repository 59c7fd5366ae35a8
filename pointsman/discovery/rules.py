"""Rules of a pool's `discovery` block that its model cannot say alone (pure; the config loader
reports them with the file's line, the sources refuse the same)."""

from __future__ import annotations

from collections.abc import Iterator

from pointsman.config.model import DiscoveryConfig, DnsDiscoveryConfig


def dns_problem(config: DnsDiscoveryConfig) -> str | None:
    """What is wrong with a `discovery.dns` block, or None."""
    if (config.srv is None) == (config.name is None):
        return "set exactly one of srv or name"
    if config.name is not None and config.port is None:
        return "name needs port (A/AAAA records carry no port)"
    if config.srv is not None and config.port is not None:
        return "srv records carry their own port: remove port"
    return None


def discovery_problems(config: DiscoveryConfig) -> Iterator[tuple[tuple[str, ...], str]]:
    """(path under the pool's `discovery`, message) for each problem."""
    if config.dns is not None and (problem := dns_problem(config.dns)) is not None:
        yield ("dns",), problem
    if config.dns is None and config.kubernetes is None and not config.etcd_members:
        yield (), "names no source: set dns, kubernetes or etcd_members"
