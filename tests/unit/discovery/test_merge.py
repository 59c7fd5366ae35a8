"""How discovered backends enter a pool (discovery/merge.py, discovery/source.py)."""

from __future__ import annotations

import yaml

from pointsman.config.loader import load_text
from pointsman.config.model import BackendConfig, PoolConfig
from pointsman.discovery.merge import change_summary, pool_backends, with_discovered
from pointsman.discovery.source import backend, canonical

CONFIG = """
listeners:
  - {name: lb, bind: "127.0.0.1:8080", pool: p}
  - {name: other, bind: "127.0.0.1:8081", pool: q}
pools:
  - name: p
    algorithm: maglev
    backends: [{name: seed, address: "127.0.0.1:9000"}]
    discovery: {dns: {srv: _x._tcp.example, min_ttl: 2s}, etcd_members: true}
  - name: q
    backends: [{address: "127.0.0.1:9100"}]
"""


def pool(**discovery: object) -> PoolConfig:
    return PoolConfig.model_validate({"name": "p", "backends": [{"name": "seed", "address": "10.0.0.1:1"}],
                                      "discovery": discovery})


def test_backend_ids_are_addresses_and_v6_is_bracketed() -> None:
    assert backend("10.0.0.2", 80).id == "10.0.0.2:80"
    assert backend("fd00::1", 80, weight=3).id == "[fd00::1]:80"
    assert backend("fd00::1", 80, weight=3).weight == 3


def test_canonical_sorts_and_deduplicates() -> None:
    found = [backend("10.0.0.3", 1), backend("10.0.0.1", 1), backend("10.0.0.3", 1, weight=5)]
    assert [b.id for b in canonical(found)] == ["10.0.0.1:1", "10.0.0.3:1"]
    assert canonical(found)[1].weight == 5  # the last answer for an id wins


def test_replacing_sources_replace_the_seed_and_members_join() -> None:
    p = pool(dns={"srv": "_x._tcp.example"}, etcd_members=True)
    assert pool_backends(p, {}) == tuple(p.backends)  # nothing found yet: the seed
    dns = (backend("10.0.0.9", 80), backend("10.0.0.8", 80))
    members = (backend("10.0.0.8", 80), backend("10.0.0.7", 80))
    got = pool_backends(p, {"dns": dns, "etcd_members": members})
    assert [b.id for b in got] == ["10.0.0.8:80", "10.0.0.9:80", "10.0.0.7:80"]


def test_members_join_the_configured_backends() -> None:
    p = pool(etcd_members=True)
    got = pool_backends(p, {"etcd_members": (backend("10.0.0.7", 80),)})
    assert [b.id for b in got] == ["seed", "10.0.0.7:80"]
    assert pool_backends(p, {"etcd_members": ()}) == tuple(p.backends)


def test_with_discovered_is_none_when_nothing_changes() -> None:
    config = load_text(CONFIG)
    assert with_discovered(config, {}) is None
    assert with_discovered(config, {"p": {}}) is None


def test_with_discovered_validates_as_a_file() -> None:
    config = load_text(CONFIG)
    found = {"p": {"dns": (backend("127.0.0.2", 80, weight=7),),
                   "etcd_members": (backend("127.0.0.3", 81),)}}
    data = with_discovered(config, found)
    assert data is not None
    merged = load_text(yaml.safe_dump(data))
    assert [(b.id, b.weight) for b in merged.pool("p").backends] == [("127.0.0.2:80", 7),
                                                                      ("127.0.0.3:81", 1)]
    # Everything else is the same config, defaults included.
    assert merged.pool("q") == config.pool("q")
    assert merged.pool("p").discovery == config.pool("p").discovery
    assert merged.listeners == config.listeners


def test_change_summary() -> None:
    old = [BackendConfig.model_validate({"address": "10.0.0.1:1"}), backend("10.0.0.2", 1)]
    new = [backend("10.0.0.2", 1, weight=4), backend("10.0.0.3", 1)]
    assert change_summary(old, new) == "+10.0.0.3:1 -10.0.0.1:1 ~10.0.0.2:1 weight 1->4 (2 backends)"
    assert change_summary(new, new) == "no change (2 backends)"
