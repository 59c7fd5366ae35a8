"""SRV answers to backends and the DNS discovery config rules (discovery/dns.py)."""

from __future__ import annotations

import pytest

from pointsman.config.model import DnsDiscoveryConfig
from pointsman.discovery.dns import DnsSource, srv_backends
from pointsman.discovery.rules import dns_problem


def test_only_the_lowest_priority_is_used_and_weights_map() -> None:
    records = [(10, 5, 8001, "a."), (0, 20, 8002, "a."), (0, 0, 8003, "b."), (0, 70000, 8004, "b.")]
    addresses = {"a.": ["10.0.0.1"], "b.": ["10.0.0.2", "fd00::2"]}
    got = {(b.id, b.weight) for b in srv_backends(records, addresses)}
    assert got == {
        ("10.0.0.1:8002", 20),
        ("10.0.0.2:8003", 1), ("[fd00::2]:8003", 1),  # SRV weight 0 means "rarely", not never
        ("10.0.0.2:8004", 1000), ("[fd00::2]:8004", 1000),  # capped at the config's maximum
    }


def test_unresolved_targets_and_no_records_give_nothing() -> None:
    assert srv_backends([(0, 1, 80, "gone.")], {}) == ()
    assert srv_backends([], {"a.": ["10.0.0.1"]}) == ()


@pytest.mark.parametrize(("config", "problem"), [
    ({}, "set exactly one of srv or name"),
    ({"srv": "_a._tcp.x", "name": "x"}, "set exactly one of srv or name"),
    ({"name": "x"}, "name needs port"),
    ({"srv": "_a._tcp.x", "port": 80}, "srv records carry their own port"),
    ({"srv": "_a._tcp.x"}, None),
    ({"name": "x", "port": 80, "resolver": "127.0.0.1:53"}, None),
])
def test_config_rules(config: dict[str, object], problem: str | None) -> None:
    dns_config = DnsDiscoveryConfig.model_validate(config)
    found = dns_problem(dns_config)
    assert (found is None) if problem is None else (found is not None and problem in found)
    if problem is not None:
        with pytest.raises(ValueError, match=problem):
            DnsSource(dns_config)


def test_a_source_describes_what_it_watches() -> None:
    source = DnsSource(DnsDiscoveryConfig.model_validate({"srv": "_a._tcp.x", "resolver": "127.0.0.1:5353"}))
    assert source.describe == "SRV _a._tcp.x via 127.0.0.1:5353"
    assert source.resolver.nameservers == ["127.0.0.1"] and source.resolver.port == 5353


def test_check_reports_discovery_rules_with_their_line() -> None:
    from pointsman.config.loader import ConfigError, load_text

    text = ("listeners: [{name: lb, bind: '127.0.0.1:1', pool: p}]\n"
            "pools:\n"
            "  - name: p\n"
            "    backends: [{address: '127.0.0.1:2'}]\n"
            "    discovery:\n"
            "      dns: {name: web.example}\n"
            "  - name: q\n"
            "    backends: [{address: '127.0.0.1:2'}]\n"
            "    discovery: {}\n")
    with pytest.raises(ConfigError) as raised:
        load_text(text, "c.yaml")
    assert [str(i) for i in raised.value.issues] == [
        "c.yaml:6: pools[0].discovery.dns: name needs port (A/AAAA records carry no port)",
        "c.yaml:9: pools[1].discovery: names no source: set dns, kubernetes or etcd_members",
    ]
